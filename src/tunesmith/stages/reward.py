"""Reward model: a scalar head on the base learns which of two replies people preferred.

    tunesmith train examples/rlhf/reward.yaml

Each pair is rendered twice through the chat template, as at inference (prompt + chosen,
prompt + rejected); the model scores each at its last real token, and the Bradley-Terry loss
-log sigmoid(score_chosen - score_rejected) pushes the preferred one up. The base trains fully,
with frozen layers, or through LoRA (the head itself always trains). Held-out pairs are
scored before and after: pairwise accuracy (chosen above rejected), mean margin, and a
histogram of margins (margins.png).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

from tunesmith.config import Recipe
from tunesmith.data.preferences import PairRow, render_pairs
from tunesmith.data.render import IGNORE, PackedRow, collate, pack_groups
from tunesmith.evaluate.plots import margin_histogram
from tunesmith.files import write_text_atomic
from tunesmith.models import load_model
from tunesmith.rewards import last_token_scores
from tunesmith.tuning import count_parameters
from tunesmith.stages.common import (build_model, check_output_dir, load_pair_split, open_base, open_output_dir,
                                     memory_report, save_final, training_progress, write_summary)


def pair_batch(rows: list[PairRow], pad_id: int, device: torch.device, pack_length: int | None = None) -> dict[str, torch.Tensor]:
    """Chosen sides (sequences 0..n-1), then rejected (n..2n-1), as one batch.

    With `pack_length` the sequences are packed into rows of that many tokens (position ids restart
    at each, so attention never crosses them): no compute is spent on padding. `segments` gives the
    sequence of every position (-1 on padding), `ends` the (row, column) of each sequence's last
    token, `reply_tokens` each sequence's number of reply tokens."""
    sides = [r.chosen for r in rows] + [r.rejected for r in rows]
    lengths = [len(s.input_ids) for s in sides]
    groups = pack_groups(lengths, pack_length) if pack_length else [[i] for i in range(len(sides))]
    packed, segments, ends = [], [], [(0, 0)] * len(sides)
    for r, group in enumerate(groups):
        row, segment = PackedRow([], [], []), []
        for i in group:
            row.input_ids += sides[i].input_ids
            row.labels += sides[i].labels
            row.position_ids += list(range(lengths[i]))
            segment += [i] * lengths[i]
            ends[i] = (r, len(row.input_ids) - 1)
        packed.append(row)
        segments.append(segment)
    batch = collate(packed, pad_id)
    width = batch["input_ids"].shape[1]
    batch["segments"] = torch.tensor([seg + [-1] * (width - len(seg)) for seg in segments])
    batch["ends"] = torch.tensor(ends)
    batch["reply_tokens"] = torch.tensor([sum(1 for label in s.labels if label != IGNORE) for s in sides],
                                         dtype=torch.float32).clamp(min=1)
    return {k: v.to(device) for k, v in batch.items()}


@dataclass
class PairScores:
    margins: list[float]
    loss: float

    @property
    def accuracy(self) -> float:
        return sum(1 for m in self.margins if m > 0) / len(self.margins) if self.margins else 0.0

    @property
    def mean_margin(self) -> float:
        return sum(self.margins) / len(self.margins) if self.margins else 0.0


class PairObjective:
    """What reward and DPO objectives share: batches of pairs, the step's loss as the mean over its pairs,
    per-step accuracy and margin of the pairs trained on, held-out scoring. Subclasses give `pair_losses`
    (per-pair loss and margin) and `metric_names` (how the step's accuracy and margin are logged)."""

    eval_key = "eval_loss"
    metric_names = ("accuracy", "margin")

    def __init__(self, pad_id: int, pack_length: int | None = None) -> None:
        self.pad_id, self.pack_length = pad_id, pack_length
        self._seen: list[float] = []  # margins of the pairs trained on since the last step_metrics()

    def rows_of(self, rows: list) -> list[PairRow]:
        return rows

    def batch(self, rows: list, device: torch.device) -> dict[str, torch.Tensor]:
        return pair_batch(self.rows_of(rows), self.pad_id, device, self.pack_length)

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["ends"].shape[0] // 2

    def pair_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        losses, margins = self.pair_losses(model, batch)
        self._seen += margins.tolist()
        return losses.sum()

    def tokens(self, rows: list) -> int:
        return sum(len(r.chosen.input_ids) + len(r.rejected.input_ids) for r in self.rows_of(rows))

    def step_metrics(self) -> dict:
        seen, self._seen = self._seen, []
        if not seen:
            return {}
        accuracy, margin = self.metric_names
        return {accuracy: round(sum(m > 0 for m in seen) / len(seen), 4), margin: round(sum(seen) / len(seen), 5)}

    @torch.no_grad()
    def score(self, model: torch.nn.Module, rows: list, batch_size: int, device: torch.device,
              autocast_bf16: bool = False, max_batches: int | None = None) -> PairScores:
        was_training = model.training
        model.eval()
        margins, total = [], 0.0
        for n, start in enumerate(range(0, len(rows), batch_size)):
            if max_batches is not None and n >= max_batches:
                break
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
                losses, got = self.pair_losses(model, self.batch(rows[start : start + batch_size], device))
            total += float(losses.sum())
            margins += got.tolist()
        model.train(was_training)
        return PairScores(margins, total / max(len(margins), 1))

    def evaluate(self, model, rows, batch_size, device, autocast_bf16, max_batches) -> float:
        return self.score(model, rows, batch_size, device, autocast_bf16, max_batches).loss


