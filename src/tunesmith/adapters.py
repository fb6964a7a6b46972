"""Load trained outputs (full models or PEFT adapters on their base) and merge adapters into their base.

An adapter folder is standard PEFT (adapter_config.json + adapter_model.safetensors), so
vLLM and others load it too; tunesmith also keeps the recipe beside it, which names the
base in tunesmith's own terms (a built-in name, a GGUF, a folder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from tunesmith.config import ModelConfig
from tunesmith.errors import TunesmithError
from tunesmith.files import building_dir
from tunesmith.models import load_model, load_tokenizer, pick_runtime, resolve_base

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

ADAPTER_CONFIG = "adapter_config.json"
MERGE_PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
]


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(adapter_dir: Path) -> ModelConfig:
    """The base an adapter was trained on: from its recipe, else from its PEFT config."""
    recipe = adapter_dir / "recipe.yaml"
    if recipe.is_file():
        model = (yaml.safe_load(recipe.read_text()) or {}).get("model")
        if model:
            return ModelConfig.model_validate(model)
    base = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise TunesmithError(f"{adapter_dir / ADAPTER_CONFIG}: base_model_name_or_path: missing; cannot find the base")
    return ModelConfig(path=base)


def load_trained(spec: str | Path, device: str = "auto") -> tuple["torch.nn.Module", "PreTrainedTokenizerBase"]:
    """Load anything tunesmith can answer with: a built-in name, an HF folder, a GGUF, or an adapter folder."""
    path = Path(spec)
    if path.is_dir() and is_adapter_dir(path):
        from peft import PeftModel

        config = adapter_base(path).model_copy(update={"device": device})
        base = load_model(resolve_base(config), config, pick_runtime(config))
        model = PeftModel.from_pretrained(base, path)
        return model, load_tokenizer(path)
    config = ModelConfig(path=str(spec), device=device)
    folder = resolve_base(config)
    return load_model(folder, config, pick_runtime(config)), load_tokenizer(folder)


@dataclass(frozen=True)
class MergeReport:
    out_dir: Path
    max_abs_diff: float
    prompts: int


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, tolerance: float = 1e-3,
                  overwrite: bool = False) -> MergeReport:
    """Fold a LoRA adapter into its base, check merged == base+adapter on a few prompts, save standalone."""
    import torch

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not is_adapter_dir(adapter_dir):
        raise TunesmithError(f"{adapter_dir}: no {ADAPTER_CONFIG} here; give the output folder of a LoRA run")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise TunesmithError(f"{out_dir}: folder is not empty; choose another --out or pass --overwrite")
    model, tokenizer = load_trained(adapter_dir, device="cpu")
    model.eval()
    batch = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in MERGE_PROMPTS]
    with torch.no_grad():
        unmerged = [model(input_ids=torch.tensor([ids])).logits for ids in batch]
        merged_model = model.merge_and_unload()
        merged = [merged_model(input_ids=torch.tensor([ids])).logits for ids in batch]
    diff = max(float((a - b).abs().max()) for a, b in zip(unmerged, merged))
    if not diff <= tolerance:
        raise TunesmithError(
            f"{adapter_dir}: merged model differs from base + adapter by {diff:.3g} in logits (tolerance {tolerance}); "
            "not saved"
        )
    with building_dir(out_dir) as tmp:
        merged_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return MergeReport(out_dir, diff, len(MERGE_PROMPTS))
