"""Reward model: golden loss, the scalar head scores the last real token, learns a synthetic preference, `score`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import longer_wins_rows, run_cli, write_jsonl, write_recipe

from stages.helpers import losses, train

LORA = {"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
# Produced by this code (CPU, fp32): pins rendering of pairs, the head's init, Bradley-Terry and the loop.
GOLDEN = {"full": [0.715513, 0.680457, 0.658588], "lora": [0.715513, 0.706912, 0.71417]}


def reward_recipe(tmp_path, **overrides):
    write_jsonl(tmp_path / "train.jsonl", longer_wins_rows())
    sections = {"stage": "reward", "tuning": {"method": "full"},
                "training": {"max_steps": 3, "learning_rate": 3e-4, "micro_batch_size": 8, "max_length": 64,
                             "lr_schedule": "constant", "seed": 0}}
    sections.update(overrides)
    return write_recipe(tmp_path, **sections)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_golden_loss(tmp_path, method):
    tuning = {"method": "full"} if method == "full" else LORA
    summary = train(reward_recipe(tmp_path, tuning=tuning))
    assert losses(tmp_path / "out") == pytest.approx(GOLDEN[method], rel=1e-4)
    assert summary["steps"] == 3 and summary["heldout_pairs"] == 40
    assert summary["peak_rss_gib"] > 0 and summary["allocator"] in ("jemalloc", "system")


def test_learns_that_longer_wins(tmp_path):
    summary = train(reward_recipe(tmp_path), ["training.max_steps=40"])
    assert summary["accuracy_before"] < 0.5
    assert summary["accuracy_after"] > 0.9
    assert summary["margin_after"] > summary["margin_before"] + 1.0
    out = tmp_path / "out"
    assert (out / "margins.png").stat().st_size > 1000 and (out / "loss.png").stat().st_size > 1000
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("accuracy" in r and "margin" in r for r in records if "loss" in r)


def test_freeze_trains_the_head_too(tmp_path):
    summary = train(reward_recipe(tmp_path, tuning={"method": "freeze", "trainable_modules": ["layers.1.mlp"]}))
    from tunesmith.rewards import load_reward_model

    model = load_reward_model(tmp_path / "out").model
    assert summary["trainable_parameters"] == sum(p.numel() for n, p in model.named_parameters()
                                                  if "layers.1.mlp" in n or n.startswith("score"))


def test_scores_at_the_last_real_token_like_transformers(tiny_path, tokenizer):
    """Own pooling (by length) == the sequence-classification forward with an attention mask, on a padded batch."""
    from tunesmith.data.render import PackedRow, collate
    from tunesmith.models import load_model
    from tunesmith.rewards import last_token_scores

    torch.manual_seed(0)
    model = load_model(tiny_path, scalar_head=True).eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    rows = [tokenizer("a b c d e f", add_special_tokens=False)["input_ids"], tokenizer("x y", add_special_tokens=False)["input_ids"]]
    batch = collate([PackedRow(r, r, list(range(len(r)))) for r in rows], 0)
    batch["ends"] = torch.tensor([(i, len(r) - 1) for i, r in enumerate(rows)])
    with torch.no_grad():
        ours = last_token_scores(model, batch)
        reference = [float(model(input_ids=torch.tensor([r])).logits[0, 0]) for r in rows]
    assert ours.tolist() == pytest.approx(reference, abs=1e-5)


def test_score_command(tmp_path, capsys):
    train(reward_recipe(tmp_path), ["training.max_steps=40"])
    rows = longer_wins_rows(6, seed=1)
    items = write_jsonl(tmp_path / "items.jsonl", rows[:3] + [
        {"prompt": "Hi", "response": "ok."},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "hello there " * 8}]}])
    code, out, err = run_cli("score", str(tmp_path / "out"), "--input", str(items), capsys=capsys)
    assert code == 0, err
    scored = [json.loads(line) for line in out.splitlines()]
    assert all(r["margin"] > 0 for r in scored[:3]) and "score" in scored[3] and "score" in scored[4]
    assert scored[4]["score"] > scored[3]["score"]  # the long reply scores higher
    assert "accuracy 1.000" in err

    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Hi", "response": "x"}, {"prompt": "Hi"}])
    code, _, err = run_cli("score", str(tmp_path / "out"), "--input", str(tmp_path / "bad.jsonl"), capsys=capsys)
    assert code == 2 and "bad.jsonl:2: response: missing" in err and "Traceback" not in err


def test_packed_pairs_score_and_log_prob_like_padded_ones(tiny_path, tokenizer):
    """Packing pairs into rows (no padding compute) changes no score and no reply log-probability."""
    from tunesmith.data.preferences import read_preferences, render_pairs
    from tunesmith.models import load_model
    from tunesmith.rewards import last_token_scores
    from tunesmith.stages.policy import sequence_logps
    from tunesmith.stages.reward import pair_batch

    import tempfile
    from pathlib import Path

    path = write_jsonl(Path(tempfile.mkdtemp()) / "p.jsonl", longer_wins_rows(6))
    rows = render_pairs(tokenizer, read_preferences([path])[0], 128).rows
    padded, packed = pair_batch(rows, 0, torch.device("cpu")), pair_batch(rows, 0, torch.device("cpu"), 128)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    torch.manual_seed(0)
    scorer = load_model(tiny_path, scalar_head=True).eval()
    policy = load_model(tiny_path).eval()
    with torch.no_grad():
        assert last_token_scores(scorer, packed).tolist() == pytest.approx(last_token_scores(scorer, padded).tolist(), abs=1e-5)
        assert sequence_logps(policy, packed).tolist() == pytest.approx(sequence_logps(policy, padded).tolist(), rel=1e-5)
