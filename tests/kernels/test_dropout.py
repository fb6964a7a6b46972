"""LoRA dropout fused into A: nn.Dropout's distribution, exact gradients, PEFT's files and eval unchanged."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from tunesmith.kernels.dropout import (DropoutLinear, _dropout_linear, _dropout_mask, _pack_bits_torch, _unpack_bits_torch,
                                      dropout_linear, fuse_lora_dropout, keep_mask, pack_bits, unpack_bits)


def test_the_mask_keeps_one_minus_p_in_every_lane_and_follows_the_torch_seed():
    torch.manual_seed(0)
    keep = keep_mask((1000, 1000), 0.1)
    assert keep.dtype == torch.uint8 and set(keep.unique().tolist()) == {0, 1}
    sigma = math.sqrt(0.1 * 0.9 / 250_000)
    for lane in range(4):  # each 64-bit word gives four 16-bit lanes: each must be fair
        assert abs(keep.view(-1)[lane::4].float().mean().item() - 0.9) < 5 * sigma
    torch.manual_seed(0)
    assert torch.equal(keep_mask((1000, 1000), 0.1), keep)
    assert not torch.equal(keep_mask((1000, 1000), 0.1), keep)


def test_forward_and_gradients_equal_the_explicit_formula_with_the_same_mask():
    x = torch.randn(3, 40, 32, requires_grad=True)
    weight = torch.randn(8, 32, requires_grad=True)
    torch.manual_seed(5)
    ours = dropout_linear(x, weight, 0.2)
    torch.manual_seed(5)
    keep = keep_mask(x.shape, 0.2)
    ref = F.linear(x * keep / 0.8, weight)
    assert torch.allclose(ours, ref, atol=1e-5)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ours, (x, weight), grad), torch.autograd.grad(ref, (x, weight), grad)):
        assert torch.allclose(a, b, atol=1e-4)


def test_under_autocast_it_runs_in_the_autocast_dtype_and_grads_reach_fp32_weights():
    """GPU training runs LoRA under bf16 autocast, which does not see into the op (CPU autocast takes the
    same tensor path here): the layer casts as autocast would for F.linear, gradients come back in fp32."""
    layer = torch.nn.Linear(32, 8, bias=False)
    layer.__class__, layer.dropout_p = DropoutLinear, 0.1
    x = torch.randn(4, 32, requires_grad=True)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    torch.manual_seed(1)
    keep = keep_mask(x.shape, 0.1)
    ref_x, ref_w = x.detach().clone().requires_grad_(), layer.weight.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.linear(ref_x * keep / 0.9, ref_w)
    ref.float().square().sum().backward()
    assert torch.allclose(y.float(), ref.float(), rtol=2e-2, atol=1e-2)  # bf16: scaled after the product
    assert (layer.weight.grad - ref_w.grad).abs().max() <= 0.02 * ref_w.grad.abs().max()  # bf16 rounding


@pytest.mark.parametrize("shape", [(3, 5, 7), (8,), (1, 511, 576)])
def test_masks_are_saved_one_bit_per_element_and_come_back_the_same(shape):
    torch.manual_seed(1)
    mask = keep_mask(shape, 0.3)
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_bits(packed, shape), mask)
    # the accelerator path (torch ops) lays the bits out as numpy does
    assert torch.equal(_pack_bits_torch(mask), packed)
    assert torch.equal(_unpack_bits_torch(packed, shape), mask)


def test_the_op_saves_the_packed_mask():
    x, weight = torch.randn(2, 9, 16, requires_grad=True), torch.randn(4, 16, requires_grad=True)
    y, packed = _dropout_linear(x, weight, 0.5)
    assert packed.shape == ((x.numel() + 7) // 8,)
    keep = unpack_bits(packed, x.shape)
    assert torch.allclose(y, F.linear(x * keep * 2.0, weight), atol=1e-5)


def test_the_op_passes_torch_opcheck():
    x, weight = torch.randn(4, 10, 16, requires_grad=True), torch.randn(4, 16, requires_grad=True)
    result = opcheck(_dropout_linear._opoverload, (x, weight, 0.0))
    assert set(result.values()) == {"SUCCESS"}
    packed = pack_bits(keep_mask((4, 10, 16), 0.5))
    result = opcheck(_dropout_mask._opoverload, (torch.randn(4, 10, 16), packed, 1.25))
    assert set(result.values()) == {"SUCCESS"}


def test_the_expected_output_is_the_undropped_one():
    torch.manual_seed(0)
    x, weight = torch.randn(64, 32), torch.randn(4, 32)
    draws = torch.stack([dropout_linear(x, weight, 0.3) for _ in range(400)])
    z = (draws.mean(0) - F.linear(x, weight)) / (draws.std(0) / 20)  # standardised error of the mean of 400
    assert z.abs().max() < 5 and 0.7 < (z**2).mean() < 1.3


def lora_model(tiny_path, dora=False):
    from tunesmith.config import TuningConfig
    from tunesmith.models import load_model
    from tunesmith.tuning import apply_tuning

    torch.manual_seed(0)
    return apply_tuning(load_model(tiny_path), TuningConfig(method="lora", lora={"r": 4, "dropout": 0.1, "dora": dora}))


def test_fusing_keeps_the_state_dict_eval_outputs_and_saved_adapter(tiny_path, tmp_path):
    from peft import PeftModel

    from tunesmith.models import load_model

    plain, fused = lora_model(tiny_path), lora_model(tiny_path)
    for module in plain.modules():  # give B weights so the adapter changes outputs
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    fused.load_state_dict(plain.state_dict())
    layers = sum(1 for m in plain.modules() if hasattr(m, "lora_A"))
    assert fuse_lora_dropout(fused) == layers > 0
    assert sum(isinstance(m, DropoutLinear) for m in fused.modules()) == layers
    assert plain.state_dict().keys() == fused.state_dict().keys()
    ids = torch.randint(5, 1000, (2, 10))
    plain.eval(), fused.eval()
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, fused(input_ids=ids).logits, atol=1e-6)
    fused.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_model(tiny_path), tmp_path / "adapter").eval()
    assert reloaded.peft_config["default"].lora_dropout == 0.1
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-6)


def test_training_mode_drops_and_dora_keeps_peft_path(tiny_path):
    fused = lora_model(tiny_path)
    for module in fused.modules():  # B starts at zero: give it weights so the adapter shows in the output
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    fuse_lora_dropout(fused)
    fused.train()
    ids = torch.randint(5, 1000, (1, 16))
    first, second = fused(input_ids=ids).logits, fused(input_ids=ids).logits
    assert not torch.allclose(first, second)  # a fresh mask each forward
    assert fuse_lora_dropout(lora_model(tiny_path, dora=True)) == 0


@pytest.mark.parametrize("p", [0.0, 1e-6])
def test_nothing_to_fuse_without_dropout(tiny_path, p):
    from tunesmith.config import TuningConfig
    from tunesmith.models import load_model
    from tunesmith.tuning import apply_tuning

    model = apply_tuning(load_model(tiny_path), TuningConfig(method="lora", lora={"r": 4, "dropout": p}))
    assert fuse_lora_dropout(model) == (0 if p == 0 else sum(1 for m in model.modules() if hasattr(m, "lora_A")))
