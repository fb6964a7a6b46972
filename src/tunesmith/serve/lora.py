"""Many LoRA adapters on one base at run time, each row of a batch with its own adapter.

PEFT can run a mixed batch (`adapter_names`), but every LoRA layer then loops over the adapters
with advanced indexing (a gather and a scatter per adapter per layer); with 8 adapters in a batch
that measured 0.56x the single-adapter throughput (docs/benchmarks.md). Here each wrapped Linear
keeps all adapters stacked in slots (A rows and scaled B^T rows, ranks zero-padded to the largest).
The engine keeps its rows sorted by adapter, so each adapter's rows are one contiguous slice:
prefill and few-adapter steps add `(x[s:e] @ A.T) @ (scale B^T)` into the output slice in place,
two GEMMs per adapter and no copies; a decode step with many adapters gathers its rows per slot
(one token each: a few KB) and runs two batched GEMMs over the used slots, so the cost is reading
each adapter's weights once, with a handful of ops per layer whatever the adapter count. Adapters
are read from standard PEFT folders (the same files vLLM loads); the result is
checked against PEFT's own mixed batch in tests/serve/test_lora.py.

Supported: LoRA on Linear layers, per-module ranks and alphas (rank_pattern, alpha_pattern),
rsLoRA. Refused with a clear error (serve those merged): DoRA, modules_to_save, trained biases,
embedding or conv targets.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from tunesmith.errors import TunesmithError

PREFIX = "base_model.model."


class LoraLinear(nn.Module):
    """A base Linear plus the adapters' weights, stacked: slot k holds rows [k*R, (k+1)*R) of `a` and `bt`."""

    def __init__(self, base: nn.Linear, owner: "MultiLora") -> None:
        super().__init__()
        self.base, self.owner = base, owner
        like = base.weight
        self.set_stacks(torch.zeros(0, base.in_features, dtype=like.dtype, device=like.device),  # A, rows per slot
                        torch.zeros(0, base.out_features, dtype=like.dtype, device=like.device), 1)  # scale * B^T

    def set_stacks(self, a: torch.Tensor, bt: torch.Tensor, rank: int) -> None:
        self.a, self.bt = a, bt
        self.a_t = a.view(-1, rank, a.shape[1]).transpose(1, 2)  # [slots, in, R] views, made once
        self.bt_3 = bt.view(-1, rank, bt.shape[1])  # [slots, R, out]

    @property
    def weight(self) -> torch.Tensor:  # code that inspects the module (dtype, device) sees the base's
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        plan = self.owner.plan
        if plan is None or not self.a.shape[0]:
            return out
        flat_out = out.view(-1, out.shape[-1])
        if plan.grouped is not None and x.shape[1] == 1:
            # decode step, many adapters: rows gathered per slot, two batched GEMMs over the used slots
            g = plan.grouped
            a_t, bt = (self.a_t, self.bt_3) if g.whole else (self.a_t[g.first : g.last + 1], self.bt_3[g.first : g.last + 1])
            h = torch.bmm(g.gather(x), a_t)
            return flat_out.index_add_(0, g.source, torch.bmm(h, bt).view(-1, flat_out.shape[1])).view_as(out)
        tokens = x.shape[1]
        for slot, start, end in plan.runs:  # contiguous rows per adapter: two GEMMs each, no copies
            rows = x[start:end].reshape(-1, x.shape[-1])
            flat_out[start * tokens : end * tokens].addmm_(rows @ self.a_t[slot], self.bt_3[slot])
        return out


