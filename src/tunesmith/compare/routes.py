"""One function per route. Each runs in its own process (harness.py), trains or builds what it needs,
answers the prepared test set and returns a RouteResult: per-example records plus what it cost.

Costs are measured the same way for every route:
- train_seconds: wall time to make the route ready (fine-tuning with its model loading and evaluations,
  a classifier's embedding pass and head, a retrieval index, embedding the few-shot pool; 0 for zero-shot);
- inference_seconds: wall time to answer the whole test set once the model is loaded (prompt building,
  retrieval and demonstration search included);
- trainable_parameters and artifact_bytes: what was trained, and what must be stored beyond the base.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel
from rich.console import Console

from tunesmith.compare.data import Prepared
from tunesmith.compare.predict import answer_rows, conversation, query_text, target
from tunesmith.compare.task import Task, budget_of
from tunesmith.files import building_dir, write_text_atomic


@dataclass
class RouteResult:
    route: str
    records: list[dict]
    train_seconds: float = 0.0
    inference_seconds: float = 0.0
    load_seconds: float = 0.0
    trainable_parameters: int = 0
    artifact_bytes: int = 0
    details: dict = field(default_factory=dict)
    peak_rss_floor: int = 0  # a peak measured in another process this route builds on (the hybrid's training)


@dataclass
class RouteContext:
    name: str
    task: Task
    settings: BaseModel
    prepared: Prepared
    folder: Path  # this route's folder; what it trains or builds goes in `artifact`
    shared: Path  # the report folder: the retrieval index lives there, built once for every route using it
    console: Console
    depends: dict[str, tuple[Path, dict]] = field(default_factory=dict)  # hybrid: lora_sft's folder and result

    @property
    def artifact(self) -> Path:
        return self.folder / "artifact"


# --- prompting routes ----------------------------------------------------------------------------

def zero_shot(ctx: RouteContext) -> RouteResult:
    model, tokenizer, load = _base(ctx)
    records, seconds = _answer(ctx, model, tokenizer)
    return RouteResult(ctx.name, records, 0.0, seconds, load)


def few_shot(ctx: RouteContext) -> RouteResult:
    import numpy as np

    from tunesmith.rag.embed import TextEncoder
    from tunesmith.rag.fewshot import Example, FewShot

    model, tokenizer, load = _base(ctx)
    started = time.perf_counter()
    kind, pool = ctx.task.type, ctx.prepared.train
    examples = [Example(query_text(kind, row), target(kind, row)) for row in pool]
    shots = FewShot(examples, TextEncoder(ctx.task.retrieval.embedder))
    ctx.artifact.mkdir(parents=True, exist_ok=True)
    write_text_atomic(ctx.artifact / "pool.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pool))
    np.save(ctx.artifact / "pool_vectors.npy", shots.vectors)
    build = time.perf_counter() - started
    row_of = {id(example): row for example, row in zip(examples, pool)}
    records, seconds = _answer(ctx, model, tokenizer, demos=lambda q: [row_of[id(e)] for e in shots.select(q, ctx.settings.k)])
    return RouteResult(ctx.name, records, build, seconds, load, artifact_bytes=_bytes(ctx.artifact),
                       details={"pool": len(pool), "k": ctx.settings.k})


def rag(ctx: RouteContext) -> RouteResult:
    model, tokenizer, load = _base(ctx)
    retriever, index = _index(ctx)
    records, seconds = _answer(ctx, model, tokenizer, retriever=retriever)
    details = {"index": index, **_recall(ctx, retriever, records)}
    return RouteResult(ctx.name, records, index["seconds"], seconds, load, artifact_bytes=index["bytes"], details=details)


# --- fine-tuning routes (stages/sft.py through a Recipe) ----------------------------------------------

def lora_sft(ctx: RouteContext) -> RouteResult:
    s = ctx.settings
    return _fine_tune(ctx, {"method": "lora", "lora": {"r": s.r, "alpha": s.alpha, "dropout": s.dropout}})


def freeze(ctx: RouteContext) -> RouteResult:
    return _fine_tune(ctx, {"method": "freeze", "top_layers": ctx.settings.top_layers})


def full(ctx: RouteContext) -> RouteResult:
    return _fine_tune(ctx, {"method": "full"})


def hybrid(ctx: RouteContext) -> RouteResult:
    """The lora_sft route's adapter, answering with retrieved sources."""
    from tunesmith.adapters import load_trained

    sft_folder, sft = ctx.depends["lora_sft"]
    retriever, index = _index(ctx)
    started = time.perf_counter()
    model, tokenizer = load_trained(sft_folder / "artifact")
    load = time.perf_counter() - started
    records, seconds = _answer(ctx, model, tokenizer, retriever=retriever)
    details = {"index": index, "adapter": f"lora_sft ({sft_folder.name})", "sft_train_seconds": sft["train_seconds"],
               **_recall(ctx, retriever, records)}
    return RouteResult(ctx.name, records, sft["train_seconds"] + index["seconds"], seconds, load,
                       sft["trainable_parameters"], sft["artifact_bytes"] + index["bytes"], details, sft["peak_rss_bytes"])


