"""SFT throughput: tunesmith's loop vs a plain TRL SFTTrainer script, same model, data, max_length, batch, in one run.

    .venv/bin/python bench/sft_throughput.py                 # LoRA, 10 TRL steps (about 9 minutes on 2 cores)
    .venv/bin/python bench/sft_throughput.py --method full   # full fine-tuning
    .venv/bin/python bench/sft_throughput.py --steps 4 --model tiny   # smoke run
    .venv/bin/python bench/sft_throughput.py --no-trl-packed # skip TRL's packed run (it needs ~10 GiB)

Each contender runs in its own fresh process, so its peak RSS is its own; every contender runs
once per round, rounds interleave (--repeats, default 2) and each row keeps its contender's
fastest round: on a shared machine a neighbour's load only ever slows a run down. Both train on
the same Alpaca rows (../shared/data/alpaca_5k when present, else the shipped sample)
rendered with the model's chat template, loss on the response only, max_length 512,
4 examples per optimizer step, fp32, AdamW, constant LR. TRL gets its best CPU setting
(bf16=False, gradient_checkpointing=False), unpacked and packed at the same tokens per step; the
ratios are taken against its fastest run for speed and its leanest for memory. tunesmith runs unpacked (the same
batches of 4 examples), packed (rows of up to 512 tokens holding as many tokens as TRL's
steps, attention kept inside each sample) and packed with `training.compile` over about the same
number of tokens. Timing skips the first optimizer step (warm-up; the compiler runs in it, and
its time is shown apart).

tunesmith runs on the allocator `tunesmith train` uses (jemalloc when the system has it, see
src/tunesmith/allocator.py; TUNESMITH_ALLOCATOR=system for the C library's); TRL as a plain script.

Model-FLOPs utilisation (MFU) = model FLOPs per token x tokens/s / the GEMM peak this script
measures (fp32 2048^3 products). Model FLOPs per token are counted as PaLM's MFU counts them
(Chowdhery et al. 2022, appendix B), the same for every contender whatever it skips: forward 2N
and backward 4N for trained weights (activation and weight gradients), 2N for frozen ones (LoRA's
base: activation gradients only), with N every matmul weight including the vocabulary head on
every token; plus attention's QK^T and PV over the keys each token sees (causal, within its
sample). "MFU*" is stricter: the head counted only on tokens that carry a label, the FLOPs an SFT
loop cannot avoid (masked prompt tokens need no logits; tunesmith skips them, TRL does not), so
the skipped work earns nothing there.
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
SHARED = REPO.parent / "shared" / "data" / "alpaca_5k" / "train.jsonl"
SAMPLE = REPO / "src" / "tunesmith" / "samples" / "alpaca_500.jsonl"
BATCH, MAX_LENGTH, LR = 4, 512, 2e-4


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def gemm_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def read_rows(path: Path, n: int, skip: int = 0) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[skip : skip + n]


HELD_OUT = 48  # rows after the training rows: every contender's model is scored on them by the same code


def heldout_loss(model, tokenizer, args) -> float:
    """Mean cross-entropy per response token on the held-out rows, computed the same way for every contender."""
    import torch

    from tunesmith.data.formats import load_examples
    from tunesmith.data.render import as_rows, render
    from tunesmith.stages.loop import evaluate_loss

    path = Path(tempfile.mkdtemp()) / "held.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in read_rows(Path(args.data), HELD_OUT, skip=args.rows)))
    rows = as_rows([render(tokenizer, e) for e in load_examples([str(path)], "alpaca").examples])
    rows = [r for r in rows if len(r.input_ids) <= MAX_LENGTH]
    return evaluate_loss(model, rows, 4, tokenizer.pad_token_id, torch.device("cpu"))


# --- contenders (each runs in its own process) ------------------------------------------------

def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tunesmith.models import load_tokenizer, resolve_base

    folder = resolve_base(args.model)
    tokenizer = load_tokenizer(folder)
    rows = read_rows(Path(args.data), args.rows)
    prompt = lambda r: r["instruction"] + (f"\n\n{r['input']}" if r["input"].strip() else "")  # noqa: E731
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": prompt(r)}],
                                  "completion": [{"role": "assistant", "content": r["output"]}]} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, max_length=MAX_LENGTH,
        packing=args.packing, logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0,
        seed=0, weight_decay=0.0, max_grad_norm=1.0,
    )
    peft_config = None
    if args.method == "lora":
        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    log: list[dict] = []

    class Clock(TrainerCallback):
        def on_log(self, _args, state, _control, logs=None, **_):
            if logs and "loss" in logs:
                log.append({"step": state.global_step, "loss": logs["loss"], "tokens": logs.get("num_tokens"),
                            "time": time.perf_counter()})

    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Clock()])
    start = time.perf_counter()
    trainer.train()
    for record in log:
        record["time"] -= start
    result = summarise(log, model_config=model.config, targets_share=_target_share(trainer))
    return {**result, "heldout_loss": heldout_loss(trainer.model, tokenizer, args)}


def _target_share(trainer) -> float:
    data = trainer.train_dataset
    total = sum(len(ids) for ids in data["input_ids"])
    if "completion_mask" in data.column_names:
        return sum(sum(m) for m in data["completion_mask"]) / total
    return 1.0


def run_tunesmith(args) -> dict:
    import io

    from rich.console import Console

    from tunesmith.config import load_recipe
    from tunesmith.stages import sft
    from tunesmith.stages.loop import read_metrics

    out = Path(tempfile.mkdtemp()) / "run"
    data = Path(tempfile.mkdtemp()) / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in read_rows(Path(args.data), args.rows)))
    tuning = {"method": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.05}} if args.method == "lora" else {"method": "full"}
    recipe = load_recipe(None, base={
        "model": args.model, "stage": "sft",
        "data": {"train": [str(data)], "format": "alpaca", "validation_fraction": 0.0},
        "tuning": tuning,
        "training": {"max_steps": args.steps, "learning_rate": LR, "lr_schedule": "constant", "micro_batch_size": args.batch,
                     "max_length": MAX_LENGTH, "packing": args.packing, "seed": 0, "eval_max_batches": 1,
                     "compile": args.compile},
        "output_dir": str(out),
    })
    sft.run(recipe, Console(file=io.StringIO()), preview_tokens=0)
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    log = [{"step": r["step"], "loss": r["loss"], "tokens": r["tokens"], "time": r["seconds"],
            "targets": r["target_tokens"]} for r in records]
    from transformers import AutoConfig

    from tunesmith.models import resolve_base

    share = sum(r["targets"] for r in log) / max(1, log[-1]["tokens"])
    result = summarise(log, model_config=AutoConfig.from_pretrained(resolve_base(args.model)), targets_share=share)
    from tunesmith.adapters import load_trained

    model, tokenizer = load_trained(out, device="cpu")
    return {**result, "heldout_loss": heldout_loss(model, tokenizer, args)}


def summarise(log: list[dict], model_config, targets_share: float) -> dict:
    first, last = log[0], log[-1]
    tokens = last["tokens"] - first["tokens"]
    seconds = last["time"] - first["time"]
    return {"tokens_per_s": tokens / seconds, "tokens": int(last["tokens"]), "timed_tokens": tokens, "seconds": seconds,
            "steps": len(log), "first_step_s": first["time"], "peak_rss_gib": peak_rss_gib(), "allocator": _allocator(), "losses": [(r["tokens"], r["loss"]) for r in log],
            "target_share": targets_share, "n_layers": model_config.num_hidden_layers,
            "hidden": model_config.hidden_size, "vocab": model_config.vocab_size,
            "matmul_params": _matmul_params(model_config), "adapter_params": _adapter_params(model_config)}


def _allocator() -> str:
    from tunesmith import allocator

    return allocator.active()


def _matmul_params(c) -> int:
    """The decoder blocks' matmul weights (attention and MLP projections; not the vocabulary head)."""
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_layer = c.hidden_size * (c.hidden_size * 2 + kv * 2) + 3 * c.hidden_size * c.intermediate_size
    return per_layer * c.num_hidden_layers