class RewardObjective(PairObjective):
    """Bradley-Terry: -log sigmoid(score_chosen - score_rejected), plus the optional centring penalty."""

    def __init__(self, pad_id: int, center_rewards: float = 0.0, pack_length: int | None = None) -> None:
        super().__init__(pad_id, pack_length)
        self.center = center_rewards

    def pair_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        chosen, rejected = last_token_scores(model, batch).chunk(2)
        losses = -F.logsigmoid(chosen - rejected)
        if self.center:
            losses = losses + self.center * (chosen + rejected) ** 2
        return losses, (chosen - rejected).detach()


def run(recipe: Recipe, console: Console, resume: bool = False, overwrite: bool = False) -> dict:
    from tunesmith.stages.loop import Loop, read_metrics

    # 1. Check everything before touching the output folder.
    check_output_dir(recipe, resume, overwrite)
    train_pairs, held_pairs, skipped = load_pair_split(recipe)
    base = open_base(recipe)
    training = recipe.training
    rendered = render_pairs(base.tokenizer, train_pairs, training.max_length, recipe.data.overlong)
    held = render_pairs(base.tokenizer, held_pairs, training.max_length).rows if held_pairs else []
    console.print(f"data: {len(train_pairs):,} train / {len(held_pairs):,} held-out pairs; skipped {skipped}, "
                  f"truncated {rendered.truncated}, dropped {rendered.dropped}")

    # 2. The base with a scalar head (seeded: the new head's init is part of the run).
    out = open_output_dir(recipe, resume, overwrite)
    torch.manual_seed(training.seed)
    scorer = load_model(base.folder, recipe.model, base.runtime, scalar_head=True)
    scorer.config.pad_token_id = base.tokenizer.pad_token_id
    model, _ = build_model(recipe, base, model=scorer, task_type="SEQ_CLS")
    _head_trains(model)
    report = count_parameters(model)
    console.print(f"[bold]{report}[/bold] ({recipe.tuning.method}; the score head always trains)")

    objective = RewardObjective(base.tokenizer.pad_token_id, recipe.reward.center_rewards, training.max_length)
    device = base.runtime.torch_device
    loop = Loop(model, rendered.rows, held, training, out, base.tokenizer.pad_token_id, device,
                base.runtime.autocast_bf16, objective=objective)
    start = loop.resume() if resume else 0
    before_path = out / "heldout_before.json"
    if start:
        console.print(f"resumed from step {start} of {loop.plan.total_steps}")
        before = PairScores(**json.loads(before_path.read_text())) if before_path.is_file() else None
    else:
        loop.metrics_path.unlink(missing_ok=True)
        before = None
        if held:
            with console.status("scoring held-out pairs before training..."):
                before = objective.score(model, held, training.micro_batch_size, device, base.runtime.autocast_bf16)
            write_text_atomic(before_path, json.dumps({"margins": before.margins, "loss": before.loss}))
            loop.log({"step": 0, "eval_loss": round(before.loss, 6)})
            console.print(f"held-out before: accuracy {before.accuracy:.3f}, mean margin {before.mean_margin:+.3f}")

    # 3. Train; score the held-out pairs again.
    with training_progress(console, loop.plan.total_steps, start) as on_record:
        loop.on_step = on_record
        result = loop.run()
    after = None
    if held:
        with console.status("scoring held-out pairs after training..."):
            after = objective.score(model, held, training.micro_batch_size, device, base.runtime.autocast_bf16)
        loop.log({"step": loop.step, "eval_loss": round(after.loss, 6), "final": True})
        result.eval_losses.append((loop.step, after.loss))
        margin_histogram(out / "margins.png", {"before": before.margins if before else [], "after": after.margins},
                         f"reward model · held-out margins ({len(held):,} pairs)")

    summary = {
        "stage": "reward", "method": recipe.tuning.method, "base": recipe.model.path,
        "train_pairs": len(rendered.rows), "heldout_pairs": len(held), "skipped_rows": skipped,
        "truncated": rendered.truncated, "dropped": rendered.dropped,
        "trainable_parameters": report.trainable, "total_parameters": report.total,
        "steps": result.steps, "tokens": result.tokens, "train_seconds": round(result.seconds, 1),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "accuracy_before": _round(before and before.accuracy), "accuracy_after": _round(after and after.accuracy),
        "margin_before": _round(before and before.mean_margin), "margin_after": _round(after and after.mean_margin),
        "eval_loss_before": _round(before and before.loss), "eval_loss_after": _round(after and after.loss),
        "train_accuracy_last": next((r["accuracy"] for r in reversed(read_metrics(loop.metrics_path))
                                     if "accuracy" in r), None),
    }
    summary["files"] = save_final(model, base.tokenizer, out)
    summary.update(memory_report())
    write_summary(out, summary, result.train_losses, result.eval_losses,
                  f"reward · {recipe.tuning.method} · {Path(recipe.model.path).name}",
                  ylabel="Bradley-Terry loss per pair", eval_label="held-out loss")
    return summary


def _head_trains(model: torch.nn.Module) -> None:
    """The new score head must learn under every tuning method (PEFT's SEQ_CLS task already trains its copy)."""
    if not hasattr(model, "peft_config"):
        model.score.requires_grad_(True)


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)
