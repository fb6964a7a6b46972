"""Serving throughput and latency: one adapter vs eight adapters mixed vs plain sequential generate, in one run.

    .venv/bin/python bench/serve.py                        # SmolLM2-135M, 8 LoRA adapters (about 8 minutes on 2 cores)
    .venv/bin/python bench/serve.py --model tiny --requests 32   # smoke run

Eight LoRA adapters (r=16 on every linear layer, random non-zero weights: the cost of a trained
adapter without training eight) are saved as PEFT folders. `tunesmith serve` runs in its own
process; a pool of concurrent clients sends the same prompts (Alpaca instructions) to it over
HTTP, first all naming one adapter, then each naming one of the eight in turn. The reference is
what a user writes without a server: PEFT + `model.generate`, one request at a time, the adapter
set per request. Every contender decodes greedily up to --max-tokens; throughput counts the
tokens actually generated (a row ends at its end-of-turn token), latency is per request.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "alpaca_5k" / "train.jsonl"
SAMPLE = REPO / "src" / "tunesmith" / "samples" / "alpaca_500.jsonl"
ADAPTERS = 8


def prompts(n: int) -> list[str]:
    path = SHARED if SHARED.is_file() else SAMPLE
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    picked = [r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "") for r in rows
              if len(r["instruction"]) + len(r.get("input", "")) < 300]
    return picked[:n]


def make_adapters(model: str, folder: Path) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model

    from tunesmith.models import load_model, load_tokenizer, resolve_base

    base = resolve_base(model)
    tokenizer = load_tokenizer(base)
    out = []
    for i in range(ADAPTERS):
        torch.manual_seed(i)
        config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False,
                            task_type="CAUSAL_LM")
        peft_model = get_peft_model(load_model(base), config)
        with torch.no_grad():  # small deltas: a plausible fine-tune, not a broken model
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.02)
        path = folder / f"adapter{i}"
        peft_model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        (path / "recipe.yaml").write_text(f"model: {json.dumps(model)}\n")
        out.append(path)
    return out


def summarize(name: str, latencies: list[float], tokens: int, wall: float) -> dict:
    ordered = sorted(latencies)
    return {"contender": name, "requests": len(latencies), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "p50_s": statistics.median(ordered), "p99_s": ordered[int(0.99 * (len(ordered) - 1))],
            "latencies": latencies}


def merge_rounds(name: str, parts: list[dict]) -> dict:
    return summarize(name, [x for p in parts for x in p["latencies"]], sum(p["tokens"] for p in parts),
                     sum(p["wall_s"] for p in parts))


def sequential_generate(model: str, adapters: list[Path], texts: list[str], max_tokens: int) -> dict:
    """The reference: PEFT + transformers.generate, one request after another, adapter switched per request."""
    import torch
    from peft import PeftModel

    from tunesmith.generate import chat_prompt_ids
    from tunesmith.models import load_model, load_tokenizer, resolve_base

    base = resolve_base(model)
    tokenizer = load_tokenizer(base)
    peft_model = PeftModel.from_pretrained(load_model(base), adapters[0], adapter_name="adapter0")
    for i, path in enumerate(adapters[1:], 1):
        peft_model.load_adapter(path, adapter_name=f"adapter{i}")
    peft_model.eval()
    eos = [tokenizer.eos_token_id] + ([peft_model.generation_config.eos_token_id]
                                      if isinstance(peft_model.generation_config.eos_token_id, int) else [])
    latencies, tokens = [], 0
    start = time.perf_counter()
    for i, text in enumerate(texts):
        t0 = time.perf_counter()
        peft_model.set_adapter(f"adapter{i % len(adapters)}")
        ids = torch.tensor([chat_prompt_ids(tokenizer, [{"role": "user", "content": text}])])
        with torch.no_grad():
            out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                      do_sample=False, temperature=None, top_p=None, top_k=None, eos_token_id=eos,
                                      pad_token_id=tokenizer.pad_token_id)
        tokens += out.shape[1] - ids.shape[1] - int(out[0, -1].item() in eos)
        latencies.append(time.perf_counter() - t0)
    return summarize("sequential transformers.generate (PEFT, 1 at a time)", latencies, tokens,
                     time.perf_counter() - start)


def start_server(model: str, adapters: list[Path], max_rows: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "tunesmith.cli", "serve", "--model", model, "--no-registry", "--port", str(port),
            "--max-batch-rows", str(max_rows), "--max-loaded-adapters", str(ADAPTERS)]
    for i, path in enumerate(adapters):
        args += ["--adapter", f"adapter{i}={path}"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise SystemExit(f"server exited: {process.stderr.read()}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2).read()
            return process, url
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("server did not start")
            time.sleep(0.3)


def hammer(url: str, name: str, models: list[str], texts: list[str], max_tokens: int, clients: int) -> dict:
    """`clients` threads take requests from a shared list; request i names models[i % len(models)]."""
    latencies, tokens, errors = [], [0], []
    lock, cursor = threading.Lock(), iter(range(len(texts)))

    def worker() -> None:
        while True:
            with lock:
                i = next(cursor, None)
            if i is None:
                return
            body = json.dumps({"model": models[i % len(models)], "max_tokens": max_tokens, "temperature": 0,
                               "messages": [{"role": "user", "content": texts[i]}]}).encode()
            request = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=600) as response:
                    answer = json.loads(response.read())
            except OSError as e:
                errors.append(str(e))
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)
                tokens[0] += answer["usage"]["completion_tokens"]

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    if errors:
        raise SystemExit(f"{name}: {len(errors)} failed requests, e.g. {errors[0]}")
    return summarize(name, latencies, tokens[0], time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=192, help="requests per server scenario")
    parser.add_argument("--sequential", type=int, default=24, help="requests for the sequential reference")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3, help="server scenarios alternate this many times")
    args = parser.parse_args()
    texts = prompts(args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(args.model, Path(tmp))
        rows = [sequential_generate(args.model, adapters, texts[: args.sequential], args.max_tokens)]
        process, url = start_server(args.model, adapters, args.clients)
        try:
            hammer(url, "warm-up", ["adapter0"], texts[: args.clients], 4, args.clients)
            scenarios = {"tunesmith serve, 1 adapter": ["adapter0"],
                         f"tunesmith serve, {ADAPTERS} adapters mixed": [f"adapter{i}" for i in range(ADAPTERS)]}
            rounds: dict[str, list[dict]] = {name: [] for name in scenarios}
            share = len(texts) // args.rounds
            for r in range(args.rounds):  # interleaved, so a noisy neighbour hits both alike
                part = texts[r * share : (r + 1) * share]
                for name, models in scenarios.items():
                    rounds[name].append(hammer(url, name, models, part, args.max_tokens, args.clients))
            rows += [merge_rounds(name, parts) for name, parts in rounds.items()]
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=60)
    reference, single = rows[0]["tok_s"], rows[1]["tok_s"]
    print(f"\nmodel {args.model}; {args.clients} concurrent clients; greedy, max_tokens {args.max_tokens}; "
          f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}\n")
    print("| contender | requests | tokens | tok/s | x sequential | x 1 adapter | p50 s | p99 s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['contender']} | {r['requests']} | {r['tokens']} | {r['tok_s']:.1f} | {r['tok_s'] / reference:.2f} "
              f"| {r['tok_s'] / single:.2f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} |")
    mixed = rows[2]["tok_s"] / single
    print(f"\nmixed-adapter throughput = {mixed:.2f}x single-adapter (target >= 0.9)")


if __name__ == "__main__":
    main()