class Grouped:
    """Rows gathered per slot for a decode step: slot first+k's j-th row is row source[k*depth+j]."""

    def __init__(self, slots: list[int], adapters_rows: dict[int, list[int]], capacity: int, like: torch.Tensor) -> None:
        self.first, self.last = min(slots), max(slots)
        self.whole = self.first == 0 and self.last == capacity - 1
        self.depth = max(len(rows) for rows in adapters_rows.values())
        source, valid = [], []
        for slot in range(self.first, self.last + 1):
            rows = adapters_rows.get(slot, [])
            pad = rows[:1] or [0]  # padding re-reads a real row; `valid` zeroes it
            source += rows + pad * (self.depth - len(rows))
            valid += [1.0] * len(rows) + [0.0] * (self.depth - len(rows))
        self.source = torch.tensor(source, device=like.device)
        self.valid = None if all(valid) else torch.tensor(valid, dtype=like.dtype, device=like.device).view(-1, 1)
        self._input: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x's rows per slot, [slots, depth, in]; q/k/v (and gate/up) share one input, so it is gathered once."""
        if self._input is not x:  # identity, not address: the reference keeps x alive, so it cannot be reused
            rows = x.reshape(-1, x.shape[-1]).index_select(0, self.source)
            if self.valid is not None:
                rows.mul_(self.valid)
            self._input, self._rows = x, rows.view(self.last - self.first + 1, self.depth, -1)
        return self._rows


class Plan:
    """How the current forward pass applies adapters: runs of rows per slot, and (many runs) rows grouped by slot."""

    def __init__(self, runs: list[tuple[int, int, int]], grouped: Grouped | None) -> None:
        self.runs, self.grouped = runs, grouped


class MultiLora:
    """Wraps the base's Linear layers (once, in place) and holds adapters in numbered slots."""

    GROUPED_FROM = 3  # from this many adapter runs in a decode step, two batched GEMMs beat per-run GEMMs

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.plan: Plan | None = None
        self.layers: dict[str, LoraLinear] = {}
        self.slots: dict[str, int] = {}  # adapter name -> slot
        self.free: list[int] = []
        self.capacity = 0  # slots allocated in every layer
        self.rank = 0  # rows per slot: the largest rank loaded (smaller ranks are zero-padded)
        model.tunesmith_lora = self

    @property
    def adapters(self) -> set[str]:
        return set(self.slots)

    def load(self, name: str, folder: str | Path) -> None:
        staged = read_adapter(Path(folder), self._linear)
        if name in self.slots:
            self.unload(name)
        for path in staged:
            self._wrap(path)
        rank = max(a.shape[0] for a, _, _ in staged.values())
        if rank > self.rank or not self.free:
            self._resize(self.capacity + (0 if self.free else 1), max(rank, self.rank))
        slot = self.free.pop(0)
        rows = slice(slot * self.rank, slot * self.rank + rank)
        for path, layer in self.layers.items():
            if path in staged:
                a, b, scale = staged[path]
                layer.a[rows][: a.shape[0]] = a
                layer.bt[rows][: a.shape[0]] = b.T * scale
        self.slots[name] = slot

    def unload(self, name: str) -> None:
        slot = self.slots.pop(name, None)
        if slot is None:
            return
        rows = slice(slot * self.rank, (slot + 1) * self.rank)
        for layer in self.layers.values():
            layer.a[rows] = 0
            layer.bt[rows] = 0
        self.free.append(slot)
        self.free.sort()

    @contextmanager
    def rows(self, adapters: list[str | None]) -> Iterator[None]:
        """Within the block, row i of a forward pass uses `adapters[i]` (None: the base alone)."""
        unknown = {a for a in adapters if a is not None and a not in self.slots}
        if unknown:
            raise TunesmithError(f"adapter(s) not loaded: {', '.join(sorted(unknown))}")
        runs, start = [], 0
        for i in range(1, len(adapters) + 1):
            if i == len(adapters) or adapters[i] != adapters[start]:
                if adapters[start] is not None:
                    runs.append((self.slots[adapters[start]], start, i))
                start = i
        grouped = None
        if len(runs) >= self.GROUPED_FROM:
            per_slot: dict[int, list[int]] = {}
            for slot, first, last in runs:
                per_slot.setdefault(slot, []).extend(range(first, last))
            grouped = Grouped(sorted(per_slot), per_slot, self.capacity, next(iter(self.layers.values())).a)
        self.plan = Plan(runs, grouped) if runs else None
        try:
            yield
        finally:
            self.plan = None

    def _resize(self, capacity: int, rank: int) -> None:
        """Re-lay every layer's stacks for `capacity` slots of `rank` rows, keeping loaded adapters in their slots."""
        for layer in self.layers.values():
            stacks = []
            for old in (layer.a, layer.bt):
                new = old.new_zeros(capacity * rank, old.shape[1])
                for slot in range(self.capacity):
                    new[slot * rank : slot * rank + self.rank] = old[slot * self.rank : (slot + 1) * self.rank]
                stacks.append(new)
            layer.set_stacks(*stacks, rank)
        self.free += list(range(self.capacity, capacity))
        self.capacity, self.rank = capacity, rank

    def _linear(self, path: str, where: Path) -> nn.Linear:
        try:
            module = self.model.get_submodule(path)
        except AttributeError:
            raise TunesmithError(f"{where}: {path}: the base model has no such layer; wrong base model?") from None
        if isinstance(module, LoraLinear):
            return module.base
        if not isinstance(module, nn.Linear):
            raise TunesmithError(f"{where}: {path}: LoRA on a {type(module).__name__} is not supported at run time; "
                                 "serve this adapter merged (`tunesmith merge`)")
        return module

    def _wrap(self, path: str) -> LoraLinear:
        if path not in self.layers:
            parent_path, _, child = path.rpartition(".")
            parent = self.model.get_submodule(parent_path) if parent_path else self.model
            layer = LoraLinear(getattr(parent, child), self)
            layer.set_stacks(layer.a.new_zeros(self.capacity * self.rank, layer.a.shape[1]),
                             layer.bt.new_zeros(self.capacity * self.rank, layer.bt.shape[1]), max(self.rank, 1))
            self.layers[path] = layer
            setattr(parent, child, layer)
        return self.layers[path]


