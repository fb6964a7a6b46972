import pytest

from tunesmith.config import TuningConfig
from tunesmith.errors import TunesmithError
from tunesmith.models import load_model
from tunesmith.tuning import apply_tuning, count_parameters


@pytest.fixture
def model(tiny_path):
    return load_model(tiny_path)


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_full_trains_everything(model):
    report = count_parameters(apply_tuning(model, TuningConfig(method="full")))
    assert report.trainable == report.total == sum(p.numel() for p in model.parameters())
    assert str(report).startswith("trainable parameters: 3,219,776 of 3,219,776 (100.00%)")


def test_freeze_bottom_layers_freezes_embeddings_and_those_blocks(model):
    apply_tuning(model, TuningConfig(method="freeze", freeze_layers=1))
    names = trainable_names(model)
    assert not any(n.startswith(("model.embed_tokens", "model.layers.0.")) for n in names)
    assert any(n.startswith("model.layers.1.") for n in names)
    assert "model.norm.weight" in names


def test_trainable_modules_by_name_and_glob(model):
    apply_tuning(model, TuningConfig(method="freeze", trainable_modules=["layers.1.mlp", "*.layers.0.*.q_proj.weight"]))
    assert trainable_names(model) == {
        "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
    }


def test_unknown_module_names_are_errors(model):
    with pytest.raises(TunesmithError, match=r"tuning.trainable_modules: 'layers.9' matches no parameter"):
        apply_tuning(model, TuningConfig(method="freeze", trainable_modules=["layers.9"]))
    with pytest.raises(TunesmithError, match=r"freeze_layers: 5 is more than the model's 2 layers"):
        apply_tuning(model, TuningConfig(method="freeze", freeze_layers=5))


def test_lora_all_linear_trains_only_adapters(model):
    peft_model = apply_tuning(model, TuningConfig(method="lora", lora={"r": 4, "alpha": 8}))
    names = trainable_names(peft_model)
    assert names and all("lora_" in n for n in names)
    # 7 linear layers per block x 2 blocks x (A + B); r=4
    report = count_parameters(peft_model)
    expected = 2 * 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 2 + (128 + 64))
    assert report.trainable == expected


def test_dora_and_named_targets(model):
    peft_model = apply_tuning(model, TuningConfig(method="lora", lora={"r": 2, "target_modules": ["q_proj"], "dora": True}))
    names = trainable_names(peft_model)
    assert any("lora_magnitude_vector" in n for n in names) and all("q_proj" in n for n in names)


def test_bad_lora_targets_are_errors(model):
    with pytest.raises(TunesmithError, match="tuning.lora.target_modules"):
        apply_tuning(model, TuningConfig(method="lora", lora={"target_modules": ["nonexistent"]}))


def test_top_layers_trains_the_top_blocks_and_what_sits_above(model):
    apply_tuning(model, TuningConfig(method="freeze", top_layers=1))
    names = trainable_names(model)
    assert names == {n for n, _ in model.named_parameters() if n.startswith("model.layers.1.")} | {"model.norm.weight"}
    with pytest.raises(TunesmithError, match=r"tuning.top_layers: 3 is more than the model's 2 layers"):
        apply_tuning(model, TuningConfig(method="freeze", top_layers=3))


def test_none_freezes_everything(model):
    assert count_parameters(apply_tuning(model, TuningConfig(method="none"))).trainable == 0
