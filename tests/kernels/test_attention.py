"""Packed (varlen) attention equals SDPA over the block-diagonal mask transformers builds."""

import pytest
import torch
from torch.library import opcheck

from tunesmith.kernels.attention import PACKED, _packed_attention, _packed_attention_backward, packed_attention, packed_kwargs, segments

# Two rows of 64 tokens: three samples in the first, one sample and its padding in the second.
POSITIONS = torch.tensor([list(range(20)) + list(range(30)) + list(range(14)),
                          list(range(50)) + list(range(14))])


def reference(q, k, v, positions, scale):
    groups = q.shape[1] // k.shape[1]
    sample = torch.cumsum((positions == 0).long(), -1)
    length = positions.shape[1]
    mask = (sample[:, :, None] == sample[:, None, :]) & torch.ones(length, length, dtype=torch.bool).tril()
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), attn_mask=mask[:, None], scale=scale)
    return out.transpose(1, 2)


def inputs(heads=6, kv_heads=2, dim=16):
    torch.manual_seed(0)
    q = torch.randn(2, 64, heads, dim).transpose(1, 2).requires_grad_()  # the layout q_proj(x).view().transpose() has
    k = torch.randn(2, kv_heads, 64, dim, requires_grad=True)
    v = torch.randn(2, kv_heads, 64, dim, requires_grad=True)
    return q, k, v


def test_segments_start_wherever_positions_restart():
    assert segments(POSITIONS).tolist() == [0, 20, 50, 64, 114, 128]


@pytest.mark.parametrize("kv_heads", [6, 2])
def test_forward_and_gradients_equal_sdpa_with_the_block_mask(kv_heads):
    q, k, v = inputs(kv_heads=kv_heads)
    ours = packed_attention(q, k, v, segments(POSITIONS), 0.25)
    ref = reference(q, k, v, POSITIONS, 0.25)
    assert ours.shape == ref.shape == (2, 64, 6, 16)
    assert torch.allclose(ours, ref, atol=1e-5)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)


def test_the_custom_ops_pass_torch_opcheck():
    q, k, v = inputs()
    cu = segments(POSITIONS)
    result = opcheck(_packed_attention._opoverload, (q, k, v, cu, 0.25))
    assert set(result.values()) == {"SUCCESS"}
    out, lse = _packed_attention(q, k, v, cu, 0.25)
    back = opcheck(_packed_attention_backward._opoverload,
                   (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), cu, 0.25))
    assert set(back.values()) == {"SUCCESS"}


def test_a_model_step_on_packed_rows_equals_the_masked_sdpa_step(tiny_path):
    from tunesmith.config import TuningConfig
    from tunesmith.models import load_model
    from tunesmith.stages.loop import loss_sum
    from tunesmith.tuning import apply_tuning

    torch.manual_seed(0)
    model = apply_tuning(load_model(tiny_path), TuningConfig(method="full"))
    assert model.config._attn_implementation == PACKED
    ids = torch.randint(5, 1000, POSITIONS.shape)
    labels = ids.clone()
    labels[:, :8] = -100
    batch = {"input_ids": ids, "position_ids": POSITIONS, "labels": labels}
    assert "packed_cu" in packed_kwargs(model, POSITIONS)

    def step():
        model.zero_grad()
        loss = loss_sum(model, batch)
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}

    packed_loss, packed_grads = step()
    import tunesmith.stages.loop as loop

    real = loop.packed_kwargs
    loop.packed_kwargs = lambda *_: {}  # the reference: transformers' block mask through SDPA
    try:
        sdpa_loss, sdpa_grads = step()
    finally:
        loop.packed_kwargs = real
    assert packed_loss == pytest.approx(sdpa_loss, rel=1e-6)
    assert all(torch.allclose(packed_grads[n], sdpa_grads[n], atol=1e-5) for n in sdpa_grads)


def test_without_packed_segments_the_model_attends_as_sdpa(tiny_path):
    from transformers import AutoModelForCausalLM

    from tunesmith.models import load_model

    ours = load_model(tiny_path).eval()
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_path, attn_implementation="sdpa").eval()
    ids = torch.randint(5, 1000, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # padded generation-style batch: the mask path must still work
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids, attention_mask=mask).logits,
                              sdpa(input_ids=ids, attention_mask=mask).logits, atol=1e-5)
