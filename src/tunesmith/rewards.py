"""Rewards for (prompt, reply): a trained reward model, or a Python function given by import path.

A reward model is a causal LM's backbone with a one-output score head (transformers'
`...ForSequenceClassification` with `num_labels=1`, the layout TRL and others load). It reads the
conversation through the chat template, as at inference, and scores the last real token: the
position comes from the sequence's length, not from looking for padding, because many chat models
pad with their end-of-turn token (SmolLM2 does).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tunesmith.errors import TunesmithError

if TYPE_CHECKING:
    import torch


def last_token_scores(model: "torch.nn.Module", batch: dict[str, "torch.Tensor"]) -> "torch.Tensor":
    """Score of each sequence at its last real token; `batch["ends"]` holds its (row, column)."""
    from tunesmith.kernels.attention import packed_kwargs

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, inner.base_model_prefix)
    hidden = backbone(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                      **packed_kwargs(inner, batch["position_ids"])).last_hidden_state
    ends = batch["ends"]
    return inner.score(hidden[ends[:, 0], ends[:, 1]]).squeeze(-1).float()


class RewardModel:
    """A trained reward model, ready to score conversations in batches (no gradients)."""

    def __init__(self, model: "torch.nn.Module", tokenizer, batch_size: int = 8, max_length: int = 1024) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.device = next(model.parameters()).device

    def token_rows(self, conversations: list[list[dict[str, str]]]) -> list[list[int]]:
        """Each conversation rendered as at inference, cut to max_length the way training cut it (the end goes)."""
        rows = []
        for chat in conversations:
            text = self.tokenizer.apply_chat_template(chat, tokenize=False)
            rows.append(self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_length])
        return rows

    def score(self, conversations: list[list[dict[str, str]]]) -> list[float]:
        import torch

        from tunesmith.data.render import PackedRow, collate

        rows = self.token_rows(conversations)
        # Longest first, so each batch pads little; the scores go back in the callers' order.
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        by_index: dict[int, float] = {}
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                picked = order[start : start + self.batch_size]
                packed = [PackedRow(rows[i], rows[i], list(range(len(rows[i])))) for i in picked]
                batch = {k: v.to(self.device) for k, v in collate(packed, self.tokenizer.pad_token_id).items()}
                batch["ends"] = torch.tensor([(n, len(rows[i]) - 1) for n, i in enumerate(picked)], device=self.device)
                for i, value in zip(picked, last_token_scores(self.model, batch).tolist()):
                    by_index[i] = value
        return [by_index[i] for i in range(len(rows))]


def is_reward_model_dir(path: str | Path) -> bool:
    from tunesmith.adapters import ADAPTER_CONFIG

    path = Path(path)
    if (path / ADAPTER_CONFIG).is_file():
        import json

        return json.loads((path / ADAPTER_CONFIG).read_text()).get("task_type") == "SEQ_CLS"
    if (path / "config.json").is_file():
        import json

        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
        return any(a.endswith("ForSequenceClassification") for a in archs)
    return False


def load_reward_model(path: str | Path, device: str = "auto", batch_size: int = 8) -> RewardModel:
    """Load the output of a `stage: reward` run (a LoRA adapter with its head, or a whole model)."""
    from tunesmith.adapters import adapter_base, is_adapter_dir
    from tunesmith.config import ModelConfig
    from tunesmith.models import load_model, load_tokenizer, pick_runtime, resolve_base

    path = Path(path)
    if not path.is_dir():
        raise TunesmithError(f"{path}: reward model not found; give the output folder of a `stage: reward` run")
    if not is_reward_model_dir(path):
        raise TunesmithError(f"{path}: not a reward model (no scalar head); train one with `stage: reward`")
    tokenizer = load_tokenizer(path)
    if is_adapter_dir(path):
        from peft import PeftModel

        config = adapter_base(path).model_copy(update={"device": device})
        base = load_model(resolve_base(config), config, pick_runtime(config), scalar_head=True)
        base.config.pad_token_id = tokenizer.pad_token_id
        model = PeftModel.from_pretrained(base, path).merge_and_unload()  # merged: scoring runs at base speed
    else:
        config = ModelConfig(path=str(path), device=device)
        model = load_model(path, config, pick_runtime(config), scalar_head=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    return RewardModel(model, tokenizer, batch_size=batch_size, max_length=_trained_length(path))


def _trained_length(path: Path) -> int:
    import yaml

    recipe = path / "recipe.yaml"
    training = (yaml.safe_load(recipe.read_text()) or {}).get("training", {}) if recipe.is_file() else {}
    return int(training.get("max_length") or 1024)


RewardFunction = Callable[..., list[float]]


def load_reward_function(spec: str) -> RewardFunction:
    """'package.module:function' or 'path/to/file.py:function' -> the function (checked callable)."""
    target, _, name = spec.partition(":")
    if target.endswith(".py"):
        file = Path(target)
        if not file.is_file():
            raise TunesmithError(f"rl.reward_function: {file} not found")
        module_name = f"tunesmith_reward_{abs(hash(str(file.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(module_name, file)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:  # the user's file: report what broke, in one line
            raise TunesmithError(f"rl.reward_function: importing {file} failed: {type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise TunesmithError(f"rl.reward_function: cannot import {target!r} ({exc})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise TunesmithError(f"rl.reward_function: {target} has no function {name!r}")
    try:
        inspect.signature(function).bind([], [])
    except TypeError:
        raise TunesmithError(f"rl.reward_function: {name} must accept (prompts, completions)") from None
    return function


class Rewarder:
    """One interface over both kinds: scores for (prompt chat, reply) pairs, checked finite."""

    def __init__(self, model: RewardModel | None = None, function: RewardFunction | None = None,
                 name: str = "") -> None:
        self.model, self.function, self.name = model, function, name

    def __call__(self, prompts: list[list[dict[str, str]]], replies: list[str]) -> list[float]:
        import math

        if self.model is not None:
            scores = self.model.score([p + [{"role": "assistant", "content": r}] for p, r in zip(prompts, replies)])
        else:
            texts = [p[-1]["content"] for p in prompts]
            parameters = inspect.signature(self.function).parameters
            wants_chats = "prompt_messages" in parameters or any(p.kind == p.VAR_KEYWORD for p in parameters.values())
            scores = self.function(texts, replies, **({"prompt_messages": prompts} if wants_chats else {}))
            scores = list(scores)
            if len(scores) != len(replies):
                raise TunesmithError(f"rl.reward_function: {self.name} returned {len(scores)} scores for "
                                     f"{len(replies)} replies")
        try:
            values = [float(s) for s in scores]
        except (TypeError, ValueError):
            raise TunesmithError(f"rl.reward_function: {self.name} must return numbers") from None
        if not all(math.isfinite(v) for v in values):
            raise TunesmithError(f"{self.name}: a reward is not finite (NaN or infinite)")
        return values


def open_rewarder(reward_model: str | None, reward_function: str | None, device: str = "auto") -> Rewarder:
    if reward_model:
        return Rewarder(model=load_reward_model(reward_model, device), name=str(reward_model))
    return Rewarder(function=load_reward_function(reward_function), name=reward_function)