def _fine_tune(ctx: RouteContext, tuning: dict) -> RouteResult:
    from tunesmith.adapters import load_trained
    from tunesmith.config import Recipe
    from tunesmith.stages import sft

    s, kind = ctx.settings, ctx.task.type
    files = {}
    for split in ("train", "validation"):
        rows = getattr(ctx.prepared, split)
        chats = [{"messages": _chat(ctx, row, None) + [{"role": "assistant", "content": target(kind, row)}]}
                 for row in rows]
        if chats:
            files[split] = write_text_atomic(ctx.folder / "sft_data" / f"{split}.jsonl",
                                             "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats))
    recipe = Recipe.model_validate({
        "model": ctx.task.model.model_dump(mode="json"), "stage": "sft",
        "data": {"train": [str(files["train"])], "validation": [str(files["validation"])] if "validation" in files else None,
                 "validation_fraction": 0.0, "format": "messages"},
        "tuning": tuning,
        "training": {"max_steps": 1, "learning_rate": s.learning_rate, "micro_batch_size": s.micro_batch_size,
                     "gradient_accumulation": s.gradient_accumulation, "max_length": s.max_length, "seed": s.seed,
                     "eval_max_batches": 8, "threads": ctx.task.threads},
        "output_dir": str(ctx.artifact),
    })
    budget = budget_of(ctx.task, s)
    steps = budget.max_steps or _lm_steps_for(recipe, budget.minutes)
    recipe.training.max_steps = steps
    recipe.training.warmup_steps = steps // 10
    started = time.perf_counter()
    summary = sft.run(recipe, ctx.console, overwrite=True, preview_tokens=0)
    train = time.perf_counter() - started
    started = time.perf_counter()
    model, tokenizer = load_trained(ctx.artifact)
    load = time.perf_counter() - started
    records, seconds = _answer(ctx, model, tokenizer)
    details = {"steps": summary["steps"], "tokens": summary["tokens"], "loop_seconds": summary["train_seconds"],
               "budget": budget.model_dump(exclude_none=True), "validation_loss_before": summary["eval_loss_before"],
               "validation_loss_after": summary["eval_loss_after"], "tuning": tuning["method"]}
    return RouteResult(ctx.name, records, train, seconds, load, summary["trainable_parameters"],
                       _bytes(ctx.artifact, weights_only=True), details)


def _lm_steps_for(recipe, minutes: float) -> int:
    """Optimizer steps that fit in `minutes`: three steps of the real recipe on its own data are timed
    (the first is warm-up), and the budget is divided by the others' mean."""
    from tunesmith.data.render import as_rows
    from tunesmith.stages.common import build_model, load_split, open_base, render_all
    from tunesmith.stages.loop import Loop, read_metrics

    training = recipe.training
    per_step = training.micro_batch_size * training.gradient_accumulation
    base, split = open_base(recipe), load_split(recipe)
    samples, _, _ = render_all(base.tokenizer, split.train[: 3 * per_step], training.max_length, "truncate")
    model, _ = build_model(recipe, base)
    probe = training.model_copy(update={"max_steps": 3, "eval_every": None, "save_every": None})
    with tempfile.TemporaryDirectory() as tmp:
        loop = Loop(model, as_rows(samples), [], probe, Path(tmp), base.tokenizer.pad_token_id, base.runtime.torch_device)
        loop.run()
        seconds = [r["seconds"] for r in read_metrics(loop.metrics_path) if "loss" in r]
    del model, loop
    return max(1, math.floor(minutes * 60 / ((seconds[-1] - seconds[0]) / (len(seconds) - 1))))


# --- classifier repurposing (stages/classify.py through a Recipe) ----------------------------------

def classifier_frozen(ctx: RouteContext) -> RouteResult:
    return _classifier(ctx, {"method": "none"})


def classifier_lora(ctx: RouteContext) -> RouteResult:
    s = ctx.settings
    return _classifier(ctx, {"method": "lora", "lora": {"r": s.r, "alpha": s.alpha, "dropout": 0.0}})


def _classifier(ctx: RouteContext, tuning: dict) -> RouteResult:
    from tunesmith.classifier import load_classifier
    from tunesmith.config import Recipe
    from tunesmith.stages import classify

    s, prepared = ctx.settings, ctx.prepared
    max_rows, details = None, {"tuning": tuning["method"]}
    if tuning["method"] != "none":
        budget = budget_of(ctx.task, s)
        steps = budget.max_steps or _classifier_steps_for(ctx, tuning, budget.minutes)
        max_rows = steps * s.micro_batch_size  # one epoch over this many texts: `steps` optimizer steps
        details.update(budget=budget.model_dump(exclude_none=True), steps=steps, texts=min(max_rows, len(prepared.train)))
    recipe = Recipe.model_validate({
        "model": ctx.task.model.model_dump(mode="json"), "stage": "classify",
        "data": {"train": [str(prepared.path("train"))],
                 "validation": [str(prepared.path("validation"))] if prepared.validation else None,
                 "validation_fraction": 0.0 if prepared.validation else 0.1, "labels_file": str(prepared.labels_path),
                 "label_type": "str", "max_rows": max_rows},
        "tuning": tuning,
        "training": {"seed": getattr(s, "seed", 0), "micro_batch_size": getattr(s, "micro_batch_size", 8)},
        "classifier": {"layer": s.layer, "head": s.head, "max_length": s.max_length, "embed_batch_size": s.batch_size,
                       "cache_dir": str(ctx.folder / "embedding_cache"), "finetune_epochs": 1,
                       "finetune_learning_rate": getattr(s, "learning_rate", 1e-4)},
        "output_dir": str(ctx.artifact),
    })
    started = time.perf_counter()
    summary = classify.run(recipe, ctx.console, overwrite=True)
    train = time.perf_counter() - started
    started = time.perf_counter()
    classifier = load_classifier(ctx.artifact)
    load = time.perf_counter() - started
    started = time.perf_counter()
    probabilities = classifier.predict_proba([row["text"] for row in prepared.test]).tolist()
    seconds = time.perf_counter() - started
    names = classifier.spec.labels
    records = []
    for row, probs in zip(prepared.test, probabilities):
        best = names[max(range(len(probs)), key=probs.__getitem__)]
        records.append({"true": row["label"], "predicted": best, "correct": best == row["label"],
                        "scores": dict(zip(names, (round(p, 4) for p in probs)))})
    head = sum(p.numel() for p in classifier.head.parameters())
    lora = sum(p.numel() for n, p in classifier.embedder.model.named_parameters() if "lora_" in n)
    details.update(layer=summary["layer"], head=s.head, validation_accuracy=_last_validation(summary))
    return RouteResult(ctx.name, records, train, seconds, load, head + lora,
                       _bytes(ctx.artifact, names=("head.safetensors", "classifier.json", "adapter", "backbone.safetensors")),
                       details)


def _last_validation(summary: dict) -> float | None:
    finetune = summary.get("finetune")
    if finetune:
        kept = next((r for r in finetune["epochs"] if r["epoch"] == finetune["kept_epoch"]), {})
        return kept.get("val_accuracy")
    return None


def _classifier_steps_for(ctx: RouteContext, tuning: dict, minutes: float) -> int:
    """Steps that fit in `minutes`, from three timed forward/backward/update steps of the LoRA backbone."""
    from tunesmith.config import TuningConfig
    from tunesmith.embeddings import Embedder, resolve_pooling
    from tunesmith.models import load_backbone, load_tokenizer, resolve_base
    from tunesmith.tuning import apply_tuning

    s = ctx.settings
    folder = resolve_base(ctx.task.model)
    backbone = apply_tuning(load_backbone(folder, ctx.task.model), TuningConfig.model_validate(tuning), task_type=None)
    embedder = Embedder(backbone, load_tokenizer(folder), resolve_pooling("auto", backbone.config),
                        s.layer if isinstance(s.layer, int) else -1, s.max_length)
    optimizer = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad], lr=s.learning_rate)
    texts = [row["text"] for row in ctx.prepared.train[: s.micro_batch_size]]
    times = []
    for _ in range(3):
        started = time.perf_counter()
        embedder.forward(texts).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return max(1, math.floor(minutes * 60 / (sum(times[1:]) / 2)))


