"""Online RL: a 2-step run changes the adapter, logs a finite KL, resumes exactly; rewards from a model or a function."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import longer_wins_rows, run_cli, write_jsonl, write_recipe

from stages.helpers import train

REWARD_FILE = '''
def vowels(prompts, completions):
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]

def wrong_length(prompts, completions):
    return [1.0]
'''


def rl_recipe(tmp_path, rl=None, **overrides):
    write_jsonl(tmp_path / "train.jsonl", longer_wins_rows(24))
    (tmp_path / "rewards.py").write_text(REWARD_FILE)
    sections = {"stage": "rl", "tuning": {"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
                "data": {"train": str(tmp_path / "train.jsonl"), "validation_fraction": 0.2},
                "training": {"max_steps": 2, "learning_rate": 5e-3, "micro_batch_size": 2, "max_length": 64,
                             "lr_schedule": "constant", "seed": 0, "save_every": 1},
                "rl": {"reward_function": "rewards.py:vowels", "samples_per_prompt": 3, "max_new_tokens": 8,
                       "eval_prompts": 2, "sample_every": 1, "updates_per_batch": 2, **(rl or {})}}
    sections.update(overrides)
    return write_recipe(tmp_path, **sections)


def records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_steps_change_the_adapter_log_a_finite_kl_and_resume(tmp_path):
    from safetensors.torch import load_file

    recipe = rl_recipe(tmp_path)
    summary = train(recipe, [f"output_dir={tmp_path / 'straight'}", "training.max_steps=3"])
    train(recipe)  # 2 steps, a checkpoint after each
    lora_b = {k: v for k, v in load_file(tmp_path / "out" / "adapter_model.safetensors").items() if "lora_B" in k}
    assert lora_b and any(float(v.abs().max()) > 0 for v in lora_b.values())  # B starts at zero: it moved
    steps = [r for r in records(tmp_path / "out") if "loss" in r]
    assert len(steps) == 2
    for r in steps:
        assert all(math.isfinite(r[k]) for k in ("kl", "reward_mean", "reward_std", "length_mean", "clip_fraction"))
    assert steps[1]["kl"] > 0  # after an update the policy has left its reference
    assert (tmp_path / "out" / "checkpoints" / "step-0000002").is_dir()
    samples = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2} and all("reply" in s and "reward" in s for s in samples)

    resumed = train(recipe, ["training.max_steps=3"], resume=True)
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    straight = [(r["step"], r["reward_mean"], r["kl"]) for r in records(tmp_path / "straight") if "loss" in r]
    assert [(r["step"], r["reward_mean"], r["kl"]) for r in records(tmp_path / "out") if "loss" in r] == straight
    assert resumed["steps"] == summary["steps"] == 3 and resumed["eval_reward_after"] is not None
    assert (tmp_path / "out" / "rl.png").stat().st_size > 1000


def test_rloo_with_a_reward_model_and_full_tuning(tmp_path):
    reward_dir = tmp_path / "rm"
    write_jsonl(reward_dir / "train.jsonl", longer_wins_rows(40))
    train(write_recipe(reward_dir, stage="reward", tuning={"method": "full"}))
    recipe = rl_recipe(tmp_path, rl={"reward_function": None, "reward_model": str(reward_dir / "out"),
                                     "algorithm": "rloo", "updates_per_batch": 1},
                       tuning={"method": "full"})
    summary = train(recipe)
    assert summary["reference"] == "a frozen copy of the starting model"
    assert summary["reward"] == str(reward_dir / "out")
    steps = [r for r in records(tmp_path / "out") if "loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r["kl"]) and r["clip_fraction"] == 0.0 for r in steps)
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("rl, message", [
    ({"temperature": 0}, "rl.temperature: must be > 0"),
    ({"top_p": 1.5}, "rl.top_p: must be in (0, 1]"),
    ({"samples_per_prompt": 1}, "rl.samples_per_prompt"),
    ({"reward_model": "somewhere"}, "give exactly one of reward_model"),
    ({"reward_function": "no_colon"}, "rl.reward_function: write it as"),
    ({"max_new_tokens": 64}, "must leave room for the prompt"),
])
def test_invalid_generation_settings_are_one_line_errors(tmp_path, capsys, rl, message):
    code, _, err = run_cli("train", str(rl_recipe(tmp_path, rl=rl)), capsys=capsys)
    assert code == 2 and message in err and "recipe.yaml" in err and "Traceback" not in err


def test_rl_section_needs_stage_rl_and_back(tmp_path, capsys):
    recipe = rl_recipe(tmp_path, stage="sft")
    code, _, err = run_cli("train", str(recipe), capsys=capsys)
    assert code == 2 and "the rl section only applies to stage rl" in err
    recipe = rl_recipe(tmp_path)
    code, _, err = run_cli("train", str(recipe), "rl=", capsys=capsys)
    assert code == 2


def test_reward_function_problems_are_clear(tmp_path):
    from tunesmith.errors import TunesmithError

    with pytest.raises(TunesmithError, match="has no function 'missing'"):
        train(rl_recipe(tmp_path, rl={"reward_function": "rewards.py:missing"}))
    with pytest.raises(TunesmithError, match="returned 1 scores for 2 replies"):
        train(rl_recipe(tmp_path, rl={"reward_function": "rewards.py:wrong_length"}), ["training.max_steps=1"],
              overwrite=True)
