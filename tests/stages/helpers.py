from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from tunesmith.config import load_recipe


def train(recipe_path: Path, overrides: list[str] = (), resume: bool = False, overwrite: bool = False,
          preview_tokens: int = 0) -> dict:
    """Run a recipe through the same path as `tunesmith train`, output captured."""
    from tunesmith.stages import dpo, pretrain, reward, rl, sft

    recipe = load_recipe(recipe_path, list(overrides))
    console = Console(file=io.StringIO(), width=120)
    if recipe.stage == "reward":
        return reward.run(recipe, console, resume=resume, overwrite=overwrite)
    if recipe.stage == "dpo":
        return dpo.run(recipe, console, resume=resume, overwrite=overwrite, preview_tokens=preview_tokens)
    if recipe.stage == "rl":
        return rl.run(recipe, console, resume=resume, overwrite=overwrite)
    if recipe.stage == "pretrain":
        return pretrain.run(recipe, console, resume=resume, overwrite=overwrite)
    return sft.run(recipe, console, resume=resume, overwrite=overwrite, preview_tokens=preview_tokens)


def losses(out_dir: Path) -> list[float]:
    from tunesmith.stages.loop import read_metrics

    return [r["loss"] for r in read_metrics(Path(out_dir) / "metrics.jsonl") if "loss" in r]
