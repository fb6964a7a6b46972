"""Repurposing benchmark: LLM embeddings + heads vs a sentence encoder, on SST-2 and AG News.

    .venv/bin/python bench/classify.py                        # both datasets (about 30 minutes on 2 cores)
    .venv/bin/python bench/classify.py --datasets sst2 --finetune-train 1000   # quicker

Variants, each run through `tunesmith train` (stage classify) with a fresh embedding cache:
- MiniLM (all-MiniLM-L6-v2, frozen, mean pooling) + linear head;
- SmolLM2-135M-Instruct frozen + linear head, layer chosen on validation (layer: auto);
- SmolLM2 frozen + MLP head on that layer (embeddings come from the cache);
- SmolLM2 + LoRA, end to end from the linear probe (a subset of the training texts, one epoch).
Reports embedding throughput (texts/s), head training time, fine-tuning time, test accuracy
and macro-F1, and measures the embedding pass against a bare forward pass over the same
texts and batches, in the same run.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def dataset(name: str, args, folder: Path) -> dict:
    """Train/validation/test files for one dataset (subsampled as asked, seeded)."""
    rng = random.Random(0)
    base = SHARED / name
    train = read_jsonl(base / "train.jsonl")
    if (base / "validation.jsonl").exists():
        validation = read_jsonl(base / "validation.jsonl")
    else:
        rng.shuffle(train)
        cut = len(train) // 10
        validation, train = train[:cut], train[cut:]
    test = read_jsonl(base / "test.jsonl")
    limit_train = args.ag_train if name == "ag_news" else args.sst_train
    limit_test = args.max_test
    if limit_train and len(train) > limit_train:
        train = rng.sample(train, limit_train)
    if limit_test and len(test) > limit_test:
        test = rng.sample(test, limit_test)
    validation = validation[: args.max_validation]
    files = {split: write_jsonl(folder / f"{name}_{split}.jsonl", rows)
             for split, rows in (("train", train), ("validation", validation), ("test", test))}
    files["labels"] = str(base / "labels.json")
    files["sizes"] = {"train": len(train), "validation": len(validation), "test": len(test)}
    return files


def run_variant(files: dict, model: str, cache: Path, out: Path, **sections) -> dict:
    from rich.console import Console

    from tunesmith.config import load_recipe
    from tunesmith.stages import classify

    classifier = {"max_length": 128, "embed_batch_size": 32, "cache_dir": str(cache), **sections.pop("classifier", {})}
    recipe = load_recipe(None, base={
        "model": model, "stage": "classify",
        "data": {"train": [files["train"]], "validation": [files["validation"]], "test": [files["test"]],
                 "labels_file": files["labels"]},
        "classifier": classifier, "training": {"seed": 0, "micro_batch_size": 16}, "output_dir": str(out),
        **sections,
    })
    start = time.perf_counter()
    summary = classify.run(recipe, Console(file=io.StringIO()), overwrite=True)
    summary["wall_seconds"] = time.perf_counter() - start
    return summary


def forward_overhead(model_name: str, layers: list[int], texts: list[str], batch_size: int = 32) -> tuple[float, float]:
    """Seconds for tunesmith's embedding pass vs a bare forward over the same batches (best of 2 each)."""
    import torch

    from tunesmith.embeddings import Embedder
    from tunesmith.models import load_backbone, load_tokenizer, resolve_base

    folder = resolve_base(model_name)
    model = load_backbone(folder).eval()
    embedder = Embedder(model, load_tokenizer(folder), "last", layers[0], 128, batch_size)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = [embedder.encode([texts[i] for i in order[s : s + batch_size]]) for s in range(0, len(order), batch_size)]

    def bare() -> None:
        with torch.no_grad():
            for batch in batches:
                model(**batch)

    def ours() -> None:
        embedder.embed(texts, layers=layers)

    timings = {}
    for name, fn in (("bare", bare), ("ours", ours), ("bare", bare), ("ours", ours)):
        start = time.perf_counter()
        fn()
        timings[name] = min(timings.get(name, float("inf")), time.perf_counter() - start)
    return timings["ours"], timings["bare"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="sst2,ag_news")
    parser.add_argument("--sst-train", type=int, default=0, help="0: all 6,920")
    parser.add_argument("--ag-train", type=int, default=4000)
    parser.add_argument("--max-test", type=int, default=2000, help="test texts at most (SST-2 has 1,821)")
    parser.add_argument("--max-validation", type=int, default=872)
    parser.add_argument("--finetune-train", type=int, default=2000, help="texts for the LoRA epoch")
    parser.add_argument("--overhead-texts", type=int, default=512)
    args = parser.parse_args()

    from tunesmith.embeddings import candidate_layers

    work = Path(tempfile.mkdtemp(prefix="tunesmith-bench-"))
    results: dict[str, list[tuple[str, dict]]] = {}
    for name in args.datasets.split(","):
        files = dataset(name, args, work)
        print(f"\n{name}: {files['sizes']}", flush=True)
        cache = work / f"cache-{name}"
        rows = []
        minilm = run_variant(files, "minilm", cache, work / f"{name}-minilm")
        rows.append(("MiniLM frozen + linear", minilm))
        smol = run_variant(files, "smollm2-135m-instruct", cache, work / f"{name}-smol", classifier={"layer": "auto"})
        rows.append((f"SmolLM2 frozen + linear (layer {smol['layer']})", smol))
        layer = smol["layer"]
        mlp = run_variant(files, "smollm2-135m-instruct", cache, work / f"{name}-mlp",
                          classifier={"layer": layer, "head": "mlp", "hidden_sizes": [256], "dropout": 0.2})
        rows.append((f"SmolLM2 frozen + MLP (layer {layer})", mlp))
        ft_files = dict(files)
        train_rows = read_jsonl(Path(files["train"]))
        ft_files["train"] = write_jsonl(work / f"{name}_ft_train.jsonl",
                                        random.Random(1).sample(train_rows, min(args.finetune_train, len(train_rows))))
        lora = run_variant(ft_files, "smollm2-135m-instruct", cache, work / f"{name}-lora",
                           classifier={"layer": layer, "finetune_epochs": 1, "finetune_learning_rate": 2e-4},
                           tuning={"method": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.05}})
        rows.append((f"SmolLM2 + LoRA end to end (layer {layer}, {min(args.finetune_train, len(train_rows))} texts)", lora))
        results[name] = rows
        print_table(name, rows)

    texts = [r["text"] for r in read_jsonl(SHARED / "sst2" / "test.jsonl")][: args.overhead_texts]
    layers = candidate_layers(30)
    ours, bare = forward_overhead("smollm2-135m-instruct", layers, texts)
    print(f"\nembedding pass vs bare forward ({len(texts)} SST-2 texts, batch 32, {len(layers)} layers pooled): "
          f"{ours:.2f} s vs {bare:.2f} s = {ours / bare:.3f}x")


def print_table(name: str, rows: list[tuple[str, dict]]) -> None:
    header = f"{'variant':<58}{'embed texts/s':>14}{'head s':>8}{'tune s':>8}{'kept':>6}{'test acc':>10}{'macro-F1':>10}"
    print(f"\n{name}\n{header}\n{'-' * len(header)}")
    for label, s in rows:
        rate = s["embeddings"]["train"]["texts_per_second"]
        tune = s["finetune"]["seconds"] if s.get("finetune") else None
        kept = f"ep {s['finetune']['kept_epoch']}" if s.get("finetune") else "-"
        print(f"{label:<58}{(f'{rate:.1f}' if rate else 'cached'):>14}{s['head_training']['seconds']:>8.2f}"
              f"{(f'{tune:.0f}' if tune else '-'):>8}{kept:>6}{s['accuracy']:>10.4f}{s['macro_f1']:>10.4f}", flush=True)


if __name__ == "__main__":
    main()
