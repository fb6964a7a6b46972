"""LoRA's input dropout fused into the adapter's A projection.

PEFT computes `lora_A(dropout(x))` for every adapted linear layer: `nn.Dropout` draws one
Bernoulli sample per element through the generic RNG path (about 6 ns each on these CPUs) and
autograd keeps both its mask and the dropped fp32 copy of x for A's weight gradient. SmolLM2-135M
has 7 adapted layers per block, so a 512-token step draws ~77M samples: about a quarter of the
step's time and ~0.4 GiB of saved activations.

Here `y = (x * keep / (1 - p)) @ A^T` is one op: the keep-mask comes from 64-bit random words cut
into four 16-bit lanes (p is exact to 1/65536), only the 1-byte mask is saved (x is saved anyway,
shared with the other layers that read it) and the dropped x is rebuilt in the backward pass. Same
distribution as `nn.Dropout` (tests/kernels check the drop rate, the lanes and the gradients).
`fuse_lora_dropout(model)` swaps it into a PEFT model in place: the state dict, the saved adapter
and merging are unchanged (A keeps its `weight`); in eval mode A is a plain linear layer.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

LANES = 65536  # 16-bit lanes: p is quantised to a multiple of 1/65536


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """0/1 uint8 mask, 1 with probability 1 - p (to 1/65536).

    The bits come from numpy's PCG64 seeded by one draw of torch's default generator, so a run is
    as reproducible (and resumable) as with `nn.Dropout`; PCG64 fills 64-bit words about 3x faster
    than torch's CPU generator and each word gives four 16-bit lanes. uint8, not bool: float x uint8
    multiplies ~3x faster on CPU than float x bool, which converts the mask first."""
    if torch.device(device).type != "cpu":  # accelerators draw on the device (a fused Philox kernel)
        return (torch.rand(shape, device=device) >= p).view(torch.uint8)
    n = math.prod(shape)
    seed = int(torch.randint(0, 2**62, (1,)))
    words = np.random.PCG64(seed).random_raw((n + 3) // 4)
    lanes = torch.from_numpy(words.view(np.int16)[:n])  # uniform over [-32768, 32767]
    return (lanes >= round(p * LANES) - 32768).view(torch.uint8).view(shape).to(device)


@torch.library.custom_op("tunesmith::dropout_linear", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _dropout_linear(x: torch.Tensor, weight: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    keep = keep_mask(x.shape, p, x.device)
    return F.linear(x * keep, weight).mul_(1.0 / (1.0 - p)), keep


@_dropout_linear.register_fake
def _(x, weight, p):
    return x.new_empty(*x.shape[:-1], weight.shape[0]), torch.empty(x.shape, dtype=torch.uint8, device=x.device)


def _setup(ctx, inputs, output):
    x, weight, p = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.scale = 1.0 / (1.0 - p)


def _backward(ctx, grad_y, _grad_keep):
    x, weight, keep = ctx.saved_tensors
    grad_y = grad_y * ctx.scale
    grad_x = (grad_y @ weight) * keep if ctx.needs_input_grad[0] else None
    grad_w = None
    if ctx.needs_input_grad[1]:
        grad_w = grad_y.reshape(-1, grad_y.shape[-1]).t() @ (x * keep).reshape(-1, x.shape[-1])
    return grad_x, grad_w, None


_dropout_linear.register_autograd(_backward, setup_context=_setup)


def dropout_linear(x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    """`F.linear(F.dropout(x, p), weight)` in training, as one op that saves a 1-byte mask."""
    return _dropout_linear(x, weight, p)[0]


class DropoutLinear(torch.nn.Linear):
    """A LoRA A projection (no bias) that applies its layer's input dropout itself while training."""

    dropout_p: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_p > 0:
            return dropout_linear(x, self.weight, self.dropout_p)
        return F.linear(x, self.weight, self.bias)


def fuse_lora_dropout(model: torch.nn.Module) -> int:
    """Move every plain LoRA layer's input dropout into its A projection; returns how many were fused.

    Only vanilla LoRA on linear layers (DoRA and other variants, and adapters with a bias on A,
    keep PEFT's path)."""
    fused = 0
    for module in model.modules():
        drops, a_layers = getattr(module, "lora_dropout", None), getattr(module, "lora_A", None)
        if not isinstance(drops, torch.nn.ModuleDict) or not isinstance(a_layers, torch.nn.ModuleDict):
            continue
        variants = getattr(module, "lora_variant", {})
        for name, drop in list(drops.items()):
            a = a_layers[name] if name in a_layers else None
            if (not isinstance(drop, torch.nn.Dropout) or drop.p <= 0 or name in variants
                    or type(a) is not torch.nn.Linear or a.bias is not None):
                continue
            a.__class__ = DropoutLinear
            a.dropout_p = float(drop.p)
            drops[name] = torch.nn.Identity()
            fused += 1
    return fused
