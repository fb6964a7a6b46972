"""Attention over packed rows, one causal block per sample ("varlen" attention, as flash-attn's).

The loop packs several samples into one row and restarts `position_ids` at 0 for each. The
reference (transformers' SDPA path) turns that into a rows x rows block-diagonal mask and runs
attention over the whole square; the CPU flash kernel cannot skip the masked blocks, so a
512-token row of three samples does about three times the work it needs. Here each sample's
block runs through the same flash kernel with `is_causal` (work: the sum of the squared sample
lengths, halved), forward and backward; the mask transformers still builds (SDPA's mask function
is registered for the implementation, so padded and generation batches work) goes unused.

Use: a model loaded with `attn_implementation=PACKED` (models.load_model does) behaves exactly
as SDPA unless a forward passes `packed_cu` (the cumulative segment boundaries over the
flattened batch, from `segments(position_ids)`), which the training paths do.
"""

from __future__ import annotations

import torch

from tunesmith.kernels.compile import op_name

PACKED = "tunesmith_packed"


def segments(position_ids: torch.Tensor) -> torch.Tensor:
    """Boundaries of the samples of a [batch, length] position_ids tensor, over the flattened batch:
    a sample starts wherever its position is 0 (every row starts one; padding is its own sample)."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    return torch.cat([starts, starts.new_tensor([flat.numel()])]).to("cpu")


def _blocks(cu: torch.Tensor) -> list[tuple[int, int]]:
    bounds = cu.tolist()
    return [(s, e) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]


def _flat(t: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] -> [B*L, H, D] (no copy for q/k/v as the projections lay them out)."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b * n, h, d)


def _view(flat: torch.Tensor, s: int, e: int) -> torch.Tensor:
    return flat[s:e].unsqueeze(0).transpose(1, 2)  # [1, H, l, D], strides of the [l, H, D] storage


@torch.library.custom_op(op_name("packed_attention", __file__), mutates_args=())
def _packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, n, d = q.shape
    qf, kf, vf = _flat(q), _flat(k), _flat(v)  # the CPU flash kernel takes grouped kv heads as they are
    out = q.new_empty(b * n, h, d)
    lse = q.new_empty(h, b * n, dtype=torch.float32)
    for s, e in _blocks(cu):
        o, lg = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _view(qf, s, e), _view(kf, s, e), _view(vf, s, e), 0.0, True, attn_mask=None, scale=scale)
        out[s:e] = o[0].transpose(0, 1)
        lse[:, s:e] = lg[0]
    return out.view(b, n, h, d), lse


@_packed_attention.register_fake
def _(q, k, v, cu, scale):
    b, h, n, d = q.shape
    return q.new_empty(b, n, h, d), q.new_empty(h, b * n, dtype=torch.float32)


@torch.library.custom_op(op_name("packed_attention_backward", __file__), mutates_args=())
def _packed_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               out: torch.Tensor, lse: torch.Tensor, cu: torch.Tensor,
                               scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, n, d = q.shape
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    of, gf = out.reshape(b * n, h, d), grad.reshape(b * n, h, d)
    gq, gk, gv = torch.empty_like(qf), torch.empty_like(kf), torch.empty_like(vf)  # the blocks cover every token
    for s, e in _blocks(cu):
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _view(gf, s, e), _view(qf, s, e), _view(kf, s, e), _view(vf, s, e), _view(of, s, e),
            lse[:, s:e].unsqueeze(0).contiguous(), 0.0, True, attn_mask=None, scale=scale)
        gq[s:e], gk[s:e], gv[s:e] = dq[0].transpose(0, 1), dk[0].transpose(0, 1), dv[0].transpose(0, 1)

    def back(flat: torch.Tensor) -> torch.Tensor:  # [B*L, heads, D] -> [B, heads, L, D] (BLHD storage)
        return flat.view(b, n, flat.shape[1], d).transpose(1, 2)

    return back(gq), back(gk), back(gv)


@_packed_attention_backward.register_fake
def _(grad, q, k, v, out, lse, cu, scale):
    def blhd(t: torch.Tensor) -> torch.Tensor:  # the layout the real kernel returns
        b, h, n, d = t.shape
        return t.new_empty(b, n, h, d).transpose(1, 2)

    return blhd(q), blhd(k), blhd(v)


def _setup(ctx, inputs, output):
    q, k, v, cu, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu)
    ctx.scale = scale


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu = ctx.saved_tensors
    gq, gk, gv = _packed_attention_backward(grad_out.contiguous(), q, k, v, out, lse, cu, ctx.scale)
    return gq, gk, gv, None, None


_packed_attention.register_autograd(_backward, setup_context=_setup)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of q [B, H, L, D] over k, v [B, Hkv, L, D] within each segment of `cu`; returns [B, L, H, D]."""
    return _packed_attention(q, k, v, cu, scale)[0]


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      packed_cu: torch.Tensor | None = None, **kwargs):
    """transformers attention interface: varlen attention when the forward passed `packed_cu` on CPU, else SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (packed_cu is None or query.device.type != "cpu" or dropout or query.shape[2] != key.shape[2]
            or torch.is_autocast_enabled("cpu")):  # (bf16 autocast: SDPA casts; this kernel runs fp32 inputs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return packed_attention(query, key, value, packed_cu, scale), None


def register() -> str:
    """Make PACKED a transformers attention implementation (its masks are SDPA's); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED, sdpa_mask)
    return PACKED


def packed_kwargs(model: torch.nn.Module, position_ids: torch.Tensor) -> dict:
    """`{"packed_cu": ...}` for a forward over packed rows when the model runs PACKED attention, else {}."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != PACKED or position_ids.device.type != "cpu":
        return {}
    return {"packed_cu": segments(position_ids)}