# --- shared pieces -----------------------------------------------------------------------------------

def _base(ctx: RouteContext):
    from tunesmith.models import load_model, load_tokenizer, resolve_base

    started = time.perf_counter()
    folder = resolve_base(ctx.task.model)
    model, tokenizer = load_model(folder, ctx.task.model), load_tokenizer(folder)
    return model, tokenizer, time.perf_counter() - started


def _chat(ctx: RouteContext, row: dict, tokenizer, demos: list[dict] = (), hits=None) -> list[dict]:
    s = ctx.settings
    return conversation(ctx.task.type, row, tokenizer, ctx.task.classification_prompt, ctx.prepared.labels, demos, hits,
                        getattr(s, "context_tokens", 768))


def _answer(ctx: RouteContext, model, tokenizer, demos=None, retriever=None) -> tuple[list[dict], float]:
    """Answer every test row; returns the records and the seconds it took."""
    s, kind, rows = ctx.settings, ctx.task.type, ctx.prepared.test
    started = time.perf_counter()
    chats = []
    for row in rows:
        query = query_text(kind, row)
        hits = retriever.search(query, s.k, s.retriever) if retriever is not None else None
        chats.append(_chat(ctx, row, tokenizer, demos(query) if demos else (), hits))
    with ctx.console.status(f"answering {len(rows)} test examples..."):
        records = answer_rows(kind, model, tokenizer, rows, chats, ctx.prepared.labels, s.batch_size, s.max_new_tokens)
    return records, time.perf_counter() - started


