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
