"""LoRA's input dropout fused into the adapter's A projection.

PEFT computes `lora_A(dropout(x))` for every adapted linear layer: `nn.Dropout` draws one
Bernoulli sample per element through the generic RNG path (about 6 ns each on these CPUs) and
autograd keeps both its mask and the dropped fp32 copy of x for A's weight gradient. SmolLM2-135M
has 7 adapted layers per block, so a 512-token step draws ~77M samples: about a quarter of the
step's time and ~0.4 GiB of saved activations.

Here `y = (x * keep / (1 - p)) @ A^T` is one op: the keep-mask comes from 64-bit random words cut
into four 16-bit lanes (p is exact to 1/65536), only the mask is saved, packed to one bit per
element (x is saved anyway, shared with the other layers that read it: a 512-token step keeps
~10 MB of masks instead of ~77 MB of bytes), and the dropped x is rebuilt in the backward pass. Same
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


def _cpu_keep(n: int, p: float) -> np.ndarray:
    """n booleans, True with probability 1 - p (to 1/65536), from numpy's PCG64 seeded by torch's generator."""
    seed = int(torch.randint(0, 2**62, (1,)))
    words = np.random.PCG64(seed).random_raw((n + 3) // 4)
    return np.greater_equal(words.view(np.int16)[:n], round(p * LANES) - 32768)  # lanes uniform over int16


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """0/1 uint8 mask, 1 with probability 1 - p (to 1/65536).

    The bits come from numpy's PCG64 seeded by one draw of torch's default generator, so a run is
    as reproducible (and resumable) as with `nn.Dropout`; PCG64 fills 64-bit words about 3x faster
    than torch's CPU generator, each word gives four 16-bit lanes, and numpy compares int16 lanes
    ~5x faster than torch. uint8, not bool: float x uint8 multiplies ~3x faster on CPU than float x
    bool, which converts the mask first."""
    if torch.device(device).type != "cpu":  # accelerators draw on the device (a fused Philox kernel)
        return (torch.rand(shape, device=device) >= p).view(torch.uint8)
    return torch.from_numpy(_cpu_keep(math.prod(shape), p).view(np.uint8)).view(shape)


_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 uint8 mask as ceil(n / 8) bytes, least significant bit first (numpy's bitorder="little")."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.packbits(mask.reshape(-1).numpy(), bitorder="little"))
    return _pack_bits_torch(mask)


def unpack_bits(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The inverse of `pack_bits`: the 0/1 uint8 mask of `shape` (an op, so compiled backward passes can call it)."""
    return _unpack_bits(packed, list(shape))


@torch.library.custom_op("tunesmith::unpack_bits", mutates_args=())
def _unpack_bits(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    if packed.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(packed.numpy(), count=math.prod(shape), bitorder="little")).view(shape)
    return _unpack_bits_torch(packed, shape)


@_unpack_bits.register_fake
def _(packed, shape):
    return packed.new_empty(shape)


def _pack_bits_torch(mask: torch.Tensor) -> torch.Tensor:  # the same layout, for accelerators
    flat = F.pad(mask.reshape(-1), (0, -mask.numel() % 8)).view(-1, 8)
    return (flat * _BITS.to(flat.device)).sum(1, dtype=torch.uint8)


def _unpack_bits_torch(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    bits = (packed[:, None] & _BITS.to(packed.device)).ne(0).view(torch.uint8)
    return bits.reshape(-1)[: math.prod(shape)].view(shape)


@torch.library.custom_op("tunesmith::dropout_linear_bits", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _dropout_linear(x: torch.Tensor, weight: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    keep = keep_mask(x.shape, p, x.device)
    return F.linear(x * keep, weight).mul_(1.0 / (1.0 - p)), pack_bits(keep)


@_dropout_linear.register_fake
def _(x, weight, p):
    return x.new_empty(*x.shape[:-1], weight.shape[0]), torch.empty((x.numel() + 7) // 8, dtype=torch.uint8,
                                                                      device=x.device)


def _setup(ctx, inputs, output):
    x, weight, p = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.scale = 1.0 / (1.0 - p)


def _backward(ctx, grad_y, _grad_keep):
    x, weight, packed = ctx.saved_tensors
    keep = unpack_bits(packed, x.shape)
    grad_y = grad_y * ctx.scale
    grad_x = (grad_y @ weight).mul_(keep) if ctx.needs_input_grad[0] else None
    grad_w = None
    if ctx.needs_input_grad[1]:
        grad_w = grad_y.reshape(-1, grad_y.shape[-1]).t() @ (x * keep).reshape(-1, x.shape[-1])
    return grad_x, grad_w, None


_dropout_linear.register_autograd(_backward, setup_context=_setup)


def dropout_linear(x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    """`F.linear(F.dropout(x, p), weight)` in training, as one op that saves a 1-bit mask."""
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
