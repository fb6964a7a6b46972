"""A few real steps on the embedded default model (SmolLM2-135M-Instruct): minutes, not seconds."""

import json

import pytest
import torch

from conftest import SAMPLES, run_cli
from stages.helpers import train
from tunesmith.adapters import load_trained, merge_adapter

pytestmark = pytest.mark.slow


def test_lora_sft_on_the_default_model_lowers_eval_loss_and_merges_exactly(tmp_path):
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": "smollm2-135m-instruct", "stage": "sft",
        "data": {"train": str(SAMPLES / "alpaca_500.jsonl"), "max_rows": 60, "validation_fraction": 0.2},
        "tuning": {"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "training": {"max_steps": 4, "learning_rate": 1e-3, "micro_batch_size": 4, "max_length": 256,
                     "packing": True, "lr_schedule": "constant", "seed": 0},
        "output_dir": str(tmp_path / "out"),
    }))
    summary = train(recipe, preview_tokens=8)
    assert summary["eval_loss_after"] < summary["eval_loss_before"] < 4.0
    assert summary["answer_before"] and summary["answer_after"]
    report = merge_adapter(tmp_path / "out", tmp_path / "merged")
    assert report.max_abs_diff < 1e-3
    merged, tokenizer = load_trained(tmp_path / "merged", device="cpu")
    ids = torch.tensor([tokenizer("Hello")["input_ids"]])
    assert torch.isfinite(merged(input_ids=ids).logits).all()


def test_continued_pretraining_with_frozen_layers_on_the_default_model(tmp_path):
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": "smollm2-135m-instruct", "stage": "pretrain",
        "data": {"train": str(SAMPLES / "medical_abstracts_200.jsonl"), "max_rows": 40, "validation_fraction": 0.25},
        "tuning": {"method": "freeze", "freeze_layers": 26},
        "training": {"max_steps": 3, "learning_rate": 1e-4, "micro_batch_size": 2, "max_length": 256, "seed": 0},
        "output_dir": str(tmp_path / "out"),
    }))
    summary = train(recipe)
    assert summary["perplexity_after"] < summary["perplexity_before"]
    assert summary["trainable_parameters"] < 0.2 * summary["total_parameters"]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_quickstart_command_runs_the_shipped_recipe(tmp_path, capsys):
    code, out, err = run_cli("quickstart", "--out", str(tmp_path / "qs"), "training.max_steps=2",
                             "training.micro_batch_size=2", "training.eval_max_batches=1", capsys=capsys)
    assert code == 0, err
    assert "answer before:" in out and "answer after:" in out and "eval loss" in out
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["method"] == "lora"
    assert (tmp_path / "qs" / "adapter_model.safetensors").is_file()


def test_frozen_default_model_classifies_sst2_sentences_well_above_chance(tmp_path, capsys):
    code, out, err = run_cli("train", str(SAMPLES.parents[2] / "examples" / "classify_sst2.yaml"),
                             f"output_dir={tmp_path / 'cls'}", "data.max_rows=300", "classifier.layer=-10",
                             f"classifier.cache_dir={tmp_path / 'cache'}", capsys=capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "cls" / "summary.json").read_text())
    assert summary["accuracy"] > 0.7 and summary["scored_split"] == "test"
    assert "test: accuracy" in out and (tmp_path / "cls" / "confusion.png").is_file()
