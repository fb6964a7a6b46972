"""Preference training speed: tunesmith's reward and DPO stages vs TRL's RewardTrainer and DPOTrainer, and
RL steps per minute vs TRL's GRPOTrainer, same model, data and settings, in one run.

    .venv/bin/python bench/preference.py                       # default model, 8 steps each (~25 min on 2 cores)
    .venv/bin/python bench/preference.py --model tiny --steps 3   # smoke run

Each contender runs in its own fresh process, so its peak RSS is its own. Data: the first
hh-rlhf harmless pairs whose both sides fit in max_length (so neither side truncates or drops
rows differently). Both sides: LoRA r16 all-linear, dropout 0, fp32, batch 4 pairs, constant LR,
TRL in its best CPU setting (bf16=False, gradient_checkpointing=False). DPO's reference under LoRA is
the adapter-disabled base for both (TRL computes it every step; tunesmith once, before training,
and its time counts). RL: GRPO, 2 prompts x 4 samples, 32 new tokens, a Python reward (reply length),
so the policy's own cost is measured. Timing skips the first optimizer step (warm-up) except for
tunesmith DPO's reference pass, which is included.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "hh_rlhf_harmless" / "train.jsonl"
BATCH, MAX_LENGTH, LR = 4, 256, 1e-4
RL_PROMPTS, RL_SAMPLES, RL_TOKENS = 2, 4, 32


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def length_reward(prompts, completions, **_):
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]  # TRL passes chats for chat prompts
    return [min(len(t.split()), 30) / 30 for t in texts]


def fitting_pairs(args) -> list[dict]:
    """The first `rows` pairs (as prompt/chosen/rejected strings) whose both sides fit in MAX_LENGTH."""
    from tunesmith.data.preferences import read_preferences, render_pairs
    from tunesmith.models import load_tokenizer, resolve_base

    tokenizer = load_tokenizer(resolve_base(args.model))
    pairs, _ = read_preferences([args.data], skip_bad_rows=True)
    kept = []
    for pair in pairs:
        rendered = render_pairs(tokenizer, [pair], 10**6).rows[0]
        if max(len(rendered.chosen.input_ids), len(rendered.rejected.input_ids)) <= MAX_LENGTH:
            kept.append({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected})
        if len(kept) == args.rows:
            break
    return kept


# --- contenders (each in its own process) --------------------------------------------------------

def trl_worker(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

    from tunesmith.models import load_tokenizer, resolve_base

    folder = resolve_base(args.model)
    tokenizer = load_tokenizer(folder)
    log: list[dict] = []

    class Clock(TrainerCallback):
        def on_log(self, _args, state, _control, logs=None, **_):
            if logs and "loss" in logs:
                log.append({"step": state.global_step, "loss": logs["loss"], "tokens": logs.get("num_tokens", 0),
                            "time": time.perf_counter()})

    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                  max_steps=args.steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, bf16=False,
                  fp16=False, gradient_checkpointing=False, use_cpu=True, logging_steps=1, save_strategy="no",
                  report_to=[], dataloader_num_workers=0, seed=0, weight_decay=0.0, max_grad_norm=1.0)
    lora = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    pairs = fitting_pairs(args)
    conversational = [{"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
                       "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]
    if args.worker == "trl-reward":
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        trainer = RewardTrainer(model=model, args=RewardConfig(max_length=MAX_LENGTH, **common),
                                train_dataset=Dataset.from_list(conversational), processing_class=tokenizer,
                                peft_config=LoraConfig(task_type="SEQ_CLS", **lora), callbacks=[Clock()])
    elif args.worker == "trl-dpo":
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        trainer = DPOTrainer(model=model, args=DPOConfig(max_length=MAX_LENGTH, beta=0.1, **common),
                             train_dataset=Dataset.from_list(conversational), processing_class=tokenizer,
                             peft_config=LoraConfig(task_type="CAUSAL_LM", **lora), callbacks=[Clock()])
    else:
        from trl import GRPOConfig, GRPOTrainer

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        prompts = Dataset.from_list([{"prompt": p["prompt"]} for p in pairs])
        config = GRPOConfig(**{**common, "per_device_train_batch_size": RL_PROMPTS * RL_SAMPLES},
                            num_generations=RL_SAMPLES, max_completion_length=RL_TOKENS, temperature=1.0, beta=0.05,
                            disable_dropout=True)
        trainer = GRPOTrainer(model=model, reward_funcs=[length_reward], args=config, train_dataset=prompts,
                              processing_class=tokenizer, peft_config=LoraConfig(task_type="CAUSAL_LM", **lora),
                              callbacks=[Clock()])
    trainer.train()
    return summarise(log)


def tunesmith_worker(args) -> dict:
    import io

    from rich.console import Console

    from tunesmith.config import load_recipe
    from tunesmith.stages import dpo, reward, rl
    from tunesmith.stages.loop import read_metrics

    work = Path(tempfile.mkdtemp())
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in fitting_pairs(args)))
    stage = args.worker.split("-")[1]
    recipe = {"model": args.model, "stage": stage,
              "data": {"train": [str(data)], "validation_fraction": 0.0},
              "tuning": {"method": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
              "training": {"max_steps": args.steps, "learning_rate": LR, "lr_schedule": "constant",
                           "micro_batch_size": RL_PROMPTS if stage == "rl" else BATCH, "max_length": MAX_LENGTH,
                           "seed": 0},
              "output_dir": str(work / "out")}
    if stage == "rl":
        (work / "reward.py").write_text("def length_reward(prompts, completions, **_):\n"
                                        "    return [min(len(c.split()), 30) / 30 for c in completions]\n")
        recipe["rl"] = {"reward_function": f"{work / 'reward.py'}:length_reward", "samples_per_prompt": RL_SAMPLES,
                        "max_new_tokens": RL_TOKENS, "temperature": 1.0, "kl_coef": 0.05, "eval_prompts": 0}
    config = load_recipe(None, base=recipe)
    started = time.perf_counter()
    runner = {"reward": reward, "dpo": dpo, "rl": rl}[stage]
    kwargs = {"preview_tokens": 0} if stage == "dpo" else {}
    runner.run(config, Console(file=io.StringIO()), **kwargs)
    records = [r for r in read_metrics(work / "out" / "metrics.jsonl") if "loss" in r]
    log = [{"step": r["step"], "loss": r["loss"], "tokens": r["tokens"], "time": started + r["seconds"]}
           for r in records]
    result = summarise(log)
    if stage == "dpo":  # the reference pass before step 1 is part of DPO's cost: count it
        summary = json.loads((work / "out" / "summary.json").read_text())
        result["seconds"] += summary["reference_seconds"]
        result["tokens_per_s"] = result["timed_tokens"] / result["seconds"]
    return result


def summarise(log: list[dict]) -> dict:
    first, last = log[0], log[-1]
    seconds = last["time"] - first["time"]
    tokens = last["tokens"] - first["tokens"]
    return {"tokens_per_s": tokens / seconds if seconds else 0.0, "timed_tokens": tokens, "seconds": seconds,
            "steps": len(log), "steps_per_min": 60 * (len(log) - 1) / seconds if seconds else 0.0,
            "peak_rss_gib": peak_rss_gib(), "first_loss": first["loss"], "last_loss": last["loss"]}


def spawn(worker: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_path = handle.name
    cmd = [sys.executable, __file__, "--worker", worker, "--result", result_path, "--steps", str(args.steps),
           "--model", args.model, "--data", str(args.data), "--rows", str(args.rows)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    print(f"  running {worker} ...", flush=True)
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"{worker} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(Path(result_path).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per contender")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--only", choices=["reward", "dpo", "rl"], action="append", help="run only these (repeatable)")
    parser.add_argument("--worker")
    parser.add_argument("--result")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "preference.json")
    args = parser.parse_args()
    if args.worker:
        result = (trl_worker if args.worker.startswith("trl") else tunesmith_worker)(args)
        Path(args.result).write_text(json.dumps(result))
        return

    print(f"model {args.model}, {args.rows} hh-rlhf pairs fitting {MAX_LENGTH} tokens, LoRA r16, batch {BATCH} pairs, "
          f"{args.steps} steps each; {os.cpu_count()} CPUs", flush=True)
    results: dict[str, dict] = {}
    for kind in args.only or ["reward", "dpo", "rl"]:
        results[kind] = {"TRL": spawn(f"trl-{kind}", args), "tunesmith": spawn(f"tunesmith-{kind}", args)}
    header = f"{'stage':<8}{'contender':<12}{'tokens/s':>10}{'steps/min':>11}{'x TRL':>8}{'peak RSS GiB':>14}{'x TRL':>8}{'first loss':>12}"
    print("\n" + header + "\n" + "-" * len(header))
    for kind, pair in results.items():
        trl = pair["TRL"]
        for name, r in pair.items():
            speed = r["steps_per_min"] / trl["steps_per_min"] if kind == "rl" else r["tokens_per_s"] / trl["tokens_per_s"]
            print(f"{kind:<8}{name:<12}{r['tokens_per_s']:>10.1f}{r['steps_per_min']:>11.2f}{speed:>8.2f}"
                  f"{r['peak_rss_gib']:>14.2f}{r['peak_rss_gib'] / trl['peak_rss_gib']:>8.2f}{r['first_loss']:>12.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "steps": args.steps, "rows": args.rows,
                                    "date": time.strftime("%Y-%m-%d"), "results": results}, indent=2) + "\n")
    print(f"\nsaved {args.out}")


if __name__ == "__main__":
    main()