def _recall(ctx: RouteContext, retriever, records: list[dict]) -> dict:
    """QA with qrels: recall@k of the documents behind each test question (stored per record)."""
    from tunesmith.evaluate.metrics import recall_at_k
    from tunesmith.rag.evaluate import ranked_documents

    qrels, k = ctx.prepared.qrels, ctx.settings.k
    if ctx.task.type != "qa_with_documents" or not qrels:
        return {}
    for row, record in zip(ctx.prepared.test, records):
        if row["id"] in qrels:
            ranked = ranked_documents(retriever, row["question"], ctx.settings.retriever, depth=max(k, 10))
            record["recall"] = recall_at_k(ranked, qrels[row["id"]], k)
    return {"recall_k": k}


def _index(ctx: RouteContext):
    """The retrieval index of the task's documents: built once into the report folder (LanceDB), reused
    by every route and run with the same documents and retrieval settings. Returns (retriever, facts)."""
    from tunesmith.rag.chunking import chunk_document
    from tunesmith.rag.documents import file_hash, find_files, read_documents
    from tunesmith.rag.embed import TextEncoder
    from tunesmith.rag.retrieve import Retriever
    from tunesmith.rag.store import LanceStore

    settings = ctx.task.retrieval
    key = hashlib.sha256(f"{ctx.prepared.documents_fingerprint}\0{settings.model_dump_json()}".encode()).hexdigest()
    folder = ctx.shared / f"index-{key[:12]}"
    encoder = TextEncoder(settings.embedder)
    built_here = not (folder / "index.json").is_file()
    if built_here:
        with building_dir(folder) as tmp, ctx.console.status("building the retrieval index..."):
            started = time.perf_counter()
            store = LanceStore(tmp / "lance", encoder.dim)
            files, _ = find_files(ctx.task.documents)
            for path in files:
                chunks = [c for d in read_documents(path.resolve())
                          for c in chunk_document(d, encoder.tokenizer, settings.chunk_tokens, settings.overlap)]
                store.replace_file(str(path.resolve()), file_hash(path), chunks, encoder.embed([c.text for c in chunks]))
            store.finish()
            facts = {"files": len(files), "chunks": store.count(), "seconds": round(time.perf_counter() - started, 2)}
            store.close()
            write_text_atomic(tmp / "index.json", json.dumps(facts) + "\n")
    facts = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    facts.update(bytes=_bytes(folder / "lance"), built_by_this_route=built_here)
    return Retriever(LanceStore(folder / "lance", encoder.dim), encoder), facts


def _bytes(folder: Path, weights_only: bool = False, names: tuple[str, ...] = ()) -> int:
    """Bytes on disk under `folder`: everything; or only model weights and configs; or only the named entries."""
    if not folder.exists():
        return 0
    if names:
        entries = [folder / n for n in names if (folder / n).exists()]
        files = [p for e in entries for p in ([e] if e.is_file() else e.rglob("*"))]
    elif weights_only:
        files = [p for p in folder.iterdir() if p.suffix == ".safetensors" or p.name.endswith("config.json")]
    else:
        files = list(folder.rglob("*"))
    return sum(p.stat().st_size for p in files if p.is_file())


RUNNERS = {"zero_shot": zero_shot, "few_shot": few_shot, "rag": rag, "classifier_frozen": classifier_frozen,
           "classifier_lora": classifier_lora, "lora_sft": lora_sft, "freeze": freeze, "full": full, "hybrid": hybrid}
