"""Online RL: the policy writes replies, a reward model (or function) scores them, the policy moves
toward the better ones while a KL penalty keeps it near the reference.

    tunesmith train examples/rlhf/rl.yaml

Each step takes `micro_batch_size x gradient_accumulation` prompts and samples
`rl.samples_per_prompt` replies for each (temperature, top-p, max_new_tokens). Two algorithms of
the PPO family, both critic-free, so no value model is held:
- `grpo`: advantage = (reward - mean of the prompt's group) / its std; per-token loss
  -min(ratio * A, clip(ratio) * A) + kl_coef * KL, with KL the k3 estimator against the reference.
- `rloo`: the KL (summed log-ratio of the reply) is subtracted from the reward, and the baseline is
  the mean of the group's other replies; the same clipped surrogate.
`updates_per_batch` > 1 takes several optimizer steps on one batch of samples (PPO epochs), where
the ratio moves off 1 and clipping engages. The loss is averaged over reply tokens. Dropout is off
throughout (as TRL advises): with it the ratio would be noise.

The reference is the base with the adapter disabled (LoRA), a frozen copy of `tuning.init_adapter`,
or, for full and frozen-layer tuning, a frozen copy of the starting model. Logged per step: mean and
std of reward, KL, reply length, clip fraction; sample replies every `rl.sample_every` steps
(samples.jsonl); greedy replies to held-out prompts are scored before, during (eval_every) and after.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from tunesmith.config import Recipe, RlConfig, TrainingConfig
from tunesmith.data.formats import split_off
from tunesmith.data.prompts import read_prompts
from tunesmith.data.render import IGNORE, PackedRow, collate
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.plots import rl_plot
from tunesmith.files import write_text_atomic
from tunesmith.generate import chat_prompt_ids, stop_token_ids
from tunesmith.rewards import Rewarder, open_rewarder
from tunesmith.stages.common import (build_model, check_output_dir, open_base, open_output_dir, memory_report,
                                     save_final, training_progress, write_summary)
from tunesmith.stages.policy import add_reference_adapter, as_reference, is_peft, reply_token_logps

SAMPLES_SHOWN = 2  # prompts whose first reply is logged every sample_every steps


@dataclass
class Prompt:
    where: str
    messages: list[dict[str, str]]
    ids: list[int]


def read_prompt_rows(paths: list[str], tokenizer, room: int) -> tuple[list[Prompt], int]:
    """Prompts that leave `room` tokens within max_length for the reply; returns (prompts, dropped as too long)."""
    prompts, dropped = [], 0
    for path in paths:
        for n, messages in enumerate(read_prompts(path), start=1):
            ids = chat_prompt_ids(tokenizer, messages)
            if len(ids) > room:
                dropped += 1
                continue
            prompts.append(Prompt(f"{path}:{n}", messages, ids))
    return prompts, dropped


@dataclass
class Rollout:
    prompts: list[Prompt]  # one per reply
    replies: list[list[int]]  # reply tokens, the stop token included when the reply ended
    texts: list[str]
    rewards: list[float]
    truncated: int


class RlObjective:
    """Rollouts (sample, score, advantages, reference log-probs) as the loop's batches; the clipped surrogate as its loss."""

    eval_key = "eval_reward"

    def __init__(self, model, tokenizer, rewarder: Rewarder, config: RlConfig, training: TrainingConfig,
                 reference_model=None) -> None:
        self.model, self.tokenizer, self.rewarder, self.config = model, tokenizer, rewarder, config
        self.training, self.reference_model = training, reference_model
        self.updates_per_batch = config.updates_per_batch
        self.pad = tokenizer.pad_token_id
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.draws = 0  # rollouts drawn so far: the sampling seed of the next one (set on resume)
        self.last: Rollout | None = None
        self._stats: dict[str, list[float]] = {}
        self._tokens = 0  # prompt + reply tokens of the step's rollouts

    # -- sampling --
    @torch.no_grad()
    def generate(self, prompts: list[Prompt], samples: int, greedy: bool = False, seed: int = 0) -> list[list[int]]:
        """`samples` replies per prompt (prompt-major), as token lists ending with the stop token when one came."""
        model, config = self.model, self.config
        device = next(model.parameters()).device
        width = max(len(p.ids) for p in prompts)
        ids = torch.tensor([[self.pad] * (width - len(p.ids)) + p.ids for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p.ids)) + [1] * len(p.ids) for p in prompts], device=device)
        from transformers import GenerationConfig

        # A fresh config: a model's own defaults (repetition penalty, top-k, ...) would sample from another
        # distribution than the one whose log-probs the loss uses.
        sampling = (dict(do_sample=False) if greedy else
                    dict(do_sample=True, temperature=config.temperature, top_p=config.top_p, top_k=0))
        settings = GenerationConfig(max_new_tokens=config.max_new_tokens, num_return_sequences=samples,
                                    eos_token_id=self.stop_ids, pad_token_id=self.pad, **sampling)
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=settings)
        replies = []
        for row in out[:, width:].tolist():
            end = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
            replies.append(row if end is None else row[: end + 1])
        return replies

    def rollout(self, prompts: list[Prompt]) -> Rollout:
        k = self.config.samples_per_prompt
        was_training = self.model.training
        self.model.eval()
        try:
            replies = self.generate(prompts, k, seed=self.training.seed * 1_000_003 + self.draws)
        finally:
            self.model.train(was_training)
        self.draws += 1
        expanded = [p for p in prompts for _ in range(k)]
        texts = [self.tokenizer.decode(r, skip_special_tokens=True).strip() for r in replies]
        rewards = self.rewarder([p.messages for p in expanded], texts)
        truncated = sum(1 for r in replies if not r or r[-1] not in self.stop_ids)
        return Rollout(expanded, replies, texts, rewards, truncated)

    # -- the loop's interface --
    def batch(self, prompts: list[Prompt], device: torch.device) -> dict[str, torch.Tensor]:
        rollout = self.rollout(prompts)
        self.last = rollout
        rows = []
        for prompt, reply in zip(rollout.prompts, rollout.replies):
            reply = reply or [self.stop_ids[0]]  # an empty reply still teaches (its first token ended it)
            ids = prompt.ids + reply
            rows.append(PackedRow(ids, [IGNORE] * len(prompt.ids) + reply, list(range(len(ids)))))
        batch = {k: v.to(device) for k, v in collate(rows, self.pad).items()}
        rewards = torch.tensor(rollout.rewards, dtype=torch.float32, device=device)
        with torch.no_grad():
            self.model.eval()
            ref, rows_of = self._reference_logps(batch)
            old = None
            if self.updates_per_batch > 1 or self.config.algorithm == "rloo":
                old, _ = reply_token_logps(self.model, batch, self.config.temperature)
        n = rewards.shape[0]
        seq_kl = None
        if old is not None:
            seq_kl = torch.zeros(n, device=device).index_add(0, rows_of, old - ref)
        advantages = self._advantages(rewards, seq_kl)
        batch.update(reward=rewards, advantage=advantages, ref=ref, rows_of=rows_of)
        if old is not None:
            batch["old"] = old
        lengths = [len(r) for r in rollout.replies]
        self._tokens += sum(len(row.input_ids) for row in rows)
        self._add(reward=rollout.rewards, length=lengths, truncated=[rollout.truncated / n])
        return batch

    def _reference_logps(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference_model is not None:
            return reply_token_logps(self.reference_model, batch, self.config.temperature)
        with as_reference(self.model):
            return reply_token_logps(self.model, batch, self.config.temperature)

    def _advantages(self, rewards: torch.Tensor, seq_kl: torch.Tensor | None) -> torch.Tensor:
        k = self.config.samples_per_prompt
        if self.config.algorithm == "rloo":
            shaped = rewards - self.config.kl_coef * seq_kl if self.config.kl_coef else rewards
            groups = shaped.view(-1, k)
            baseline = (groups.sum(1, keepdim=True) - groups) / (k - 1)  # the mean of the other replies
            return (groups - baseline).reshape(-1)
        groups = rewards.view(-1, k)
        centred = groups - groups.mean(1, keepdim=True)
        if self.config.scale_rewards:
            centred = centred / (groups.std(1, keepdim=True) + 1e-4)
        return centred.reshape(-1)

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        model.eval()  # dropout off: the ratio to the sampling policy must be exactly 1 before the first update
        logps, rows_of = reply_token_logps(model, batch, self.config.temperature)
        old = batch.get("old", logps.detach())
        ratio = torch.exp(logps - old)
        advantage = batch["advantage"][rows_of]
        eps = self.config.clip_range
        clipped = torch.clamp(ratio, 1 - eps, 1 + eps)
        per_token = -torch.min(ratio * advantage, clipped * advantage)
        log_ratio_ref = batch["ref"] - logps
        kl = torch.exp(log_ratio_ref) - log_ratio_ref - 1  # k3: unbiased for KL(policy || reference), never < 0
        if self.config.algorithm == "grpo" and self.config.kl_coef:
            per_token = per_token + self.config.kl_coef * kl
        with torch.no_grad():
            n = batch["input_ids"].shape[0]
            seq_kl = torch.zeros(n, device=logps.device).index_add(0, rows_of, kl.detach())
            clip = ((ratio < 1 - eps) & (advantage < 0)) | ((ratio > 1 + eps) & (advantage > 0))
            self._add(kl=seq_kl.tolist(), clip_fraction=[float(clip.float().mean())])
        return per_token.sum()

    def tokens(self, prompts: list[Prompt]) -> int:
        """Tokens of the step's rollouts (the loop asks once per micro-batch after the step; the first call takes all)."""
        counted, self._tokens = self._tokens, 0
        return counted

    def _add(self, **values: list[float]) -> None:
        for key, series in values.items():
            self._stats.setdefault(key, []).extend(series)

    def step_metrics(self) -> dict:
        stats, self._stats = self._stats, {}
        out = {}
        for key in ("reward", "length"):
            if stats.get(key):
                values = torch.tensor(stats[key], dtype=torch.float64)
                out[f"{key}_mean"] = round(float(values.mean()), 5)
                if key == "reward":
                    out["reward_std"] = round(float(values.std()) if len(values) > 1 else 0.0, 5)
        n_updates = self.updates_per_batch
        if stats.get("kl"):  # the KL of the last update's pass (the policy after all but one of this batch's steps)
            last = stats["kl"][-len(stats["kl"]) // n_updates:]
            out["kl"] = round(sum(last) / len(last), 6)
        if stats.get("clip_fraction"):
            out["clip_fraction"] = round(sum(stats["clip_fraction"]) / len(stats["clip_fraction"]), 5)
        if stats.get("truncated"):
            out["truncated_share"] = round(sum(stats["truncated"]) / len(stats["truncated"]), 4)
        return out

    # -- held-out evaluation --
    def evaluate(self, model, rows: list[Prompt], batch_size: int, device, autocast_bf16, max_batches) -> float:
        """Mean reward of greedy replies to the held-out prompts."""
        _, texts = self.answer(rows, batch_size)
        return sum(self.rewarder([p.messages for p in rows], texts)) / max(len(rows), 1)

    def answer(self, rows: list[Prompt], batch_size: int) -> tuple[list[list[int]], list[str]]:
        was_training = self.model.training
        self.model.eval()
        replies = []
        try:
            for start in range(0, len(rows), batch_size):
                replies += self.generate(rows[start : start + batch_size], 1, greedy=True)
        finally:
            self.model.train(was_training)
        return replies, [self.tokenizer.decode(r, skip_special_tokens=True).strip() for r in replies]


def run(recipe: Recipe, console: Console, resume: bool = False, overwrite: bool = False) -> dict:
    from tunesmith.stages.loop import Loop, read_metrics

    config, training = recipe.rl, recipe.training
    # 1. Check everything before touching the output folder: prompts, the reward, the base.
    check_output_dir(recipe, resume, overwrite)
    base = open_base(recipe)
    room = training.max_length - config.max_new_tokens
    prompts, too_long = read_prompt_rows(recipe.data.train, base.tokenizer, room)
    if recipe.data.max_rows:
        prompts = prompts[: recipe.data.max_rows]
    if recipe.data.validation:
        held, more = read_prompt_rows(recipe.data.validation, base.tokenizer, room)
        too_long += more
    else:
        prompts, held = split_off(prompts, recipe.data.validation_fraction, training.seed)
    held = held[: config.eval_prompts]
    if not prompts:
        raise TunesmithError(f"{recipe.data.train[0]}: no prompt fits in training.max_length - rl.max_new_tokens = "
                             f"{room} tokens; raise max_length or lower max_new_tokens")
    with console.status("loading the reward..."):
        rewarder = open_rewarder(config.reward_model, config.reward_function, recipe.model.device)
    console.print(f"data: {len(prompts):,} prompts, {len(held):,} held out; dropped {too_long} too long for "
                  f"{room} prompt tokens; reward: {rewarder.name}")

    # 2. The policy and its reference.
    out = open_output_dir(recipe, resume, overwrite)
    model, report = build_model(recipe, base)
    reference_model = None
    if recipe.tuning.init_adapter:
        add_reference_adapter(model)
        reference = f"{recipe.tuning.init_adapter} (frozen copy)"
    elif is_peft(model):
        reference = "the base (adapter disabled)"
    else:  # full or frozen-layer tuning: the starting weights, held frozen beside the policy
        reference_model = copy.deepcopy(model).eval().requires_grad_(False)
        reference = "a frozen copy of the starting model"
    console.print(f"[bold]{report}[/bold] ({recipe.tuning.method}); {config.algorithm}, reference: {reference}")
    objective = RlObjective(model, base.tokenizer, rewarder, config, training, reference_model)
    device = base.runtime.torch_device
    loop = Loop(model, prompts, held, training, out, base.tokenizer.pad_token_id, device, base.runtime.autocast_bf16,
                objective=objective)
    start = loop.resume() if resume else 0
    objective.draws = start * training.gradient_accumulation
    samples_path = out / "samples.jsonl"
    before = None
    if start:
        console.print(f"resumed from step {start} of {loop.plan.total_steps}")
        kept = [r for r in read_metrics(samples_path) if r["step"] <= start]
        write_text_atomic(samples_path, "".join(json.dumps(r) + "\n" for r in kept))
        before = next((r["eval_reward"] for r in read_metrics(loop.metrics_path)
                       if r.get("step") == 0 and "eval_reward" in r), None)
    else:
        loop.metrics_path.unlink(missing_ok=True)
        samples_path.unlink(missing_ok=True)
        if held:
            with console.status("answering held-out prompts before training..."):
                before = loop.evaluate()
            loop.log({"step": 0, "eval_reward": round(before, 6)})
            console.print(f"held-out mean reward before: {before:.4f} ({len(held)} prompts, greedy)")

    def on_step(record: dict, show) -> None:
        show(record)
        step = record.get("step", 0)
        if "loss" in record and objective.last and (step % config.sample_every == 0 or step == 1):
            rollout, k = objective.last, config.samples_per_prompt
            lines = [{"step": step, "prompt": rollout.prompts[i].messages[-1]["content"], "reply": rollout.texts[i],
                      "reward": round(rollout.rewards[i], 5)} for i in range(0, min(len(rollout.texts), SAMPLES_SHOWN * k), k)]
            with samples_path.open("a", encoding="utf-8") as handle:
                handle.write("".join(json.dumps(line) + "\n" for line in lines))
            console.print(f"  step {step} sample (reward {lines[0]['reward']:+.3f}): {lines[0]['reply'][:160]!r}")

    # 3. Train; answer the held-out prompts again.
    with training_progress(console, loop.plan.total_steps, start, describe=_describe) as show:
        loop.on_step = lambda record: on_step(record, show)
        result = loop.run()
    after = None
    if held:
        with console.status("answering held-out prompts after training..."):
            after = loop.evaluate()
        loop.log({"step": loop.step, "eval_reward": round(after, 6), "final": True})
        result.eval_losses.append((loop.step, after))
    records = read_metrics(loop.metrics_path)
    steps = [r for r in records if "loss" in r]
    summary = {
        "stage": "rl", "algorithm": config.algorithm, "method": recipe.tuning.method, "base": recipe.model.path,
        "reference": reference, "reward": rewarder.name, "prompts": len(prompts), "heldout_prompts": len(held),
        "samples_per_prompt": config.samples_per_prompt, "kl_coef": config.kl_coef,
        "trainable_parameters": report.trainable, "total_parameters": report.total,
        "steps": result.steps, "train_seconds": round(result.seconds, 1),
        "steps_per_minute": round(60 * len(steps) / max(result.seconds, 1e-9), 2) if steps else None,
        "eval_reward_before": None if before is None else round(before, 5),
        "eval_reward_after": None if after is None else round(after, 5),
        "reward_first_steps": _mean([r["reward_mean"] for r in steps[:5] if "reward_mean" in r]),
        "reward_last_steps": _mean([r["reward_mean"] for r in steps[-5:] if "reward_mean" in r]),
        "kl_last": steps[-1].get("kl") if steps else None,
    }
    summary["files"] = save_final(model, base.tokenizer, out)
    summary.update(memory_report())
    write_summary(out, summary, result.train_losses, [], f"rl ({config.algorithm}) · {recipe.tuning.method}",
                  ylabel="surrogate loss per reply token")
    rl_plot(out / "rl.png", records, f"rl ({config.algorithm}) · {Path(recipe.model.path).name} · reward {rewarder.name}")
    return summary


def _describe(record: dict) -> str:
    parts = [f"reward {record['reward_mean']:+.3f}" if "reward_mean" in record else "",
             f"KL {record['kl']:.4f}" if "kl" in record else "",
             f"len {record['length_mean']:.0f}" if "length_mean" in record else ""]
    return "  ".join(p for p in parts if p)


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 5) if values else None
