"""Generate answers with a loaded model: one chat turn (optionally streamed) or a batch of prompts.

Prompts are rendered with the same chat template that training used (saved with every
model and adapter), and generation stops at the template's end-of-turn token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


def chat_prompt_ids(tokenizer: "PreTrainedTokenizerBase", messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_token_ids(tokenizer: "PreTrainedTokenizerBase", model: "torch.nn.Module") -> list[int]:
    """The tokenizer's end token and every end token the model's generation config names."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def generate_reply(model: "torch.nn.Module", tokenizer: "PreTrainedTokenizerBase", messages: list[dict[str, str]],
                   max_new_tokens: int = 128, temperature: float = 0.0,
                   on_text: Callable[[str], None] | None = None) -> str:
    """Answer the last user turn; greedy when temperature is 0. `on_text` receives text as it streams."""
    import torch
    from transformers import TextIteratorStreamer

    device = next(model.parameters()).device
    ids = torch.tensor([chat_prompt_ids(tokenizer, messages)], device=device)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                  eos_token_id=stop_token_ids(tokenizer, model), pad_token_id=tokenizer.pad_token_id,
                  do_sample=temperature > 0)
    if temperature > 0:
        kwargs["temperature"] = temperature
    else:  # greedy: silence the model's sampling defaults
        kwargs.update(temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    try:
        if on_text is None:
            with torch.no_grad():
                out = model.generate(**kwargs)
            return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        import threading

        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

        def work() -> None:
            with torch.no_grad():
                model.generate(**kwargs, streamer=streamer)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        parts = []
        for text in streamer:
            parts.append(text)
            on_text(text)
        thread.join()
        return "".join(parts).strip()
    finally:
        model.train(was_training)


def generate_batch(model: "torch.nn.Module", tokenizer: "PreTrainedTokenizerBase", conversations: list[list[dict[str, str]]],
                   max_new_tokens: int = 128, batch_size: int = 8) -> list[str]:
    """Greedy answers for many prompts, left-padded in batches (much faster than one by one)."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    answers: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(conversations), batch_size):
            prompts = [chat_prompt_ids(tokenizer, c) for c in conversations[start : start + batch_size]]
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     eos_token_id=stop_token_ids(tokenizer, model), pad_token_id=pad, do_sample=False,
                                     temperature=None, top_p=None, top_k=None)
            answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    finally:
        model.train(was_training)
    return answers
