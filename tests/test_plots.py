from tunesmith.evaluate.metrics import perplexity
from tunesmith.evaluate.plots import loss_plot, smooth


def test_smooth_is_a_trailing_mean():
    assert smooth([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]


def test_loss_plot_writes_a_png(tmp_path):
    path = loss_plot(tmp_path / "loss.png", [(i, 3.0 - i / 20) for i in range(1, 21)], [(0, 3.1), (20, 2.1)], "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name != "loss.png"], "no temp file left"


def test_perplexity_is_exp_of_mean_loss():
    assert abs(perplexity(2.0) - 7.389056) < 1e-5
    assert perplexity(1000.0) == float("inf")
