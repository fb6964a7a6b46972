"""Load trained outputs (full models or PEFT adapters on their base) and merge adapters into their base.

An adapter folder is standard PEFT (adapter_config.json + adapter_model.safetensors), so
vLLM and others load it too; tunesmith also keeps the recipe beside it, which names the
base in tunesmith's own terms (a built-in name, a GGUF, a folder).
"""

from __future__ import annotations

import json
import re
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
    model = _read_yaml(adapter_dir / "recipe.yaml").get("model")
    if model:
        return ModelConfig.model_validate(model)
    base = _read_json(adapter_dir / ADAPTER_CONFIG).get("base_model_name_or_path")
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


# --- the registry: named adapters on disk ---------------------------------------------------

ENTRY_FILE = "entry.json"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def registry_dir() -> Path:
    from tunesmith.models import tunesmith_home

    return tunesmith_home() / "adapters"


def check_name(name: str) -> str:
    """Letters, digits and -_. only (no path separators, no leading dot): a name is never a path."""
    if not NAME_PATTERN.match(name) or ".." in name:
        raise TunesmithError(f"adapter name {name!r}: use 1-64 letters, digits, '-', '_' or '.', starting with a "
                             "letter or digit")
    return name


@dataclass(frozen=True)
class Entry:
    name: str
    base: str
    task: str
    created: str
    size_bytes: int
    source: str
    metrics: dict


def add_adapter(source: str | Path, name: str | None = None, task: str | None = None, replace: bool = False,
                root: Path | None = None) -> Entry:
    """Copy a PEFT adapter folder (a tunesmith LoRA run, or any PEFT adapter) into the registry under `name`."""
    import datetime
    import shutil

    source = Path(source)
    if not is_adapter_dir(source):
        raise TunesmithError(f"{source}: no {ADAPTER_CONFIG} here; give the output folder of a LoRA run or a PEFT adapter")
    name = check_name(name or source.resolve().name)
    root = root or registry_dir()
    target = root / name
    if target.exists() and not replace:
        raise TunesmithError(f"adapter {name!r} is already registered; pass --replace or choose another --name")
    base = adapter_base(source).path
    recipe = _read_yaml(source / "recipe.yaml")
    summary = _read_json(source / "summary.json")
    kept = ("eval_loss_before", "eval_loss_after", "perplexity_after", "steps", "tokens")
    with building_dir(target) as tmp:
        for path in source.iterdir():
            if path.is_file():
                shutil.copy2(path, tmp / path.name)
        size = sum(p.stat().st_size for p in tmp.iterdir() if p.name.startswith("adapter_model"))
        entry = Entry(name=name, base=base, task=task or recipe.get("stage") or "unknown",
                      created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      size_bytes=size, source=str(source.resolve()),
                      metrics={k: summary[k] for k in kept if k in summary})
        (tmp / ENTRY_FILE).write_text(json.dumps(entry.__dict__, indent=2) + "\n")
    return entry


def list_adapters(root: Path | None = None) -> list[Entry]:
    root = root or registry_dir()
    if not root.is_dir():
        return []
    return [Entry(**_read_json(p / ENTRY_FILE)) for p in sorted(root.iterdir()) if (p / ENTRY_FILE).is_file()]


def get_adapter(name: str, root: Path | None = None) -> Entry:
    path = (root or registry_dir()) / check_name(name)
    if not (path / ENTRY_FILE).is_file():
        known = ", ".join(e.name for e in list_adapters(root)) or "none yet"
        raise TunesmithError(f"adapter {name!r} is not registered (registered: {known}); add it with "
                             "`tunesmith adapters add RUN_DIR --name NAME`")
    return Entry(**_read_json(path / ENTRY_FILE))


def remove_adapter(name: str, root: Path | None = None) -> Entry:
    import shutil

    entry = get_adapter(name, root)
    shutil.rmtree((root or registry_dir()) / entry.name)
    return entry


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _read_yaml(path: Path) -> dict:
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}
