"""bf16 autocast, the precision GPU runs train in (`model.precision: auto` on CUDA). CPU autocast takes the same
code paths (the fused loss, the LoRA dropout op, the tied sparse embedding), so the suite checks them without a GPU."""

import pytest
import torch

from conftest import chat_rows, write_jsonl
from tunesmith.config import LoraConfig, TrainingConfig, TuningConfig
from tunesmith.data.formats import load_examples
from tunesmith.data.render import pack_sequences, render
from tunesmith.models import load_model
from tunesmith.stages.loop import Loop
from tunesmith.tuning import apply_tuning


def train(tiny_path, tokenizer, tmp_path, method: str, autocast: bool) -> list[float]:
    loaded = load_examples([str(write_jsonl(tmp_path / "t.jsonl", chat_rows(16)))])
    rows = pack_sequences([render(tokenizer, e) for e in loaded.examples], 128)
    torch.manual_seed(0)
    tuning = TuningConfig(method=method, lora=LoraConfig(r=4, alpha=8, dropout=0.1))
    model = apply_tuning(load_model(tiny_path), tuning)
    if method == "lora":
        from tunesmith.kernels.dropout import fuse_lora_dropout

        assert fuse_lora_dropout(model) > 0
    training = TrainingConfig(max_steps=3, micro_batch_size=2, gradient_accumulation=2, learning_rate=1e-3, seed=0)
    loop = Loop(model, rows, rows[:2], training, tmp_path, tokenizer.pad_token_id, torch.device("cpu"),
                autocast_bf16=autocast)
    torch.manual_seed(1)
    losses = loop.run().train_losses
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    return [loss for _, loss in losses] + [loop.evaluate()]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_bf16_autocast_trains_and_tracks_fp32(tiny_path, tokenizer, tmp_path, method):
    plain = train(tiny_path, tokenizer, tmp_path / "fp32", method, autocast=False)
    bf16 = train(tiny_path, tokenizer, tmp_path / "bf16", method, autocast=True)
    assert len(plain) == len(bf16) == 4
    assert plain != bf16  # autocast did run in bf16
    for a, b in zip(plain, bf16):
        assert abs(a - b) < 0.02 * a, (plain, bf16)
