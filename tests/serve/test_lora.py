"""tunesmith's run-time LoRA against the reference, PEFT: same logits for every row of a mixed batch."""

from __future__ import annotations

import json

import pytest
import torch

from tunesmith.errors import TunesmithError
from tunesmith.models import load_model
from tunesmith.serve.lora import MultiLora


def save_adapter(folder, tiny_path, seed: int, **config):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    settings = dict(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(load_model(tiny_path), LoraConfig(**{**settings, **config})).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def variants(tmp_path_factory, tiny_path):
    """Adapters that exercise the scaling rules: plain, rsLoRA, per-module rank and alpha, attention-only."""
    make = lambda name, seed, **c: save_adapter(tmp_path_factory.mktemp(name), tiny_path, seed, **c)  # noqa: E731
    return {
        "plain": make("plain", 1),
        "rslora": make("rslora", 2, r=8, use_rslora=True),
        "patterns": make("patterns", 3, rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3}),
        "attention": make("attention", 4, target_modules=["q_proj", "v_proj"], lora_alpha=8),
    }


def test_a_mixed_unsorted_batch_matches_peft_row_by_row(tiny_path, variants):
    from peft import PeftModel

    names = list(variants)
    reference = PeftModel.from_pretrained(load_model(tiny_path), variants[names[0]], adapter_name=names[0])
    for name in names[1:]:
        reference.load_adapter(variants[name], adapter_name=name)
    reference.eval()
    ours = load_model(tiny_path).eval()
    lora = MultiLora(ours)
    for name in names:
        lora.load(name, variants[name])
    rows = ["rslora", None, "plain", "patterns", "plain", "attention", None, "rslora"]
    ids = torch.randint(3, 1000, (len(rows), 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(input_ids=ids, adapter_names=[r or "__base__" for r in rows]).logits
        with lora.rows(rows):
            got = ours(input_ids=ids).logits
        base = load_model(tiny_path).eval()(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())
    for i, name in enumerate(rows):
        assert torch.equal(got[i], base[i]) == (name is None), "only adapter rows change"
    # one token per row (a decode step): the masked all-slots path
    with torch.no_grad():
        expected = reference(input_ids=ids[:, :1], adapter_names=[r or "__base__" for r in rows]).logits
        with lora.rows(rows):
            assert lora.plan.grouped is not None and lora.plan.grouped.whole
            got = ours(input_ids=ids[:, :1]).logits
    assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())
    # a decode step over some of the slots only (the first slot unused), with uneven groups
    rows = ["patterns", "rslora", "attention", "rslora", None]
    with torch.no_grad():
        expected = reference(input_ids=ids[:5, :1], adapter_names=[r or "__base__" for r in rows]).logits
        with lora.rows(rows):
            assert not lora.plan.grouped.whole and lora.plan.grouped.valid is not None
            got = ours(input_ids=ids[:5, :1]).logits
    assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())


def test_unloading_restores_the_base_exactly(tiny_path, variants):
    model = load_model(tiny_path).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        lora = MultiLora(model)
        lora.load("plain", variants["plain"])
        with lora.rows(["plain"]):
            changed = model(input_ids=ids).logits
        lora.load("other", variants["rslora"])
        lora.unload("plain")
        with lora.rows([None]):
            after = model(input_ids=ids).logits
        with pytest.raises(TunesmithError, match="not loaded: plain"), lora.rows(["plain"]):
            pass
    assert not torch.equal(before, changed) and torch.equal(before, after)


def test_adapters_it_cannot_serve_per_request_are_refused_clearly(tiny_path, tmp_path):
    dora = save_adapter(tmp_path / "dora", tiny_path, 5, use_dora=True)
    with pytest.raises(TunesmithError, match="DoRA.*merged"):
        MultiLora(load_model(tiny_path)).load("dora", dora)
    plain = save_adapter(tmp_path / "plain", tiny_path, 6)
    config = json.loads((plain / "adapter_config.json").read_text())
    wide = load_model(tiny_path)
    wide.model.layers[0].self_attn.q_proj = torch.nn.Linear(32, 64, bias=False)  # not the base it was trained on
    with pytest.raises(TunesmithError, match="do not fit.*wrong base"):
        MultiLora(wide).load("plain", plain)
    assert config["peft_type"] == "LORA"


@pytest.mark.slow
def test_on_the_default_model_a_mixed_decode_step_matches_peft(tmp_path):
    from peft import PeftModel

    from tunesmith.models import resolve_base

    base = resolve_base("smollm2-135m-instruct")
    folders = [save_adapter(tmp_path / f"a{i}", base, 10 + i, r=16, lora_alpha=32) for i in range(3)]
    reference = PeftModel.from_pretrained(load_model(base), folders[0], adapter_name="a0")
    for i, folder in enumerate(folders[1:], 1):
        reference.load_adapter(folder, adapter_name=f"a{i}")
    reference.eval()
    ours = load_model(base).eval()
    lora = MultiLora(ours)
    for i, folder in enumerate(folders):
        lora.load(f"a{i}", folder)
    rows = ["a0", "a0", "a1", None, "a2", "a2"]
    ids = torch.randint(3, 40000, (len(rows), 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids=ids, adapter_names=[r or "__base__" for r in rows]).logits
        with lora.rows(rows):
            got = ours(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-4), float((got - expected).abs().max())
