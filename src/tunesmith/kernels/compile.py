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

import hashlib
from pathlib import Path

import torch


def op_name(name: str, source: str) -> str:
    """`tunesmith::NAME_<hash of the defining module's source>`, the name to register a custom op under.

    Inductor's and AOTAutograd's caches (on disk, kept across runs and upgrades) key a compiled graph
    on the ops it calls, not on the Python of an op's autograd formula, so a formula changed under an
    unchanged name reuses backward graphs traced from the old one (measured here: a stale backward that
    kept 156 MB more activations). A name that changes with the source makes the caches miss instead."""
    return f"tunesmith::{name}_{hashlib.sha256(Path(source).read_bytes()).hexdigest()[:10]}"


def compile_blocks(model: torch.nn.Module) -> int:
    """Compile every block of the model's layer stack in place; returns how many were compiled."""
    from tunesmith.tuning import layer_list

    _, layers = layer_list(model)
    for block in layers:
        block.compile(dynamic=True)
    return len(layers)
