"""Direct preference optimisation: learn from preference pairs offline, with no reward model and no sampling.

    tunesmith train examples/rlhf/dpo.yaml

The policy's log-probability of each reply, relative to a frozen reference, is its implicit
reward r = beta * (log p(reply) - log p_ref(reply)). `sigmoid` (DPO) minimises
-log sigmoid(r_chosen - r_rejected); `ipo` fits the length-normalised log-ratio gap to 1/(2 beta).
The reference's log-probabilities are computed once, before training, for exactly the pairs the
run will visit (and the held-out pairs) and kept in the output folder, so resuming never
recomputes them and a full fine-tune needs no second copy of the model. Under LoRA the
reference is the base with the adapter disabled, or a frozen copy of `tuning.init_adapter`.
Held-out pairs are scored at the end: reward accuracy (implicit reward of chosen above
rejected) and margins (margins.png).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress

from tunesmith.config import DpoConfig, Recipe
from tunesmith.data.preferences import PairRow, render_pairs
from tunesmith.evaluate.plots import margin_histogram
from tunesmith.files import write_text_atomic
from tunesmith.generate import generate_reply
from tunesmith.stages.common import (build_model, check_output_dir, load_pair_split, open_base, open_output_dir,
                                     memory_report, save_final, training_progress, write_summary)
from tunesmith.stages.loop import micro_batch_rows, plan_steps
from tunesmith.stages.policy import add_reference_adapter, as_reference, is_peft, sequence_logps
from tunesmith.stages.reward import PairObjective, pair_batch

REFERENCE_FILE = "reference_logps.json"


@dataclass
class DpoRow:
    pair: PairRow
    ref_chosen: float
    ref_rejected: float


class DpoObjective(PairObjective):
    """The DPO/IPO loss over pairs whose reference log-probs travel with them."""

    metric_names = ("reward_accuracy", "reward_margin")

    def __init__(self, pad_id: int, config: DpoConfig, pack_length: int | None = None) -> None:
        super().__init__(pad_id, pack_length)
        self.config = config

    def rows_of(self, rows: list[DpoRow]) -> list[PairRow]:
        return [r.pair for r in rows]

    def batch(self, rows: list[DpoRow], device: torch.device) -> dict[str, torch.Tensor]:
        batch = super().batch(rows, device)
        batch["ref"] = torch.tensor([r.ref_chosen for r in rows] + [r.ref_rejected for r in rows],
                                    dtype=torch.float32, device=device)
        return batch

    def pair_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pair loss, and per-pair implicit reward margin beta * (log-ratio chosen - log-ratio rejected)."""
        beta = self.config.beta
        logratios = sequence_logps(model, batch) - batch["ref"]
        chosen, rejected = logratios.chunk(2)
        if self.config.loss == "ipo":
            per_token = logratios / batch["reply_tokens"]
            gap = per_token.chunk(2)[0] - per_token.chunk(2)[1]
            losses = (gap - 1 / (2 * beta)) ** 2
        else:
            smoothing = self.config.label_smoothing
            delta = beta * (chosen - rejected)
            losses = -(1 - smoothing) * F.logsigmoid(delta) - smoothing * F.logsigmoid(-delta)
        return losses, (beta * (chosen - rejected)).detach()


def visited_rows(n_rows: int, recipe: Recipe) -> list[int]:
    """Indices of the training pairs the run's steps will draw (the loop's order is a function of the seed)."""
    training = recipe.training
    plan = plan_steps(n_rows, training)
    indices = list(range(n_rows))
    seen: set[int] = set()
    for micro in range(plan.total_steps * training.gradient_accumulation):
        seen.update(micro_batch_rows(indices, micro, training, plan.micro_batches_per_epoch))
    return sorted(seen)


@torch.no_grad()
def reference_logps(model, pairs: list[PairRow], pad_id: int, batch_size: int, device: torch.device,
                    progress: Progress | None = None, pack_length: int | None = None) -> list[tuple[float, float]]:
    """(chosen, rejected) reply log-probabilities under the reference, for each pair."""
    was_training = model.training
    model.eval()
    task = progress.add_task("reference log-probs", total=len(pairs)) if progress else None
    out: list[tuple[float, float]] = []
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            batch = pair_batch(chunk, pad_id, device, pack_length)
            if is_peft(model):
                with as_reference(model):
                    logps = sequence_logps(model, batch)
            else:  # a full fine-tune before its first step is its own reference
                logps = sequence_logps(model, batch)
            chosen, rejected = logps.chunk(2)
            out += list(zip(chosen.tolist(), rejected.tolist()))
            if progress:
                progress.advance(task, len(chunk))
    finally:
        model.train(was_training)
    return out


