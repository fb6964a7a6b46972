"""Chained recipes: stages run in order from each other's artifacts; a stopped chain resumes at its stage and step."""

from __future__ import annotations

import io
import json

import pytest
import yaml
from conftest import chat_rows, longer_wins_rows, run_cli, text_rows, write_jsonl
from rich.console import Console

from tunesmith.chain import run_chain
from tunesmith.config import load_chain
from tunesmith.errors import TunesmithError


def write_chain(tmp_path, stages=None, **top):
    write_jsonl(tmp_path / "text.jsonl", text_rows())
    write_jsonl(tmp_path / "chat.jsonl", chat_rows())
    write_jsonl(tmp_path / "pairs.jsonl", longer_wins_rows(24))
    chain = {"model": "tiny", "output_dir": str(tmp_path / "out"),
             "tuning": {"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
             "training": {"max_steps": 2, "learning_rate": 1e-3, "micro_batch_size": 2, "max_length": 64,
                          "save_every": 1, "lr_schedule": "constant"},
             "stages": stages or [
                 {"stage": "pretrain", "data": {"train": "text.jsonl"}},
                 {"stage": "sft", "data": {"train": "chat.jsonl"}},
                 {"stage": "reward", "tuning": {"method": "full"}, "data": {"train": "pairs.jsonl"}},
                 {"stage": "rl", "data": {"train": "pairs.jsonl"},
                  "rl": {"samples_per_prompt": 2, "max_new_tokens": 8, "eval_prompts": 2}},
                 {"name": "merged", "stage": "export"}]}
    chain.update(top)
    path = tmp_path / "chain.yaml"
    path.write_text("# tunesmith train chain.yaml\n" + yaml.safe_dump(chain, sort_keys=False))
    return path


def quiet():
    return Console(file=io.StringIO(), width=1000)


def test_each_stage_starts_from_the_previous_artifact(tmp_path):
    chain = load_chain(write_chain(tmp_path))
    names = [s.output_dir.name for s in chain.steps]
    assert names == ["01-pretrain", "02-sft", "03-reward", "04-rl", "05-merged"]
    pretrain, sft, reward, rl, export = chain.steps
    assert pretrain.recipe.tuning.init_adapter is None
    assert sft.recipe.tuning.init_adapter == str(pretrain.output_dir)
    assert reward.recipe.model.path == "tiny" and reward.recipe.tuning.method == "full"
    assert rl.recipe.tuning.init_adapter == str(sft.output_dir) and rl.recipe.rl.reward_model == str(reward.output_dir)
    assert export.source == str(rl.output_dir)
    assert sft.recipe.training.max_steps == 2 and reward.recipe.tuning.lora.r == 4  # chain-level defaults inherited


def test_a_stopped_chain_resumes_at_its_stage_and_step(tmp_path, capsys):
    from tunesmith.cli import run_recipe

    path = write_chain(tmp_path)
    chain = load_chain(path)

    def stop_in_rl(recipe, resume=False, overwrite=False):
        summary = run_recipe(recipe, resume=resume, overwrite=overwrite)
        if recipe.stage == "rl":  # simulate a kill after the step-1 checkpoint: forget what came after it
            out = chain.steps[3].output_dir
            (out / "summary.json").unlink()
            import shutil

            shutil.rmtree(out / "checkpoints" / "step-0000002")
            raise KeyboardInterrupt
        return summary

    with pytest.raises(KeyboardInterrupt):
        run_chain(chain, stop_in_rl, quiet())
    done_before = {s.name: (s.output_dir / "summary.json").stat().st_mtime for s in chain.steps[:3]}
    with pytest.raises(TunesmithError, match="already holds a chain run; pass --resume"):
        run_chain(load_chain(path), run_recipe, quiet())

    console = quiet()
    capsys.readouterr()
    summaries = run_chain(load_chain(path), run_recipe, console, resume=True)
    text = console.file.getvalue() + capsys.readouterr().out
    assert text.count("finished already") == 3
    assert {s.name: (s.output_dir / "summary.json").stat().st_mtime for s in chain.steps[:3]} == done_before
    assert "resumed from step 1 of 2" in text.replace("\n", " ")
    assert summaries[3]["steps"] == 2 and summaries[4]["stage"] == "export"
    merged = chain.steps[4].output_dir
    assert (merged / "model.safetensors").is_file() and json.loads((merged / "export.json").read_text())["max_abs_logit_diff"] < 1e-3
    again = quiet()
    run_chain(load_chain(path), run_recipe, again, resume=True)
    assert again.file.getvalue().count("finished already") == 5


@pytest.mark.parametrize("stages, message", [
    ([{"stage": "export"}], "export merges a LoRA adapter into its base; no LoRA stage comes before it"),
    ([{"stage": "sft", "data": {"train": "chat.jsonl"}}, {"stage": "sft", "data": {"train": "chat.jsonl"}}],
     "'sft' is used twice"),
    ([{"stage": "sft", "data": {"train": "chat.jsonl"}},
      {"name": "full", "stage": "sft", "tuning": {"method": "full"}, "data": {"train": "chat.jsonl"}}],
     "trains full after a LoRA stage; add `- stage: export`"),
    ([{"stage": "rl", "data": {"train": "pairs.jsonl"}}], "rl needs a reward"),
    ([{"stage": "sft", "output_dir": "x", "data": {"train": "chat.jsonl"}}], "stages.0.output_dir: set once"),
    ([{"stage": "sft", "data": {"train": "chat.jsonl"}, "training": {"max_stepz": 3}}],
     "chain.yaml:.*: stages.0.training.max_stepz: unknown key; did you mean 'max_steps'"),
    ([{"stage": "sft", "data": {}}], "stages.0.data.train: required but missing"),
    ([{"stage": "distill", "data": {"train": "chat.jsonl"}}], "unknown stage 'distill'"),
])
def test_bad_chains_are_one_line_errors_before_anything_runs(tmp_path, capsys, stages, message):
    code, _, err = run_cli("train", str(write_chain(tmp_path, stages=stages)), capsys=capsys)
    assert code == 2 and "Traceback" not in err
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_overrides_reach_one_stage_or_all(tmp_path):
    path = write_chain(tmp_path)
    chain = load_chain(path, ["stages.1.training.max_steps=5", "training.learning_rate=0.5", f"output_dir={tmp_path / 'o'}"])
    assert chain.output_dir == tmp_path / "o" and chain.steps[0].recipe.output_dir == str(tmp_path / "o" / "01-pretrain")
    assert [s.recipe.training.max_steps for s in chain.steps[:4]] == [2, 5, 2, 2]
    assert all(s.recipe.training.learning_rate == 0.5 for s in chain.steps[:4])
