"""Resume: a run killed after a checkpoint (or while writing one) and resumed ends exactly where an
uninterrupted run ends: same losses at every step, same final weights within 1e-6."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import chat_rows, write_jsonl, write_recipe
from stages.helpers import losses, train
from tunesmith.errors import TunesmithError
from tunesmith.stages import loop as loop_module

OVERRIDES = ["training.max_steps=6", "training.save_every=2", "training.gradient_accumulation=2",
             "training.lr_schedule=cosine", "training.warmup_steps=2", "training.eval_every=3"]
TUNING = {
    "lora": {"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.1}},  # dropout: RNG state must resume too
    "full": {"method": "full"},
}


class Killed(BaseException):
    pass


def final_weights(out):
    name = "adapter_model.safetensors" if (out / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(out / name)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


@pytest.fixture
def recipes(tmp_path):
    def make(name, method):
        folder = tmp_path / name
        write_jsonl(folder / "train.jsonl", chat_rows(20))
        return write_recipe(folder, tuning=TUNING[method]), folder / "out"
    return make


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_after_kill_equals_uninterrupted_run(recipes, monkeypatch, method):
    straight, straight_out = recipes("straight", method)
    train(straight, OVERRIDES)

    killed, killed_out = recipes("killed", method)
    original = loop_module.Loop.save_checkpoint

    def save_then_die(self):
        folder = original(self)
        if self.step == 4:
            raise Killed()
        return folder

    monkeypatch.setattr(loop_module.Loop, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train(killed, OVERRIDES)
    monkeypatch.setattr(loop_module.Loop, "save_checkpoint", original)
    summary = train(killed, OVERRIDES, resume=True)

    assert summary["steps"] == 6
    assert losses(killed_out) == pytest.approx(losses(straight_out), abs=1e-6)
    assert_same_weights(final_weights(killed_out), final_weights(straight_out))


def test_kill_while_saving_keeps_the_last_good_checkpoint(recipes, monkeypatch):
    straight, straight_out = recipes("straight", "lora")
    train(straight, OVERRIDES)

    killed, killed_out = recipes("killed", "lora")
    real_save = torch.save

    def die_mid_save(obj, path, *args, **kwargs):
        if "step-0000004" in str(path):
            real_save(obj, path, *args, **kwargs)  # one file written, the rest never comes
            raise Killed()
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", die_mid_save)
    with pytest.raises(Killed):
        train(killed, OVERRIDES)
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in loop_module.list_checkpoints(killed_out)] == ["step-0000002"]

    train(killed, OVERRIDES, resume=True)
    assert losses(killed_out) == pytest.approx(losses(straight_out), abs=1e-6)
    assert_same_weights(final_weights(killed_out), final_weights(straight_out))


def test_only_the_newest_checkpoints_are_kept(recipes):
    recipe, out = recipes("run", "lora")
    train(recipe, OVERRIDES + ["training.keep_checkpoints=2"])
    assert [p.name for p in loop_module.list_checkpoints(out)] == ["step-0000004", "step-0000006"]


def test_resume_refuses_a_changed_recipe_and_a_missing_run(recipes):
    recipe, out = recipes("run", "lora")
    with pytest.raises(TunesmithError, match="no recipe.yaml here"):
        train(recipe, OVERRIDES, resume=True)
    train(recipe, OVERRIDES)
    with pytest.raises(TunesmithError, match=r"training.learning_rate: differs from the run being resumed"):
        train(recipe, OVERRIDES + ["training.learning_rate=0.5"], resume=True)
    # extending the run is allowed
    summary = train(recipe, OVERRIDES[1:] + ["training.max_steps=8"], resume=True)
    assert summary["steps"] == 8
