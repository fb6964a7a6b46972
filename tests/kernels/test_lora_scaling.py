"""LoRA's scaling on the rank side: PEFT's outputs and gradients, its files, and its other paths unchanged."""

import torch

from tunesmith.kernels.dropout import fuse_lora_dropout
from tunesmith.kernels.lora_scaling import RankScaledLinear, scale_on_rank


def lora_model(tiny_path, **lora):
    from tunesmith.config import TuningConfig
    from tunesmith.models import load_model
    from tunesmith.tuning import apply_tuning

    torch.manual_seed(0)
    model = apply_tuning(load_model(tiny_path), TuningConfig(method="lora", lora={"r": 4, "alpha": 16, **lora}))
    for module in model.modules():  # B starts at zero: give it weights so the adapter shows in outputs
        if hasattr(module, "lora_B"):
            for b in module.lora_B.values():
                torch.nn.init.normal_(b.weight, std=0.1)
    return model


def pair(tiny_path, **lora):
    plain = lora_model(tiny_path, **lora)
    scaled = lora_model(tiny_path, **lora)
    scaled.load_state_dict(plain.state_dict())
    return plain, scaled


def test_outputs_and_gradients_equal_peft(tiny_path):
    plain, scaled = pair(tiny_path, dropout=0.0)
    layers = sum(1 for m in plain.modules() if hasattr(m, "lora_A"))
    assert scale_on_rank(scaled) == layers > 0 and scaled.state_dict().keys() == plain.state_dict().keys()
    ids = torch.randint(5, 1000, (2, 12))
    plain.train(), scaled.train()
    ref, ours = plain(input_ids=ids, labels=ids), scaled(input_ids=ids, labels=ids)
    assert torch.allclose(ours.logits, ref.logits, atol=1e-5)
    ref.loss.backward(), ours.loss.backward()
    named = dict(scaled.named_parameters())
    grads = [(p.grad, named[n].grad) for n, p in plain.named_parameters() if p.requires_grad]
    assert len(grads) == 2 * layers and all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in grads)


def test_with_fused_dropout_the_same_seed_gives_peft_fused_results(tiny_path):
    plain, scaled = pair(tiny_path, dropout=0.1)
    fuse_lora_dropout(plain), fuse_lora_dropout(scaled), scale_on_rank(scaled)
    ids = torch.randint(5, 1000, (1, 16))
    plain.train(), scaled.train()
    torch.manual_seed(3)
    ref = plain(input_ids=ids).logits
    torch.manual_seed(3)
    assert torch.allclose(scaled(input_ids=ids).logits, ref, atol=1e-5)


def test_merged_disabled_and_mixed_batches_take_peft_paths(tiny_path, tmp_path):
    from peft import PeftModel

    from tunesmith.models import load_model

    plain, scaled = pair(tiny_path, dropout=0.0)
    scale_on_rank(scaled)
    plain.eval(), scaled.eval()
    ids = torch.randint(5, 1000, (2, 10))
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
        with scaled.disable_adapter():
            base = scaled(input_ids=ids).logits
        assert not torch.allclose(base, expected, atol=1e-3)
        mixed = scaled(input_ids=ids, adapter_names=["default", "__base__"]).logits
        assert torch.allclose(mixed[0], expected[0], atol=1e-5) and torch.allclose(mixed[1], base[1], atol=1e-5)
        scaled.save_pretrained(tmp_path / "adapter")
        reloaded = PeftModel.from_pretrained(load_model(tiny_path), tmp_path / "adapter").eval()
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-5)
        merged = scaled.merge_and_unload()
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-4)


def test_dora_keeps_peft_forward(tiny_path):
    plain, scaled = pair(tiny_path, dropout=0.0, dora=True)
    assert scale_on_rank(scaled) > 0 and any(isinstance(m, RankScaledLinear) for m in scaled.modules())
    ids = torch.randint(5, 1000, (1, 10))
    with torch.no_grad():
        assert torch.equal(scaled.eval()(input_ids=ids).logits, plain.eval()(input_ids=ids).logits)
