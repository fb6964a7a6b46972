"""Batched generation where every row may use a different LoRA adapter (or none).

One base model stays in memory with any number of adapters, applied per row by
`serve.lora.MultiLora` (or, for a PEFT model, by PEFT's per-row `adapter_names`), so a batch can
mix adapters. Rows are kept sorted by adapter: each adapter's rows form one contiguous slice.
Each row has its own sampling settings (greedy, temperature, top-p, seed), stop strings and
token budget. Prompts are left-padded; a KV cache makes each step cost one token per row.

`Batch` is continuous: new rows join a running batch between steps (their prompts are
prefilled alone, then their caches are left-padded to the batch's width and stacked), and
finished rows leave at once, so a short request never waits for a long one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from tunesmith.errors import TunesmithError
from tunesmith.generate import stop_token_ids

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
    finish_reason: str  # "stop" (end token or stop string), "length", or "cancelled"
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


@dataclass
class Row:
    request: Request
    key: Any  # the caller's handle for this row, passed back in events
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # text already reported
    finish: str | None = None
    cancelled: bool = False

    def completion(self) -> Completion:
        return Completion(self.tokens, self.text, self.finish or "length", len(self.request.prompt_ids))


@dataclass
class Event:
    key: Any
    text: str  # new text since the last event for this row (may be "")
    done: Completion | None = None  # set on the row's last event


class Batch:
    """Rows decoding together; `add` joins rows between steps, `step` advances every row one token."""

    def __init__(self, model: torch.nn.Module, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stop_ids = set(stop_token_ids(tokenizer, model))
        self.rows: list[Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # [rows, columns] 1 where the cache holds a real token
        self.logits: torch.Tensor | None = None  # [rows, vocab] for each row's next token

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def adapters_in_use(self) -> set[str]:
        return {r.request.adapter for r in self.rows if r.request.adapter}

    def _loaded(self) -> set[str]:
        lora = getattr(self.model, "tunesmith_lora", None)
        return set(lora.adapters) if lora is not None else set(getattr(self.model, "peft_config", {}))

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache, adapters: list[str | None]):
        def run(**extra):
            return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                              **extra).logits[:, -1].float()

        lora = getattr(self.model, "tunesmith_lora", None)
        if lora is not None:
            with lora.rows(adapters):
                return run()
        if getattr(self.model, "peft_config", None):
            return run(adapter_names=[a or BASE for a in adapters])
        return run()

    @torch.no_grad()
    def add(self, requests: list[Request], keys: list[Any] | None = None) -> None:
        """Prefill `requests` together and join them to the running rows."""
        if not requests:
            return
        loaded = self._loaded()
        for r in requests:
            if r.adapter is not None and r.adapter not in loaded:
                raise TunesmithError(f"adapter {r.adapter!r} is not loaded")
            if not r.prompt_ids:
                raise TunesmithError("empty prompt: give at least one token")
        keys = keys if keys is not None else list(range(len(self.rows), len(self.rows) + len(requests)))
        order = sorted(range(len(requests)), key=lambda i: _adapter_key(requests[i]))
        requests, keys = [requests[i] for i in order], [keys[i] for i in order]
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.tensor([[self.pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in requests], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in requests],
                            device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = new_cache()
        logits = self._forward(ids, mask, positions, cache, [r.adapter for r in requests])
        rows = [Row(r, k, torch.Generator(device="cpu").manual_seed(r.seed) if r.seed is not None else None)
                for r, k in zip(requests, keys)]
        if not self.rows:
            self.rows, self.cache, self.mask, self.logits = rows, cache, mask, logits
            return
        old, new = self.mask.shape[1], mask.shape[1]
        for mine, theirs in zip(self._layers(self.cache), self._layers(cache)):
            mine.keys = torch.cat([_pad_left(mine.keys, new - old), _pad_left(theirs.keys, old - new)])
            mine.values = torch.cat([_pad_left(mine.values, new - old), _pad_left(theirs.values, old - new)])
        self.mask = torch.cat([F.pad(self.mask, (max(new - old, 0), 0)), F.pad(mask, (max(old - new, 0), 0))])
        self.logits = torch.cat([self.logits, logits])
        self.rows += rows
        order = sorted(range(len(self.rows)), key=lambda i: _adapter_key(self.rows[i].request))
        if order != list(range(len(self.rows))):
            self._select(order)

    def cancel(self, key: Any) -> None:
        for row in self.rows:
            if row.key == key:
                row.cancelled = True

    @torch.no_grad()
    def step(self) -> list[Event]:
        """Pick every row's next token, report new text, retire finished rows, and run the model once."""
        events = []
        logits = self.logits.cpu()
        for i, row in enumerate(self.rows):
            request = row.request
            if row.cancelled:
                row.finish = "cancelled"
            else:
                token = choose_token(logits[i], request, row.generator)
                if token in self.stop_ids:
                    row.finish = "stop"
                else:
                    row.tokens.append(token)
                    text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
                    cut = min((text.find(s) for s in request.stop if s and s in text), default=-1)
                    if cut >= 0:
                        text, row.finish = text[:cut], "stop"
                    elif len(row.tokens) >= request.max_tokens:
                        row.finish = "length"
                    if len(text) > len(row.text) and (row.finish or not text.endswith("\ufffd")):
                        events.append(Event(row.key, text[len(row.text):]))  # never half a character
                        row.text = text
            if row.finish:
                events.append(Event(row.key, "", row.completion()))
        keep = [i for i, row in enumerate(self.rows) if not row.finish]
        if len(keep) < len(self.rows):
            self._retire(keep)
        if self.rows:
            step = [row.tokens[-1] for row in self.rows]  # every row still running took a token this step
            positions = self.mask.sum(-1, keepdim=True)
            self.mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=self.mask.dtype, device=self.device)], 1)
            ids = torch.tensor([step], device=self.device).T
            self.logits = self._forward(ids, self.mask, positions, self.cache, [r.request.adapter for r in self.rows])
        return events

    def _retire(self, keep: list[int]) -> None:
        if not keep:
            self.rows, self.cache, self.mask, self.logits = [], None, None, None
            return
        self._select(keep)

    def _select(self, index_list: list[int]) -> None:
        """Keep (and order) rows by index, dropping cache columns that are padding in every kept row."""
        self.rows = [self.rows[i] for i in index_list]
        index = torch.tensor(index_list, device=self.device)
        self.mask, self.logits = self.mask[index], self.logits[index]
        start = int((self.mask.sum(0) > 0).nonzero()[0])
        self.mask = self.mask[:, start:]
        for layer in self._layers(self.cache):
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]

    @staticmethod
    def _layers(cache) -> list:
        layers = getattr(cache, "layers", None)
        if layers is None or any(type(layer).__name__ not in ("DynamicLayer", "GrowingLayer") for layer in layers):
            raise TunesmithError("continuous batching needs a model with a plain KV cache (no sliding window)")
        return layers


