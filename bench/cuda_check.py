"""Check tunesmith's CUDA path on a GPU machine: bf16 autocast, torch.compile, full fine-tuning, activation
checkpointing, QLoRA (4-bit base through bitsandbytes), DDP and FSDP over NCCL, pre-training and the classifier.

    python bench/cuda_check.py                        # every check on the default model (needs a CUDA GPU)
    python bench/cuda_check.py --only qlora,ddp       # some checks
    python bench/cuda_check.py --random-init DIR      # DIR holds a model's config and tokenizer but no weights:
                                                      # give it random weights of that shape first
    python bench/cuda_check.py --dry-run              # the harness itself on CPU: tiny model, fp32, no QLoRA

Each check is one `tunesmith train` run in its own process (one failure does not stop the rest; a check
that outlives --check-timeout is stopped), on Alpaca rows (../shared/data/alpaca_5k when present, else
the shipped sample) with the model's chat template, loss on the responses, packed rows of 512 tokens.
The table gives steady tokens/s (the second half of the steps: compile and warm-up excluded), peak GPU
memory, model-FLOPs utilisation against a bf16 GEMM peak measured in the same run, and the eval loss
before and after. Results go to OUT/cuda_check.json and OUT/cuda_check.md as each check ends, and each
run's log to OUT/logs/. Nothing in the test suite needs a GPU: this script is how the CUDA path is
verified where one is lent (docs/performance.md records what it found).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "alpaca_5k" / "train.jsonl"
SAMPLES = REPO / "src" / "tunesmith" / "samples"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_throughput import _adapter_params, _matmul_params, attended_keys, mfu, sample_lengths  # noqa: E402  (the same FLOPs count as the CPU benchmark)


@dataclass
class Check:
    name: str
    what: str
    recipe: str  # "sft" (built here), or an example recipe's path
    overrides: list[str] = field(default_factory=list)
    torchrun: bool = False  # under `torchrun --nproc-per-node 1`: a process group of one over NCCL
    needs: str = ""  # "bitsandbytes": skipped without it


CHECKS = [
    Check("lora-bf16", "LoRA, bf16 autocast, packed", "sft", ["model.precision=bf16"]),
    Check("qlora", "QLoRA: 4-bit NF4 base (bitsandbytes), LoRA in bf16", "sft",
          ["model.precision=bf16", "model.quantization=4bit"], needs="bitsandbytes"),
    Check("ddp", "LoRA bf16 under torchrun: DDP over NCCL (one GPU)", "sft", ["model.precision=bf16"],
          torchrun=True),
    Check("full-bf16", "full fine-tuning, bf16 autocast", "sft", ["model.precision=bf16", "tuning.method=full"]),
    Check("fsdp", "full fine-tuning under torchrun: FSDP2 over NCCL (one GPU)", "sft",
          ["model.precision=bf16", "tuning.method=full", "training.parallel=fsdp"], torchrun=True),
    Check("lora-compile", "LoRA bf16 with training.compile", "sft", ["model.precision=bf16", "training.compile=true"]),
    Check("full-compile", "full fine-tuning bf16 with training.compile", "sft",
          ["model.precision=bf16", "tuning.method=full", "training.compile=true"]),
    Check("full-checkpointing", "full fine-tuning bf16, activation checkpointing", "sft",
          ["model.precision=bf16", "tuning.method=full", "training.activation_checkpointing=true"]),
    Check("lora-fp32", "LoRA in fp32 (no autocast)", "sft", ["model.precision=fp32"]),
    Check("pretrain", "continued pre-training (LoRA, bf16) on the medical sample", "examples/pretrain_medical.yaml",
          ["model.precision=bf16", "training.max_steps=10", "training.save_every=5"]),
    Check("classify", "classifier: frozen embeddings on the GPU + trained head", "examples/classify_sst2.yaml", []),
]


def cuda_facts() -> dict:
    import torch

    facts = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "gpu": None, "bf16": False}
    for name in ("transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            facts[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 (missing or broken: say which)
            facts[name] = f"unavailable ({type(exc).__name__})"
    if torch.cuda.is_available():
        facts.update(gpu=torch.cuda.get_device_name(0), bf16=torch.cuda.is_bf16_supported(),
                     gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                     bf16_gemm_tflops=round(gemm_peak_tflops(), 1))
    return facts


def gemm_peak_tflops(n: int = 8192, repeats: int = 10) -> float:
    """bf16 n x n x n products on the GPU, best of `repeats` after warm-up (the MFU denominator)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * n**3 / best / 1e12


