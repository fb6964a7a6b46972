"""LoRA's input dropout fused into the adapter's A projection.

PEFT computes `lora_A(dropout(x))` for every adapted linear layer: `nn.Dropout` draws one
Bernoulli sample per element through the generic RNG path (about 6 ns each on these CPUs) and
autograd keeps both its mask and the dropped fp32 copy of x for A's weight gradient. SmolLM2-135M
has 7 adapted layers per block, so a 512-token step draws ~77M samples: about a quarter of the
step's time and ~0.4 GiB of saved activations.

Here `y = (x * keep / (1 - p)) @ A^T` is one op. The keep-mask is a function of a seed (one draw
of torch's generator, so runs are as reproducible and resumable as with `nn.Dropout`) and the
element's index: element i reads the 16-bit lane i % 4 of the 64-bit SplitMix64 word i // 4 and is
kept when the lane is at least round(65536 p) (p exact to 1/65536). Only the mask is saved, one bit
per element (x is saved anyway, shared with the other layers that read it: a 512-token step keeps
~10 MB of masks instead of ~77 MB of bytes), and the dropped x is rebuilt in the backward pass.

On CPU the draw, the comparison, the bit packing and the multiply are one pass of C (native.c,
~30 us for a [512, 576] input on 2 cores, against ~300 us for numpy's draw plus torch's multiply);
with AVX-512 and rows of whole 64-element mask blocks (hidden sizes are) the product with A runs in
the same pass and the dropped x is never written (`lora_a`), and the eager backward's two products
read the mask as they go (`lora_a_dx`, `lora_a_dw`): a [512, 576] layer's forward and backward
~1.0 -> ~0.7 ms in isolation;
without a C compiler the numpy reference below computes the same masks. Accelerators draw with
`torch.rand` on the device. Same distribution as `nn.Dropout` (tests/kernels check the drop rate,
the lanes, the C kernel against the numpy reference bit for bit, and the gradients).
`fuse_lora_dropout(model)` swaps it into a PEFT model in place: the state dict, the saved adapter
and merging are unchanged (A keeps its `weight`); in eval mode A is a plain linear layer.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from tunesmith.kernels import native
from tunesmith.kernels.compile import op_name

LANES = 65536  # 16-bit lanes: p is quantised to a multiple of 1/65536
_GAMMA, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _seed() -> int:
    return int(torch.randint(0, 2**62, (1,)))


def _threshold(p: float) -> int:
    return min(LANES - 1, max(1, round(p * LANES)))


def reference_keep(seed: int, n: int, p: float) -> np.ndarray:
    """n booleans, True with probability 1 - p (to 1/65536): lane i % 4 of SplitMix64(seed) word i // 4 (as native.c)."""
    z = np.uint64(seed) + np.arange(1, (n + 3) // 4 + 1, dtype=np.uint64) * _GAMMA  # wraps mod 2**64, as in C
    z ^= z >> np.uint64(30)
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    return np.greater_equal(z.view(np.uint16)[:n], _threshold(p))


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """0/1 uint8 mask, 1 with probability 1 - p (to 1/65536), from a seed drawn from torch's generator.

    uint8, not bool: float x uint8 multiplies ~3x faster on CPU than float x bool, which converts the mask first."""
    if torch.device(device).type != "cpu":  # accelerators draw on the device (a fused Philox kernel)
        return (torch.rand(shape, device=device) >= p).view(torch.uint8)
    return torch.from_numpy(reference_keep(_seed(), math.prod(shape), p).view(np.uint8)).view(shape)


def _native(x: torch.Tensor):
    """The C library when x can go through it (fp32 on CPU), else None."""
    return native.library() if x.device.type == "cpu" and x.dtype == torch.float32 else None


_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 uint8 mask as ceil(n / 8) bytes, least significant bit first (numpy's bitorder="little")."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.packbits(mask.reshape(-1).numpy(), bitorder="little"))
    return _pack_bits_torch(mask)


def unpack_bits(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The inverse of `pack_bits`: the 0/1 uint8 mask of `shape`."""
    if packed.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(packed.numpy(), count=math.prod(shape), bitorder="little")).view(shape)
    return _unpack_bits_torch(packed, shape)


def _pack_bits_torch(mask: torch.Tensor) -> torch.Tensor:  # the same layout, for accelerators
    flat = F.pad(mask.reshape(-1), (0, -mask.numel() % 8)).view(-1, 8)
    return (flat * _BITS.to(flat.device)).sum(1, dtype=torch.uint8)


def _unpack_bits_torch(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Pointwise ops only (no constant tensor), so that compiled graphs fuse the unpacking into its consumer.

    When rows start on a byte (last dimension a multiple of 8, as hidden sizes are) the bytes are viewed
    per row: the compiled kernel then finds element (r, c) at byte (r, c // 8), where the flat form's
    index took a 64-bit modulo by a symbolic size per element (~1.8 ms per [512, 1536] mask)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    if len(shape) and shape[-1] % 8 == 0:
        return ((packed.view(-1, shape[-1] // 8)[..., None] >> shifts) & 1).view(shape)
    bits = (packed[:, None] >> shifts) & 1
    return bits.reshape(-1)[: math.prod(shape)].view(shape)


@torch.library.custom_op(op_name("dropout_linear", __file__), mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _dropout_linear(x: torch.Tensor, weight: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    lib = _native(x)
    if lib is None:
        keep = keep_mask(x.shape, p, x.device)
        return F.linear(x * keep, weight).mul_(1.0 / (1.0 - p)), pack_bits(keep)
    x = x.contiguous()
    packed = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8)
    if _fused_a(x, weight):  # the product without writing the dropped x (native.c, lora_a)
        weight = weight.contiguous()
        h = x.new_empty(*x.shape[:-1], weight.shape[0])
        if lib.tunesmith_lora_a(x.data_ptr(), weight.data_ptr(), h.data_ptr(), packed.data_ptr(), x.numel() // x.shape[-1],
                                x.shape[-1], weight.shape[0], _seed(), _threshold(p), 1.0 / (1.0 - p),
                                torch.get_num_threads()) == 0:
            return h, packed
    dropped = torch.empty_like(x)
    lib.tunesmith_dropout_forward(x.data_ptr(), dropped.data_ptr(), packed.data_ptr(), x.numel(), _seed(),
                                  _threshold(p), 1.0 / (1.0 - p), torch.get_num_threads())
    return F.linear(dropped, weight), packed


def _fused_a(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether native.c's fused LoRA-A kernels take this input: fp32 on CPU, rows of whole 64-element mask blocks,
    an AVX-512 build (elsewhere they decline and the steps run apart)."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.shape[-1] % 64 == 0
            and native.library() is not None and native.has_avx512())


@torch.library.custom_op(op_name("lora_a_grad_input", __file__), mutates_args=())
def _lora_a_grad_input(grad_h: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor, scale: float) -> torch.Tensor:
    """`scale * keep * (grad_h @ weight)`: the input gradient of a dropped A projection, masked as it is written."""
    grad_h, weight = grad_h.contiguous(), weight.contiguous()
    out = grad_h.new_empty(*grad_h.shape[:-1], weight.shape[1])
    rows = grad_h.numel() // grad_h.shape[-1]
    if native.library().tunesmith_lora_a_dx(grad_h.data_ptr(), weight.data_ptr(), packed.data_ptr(), out.data_ptr(),
                                            rows, weight.shape[1], weight.shape[0], scale, torch.get_num_threads()):
        return _dropout_mask(grad_h @ weight, packed, scale)  # the kernel declined: the separate steps
    return out


@_lora_a_grad_input.register_fake
def _(grad_h, weight, packed, scale):
    return grad_h.new_empty(*grad_h.shape[:-1], weight.shape[1])


@torch.library.custom_op(op_name("lora_a_grad_weight", __file__), mutates_args=())
def _lora_a_grad_weight(grad_h: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, scale: float) -> torch.Tensor:
    """`scale * grad_h^T @ (keep * x)`: A's gradient, x read once through the mask."""
    grad_h, x = grad_h.contiguous(), x.contiguous()
    out = x.new_empty(grad_h.shape[-1], x.shape[-1])
    rows = x.numel() // x.shape[-1]
    if native.library().tunesmith_lora_a_dw(grad_h.data_ptr(), x.data_ptr(), packed.data_ptr(), out.data_ptr(), rows,
                                            x.shape[-1], grad_h.shape[-1], scale, torch.get_num_threads()):
        return grad_h.reshape(rows, -1).t() @ _dropout_mask(x, packed, scale).reshape(rows, -1)  # declined (no memory)
    return out


@_lora_a_grad_weight.register_fake
def _(grad_h, x, packed, scale):
    return x.new_empty(grad_h.shape[-1], x.shape[-1])


@_dropout_linear.register_fake
def _(x, weight, p):
    return x.new_empty(*x.shape[:-1], weight.shape[0]), torch.empty((x.numel() + 7) // 8, dtype=torch.uint8,
                                                                      device=x.device)


def _setup(ctx, inputs, output):
    x, weight, p = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.scale = 1.0 / (1.0 - p)


@torch.library.custom_op(op_name("dropout_mask", __file__), mutates_args=())
def _dropout_mask(t: torch.Tensor, packed: torch.Tensor, scale: float) -> torch.Tensor:
    """`t * keep * scale` for the packed keep-mask, through the C kernel when it can. The eager backward's
    path (compiled graphs unpack with tensor ops instead, see `_backward`); an op all the same, so that a
    tracer that reaches it anyway sees an opaque call rather than raw data pointers."""
    lib = _native(t)
    if lib is None:
        return t * unpack_bits(packed, t.shape) * scale
    t = t.contiguous()
    out = torch.empty_like(t)
    lib.tunesmith_dropout_apply(t.data_ptr(), out.data_ptr(), packed.data_ptr(), t.numel(), scale,
                                torch.get_num_threads())
    return out


@_dropout_mask.register_fake
def _(t, packed, scale):
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@torch.library.custom_op(op_name("unpack_mask", __file__), mutates_args=())
def _unpack_mask(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The packed mask as n 0/1 bytes (the C kernel expands 64 bits per store)."""
    lib = native.library() if packed.device.type == "cpu" else None
    if lib is None:
        return unpack_bits(packed, (n,))
    out = torch.empty(n, dtype=torch.uint8)
    lib.tunesmith_unpack_bits(packed.data_ptr(), out.data_ptr(), n, torch.get_num_threads())
    return out


@_unpack_mask.register_fake
def _(packed, n):
    return packed.new_empty(n)


def _backward(ctx, grad_y, _grad_keep):
    x, weight, packed = ctx.saved_tensors
    if _fused_a(x, weight) and not torch.compiler.is_compiling():  # native.c's masked products (eager)
        grad_x = _lora_a_grad_input(grad_y, weight, packed, ctx.scale) if ctx.needs_input_grad[0] else None
        grad_w = _lora_a_grad_weight(grad_y, x, packed, ctx.scale) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None
    if torch.compiler.is_compiling() or x.device.type != "cpu":
        # Traced (torch.compile) or on an accelerator: the masking is tensor ops, which the compiler fuses
        # into the kernels around it. x is then recomputed from the norm that made it, not saved: an
        # opaque op reading x would make the partitioner keep every such x alive until the backward pass
        # (+165 MB). On CPU the bits come out as bytes first (an op that reads only the mask): unpacked
        # inside the fused kernels they are gathered element by element (~100 ms per LoRA step).
        def mask(t: torch.Tensor) -> torch.Tensor:
            if t.device.type == "cpu":
                return t * _unpack_mask(packed, t.numel()).view(t.shape) * ctx.scale
            return t * _unpack_bits_torch(packed, t.shape) * ctx.scale
    else:
        def mask(t: torch.Tensor) -> torch.Tensor:
            return _dropout_mask(t, packed, ctx.scale)

    grad_x = mask(grad_y @ weight) if ctx.needs_input_grad[0] else None  # (compiled, the mask fuses into the sum)
    grad_w = None
    if ctx.needs_input_grad[1]:
        grad_w = grad_y.reshape(-1, grad_y.shape[-1]).t() @ mask(x).reshape(-1, x.shape[-1])
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
            weight = self.weight
            if torch.is_autocast_enabled(x.device.type):  # autocast does not see into an op: cast as it would
                dtype = torch.get_autocast_dtype(x.device.type)  # for F.linear (GPU bf16 training)
                x, weight = x.to(dtype), weight.to(dtype)
            return dropout_linear(x, weight, self.dropout_p)
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
