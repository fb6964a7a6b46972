"""What the preference stages share about a policy: log-probabilities of replies, and its reference.

The reference is the model the policy is pulled back toward (DPO's denominator, RL's KL leash).
Under LoRA it costs no second copy of the model: it is the same weights with the adapter
disabled, or, when training continues an adapter (`tuning.init_adapter`), a frozen copy of that
adapter held beside it as a second, inactive PEFT adapter (TRL does the same). Full and frozen-layer
fine-tuning have no such trick; DPO then precomputes the reference once, and RL refuses.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from tunesmith.data.render import IGNORE
from tunesmith.kernels.attention import packed_kwargs
from tunesmith.stages.loop import PLAIN_HEAD_TYPES

REFERENCE = "reference"  # the frozen adapter's name


def reply_token_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                      temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every labelled token given what precedes it, and the sequence each belongs to.

    Only labelled positions are projected onto the vocabulary (where the architecture allows),
    so the fp32 logits of prompts and padding are never built."""
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "model_type", None) in PLAIN_HEAD_TYPES:
        hidden = base.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                                    **packed_kwargs(base, batch["position_ids"])).last_hidden_state[:, :-1]
        logits = base.get_output_embeddings()(hidden[keep])
    else:
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                       **packed_kwargs(base, batch["position_ids"])).logits[:, :-1][keep]
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = labels[keep]
    token_logps = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    # The sequence each token belongs to: its row, or its segment when sequences are packed into rows.
    owners = batch["segments"][:, 1:][keep] if "segments" in batch else keep.nonzero()[:, 0]
    return token_logps, owners


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of reply-token log-probabilities per sequence."""
    token_logps, owners = reply_token_logps(model, batch)
    count = batch["ends"].shape[0] if "ends" in batch else batch["input_ids"].shape[0]
    return torch.zeros(count, dtype=token_logps.dtype, device=token_logps.device).index_add(0, owners, token_logps)


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def add_reference_adapter(model: torch.nn.Module) -> None:
    """Hold a frozen copy of the active adapter as the reference (training continues an adapter)."""
    active = model.active_adapter
    model.add_adapter(REFERENCE, model.peft_config[active])
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            if f".{active}." in name:
                params[name.replace(f".{active}.", f".{REFERENCE}.")].copy_(param)
    model.set_adapter(active)  # add_adapter may leave the new one trainable; only the policy's adapter trains
    for name, param in params.items():
        if f".{REFERENCE}." in name:
            param.requires_grad_(False)


@contextmanager
def as_reference(model: torch.nn.Module):
    """Run the model as the reference inside this block (no gradients)."""
    with torch.no_grad():
        if not is_peft(model):
            raise RuntimeError("the reference of a full fine-tune is precomputed, not run")
        if REFERENCE not in model.peft_config:
            with model.disable_adapter():
                yield
            return
        active = model.active_adapter
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        model.set_adapter(REFERENCE)
        try:
            yield
        finally:
            model.set_adapter(active)
            for name, param in model.named_parameters():  # set_adapter flips requires_grad; restore exactly
                param.requires_grad_(name in trainable)
