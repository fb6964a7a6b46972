"""Batched generation where every row may use a different LoRA adapter (or none).

One base model stays in memory with any number of adapters loaded into one PEFT model;
requests decoded together pass PEFT's per-row `adapter_names`, so a batch can mix
adapters. Each row has its own sampling settings (greedy, temperature, top-p, seed), stop
strings and token budget. Prompts are left-padded; a KV cache makes each step cost one token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tunesmith.errors import TunesmithError

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass
class Request:
    prompt_ids: list[int]
    adapter: str | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (end token or stop string) or "length"
    prompt_tokens: int


def choose_token(logits: torch.Tensor, request: Request, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0; otherwise sample from the temperature-scaled, top-p-truncated distribution."""
    if request.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / request.temperature, dim=-1)
    if request.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < request.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer, requests: list[Request],
             on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
    """Decode all requests together; `on_text(row, text)` receives each row's new text as it appears."""
    loaded = set(getattr(model, "peft_config", {}))
    for r in requests:
        if r.adapter is not None and r.adapter not in loaded:
            raise TunesmithError(f"adapter {r.adapter!r} is not loaded")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    width = max(len(r.prompt_ids) for r in requests)
    ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in requests], device=device)
    mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in requests], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    extra = {"adapter_names": [r.adapter or BASE for r in requests]} if loaded else {}
    generators = [torch.Generator(device="cpu").manual_seed(r.seed) if r.seed is not None else None for r in requests]
    stop_ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stop_ids.update(configured if isinstance(configured, list) else [configured])
    stop_ids.discard(None)

    from transformers import DynamicCache

    cache = DynamicCache()
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                   use_cache=True, **extra).logits[:, -1].float().cpu()
    tokens: list[list[int]] = [[] for _ in requests]
    texts = [""] * len(requests)
    finish: list[str | None] = [None] * len(requests)
    for _ in range(max(r.max_tokens for r in requests)):
        step = []
        for i, request in enumerate(requests):
            if finish[i]:
                step.append(pad)
                continue
            token = choose_token(logits[i], request, generators[i])
            step.append(token)
            if token in stop_ids:
                finish[i] = "stop"
                continue
            tokens[i].append(token)
            text = tokenizer.decode(tokens[i], skip_special_tokens=True)
            cut = min((text.find(s) for s in request.stop if s and s in text), default=-1)
            if cut >= 0:
                text, finish[i] = text[:cut], "stop"
            elif len(tokens[i]) >= request.max_tokens:
                finish[i] = "length"
            if text.endswith("\ufffd") and not finish[i]:
                continue  # a character split across tokens: wait for the rest
            if on_text and len(text) > len(texts[i]):
                on_text(i, text[len(texts[i]):])
            texts[i] = text
        if all(finish):
            break
        mask = torch.cat([mask, torch.ones(len(requests), 1, dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        logits = model(input_ids=torch.tensor([step], device=device).T, attention_mask=mask, position_ids=positions,
                       cache=cache, use_cache=True, **extra).logits[:, -1].float().cpu()
    return [Completion(tokens[i], texts[i], finish[i] or "length", len(r.prompt_ids)) for i, r in enumerate(requests)]