def random_init(folder: Path) -> None:
    """Give `folder` (config.json and tokenizer, no weights) random weights of its architecture, once."""
    if any(folder.glob("*.safetensors")):
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    model.save_pretrained(folder)
    print(f"random weights written to {folder} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")


def sft_recipe(path: Path, model: str, data: Path, steps: int, batch: int) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({
        "model": model, "stage": "sft",
        "data": {"train": str(data.resolve()), "format": "alpaca", "validation_fraction": 0.05, "max_rows": 4000,
                 "skip_bad_rows": True},
        "tuning": {"method": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.05}},
        "training": {"max_steps": steps, "learning_rate": 2e-4, "lr_schedule": "constant", "micro_batch_size": batch,
                     "max_length": 512, "packing": True, "seed": 0, "eval_max_batches": 4},
        "output_dir": str(path.parent / "run"),
    }))
    return path


def steady_rate(metrics: Path) -> tuple[float | None, float]:
    """Tokens/s over the second half of the logged steps, and the share of tokens that carry a label."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if '"loss"' in line]
    if len(rows) < 2:
        return None, 1.0
    mid, last = rows[len(rows) // 2 - 1] if len(rows) > 2 else rows[0], rows[-1]
    share = sum(r.get("target_tokens", 0) for r in rows) / max(1, rows[-1]["tokens"])
    return (last["tokens"] - mid["tokens"]) / max(1e-9, last["seconds"] - mid["seconds"]), share


def model_flops_utilisation(tokens_per_s: float, method: str, model_dir: Path, share: float,
                            peak_tflops: float | None, context: float) -> float | None:
    """Model FLOPs / time / bf16 GEMM peak, through bench/sft_throughput.py's count (PaLM's); `context`: the keys
    a token attends to on average."""
    if not peak_tflops or not tokens_per_s:
        return None
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    result = {"tokens_per_s": tokens_per_s, "matmul_params": _matmul_params(c), "hidden": c.hidden_size,
              "vocab": c.vocab_size, "n_layers": c.num_hidden_layers, "target_share": share,
              "adapter_params": _adapter_params(c)}
    return mfu(result, method, peak_tflops * 1e3, context)


def run_check(check: Check, args, work: Path, logs: Path, facts: dict) -> dict:
    folder = work / check.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    out = folder / "run"
    recipe = (sft_recipe(folder / "recipe.yaml", args.model, args.data, args.steps, args.batch) if check.recipe == "sft"
              else REPO / check.recipe)
    overrides = [f"model={args.model}" if check.recipe != "sft" else "", f"output_dir={out}", *check.overrides]
    if check.name == "classify":
        overrides.append(f"classifier.cache_dir={folder / 'embeddings'}")
    if args.dry_run:
        overrides = [o.replace("model.precision=bf16", "model.precision=fp32") for o in overrides]
        overrides += ["model.device=cpu"] + ([f"training.max_steps={args.steps}"] if check.recipe != "sft" else [])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"] if check.torchrun \
        else [sys.executable]
    cmd = [*launcher, "-m", "tunesmith.cli", "train", str(recipe), *[o for o in overrides if o]]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "COLUMNS": "160"}
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.check_timeout)
        code, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        code, stdout, stderr = "timeout", _text(exc.stdout), _text(exc.stderr)
    wall = time.perf_counter() - start
    (logs / f"{check.name}.log").write_text(f"$ {' '.join(cmd)}\n\n{stdout}\n--- stderr ---\n{stderr}")
    result = {"check": check.name, "what": check.what, "ok": code == 0, "exit": code, "wall_s": round(wall, 1)}
    if code != 0:
        tail = [line for line in (stderr or stdout).strip().splitlines() if line.strip()]
        result["error"] = tail[-1][:300] if tail else "no output"
        return result
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    result.update({k: summary.get(k) for k in ("peak_gpu_gib", "eval_loss_before", "eval_loss_after", "tokens",
                                               "steps") if summary.get(k) is not None})
    if (out / "metrics.jsonl").is_file() and check.name != "classify":
        rate, share = steady_rate(out / "metrics.jsonl")
        if rate:
            from tunesmith.models import resolve_base

            result["tokens_per_s"] = round(rate, 1)
            # SFT rows are whole Alpaca samples; the pre-training example packs 512-token blocks of running text
            context = facts["sft_attended_keys"] if check.recipe == "sft" else attended_keys([512])
            value = model_flops_utilisation(rate, summary.get("method", "lora"), resolve_base(args.model), share,
                                            facts.get("bf16_gemm_tflops"), context)
            if value is not None:
                result["mfu"] = round(value, 4)
    if check.name == "classify" and "accuracy" in summary:
        result["test_accuracy"] = summary["accuracy"]
    return result


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def table(facts: dict, results: list[dict]) -> str:
    lines = [f"CUDA check, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
             + ", ".join(f"{k} {v}" for k, v in facts.items()), "",
             "| check | what | result | tokens/s | MFU | peak GPU GiB | eval loss before -> after | wall s |",
             "|---|---|---|---:|---:|---:|---|---:|"]
    for r in results:
        status = "ok" if r["ok"] else ("skipped: " + r["skipped"] if "skipped" in r else f"FAILED ({r.get('error', '')})")
        loss = (f"{r['eval_loss_before']:.4f} -> {r['eval_loss_after']:.4f}" if "eval_loss_after" in r
                else (f"test accuracy {r['test_accuracy']:.3f}" if "test_accuracy" in r else ""))
        mfu_text = f"{100 * r['mfu']:.1f}%" if "mfu" in r else ""
        lines.append(f"| {r['check']} | {r['what']} | {status} | {r.get('tokens_per_s', '')} | {mfu_text} | "
                     f"{r.get('peak_gpu_gib', '')} | {loss} | {r.get('wall_s', '')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, default=SHARED if SHARED.is_file() else SAMPLES / "alpaca_500.jsonl")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per SFT check")
    parser.add_argument("--batch", type=int, default=16, help="packed rows of 512 tokens per step")
    parser.add_argument("--only", default="", help="comma-separated check names")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cuda_check")
    parser.add_argument("--check-timeout", type=float, default=240.0, help="seconds before a check is stopped")
    parser.add_argument("--deadline", type=float, default=0.0, help="seconds: skip the checks that would start later")
    parser.add_argument("--random-init", type=Path, help="a model folder without weights: random weights first")
    parser.add_argument("--dry-run", action="store_true", help="on CPU with the tiny model: tests the harness")
    args = parser.parse_args()
    began = time.perf_counter()
    if args.random_init:
        random_init(args.random_init)
        args.model = str(args.random_init)
    if args.dry_run:
        args.model, args.steps, args.batch = "tiny", min(args.steps, 3), 2
    import torch

    if not torch.cuda.is_available() and not args.dry_run:
        sys.exit("cuda_check: no CUDA GPU is visible (use --dry-run to exercise the harness on CPU)")
    facts = cuda_facts()
    facts["sft_attended_keys"] = round(attended_keys(sample_lengths(args.data, 400, args.model)), 2)  # for MFU
    print(json.dumps(facts))
    wanted = [c for c in CHECKS if not args.only or c.name in args.only.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    work = args.out / "work"
    results: list[dict] = []
    for check in wanted:
        skipped = ""
        if check.needs == "bitsandbytes" and (not torch.cuda.is_available() or "unavailable" in str(facts["bitsandbytes"])):
            skipped = "needs a CUDA GPU and bitsandbytes"
        if args.deadline and time.perf_counter() - began > args.deadline:
            skipped = "out of time (--deadline)"
        if skipped:
            results.append({"check": check.name, "what": check.what, "ok": False, "skipped": skipped})
        else:
            print(f"== {check.name}: {check.what}", flush=True)
            results.append(run_check(check, args, work, logs, facts))
            print(json.dumps(results[-1]), flush=True)
        (args.out / "cuda_check.json").write_text(json.dumps({"facts": facts, "results": results}, indent=1))
        (args.out / "cuda_check.md").write_text(table(facts, results) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(table(facts, results))
    failed = [r["check"] for r in results if not r["ok"] and "skipped" not in r]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
