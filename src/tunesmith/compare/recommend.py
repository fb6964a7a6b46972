"""The recommendation, computed from the measured rows and the task's "when not to fine-tune" facts.

1. The best route by the primary metric.
2. The cheapest route (train + answer seconds) whose confidence interval overlaps the best one's:
   statistically tied, and how many times cheaper.
3. Checks that argue against putting the task into weights: too little training data, data that
   changes often (knowledge belongs in retrieval), per-user context (belongs in the prompt).
4. The pick: step 2's route, unless a check rules it out; then the best route the checks allow, and
   the cheapest route tied with that one.
Nothing here is fixed text about which route wins: every sentence names measured numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunesmith.compare.scores import NAMES, RouteRow
from tunesmith.compare.task import RETRIEVAL

MIN_FINE_TUNE_EXAMPLES = 300  # below a few hundred examples fine-tuning overfits and its test estimate is noisy
FINE_TUNED = ("classifier_lora", "lora_sft", "freeze", "full", "hybrid")  # change the language model's weights
KNOWLEDGE_IN_WEIGHTS = ("classifier_frozen", "classifier_lora", "lora_sft", "freeze", "full")


@dataclass
class Recommendation:
    pick: str | None
    best: str | None
    tied: str | None  # the cheapest route tied with the best, when it is not the best itself
    lines: list[str] = field(default_factory=list)  # markdown sentences, in order


def recommend(rows: list[RouteRow], metric: str, lower_is_better: bool, n_train: int, data_changes: str,
              per_user_context: bool, has_documents: bool, level: float,
              baseline: tuple[str, float] | None = None) -> Recommendation:
    """`baseline`: (the most common answer, the accuracy of always giving it), for accuracy metrics."""
    scored = [r for r in rows if r.value is not None and r.low is not None]
    if not scored:
        return Recommendation(None, None, None, ["No route finished, so there is nothing to recommend."])
    name = NAMES[metric]
    best = _best(scored, lower_is_better)
    tied = _cheapest_tied(scored, best)
    lines = [f"Best {name}: **{best.label}**, {_quality(best, name, level)}, {_cost(best)}."]
    if tied is not best:
        lines.append(f"**{tied.label}** is statistically tied with it ({_quality(tied, name, level)}; the intervals "
                     f"overlap) and {_times(best.cost_seconds, tied.cost_seconds)} cheaper ({_cost(tied)}).")
    elif best is min(scored, key=lambda r: r.cost_seconds):
        lines.append("It is also the cheapest route that ran.")
    else:
        lines.append(f"No cheaper route is statistically tied with it: every cheaper route's {level:.0%} interval "
                     f"lies {'above' if lower_is_better else 'below'} {best.label}'s.")

    if baseline is not None and not lower_is_better:
        answer, share = baseline
        if best.low <= share:
            where = "lies below" if best.high < share else "includes"
            lines.append(f"Check: answering `{answer}` every time scores {share:.3f} on this test set; {best.label}'s "
                         f"interval ({best.low:.3f}–{best.high:.3f}) {where} it, so no route has shown that it beats "
                         "the most common answer.")
        else:
            lines.append(f"{best.label} beats answering `{answer}` every time ({share:.3f}) beyond its interval.")

    allowed, reasons = set(r.name for r in scored), []
    if n_train < MIN_FINE_TUNE_EXAMPLES:
        reasons.append(f"only {n_train:,} training examples: fine-tuning on fewer than a few hundred is risky "
                       "(it overfits, and one lucky run looks like a win); prefer few-shot prompting or retrieval")
        allowed -= set(FINE_TUNED)
    if data_changes == "often":
        reasons.append("the data changes often: keep knowledge in a retrieval index you can update, not in weights "
                       "you must retrain" + ("" if has_documents else "; no documents were given, so no retrieval "
                                             "route ran (add `documents`)"))
        allowed -= set(KNOWLEDGE_IN_WEIGHTS)
    if per_user_context:
        reasons.append("each user brings their own context: it belongs in the prompt or a per-user retrieval "
                       "index, not in weights shared by everyone")
        allowed -= set(FINE_TUNED) | set(KNOWLEDGE_IN_WEIGHTS)
    for reason in reasons:
        lines.append(f"Check: {reason}.")

    pick = tied
    if pick.name not in allowed:
        candidates = [r for r in scored if r.name in allowed]
        if not candidates:
            lines.append(f"**Recommendation: none of the routes that ran passes these checks**; run "
                         f"{'few-shot or RAG' if has_documents else 'zero-shot or few-shot'} routes to compare.")
            return Recommendation(None, best.name, _tied_name(tied, best), lines)
        allowed_best = _best(candidates, lower_is_better)
        pick = _cheapest_tied(candidates, allowed_best)
        gap = abs(best.value - allowed_best.value)
        overlap = _overlap(allowed_best, best)
        lines.append(f"**Recommendation: {pick.label}** ({_quality(pick, name, level)}, {_cost(pick)}). The checks "
                     f"rule out {tied.label}; the best route they allow is {allowed_best.label}, {gap:.3f} "
                     f"{'worse' if gap else 'apart'} in {name} than {best.label}"
                     f"{' (intervals overlap: statistically tied)' if overlap else ' (intervals do not overlap)'}.")
    else:
        if pick is not best:
            why = f"as good as the best within the {level:.0%} intervals, at a fraction of the cost"
        elif pick is min(scored, key=lambda r: r.cost_seconds):
            why = "the best and the cheapest"
        else:
            why = "the best, and no cheaper route is tied with it"
        lines.append(f"**Recommendation: {pick.label}** — {why}.")
    if pick.name in RETRIEVAL and data_changes == "often":
        lines.append("Its knowledge lives in the index: re-ingest changed documents instead of retraining.")
    return Recommendation(pick.name, best.name, _tied_name(tied, best), lines)


def _best(rows: list[RouteRow], lower_is_better: bool) -> RouteRow:
    # Ties in quality go to the cheaper route.
    return min(rows, key=lambda r: ((r.value if lower_is_better else -r.value), r.cost_seconds))


def _overlap(a: RouteRow, b: RouteRow) -> bool:
    return a.low <= b.high and b.low <= a.high


def _cheapest_tied(rows: list[RouteRow], best: RouteRow) -> RouteRow:
    return min((r for r in rows if _overlap(r, best)), key=lambda r: (r.cost_seconds, r is not best))


def _tied_name(tied: RouteRow, best: RouteRow) -> str | None:
    return None if tied is best else tied.name


def _quality(row: RouteRow, name: str, level: float) -> str:
    return f"{name} {row.value:.3f} ({level:.0%} CI {row.low:.3f}–{row.high:.3f})"


def _cost(row: RouteRow) -> str:
    return f"{_seconds(row.train_seconds)} to train or build + {_seconds(row.inference_seconds)} to answer {row.examples:,} examples"


def _seconds(value: float) -> str:
    if value < 10:
        return f"{value:.2f} s"
    return f"{value:.0f} s" if value < 100 else f"{value / 60:.1f} min"


def _times(expensive: float, cheap: float) -> str:
    ratio = expensive / max(cheap, 1e-6)
    return f"{ratio:.1f}×" if ratio < 10 else f"{ratio:.0f}×"
