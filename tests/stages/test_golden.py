"""Golden losses: 3 optimizer steps on the tiny model for every stage x tuning method.

The numbers were produced by this code on CPU (fp32) and pin down rendering, masking,
packing, accumulation, the optimizer and the schedule: any change to those shows here.
"""

import pytest

from conftest import chat_rows, text_rows, write_jsonl, write_recipe
from stages.helpers import losses, train

TUNING = {
    "full": {"method": "full"},
    "freeze": {"method": "freeze", "freeze_layers": 1},
    "lora": {"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
}
GOLDEN = {
    ("sft", "full"): [10.785177, 10.53367, 10.352678],
    ("sft", "freeze"): [10.785177, 10.687262, 10.597642],
    ("sft", "lora"): [10.785177, 10.777963, 10.772935],
    ("pretrain", "full"): [10.794083, 10.530939, 10.349454],
    ("pretrain", "freeze"): [10.794083, 10.688344, 10.60612],
    ("pretrain", "lora"): [10.794083, 10.77792, 10.760557],
}


@pytest.mark.parametrize("stage, method", list(GOLDEN))
def test_golden_losses(tmp_path, stage, method):
    write_jsonl(tmp_path / "train.jsonl", chat_rows() if stage == "sft" else text_rows())
    recipe = write_recipe(tmp_path, stage=stage, tuning=TUNING[method])
    summary = train(recipe, ["training.gradient_accumulation=2"])
    got = losses(tmp_path / "out")
    assert got == pytest.approx(GOLDEN[(stage, method)], rel=1e-4)
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert (tmp_path / "out" / "loss.png").stat().st_size > 1000