def _growing_layer_class():
    """A KV-cache layer with spare room: a decode step writes its token in place, where transformers'
    DynamicLayer concatenates (copying the whole cache, and touching fresh memory, at every step)."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        _k = _v = None
        _klen = _vlen = 0  # keys and values are set one after the other (merges, row selection): own lengths

        @property
        def keys(self):
            return None if self._k is None else self._k[:, :, : self._klen]

        @keys.setter
        def keys(self, value):
            self._k, self._klen = value, 0 if value is None or value.dim() < 3 else value.shape[-2]

        @property
        def values(self):
            return None if self._v is None else self._v[:, :, : self._vlen]

        @values.setter
        def values(self, value):
            self._v, self._vlen = value, 0 if value is None or value.dim() < 3 else value.shape[-2]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start, end = self._klen, self._klen + key_states.shape[-2]
            if self._k is None or self._k.dim() < 3 or end > self._k.shape[-2] or end > self._v.shape[-2] \
                    or self._k.shape[0] != key_states.shape[0]:
                room = end + max(64, end // 2)
                k = key_states.new_zeros(*key_states.shape[:2], room, key_states.shape[-1])
                v = value_states.new_zeros(*value_states.shape[:2], room, value_states.shape[-1])
                if start:
                    k[:, :, :start], v[:, :, :start] = self._k[:, :, :start], self._v[:, :, :start]
                self._k, self._v = k, v
            self._k[:, :, start:end] = key_states
            self._v[:, :, start:end] = value_states
            self._klen = self._vlen = end
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self._klen

    return GrowingLayer


_GROWING = None


def new_cache():
    """A DynamicCache whose layers grow in place (see `_growing_layer_class`)."""
    global _GROWING
    from transformers import DynamicCache

    _GROWING = _GROWING or _growing_layer_class()
    cache = DynamicCache()
    cache.layer_class_to_replicate = _GROWING
    return cache


def _adapter_key(request: Request) -> str:
    return request.adapter or ""  # the base's rows first, then each adapter's rows together


def _pad_left(states: torch.Tensor, columns: int) -> torch.Tensor:
    """Zero key/value columns on the left of [rows, heads, columns, dim] states (masked out by the attention mask)."""
    return F.pad(states, (0, 0, columns, 0)) if columns > 0 else states


def generate(model: torch.nn.Module, tokenizer, requests: list[Request],
             on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
    """Decode all requests together; `on_text(row, text)` receives each row's new text as it appears."""
    batch = Batch(model, tokenizer)
    batch.add(requests)
    done: dict[int, Completion] = {}
    while batch.rows:
        for event in batch.step():
            if on_text and event.text:
                on_text(event.key, event.text)
            if event.done:
                done[event.key] = event.done
    return [done[i] for i in range(len(requests))]