def _adapter_params(c, rank: int = 16) -> int:
    """LoRA r x (in + out) per adapted linear layer, every projection of every block (target_modules="all-linear")."""
    h, i = c.hidden_size, c.intermediate_size
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    return rank * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h)) * c.num_hidden_layers


def attended_keys(lengths: list[int]) -> float:
    """Keys a token attends to, averaged over tokens: a causal sample of s tokens has s(s+1)/2 query-key pairs."""
    return sum(s * (s + 1) / 2 for s in lengths) / max(1, sum(lengths))


# --- the table ------------------------------------------------------------------------------------

def model_flops_per_token(result: dict, method: str, context: float, head_share: float = 1.0) -> float:
    """Forward + backward FLOPs per token (see the module's docstring); `head_share` of the tokens get logits."""
    frozen = method == "lora"
    blocks = result["matmul_params"]
    head = result["hidden"] * result["vocab"] * head_share
    per_weight = 4 if frozen else 6  # forward 2, activation gradient 2, weight gradient 2 unless frozen
    adapters = 6 * result.get("adapter_params", 0) if frozen else 0
    attention = 2 * 2 * result["n_layers"] * result["hidden"] * context * 3  # QK^T and PV; x3 with backward
    return per_weight * (blocks + head) + adapters + attention


