import pytest
import torch

from tunesmith.classifier import Head, class_weights, train_head
from tunesmith.config import ClassifierConfig
from tunesmith.evaluate.metrics import classification_report, expected_calibration_error


def test_head_separates_a_separable_toy_set_perfectly():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]])
    y = torch.arange(3).repeat(40)
    x = centres[y] + 0.5 * torch.randn(len(y), 3, generator=generator)
    for kind in ("linear", "mlp"):
        head = Head(3, 3, kind, [16])
        fit = train_head(head, x[:90], y[:90], x[90:], y[90:], ClassifierConfig(head=kind, learning_rate=0.05), seed=0)
        with torch.no_grad():
            assert (head(x).argmax(-1) == y).all(), kind
        assert fit.best_epoch <= fit.epochs


def test_balanced_class_weights():
    weights = class_weights(torch.tensor([0, 0, 0, 1]), 2, "balanced")
    assert weights.tolist() == pytest.approx([4 / 6, 2.0])
    assert class_weights(torch.tensor([0, 1]), 2, "none") is None


def test_metrics_on_a_hand_checked_example():
    # true:      0    0    1    1    2
    # predicted: 0    1    1    1    0
    probs = [[0.9, 0.05, 0.05], [0.4, 0.6, 0.0], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.5, 0.2, 0.3]]
    report = classification_report([0, 0, 1, 1, 2], probs, ["a", "b", "c"])
    assert report["accuracy"] == 3 / 5
    assert report["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    a, b, c = (report["per_class"][n] for n in "abc")
    assert (a["precision"], a["recall"], a["f1"]) == (0.5, 0.5, 0.5)
    assert (b["precision"], b["recall"]) == (2 / 3, 1.0) and abs(b["f1"] - 0.8) < 1e-12
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 0.0, 1)
    assert abs(report["macro_f1"] - (0.5 + 0.8 + 0.0) / 3) < 1e-12
    # confidences .9 .6 .7 .8 .5 land in five different bins of 15: ECE = mean |correct - confidence|
    expected = (abs(1 - 0.9) + abs(0 - 0.6) + abs(1 - 0.7) + abs(1 - 0.8) + abs(0 - 0.5)) / 5
    assert abs(report["ece"] - expected) < 1e-12


def test_ece_of_a_perfectly_calibrated_bin_is_zero():
    assert expected_calibration_error([0.75] * 4, [True, True, True, False]) == 0.0
