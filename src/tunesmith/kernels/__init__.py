"""Faster pieces of a training step, each proven equal to the reference it replaces (tests/kernels).

- `attention`: attention over packed rows that computes each sample's causal block only
  (the reference builds a rows x rows block mask and attends over all of it);
- `dropout`: LoRA's input dropout fused into the adapter's A matmul, with a 16-bit mask drawn
  from 64-bit random words (PEFT draws one Bernoulli float per element and keeps the dropped copy);
- `native`: the C kernels (native.c) that need one pass over memory where numpy and torch take
  several, built once per machine with the system's compiler (numpy fallback without one);
- `compile`: regional `torch.compile` of the repeated decoder blocks.
"""