def read_adapter(folder: Path, find_linear) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """A PEFT LoRA folder as {module path: (A, B, scale)}, checked against the base's layers."""
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    check_supported(folder, config)
    files = [folder / "adapter_model.safetensors", folder / "adapter_model.bin"]
    weights_file = next((f for f in files if f.is_file()), None)
    if weights_file is None:
        raise TunesmithError(f"{folder}: no adapter_model.safetensors here")
    state = (load_file(weights_file) if weights_file.suffix == ".safetensors"
             else torch.load(weights_file, map_location="cpu", weights_only=True))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if match is None:
            raise TunesmithError(f"{weights_file}: {key}: not a LoRA A/B weight; serve this adapter merged "
                                 "(`tunesmith merge`)")
        pairs.setdefault(match.group(1).removeprefix(PREFIX), {})[match.group(2)] = tensor
    staged = {}
    for path, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise TunesmithError(f"{weights_file}: {path}: has lora_{'A' if 'A' in ab else 'B'} without its pair")
        base = find_linear(path, weights_file)
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        if a.shape != (r, base.in_features) or b.shape != (base.out_features, r):
            raise TunesmithError(f"{weights_file}: {path}: LoRA shapes {tuple(a.shape)} and {tuple(b.shape)} do "
                                 f"not fit a {base.in_features}->{base.out_features} layer; wrong base model?")
        alpha = _pattern(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8))
        rank = _pattern(config.get("rank_pattern") or {}, path, r)
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        like = base.weight
        staged[path] = (a.to(like.device, like.dtype), b.to(like.device, like.dtype), scale)
    if not staged:
        raise TunesmithError(f"{weights_file}: no LoRA weights found")
    return staged


def _pattern(patterns: dict, path: str, default):
    """PEFT's rank/alpha patterns: a key matches a module whose path ends with it (or matches it as a regex)."""
    for key, value in patterns.items():
        if path == key or path.endswith("." + key) or re.fullmatch(rf"(.*\.)?{key}", path):
            return value
    return default


def check_supported(folder: Path, config: dict) -> None:
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')} (only LORA)")
    if config.get("use_dora"):
        problems.append("DoRA")
    if config.get("modules_to_save"):
        problems.append("modules_to_save")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("trained biases")
    if config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out")
    if problems:
        raise TunesmithError(f"{folder / 'adapter_config.json'}: {', '.join(problems)} cannot be served per request; "
                             "serve this adapter merged (`tunesmith merge`)")
