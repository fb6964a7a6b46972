"""Pure metric functions any stage may use."""

from __future__ import annotations

import math


def perplexity(mean_loss: float) -> float:
    """exp of the mean per-token cross-entropy (capped so a diverged run prints inf, not an error)."""
    return math.exp(mean_loss) if mean_loss < 700 else math.inf


def confusion_matrix(y_true: list[int], y_pred: list[int], n_classes: int) -> list[list[int]]:
    """matrix[t][p]: how many examples of true class t were predicted as p."""
    matrix = [[0] * n_classes for _ in range(n_classes)]
    for t, p in zip(y_true, y_pred):
        matrix[t][p] += 1
    return matrix


def expected_calibration_error(confidences: list[float], correct: list[bool], bins: int = 15) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    if not confidences:
        return 0.0
    total = 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        members = [i for i, c in enumerate(confidences) if (low < c <= high) or (b == 0 and c == 0.0)]
        if members:
            accuracy = sum(correct[i] for i in members) / len(members)
            confidence = sum(confidences[i] for i in members) / len(members)
            total += len(members) * abs(accuracy - confidence)
    return total / len(confidences)


def classification_report(y_true: list[int], probabilities: list[list[float]], names: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support, expected calibration error, confusion matrix."""
    y_pred = [max(range(len(p)), key=p.__getitem__) for p in probabilities]
    matrix = confusion_matrix(y_true, y_pred, len(names))
    per_class = {}
    for c, name in enumerate(names):
        tp = matrix[c][c]
        predicted = sum(matrix[t][c] for t in range(len(names)))
        support = sum(matrix[c])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    correct = [t == p for t, p in zip(y_true, y_pred)]
    return {
        "examples": len(y_true),
        "accuracy": sum(correct) / len(y_true) if y_true else 0.0,
        "macro_f1": sum(c["f1"] for c in per_class.values()) / len(names),
        "ece": expected_calibration_error([max(p) for p in probabilities], correct),
        "per_class": per_class,
        "confusion": matrix,
        "labels": names,
    }


# --- retrieval -------------------------------------------------------------------------------------

def recall_at_k(ranked: list[str], relevant: dict[str, float], k: int) -> float:
    """Share of the relevant documents found in the top k."""
    wanted = {d for d, grade in relevant.items() if grade > 0}
    return len(wanted & set(ranked[:k])) / len(wanted) if wanted else 0.0


def reciprocal_rank(ranked: list[str], relevant: dict[str, float]) -> float:
    for rank, doc in enumerate(ranked, start=1):
        if relevant.get(doc, 0) > 0:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(ranked: list[str], relevant: dict[str, float], k: int) -> float:
    """Normalised discounted cumulative gain with graded relevance (gain = grade, discount = log2(rank + 1))."""
    import math

    dcg = sum(relevant.get(doc, 0) / math.log2(rank + 1) for rank, doc in enumerate(ranked[:k], start=1))
    ideal = sorted((g for g in relevant.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(rank + 1) for rank, g in enumerate(ideal, start=1))
    return dcg / idcg if idcg else 0.0


def retrieval_report(rankings: dict[str, list[str]], qrels: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean recall@1/5/10, MRR and nDCG@10 over the queries that have relevance judgements."""
    judged = [q for q in rankings if qrels.get(q)]
    if not judged:
        return {"queries": 0}
    mean = lambda f: sum(f(q) for q in judged) / len(judged)  # noqa: E731
    return {"queries": len(judged),
            "recall@1": mean(lambda q: recall_at_k(rankings[q], qrels[q], 1)),
            "recall@5": mean(lambda q: recall_at_k(rankings[q], qrels[q], 5)),
            "recall@10": mean(lambda q: recall_at_k(rankings[q], qrels[q], 10)),
            "mrr": mean(lambda q: reciprocal_rank(rankings[q], qrels[q])),
            "ndcg@10": mean(lambda q: ndcg_at_k(rankings[q], qrels[q], 10))}


# --- generated text against a reference ------------------------------------------------------------

def _words(text: str) -> list[str]:
    import re

    return re.findall(r"\w+", text.lower())


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased word tokens: the longest common subsequence as precision and recall
    (Lin, 2004; beta = 1)."""
    pred, ref = _words(prediction), _words(reference)
    if not pred or not ref:
        return float(pred == ref)
    previous = [0] * (len(ref) + 1)
    for word in pred:
        current = [0]
        for j, other in enumerate(ref, start=1):
            current.append(previous[j - 1] + 1 if word == other else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1: bag-of-words overlap after lower-casing and dropping punctuation and articles."""
    from collections import Counter

    drop = {"a", "an", "the"}
    pred = [w for w in _words(prediction) if w not in drop]
    ref = [w for w in _words(reference) if w not in drop]
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


# --- uncertainty -----------------------------------------------------------------------------------

def bootstrap_ci(statistic, n: int, resamples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic over n examples.

    `statistic` maps an integer array [resamples, n] of example indices (rows drawn with replacement) to
    one value per row. The same seed draws the same rows, so intervals of routes scored on the same test
    set are paired."""
    import numpy as np

    if n == 0:
        return (math.nan, math.nan)
    rows = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    values = np.asarray(statistic(rows), dtype=float)
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return float(low), float(high)