def mfu(result: dict, method: str, peak_gflops: float, context: float, strict: bool = False) -> float:
    """MFU (the head on every token) or, with `strict`, MFU* (the head on labelled tokens only)."""
    share = result["target_share"] if strict else 1.0
    return model_flops_per_token(result, method, context, share) * result["tokens_per_s"] / (peak_gflops * 1e9)


def sample_lengths(data: str | Path, rows: int, model: str) -> list[int]:
    """Token counts of the first `rows` Alpaca rows as the contenders render them (chat template, cut at max_length)."""
    from tunesmith.data.formats import load_examples
    from tunesmith.data.render import render
    from tunesmith.models import load_tokenizer, resolve_base

    path = Path(tempfile.mkdtemp()) / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in read_rows(Path(data), rows)))
    tokenizer = load_tokenizer(resolve_base(model))
    return [min(MAX_LENGTH, len(render(tokenizer, e).input_ids))
            for e in load_examples([str(path)], "alpaca").examples]


def spawn(kind: str, args, **extra) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_path = handle.name
    cmd = [sys.executable, __file__, "--worker", kind, "--result", result_path, "--method", args.method,
           "--steps", str(extra.get("steps", args.steps)), "--model", args.model, "--data", args.data,
           "--rows", str(args.rows), "--batch", str(extra.get("batch", BATCH))]
    cmd += [flag for flag in ("--packing", "--compile") if extra.get(flag[2:])]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if kind == "tunesmith":  # the allocator `tunesmith train` runs on: jemalloc when installed (src/tunesmith/allocator.py)
        from tunesmith import allocator

        env = allocator.preload_env(env) or env
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"{kind} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(Path(result_path).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["lora", "full"], default="lora")
    parser.add_argument("--steps", type=int, default=10, help="TRL optimizer steps (tunesmith matches the tokens)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default=str(SHARED if SHARED.exists() else SAMPLE))
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--worker", choices=["trl", "tunesmith"])
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--no-trl-packed", dest="trl_packed", action="store_false",
                        help="skip TRL with packing=True (by default both TRL settings run and its best is the reference)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds of every contender, interleaved; each keeps its fastest round (default 2)")
    parser.add_argument("--batch", type=int, default=BATCH, help=argparse.SUPPRESS)
    parser.add_argument("--result")
    parser.add_argument("--plot", default=str(REPO / "bench" / "results" / "sft_throughput.png"))
    args = parser.parse_args()
    if args.worker:
        result = (run_trl if args.worker == "trl" else run_tunesmith)(args)
        Path(args.result).write_text(json.dumps(result))
        return

    import torch

    peak = gemm_peak_gflops()
    print(f"GEMM peak (fp32, 2048^3, {torch.get_num_threads()} threads): {peak:.0f} GFLOP/s", flush=True)
    print(f"data: {args.data} ({args.rows} rows), model {args.model}, {args.method}, max_length {MAX_LENGTH}, "
          f"batch {BATCH}", flush=True)
    first = spawn("trl", args)
    print(f"  TRL: {first['tokens']:,} tokens in {first['steps']} steps", flush=True)
    # Packed: as many 512-token rows per step as TRL's 4 examples hold tokens (the same effective batch in
    # tokens), so both train on about the same number of tokens,
    rows_per_step = max(1, round(first["tokens"] / first["steps"] / (MAX_LENGTH * 0.95)))
    # and as many steps as come closest to TRL's tokens (packed rows are ~98% full)
    steps = max(2, round(first["tokens"] / (rows_per_step * MAX_LENGTH * 0.98)))
    packed = {"packing": True, "batch": rows_per_step, "steps": steps}
    contenders = {"TRL SFTTrainer (unpacked)": ("trl", {})}
    if args.trl_packed:
        contenders["TRL SFTTrainer (packed)"] = ("trl", packed)
    contenders |= {"tunesmith (unpacked)": ("tunesmith", {}), "tunesmith (packed)": ("tunesmith", packed),
                   "tunesmith (packed, compiled)": ("tunesmith", {**packed, "compile": True})}
    # The machine is shared: a neighbour's load slows whichever contender runs meanwhile. Every contender
    # runs in each round, the rounds interleave, and each keeps its fastest round (noise only slows).
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    runs["TRL SFTTrainer (unpacked)"].append(first)
    for round_ in range(max(1, args.repeats)):
        if round_:
            peak = max(peak, gemm_peak_gflops())  # the machine's best, as for the contenders
        for name, (kind, extra) in contenders.items():
            if len(runs[name]) <= round_:
                runs[name].append(spawn(kind, args, **extra))
        print(f"  round {round_ + 1}: " + ", ".join(f"{name} {r[-1]['tokens_per_s']:.1f}" for name, r in runs.items()),
              flush=True)
    results = {name: max(r, key=lambda run: run["tokens_per_s"]) for name, r in runs.items()}
    trl = results["TRL SFTTrainer (unpacked)"]

    # The reference is TRL at its best: its fastest configuration for speed, its leanest for memory.
    trls = [r for name, r in results.items() if name.startswith("TRL")]
    ref_speed = max(r["tokens_per_s"] for r in trls)
    ref_rss = min(r["peak_rss_gib"] for r in trls)
    context = attended_keys(sample_lengths(args.data, args.rows, args.model))
    header = (f"{'contender':<31}{'tokens/s':>10}{'x TRL':>8}{'peak RSS GiB':>14}{'x TRL':>8}{'MFU':>6}{'MFU*':>6}"
              f"{'1st step s':>12}{'tokens':>9}{'held-out loss':>15}")
    print("\n" + header + "\n" + "-" * len(header))
    for name, r in results.items():
        util, strict = mfu(r, args.method, peak, context), mfu(r, args.method, peak, context, strict=True)
        print(f"{name:<31}{r['tokens_per_s']:>10.1f}{r['tokens_per_s'] / ref_speed:>8.2f}"
              f"{r['peak_rss_gib']:>14.2f}{r['peak_rss_gib'] / ref_rss:>8.2f}{100 * util:>5.0f}%{100 * strict:>5.0f}%"
              f"{r['first_step_s']:>12.1f}{r['tokens']:>9,}{r['heldout_loss']:>15.4f}")
    allocators = sorted({f"{name.split(' ')[0]}: {r['allocator']}" for name, r in results.items()})
    print(f"(allocators: {', '.join(allocators)}; TUNESMITH_ALLOCATOR=system runs tunesmith on the C library's)")
    if len(trls) > 1:
        print(f"(x TRL: against TRL's fastest run for tokens/s, {ref_speed:.1f}, and its leanest for RSS, {ref_rss:.2f} GiB)")
    print(f"(each row: the fastest of {max(1, args.repeats)} interleaved rounds)")
    print(f"(MFU: model FLOPs per token as PaLM counts them, {model_flops_per_token(trl, args.method, context) / 1e6:.0f}M "
          f"here (a token attends to {context:.0f} keys on average), x tokens/s / the GEMM peak, {peak:.0f} GFLOP/s; "
          f"MFU*: the vocabulary head counted on labelled tokens only)")
    _plot(results, Path(args.plot), args.method)
    print(f"\nloss curves: {args.plot}")


def _plot(results: dict, path: Path, method: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, r in results.items():
        tokens, losses = zip(*r["losses"])
        ax.plot(tokens, losses, "o-", label=name, markersize=3)
    ax.set_xlabel("tokens trained")
    ax.set_ylabel("training loss")
    ax.set_title(f"SFT {method}: tunesmith vs TRL, same data")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
