"""Run a chained recipe: its stages in order, each from the previous stage's artifact, resumable.

    tunesmith train examples/chain_rlhf.yaml            # runs every stage
    tunesmith train examples/chain_rlhf.yaml --resume   # after a stop: skips finished stages, resumes the
                                                        # interrupted one at its last checkpoint

A stage is finished when its folder holds `summary.json` (export: `export.json`), which each stage
writes last; a folder with only `recipe.yaml` is a stage that started, and resumes at its step.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable

from tunesmith.config import Chain, ChainStep
from tunesmith.errors import TunesmithError
from tunesmith.files import write_text_atomic

EXPORT_FILE = "export.json"


def step_state(step: ChainStep) -> str:
    """'done', 'started' or 'new'."""
    folder = step.output_dir
    if (folder / ("export.json" if step.kind == "export" else "summary.json")).is_file():
        return "done"
    if (folder / "recipe.yaml").is_file():
        return "started"
    return "new"


def check_chain_dir(chain: Chain, resume: bool, overwrite: bool) -> None:
    out = chain.output_dir
    if resume and overwrite:
        raise TunesmithError("--resume and --overwrite contradict each other; pick one")
    if out.exists() and not out.is_dir():
        raise TunesmithError(f"output_dir: {out} is a file; give a folder")
    holds = out.is_dir() and any(out.iterdir())
    if holds and not resume and not overwrite:
        raise TunesmithError(f"output_dir: {out} already holds a chain run; pass --resume to continue it, --overwrite "
                             "to replace it, or choose another output_dir")
    if resume and not holds:
        raise TunesmithError(f"output_dir: {out} holds no chain run to resume; drop --resume")
    expected = {step.output_dir.name for step in chain.steps}
    stray = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name not in expected) if holds else []
    if resume and stray:
        raise TunesmithError(f"output_dir: {out} holds stage folders this chain does not have ({', '.join(stray)}); "
                             "resume with the chain that made them, or pass --overwrite")


def run_chain(chain: Chain, run_recipe: Callable[..., dict], console, resume: bool = False,
              overwrite: bool = False) -> list[dict]:
    """Run every stage not finished yet; return their summaries (finished ones read from disk)."""
    check_chain_dir(chain, resume, overwrite)
    if overwrite and chain.output_dir.is_dir():
        shutil.rmtree(chain.output_dir)
    chain.output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(chain.output_dir / "chain.json", json.dumps(
        {"chain": str(chain.path), "stages": [{"name": s.name, "stage": s.kind, "folder": s.output_dir.name}
                                              for s in chain.steps]}, indent=2) + "\n")
    summaries = []
    for n, step in enumerate(chain.steps, start=1):
        state = step_state(step)
        label = f"[bold]stage {n}/{len(chain.steps)}: {step.name}[/bold] ({step.kind}) → {step.output_dir}"
        if state == "done":
            console.print(f"{label}: finished already")
            name = EXPORT_FILE if step.kind == "export" else "summary.json"
            summaries.append(json.loads((step.output_dir / name).read_text()))
            continue
        console.rule(label)
        if step.kind == "export":
            summaries.append(export(step, console))
        else:
            summaries.append(run_recipe(step.recipe, resume=state == "started", overwrite=False))
    console.rule(f"[bold]chain finished[/bold]: {len(chain.steps)} stages in {chain.output_dir}")
    return summaries


def export(step: ChainStep, console) -> dict:
    """Merge the policy adapter into its base (checked against base + adapter) as a standalone model."""
    from tunesmith.adapters import merge_adapter

    if step.output_dir.exists():
        shutil.rmtree(step.output_dir)  # an export interrupted before export.json: redo it whole
    report = merge_adapter(step.source, step.output_dir)
    summary = {"stage": "export", "adapter": step.source, "max_abs_logit_diff": report.max_abs_diff}
    write_text_atomic(step.output_dir / EXPORT_FILE, json.dumps(summary, indent=2) + "\n")
    console.print(f"merged {step.source} into {step.output_dir} (max |logit difference| {report.max_abs_diff:.2e})")
    return summary
