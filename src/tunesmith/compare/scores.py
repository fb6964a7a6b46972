"""Metrics of a route's per-example records, with seeded percentile-bootstrap intervals.

Every statistic is written over an array of example indices, so the point value (all examples once) and
each bootstrap resample are the same code; the same seed resamples the same examples for every route.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tunesmith.evaluate.metrics import bootstrap_ci

Statistic = Callable[[np.ndarray], np.ndarray]
NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "rouge_l": "ROUGE-L F1", "token_f1": "token F1",
         "eval_loss": "eval loss", "answer_accuracy": "answer accuracy", "recall_at_k": "recall@k"}


def _mean(values: list[float]) -> Statistic:
    array = np.asarray(values, dtype=float)
    return lambda rows: array[rows].mean(axis=1)


def _macro_f1(records: list[dict], labels: list[str]) -> Statistic:
    true = np.array([labels.index(r["true"]) for r in records])
    pred = np.array([labels.index(r["predicted"]) for r in records])

    def statistic(rows: np.ndarray) -> np.ndarray:
        t, p = true[rows], pred[rows]
        f1 = []
        for k in range(len(labels)):
            tp = ((t == k) & (p == k)).sum(axis=1)
            wrong = ((t == k) != (p == k)).sum(axis=1)  # false positives + false negatives
            f1.append(np.where(tp > 0, 2 * tp / np.maximum(2 * tp + wrong, 1), 0.0))
        return np.mean(f1, axis=0)

    return statistic


def _ratio(numerators: list[float], denominators: list[float]) -> Statistic:
    top, bottom = np.asarray(numerators, dtype=float), np.asarray(denominators, dtype=float)
    return lambda rows: top[rows].sum(axis=1) / np.maximum(bottom[rows].sum(axis=1), 1)


def statistic(metric: str, records: list[dict], labels: list[str]) -> tuple[Statistic, int] | None:
    """(statistic over index rows, number of examples it reads), or None when the records do not carry it."""
    if not records:
        return None
    if metric in ("accuracy", "answer_accuracy"):
        return _mean([float(r["correct"]) for r in records]), len(records)
    if metric == "macro_f1":
        return _macro_f1(records, labels), len(records)
    if metric in ("rouge_l", "token_f1"):
        return _mean([r[metric] for r in records]), len(records)
    if metric == "eval_loss":
        return _ratio([r["loss_sum"] for r in records], [r["loss_tokens"] for r in records]), len(records)
    if metric == "recall_at_k":
        recalls = [r["recall"] for r in records if "recall" in r]
        return (_mean(recalls), len(recalls)) if recalls else None
    raise ValueError(f"unknown metric {metric}")


def value(metric: str, records: list[dict], labels: list[str]) -> float | None:
    found = statistic(metric, records, labels)
    if found is None:
        return None
    fn, n = found
    return float(fn(np.arange(n)[None])[0])


def interval(metric: str, records: list[dict], labels: list[str], resamples: int, level: float,
             seed: int = 0) -> tuple[float, float] | None:
    found = statistic(metric, records, labels)
    if found is None:
        return None
    fn, n = found
    return bootstrap_ci(fn, n, resamples, level, seed)


# --- one row per route ---------------------------------------------------------------------------

LABELS = {"zero_shot": "zero-shot", "few_shot": "few-shot", "rag": "RAG", "classifier_frozen": "classifier (frozen)",
          "classifier_lora": "classifier + LoRA", "lora_sft": "LoRA SFT", "freeze": "partial freeze", "full": "full fine-tune",
          "hybrid": "LoRA SFT + RAG"}


@dataclass
class RouteRow:
    name: str
    status: str  # ran | cached | failed
    error: str | None = None
    value: float | None = None  # the primary metric
    low: float | None = None
    high: float | None = None
    secondary: dict[str, float] = field(default_factory=dict)
    examples: int = 0
    train_seconds: float = 0.0
    inference_seconds: float = 0.0
    trainable_parameters: int = 0
    peak_rss_bytes: int = 0
    artifact_bytes: int = 0
    wall_seconds: float = 0.0
    details: dict = field(default_factory=dict)
    predicted: dict[str, int] = field(default_factory=dict)  # classification and QA: how often each answer was given

    @property
    def label(self) -> str:
        return LABELS[self.name]

    @property
    def cost_seconds(self) -> float:
        """What the route costs in time: making it ready plus answering the test set."""
        return self.train_seconds + self.inference_seconds

    @property
    def per_example_ms(self) -> float:
        return 1000 * self.inference_seconds / self.examples if self.examples else 0.0


def summarize(runs, primary: str, others: tuple[str, ...], labels: list[str], resamples: int,
              level: float) -> list[RouteRow]:
    """A RouteRow per route run: the primary metric with its interval, the other metrics, the costs."""
    rows = []
    for run in runs:
        if run.result is None:
            rows.append(RouteRow(run.name, run.status, run.error))
            continue
        r, records = run.result, run.result["records"]
        ci = interval(primary, records, labels, resamples, level)
        secondary = {m: v for m in others if m != primary and (v := value(m, records, labels)) is not None}
        rows.append(RouteRow(
            run.name, run.status, None, value(primary, records, labels), *(ci or (None, None)), secondary,
            r["examples"], r["train_seconds"], r["inference_seconds"], r["trainable_parameters"], r["peak_rss_bytes"],
            r["artifact_bytes"], r["wall_seconds"], r["details"], _answer_counts(records, labels)))
    return rows


def _answer_counts(records: list[dict], labels: list[str]) -> dict[str, int]:
    """Every label (or yes/no/maybe) with how often it was predicted; "no label" for answers stating none."""
    if not records or "predicted" not in records[0]:
        return {}
    names = list(labels) or ["yes", "no", "maybe"]
    counts = {name: sum(r["predicted"] == name for r in records) for name in names}
    missing = sum(r["predicted"] is None for r in records)
    return {**counts, "no label": missing} if missing else counts
