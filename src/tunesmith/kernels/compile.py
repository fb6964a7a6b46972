"""Regional `torch.compile`: each repeated decoder block is compiled, the rest of the model stays eager.

The blocks share one code object, so with dynamo's default of treating module parameters as
inputs the block compiles once for all layers (about 20 s on 2 CPU cores for SmolLM2-135M, instead
of minutes for the whole model). Shapes are dynamic from the start: packed rows, padded batches
and the packed-attention segment list change length from step to step, and a static compile
would recompile mid-run; measured, the dynamic kernels are as fast here. Inductor fuses the blocks' elementwise chains (RMSNorm, rotary embedding, SwiGLU) and
recomputes them in the backward pass instead of keeping their outputs, which saves time and
activation memory; the matmuls, the packed attention and LoRA's fused dropout run as they do
eagerly (custom ops are opaque to the compiler).
"""

from __future__ import annotations

import torch


def compile_blocks(model: torch.nn.Module) -> int:
    """Compile every block of the model's layer stack in place; returns how many were compiled."""
    from tunesmith.tuning import layer_list

    _, layers = layer_list(model)
    for block in layers:
        block.compile(dynamic=True)
    return len(layers)
