"""What is trainable: the whole model, a frozen bottom (or only named modules), or LoRA adapters."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tunesmith.config import TuningConfig
from tunesmith.errors import TunesmithError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TrainableReport:
    trainable: int
    total: int

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable parameters: {self.trainable:,} of {self.total:,} ({100 * self.share:.2f}%)"


def apply_tuning(model: "torch.nn.Module", tuning: TuningConfig, task_type: str | None = "CAUSAL_LM") -> "torch.nn.Module":
    """Mark parameters trainable per the recipe; LoRA wraps the model in a PEFT model (of `task_type`)."""
    if tuning.method == "none":
        model.requires_grad_(False)
        return model
    if tuning.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if tuning.method == "freeze":
        _freeze(model, tuning)
        return model
    return _add_lora(model, tuning, task_type)


def count_parameters(model: "torch.nn.Module") -> TrainableReport:
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():  # tied weights are counted once
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return TrainableReport(trainable, total)


def _freeze(model: "torch.nn.Module", tuning: TuningConfig) -> None:
    names = [name for name, _ in model.named_parameters()]
    if tuning.trainable_modules:
        patterns = tuning.trainable_modules
        matched = {p: [n for n in names if _matches(n, p)] for p in patterns}
        missing = [p for p, hits in matched.items() if not hits]
        if missing:
            sample = ", ".join(sorted({n.rsplit(".", 1)[0] for n in names})[:6])
            raise TunesmithError(
                f"tuning.trainable_modules: {missing[0]!r} matches no parameter; names look like: {sample}, ..."
            )
        keep = {n for hits in matched.values() for n in hits}
    else:
        prefix, layers = layer_list(model)
        first_trained = tuning.freeze_layers or len(layers) - tuning.top_layers
        field = "freeze_layers" if tuning.freeze_layers else "top_layers"
        if not 0 <= first_trained <= len(layers):
            raise TunesmithError(
                f"tuning.{field}: {getattr(tuning, field)} is more than the model's {len(layers)} layers"
            )
        # Parameters come in module order: embeddings, the blocks, then what sits on top (final norm).
        # The blocks from `first_trained` up, and everything above them, train.
        block_of = {name: int(name[len(prefix) + 1 :].split(".", 1)[0]) for name in names if name.startswith(prefix + ".")}
        last_block_param = max(i for i, name in enumerate(names) if name in block_of)
        keep = {
            name for i, name in enumerate(names)
            if block_of.get(name, -1) >= first_trained or (name not in block_of and i > last_block_param)
        }
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)


def _matches(name: str, pattern: str) -> bool:
    # A pattern is a glob over parameter names, or a dotted module path matched at a boundary.
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return f".{name}.".find(f".{pattern.strip('.')}.") >= 0


def layer_list(model: "torch.nn.Module") -> tuple[str, "torch.nn.ModuleList"]:
    """The longest ModuleList is the stack of transformer blocks, whatever the architecture calls it."""
    import torch

    best: tuple[str, torch.nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise TunesmithError("tuning.freeze_layers: this model has no list of layers; use tuning.trainable_modules")
    return best


def _add_lora(model: "torch.nn.Module", tuning: TuningConfig, task_type: str | None) -> "torch.nn.Module":
    from peft import LoraConfig, get_peft_model

    lora = tuning.lora
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, use_dora=lora.dora,
        target_modules=lora.target_modules, task_type=task_type, bias="none",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise TunesmithError(f"tuning.lora.target_modules: {exc}") from None