def run(recipe: Recipe, console: Console, resume: bool = False, overwrite: bool = False,
        preview_tokens: int = 48) -> dict:
    from tunesmith.stages.loop import Loop

    # 1. Check everything before touching the output folder.
    check_output_dir(recipe, resume, overwrite)
    train_pairs, held_pairs, skipped = load_pair_split(recipe)
    base = open_base(recipe)
    training, pad_id, device = recipe.training, base.tokenizer.pad_token_id, base.runtime.torch_device
    rendered = render_pairs(base.tokenizer, train_pairs, training.max_length, recipe.data.overlong)
    held = render_pairs(base.tokenizer, held_pairs, training.max_length).rows if held_pairs else []
    console.print(f"data: {len(train_pairs):,} train / {len(held_pairs):,} held-out pairs; skipped {skipped}, "
                  f"truncated {rendered.truncated}, dropped {rendered.dropped}")

    # 2. The policy, and the reference's log-probabilities (computed once; kept for resume).
    out = open_output_dir(recipe, resume, overwrite)
    model, report = build_model(recipe, base)
    if recipe.tuning.init_adapter:
        add_reference_adapter(model)
    reference = f"{recipe.tuning.init_adapter} (frozen copy)" if recipe.tuning.init_adapter else (
        "the base (adapter disabled)" if is_peft(model) else "the model before training")
    console.print(f"[bold]{report}[/bold] ({recipe.tuning.method}); reference: {reference}")
    wanted = visited_rows(len(rendered.rows), recipe)
    # Before any checkpoint is loaded the model is the reference, so a resumed run that asks for
    # more steps than the first one planned can still fill in the pairs it now visits.
    saved = out / REFERENCE_FILE
    train_refs, held_refs = {}, None
    if saved.is_file():
        cached = json.loads(saved.read_text())
        train_refs = {int(k): tuple(v) for k, v in cached["train"].items()}
        held_refs = [tuple(v) for v in cached["held"]]
    missing = [i for i in wanted if i not in train_refs]
    reference_started = time.perf_counter()
    if missing or held_refs is None:
        todo = [rendered.rows[i] for i in missing] + (held if held_refs is None else [])
        with Progress(console=console, transient=True) as progress:
            values = reference_logps(model, todo, pad_id, training.micro_batch_size, device, progress, training.max_length)
        train_refs.update(zip(missing, values[: len(missing)]))
        held_refs = held_refs if held_refs is not None else values[len(missing):]
        write_text_atomic(saved, json.dumps({"train": {str(k): v for k, v in train_refs.items()}, "held": held_refs}))
    reference_seconds = time.perf_counter() - reference_started
    rows = [DpoRow(pair, *train_refs.get(i, (float("nan"), float("nan")))) for i, pair in enumerate(rendered.rows)]
    held_rows = [DpoRow(pair, *ref) for pair, ref in zip(held, held_refs)]

    objective = DpoObjective(pad_id, recipe.dpo, training.max_length)
    loop = Loop(model, rows, held_rows, training, out, pad_id, device, base.runtime.autocast_bf16, objective=objective)
    start = loop.resume() if resume else 0
    samples_path = out / "samples.jsonl"
    prompt = (held_pairs or train_pairs)[0].prompt

    def preview() -> str:
        return generate_reply(model, base.tokenizer, prompt, max_new_tokens=preview_tokens)

    if start:
        console.print(f"resumed from step {start} of {loop.plan.total_steps}")
    else:
        loop.metrics_path.unlink(missing_ok=True)
        if held_rows:
            loop.log({"step": 0, "eval_loss": round(objective.evaluate(model, held_rows, training.micro_batch_size,
                                                                        device, base.runtime.autocast_bf16, None), 6)})
        if preview_tokens:
            write_text_atomic(samples_path, json.dumps({"when": "before", "prompt": prompt, "answer": preview()}) + "\n")

    # 3. Train; score the held-out pairs.
    with training_progress(console, loop.plan.total_steps, start) as on_record:
        loop.on_step = on_record
        result = loop.run()
    after = None
    if held_rows:
        with console.status("scoring held-out pairs..."):
            after = objective.score(model, held_rows, training.micro_batch_size, device, base.runtime.autocast_bf16)
        loop.log({"step": loop.step, "eval_loss": round(after.loss, 6), "final": True})
        result.eval_losses.append((loop.step, after.loss))
        margin_histogram(out / "margins.png", {"after": after.margins},
                         f"DPO ({recipe.dpo.loss}, beta {recipe.dpo.beta}) · held-out implicit reward margins",
                         xlabel="beta * (log-ratio chosen - log-ratio rejected)")

    summary = {
        "stage": "dpo", "method": recipe.tuning.method, "base": recipe.model.path, "loss": recipe.dpo.loss,
        "beta": recipe.dpo.beta, "reference": reference,
        "train_pairs": len(rendered.rows), "heldout_pairs": len(held_rows), "skipped_rows": skipped,
        "truncated": rendered.truncated, "dropped": rendered.dropped,
        "trainable_parameters": report.trainable, "total_parameters": report.total,
        "steps": result.steps, "tokens": result.tokens, "train_seconds": round(result.seconds, 1),
        "tokens_per_second": round(result.tokens_per_second, 1), "reference_seconds": round(reference_seconds, 1),
        "reward_accuracy": None if after is None else round(after.accuracy, 4),
        "reward_margin": None if after is None else round(after.mean_margin, 5),
        "eval_loss_before": result.eval_losses[0][1] if result.eval_losses else None,
        "eval_loss_after": None if after is None else round(after.loss, 5),
    }
    if preview_tokens:
        lines = [json.loads(x) for x in samples_path.read_text().splitlines()] if samples_path.is_file() else []
        lines = [r for r in lines if r.get("when") == "before"] + [{"when": "after", "prompt": prompt, "answer": preview()}]
        write_text_atomic(samples_path, "".join(json.dumps(r) + "\n" for r in lines))
        summary["prompt"] = prompt[-1]["content"]
        summary["answer_before"] = lines[0]["answer"] if len(lines) > 1 else None
        summary["answer_after"] = lines[-1]["answer"]
    summary["files"] = save_final(model, base.tokenizer, out)
    summary.update(memory_report())
    write_summary(out, summary, result.train_losses, result.eval_losses,
                  f"dpo ({recipe.dpo.loss}) · {recipe.tuning.method} · {Path(recipe.model.path).name}",
                  ylabel=f"{recipe.dpo.loss} loss per pair", eval_label="held-out loss")
    return summary
