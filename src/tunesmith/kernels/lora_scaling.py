"""LoRA's scaling applied on the rank side: `B((s * A x))` instead of PEFT's `B(A x) * s`.

PEFT's vanilla LoRA layer adds `lora_B(lora_A(dropout(x))) * scaling` to the base output: the
scaling multiplies a [tokens, out_features] tensor, and autograd multiplies the incoming gradient
by it again (another [tokens, out_features] pass) before B's two backward GEMMs. The product is
linear, so the scale can as well multiply A's [tokens, r] output: the same sum, with two full-size
passes per adapted layer and step turned into passes over r = 8-64 columns. SmolLM2-135M with all
linear layers adapted writes ~640 MB less per 512-token step that way.

`scale_on_rank(model)` swaps this forward into a PEFT model's plain LoRA linear layers in place
(`__class__` only: parameters, state dict, saved adapters, merging and `adapter_names` batches are
PEFT's). Every case other than un-merged vanilla adapters on a plain call goes to PEFT's forward.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS, Linear

# forward kwargs that are PEFT's, not the base layer's: a mixed-adapter batch and the variants' (aLoRA's offsets)
_PEFT_KWARGS = ("adapter_names", *VARIANT_KWARG_KEYS)


class RankScaledLinear(Linear):
    """A PEFT LoRA `Linear` whose vanilla adapters scale A's output instead of B's."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        keys = _PEFT_KWARGS
        if (self.disable_adapters or self.merged or any(kwargs.get(key) is not None for key in keys)
                or any(name in self.lora_variant for name in self.active_adapters)):
            return super().forward(x, *args, **kwargs)
        for key in keys:  # passed as None: not for the base layer
            kwargs.pop(key, None)
        result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            h = lora_a(self.lora_dropout[name](self._cast_input_dtype(x, lora_a.weight.dtype)))
            result = result + lora_b(h * self.scaling[name])
        return result.to(dtype)


def scale_on_rank(model: torch.nn.Module) -> int:
    """Give every plain PEFT LoRA linear layer of the model the rank-side scaling; returns how many."""
    swapped = 0
    for module in model.modules():
        if type(module) is Linear:
            module.__class__ = RankScaledLinear
            swapped += 1
    return swapped
