"""DPO: golden losses (sigmoid, IPO), the implicit reward margin grows, reference handling, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import chat_rows, longer_wins_rows, write_jsonl, write_recipe

from stages.helpers import losses, train

LORA = {"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
# Produced by this code (CPU, fp32): pins pair rendering, reply log-probs, the reference and both losses.
GOLDEN = {"sigmoid": [0.693147, 0.686496, 0.681925], "ipo": [25.0, 24.948601, 24.858801]}


def dpo_recipe(tmp_path, **overrides):
    write_jsonl(tmp_path / "train.jsonl", longer_wins_rows(80))
    sections = {"stage": "dpo", "tuning": LORA,
                "training": {"max_steps": 3, "learning_rate": 1e-3, "micro_batch_size": 4, "max_length": 64,
                             "lr_schedule": "constant", "seed": 0}}
    sections.update(overrides)
    return write_recipe(tmp_path, **sections)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_golden_loss(tmp_path, loss):
    train(dpo_recipe(tmp_path, dpo={"loss": loss}))
    got = losses(tmp_path / "out")
    assert got == pytest.approx(GOLDEN[loss], rel=1e-4)
    # The policy starts as its reference: the first step's loss is the loss at a zero margin.
    assert got[0] == pytest.approx(math.log(2) if loss == "sigmoid" else (1 / (2 * 0.1)) ** 2, rel=1e-6)


def test_margin_grows(tmp_path):
    summary = train(dpo_recipe(tmp_path, tuning={"method": "full"}), ["training.max_steps=20", "training.learning_rate=1e-4"])
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    margins = [r["reward_margin"] for r in records if "reward_margin" in r]
    assert sum(margins[-5:]) / 5 > sum(margins[:5]) / 5 > -1e-6
    assert summary["reward_accuracy"] > 0.9 and summary["reward_margin"] > 0.05
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert summary["reference"] == "the model before training"
    assert summary["peak_rss_gib"] > 0 and summary["allocator"] in ("jemalloc", "system")
    assert (tmp_path / "out" / "margins.png").stat().st_size > 1000


def test_reply_logps_match_full_logits(tiny_path, tokenizer):
    """Projecting only labelled positions == log_softmax over every position, on a padded batch."""
    from tunesmith.data.preferences import PreferencePair, render_pairs
    from tunesmith.models import load_model
    from tunesmith.stages.policy import sequence_logps
    from tunesmith.stages.reward import pair_batch

    model = load_model(tiny_path).eval()
    pairs = [PreferencePair("x", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                  {"role": "user", "content": "How are you?"}], "Fine, thanks for asking.", "Bad.")]
    rows = render_pairs(tokenizer, pairs, 128).rows
    batch = pair_batch(rows, tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        ours = sequence_logps(model, batch)
        reference = []
        for side in (rows[0].chosen, rows[0].rejected):
            logits = model(input_ids=torch.tensor([side.input_ids])).logits[0, :-1].log_softmax(-1)
            targets = torch.tensor(side.labels[1:])
            keep = targets != -100
            reference.append(float(logits[keep].gather(-1, targets[keep][:, None]).sum()))
    assert ours.tolist() == pytest.approx(reference, rel=1e-5)
    # Only the last assistant turn is the reply: the earlier "Hello" carries no label.
    labelled = tokenizer.decode([t for t, lab in zip(rows[0].chosen.input_ids, rows[0].chosen.labels) if lab != -100])
    assert "Hello" not in labelled and "Fine, thanks" in labelled


def test_resume_is_exact_and_keeps_the_reference(tmp_path):
    recipe = dpo_recipe(tmp_path, tuning={"method": "full"})
    train(recipe, ["training.max_steps=4", f"output_dir={tmp_path / 'straight'}"])
    train(recipe, ["training.max_steps=2", "training.save_every=2"])
    saved = (tmp_path / "out" / "reference_logps.json").read_text()
    train(recipe, ["training.max_steps=4", "training.save_every=2"], resume=True)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "out") == losses(tmp_path / "straight")
    kept = json.loads(saved)["train"]
    assert all(json.loads((tmp_path / "out" / "reference_logps.json").read_text())["train"][k] == v for k, v in kept.items())


def test_from_an_sft_adapter_the_reference_is_its_frozen_copy(tmp_path):
    write_jsonl(tmp_path / "sft" / "train.jsonl", chat_rows())
    train(write_recipe(tmp_path / "sft"), ["training.learning_rate=1e-2"])
    recipe = dpo_recipe(tmp_path, tuning={**LORA, "init_adapter": str(tmp_path / "sft" / "out")})
    summary = train(recipe, ["training.max_steps=2"])
    assert losses(tmp_path / "out")[0] == pytest.approx(math.log(2), rel=1e-6)  # policy == SFT adapter == reference
    assert "frozen copy" in summary["reference"]
    out = tmp_path / "out"
    assert not (out / "reference").exists()  # only the trained adapter is saved
    from safetensors.torch import load_file

    start = load_file(tmp_path / "sft" / "out" / "adapter_model.safetensors")
    end = load_file(out / "adapter_model.safetensors")
    assert set(start) == set(end) and any(not torch.equal(start[k], end[k]) for k in start)


def test_init_adapter_must_exist_and_share_the_base(tmp_path, adapter_dirs):
    import shutil

    import yaml

    from tunesmith.errors import TunesmithError
    from tunesmith.models import embedder_path

    with pytest.raises(TunesmithError, match="holds no LoRA adapter"):
        train(dpo_recipe(tmp_path, tuning={**LORA, "init_adapter": str(tmp_path / "nothing")}))
    other = tmp_path / "other"
    shutil.copytree(adapter_dirs["cats"], other)
    (other / "recipe.yaml").write_text(yaml.safe_dump({"model": {"path": str(embedder_path())}}))
    with pytest.raises(TunesmithError, match="was trained on .* but this recipe's model is tiny"):
        train(dpo_recipe(tmp_path, tuning={**LORA, "init_adapter": str(other)}))
    assert not (tmp_path / "out").exists()  # refused before any output
    summary = train(dpo_recipe(tmp_path, tuning={**LORA, "init_adapter": str(adapter_dirs["cats"])}),
                    ["training.max_steps=1"])
    assert summary["steps"] == 1
