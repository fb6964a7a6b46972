"""Repurpose a language model as a classifier: frozen embeddings + a trained head, optionally tuned end to end.

    tunesmith train examples/classify_sst2.yaml

1. Read labelled texts; fix the classes from the training split.
2. Embed every split once with the frozen base (pooled hidden layer), cached on disk.
3. Train a linear or MLP head on the cached vectors, early-stopped on validation loss.
4. With tuning.method lora/freeze: start from that head and train backbone + head end to end
   (linear probe, then fine-tune: the tuned model starts exactly where the probe ended).
5. Score the test split (or validation): accuracy, macro-F1, per-class P/R/F1, calibration,
   a confusion-matrix PNG; save a classifier that `tunesmith predict` loads on its own.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from tunesmith.classifier import Classifier, ClassifierSpec, Head, class_weights, train_head
from tunesmith.config import Recipe
from tunesmith.data.classification import LabeledText, check_known, label_space, read_labeled
from tunesmith.data.formats import split_off
from tunesmith.embeddings import Embedder, cached_embed, candidate_layers, model_fingerprint, resolve_pooling
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.metrics import classification_report
from tunesmith.evaluate.plots import confusion_plot
from tunesmith.files import write_text_atomic
from tunesmith.models import load_backbone, load_tokenizer, pick_runtime, resolve_base, tunesmith_home
from tunesmith.stages.common import check_output_dir, memory_report, open_output_dir
from tunesmith.tuning import apply_tuning, count_parameters


def run(recipe: Recipe, console: Console, resume: bool = False, overwrite: bool = False) -> dict:
    if resume:
        raise TunesmithError("--resume: stage classify keeps no checkpoints (the head trains in seconds); run it again")
    check_output_dir(recipe, resume, overwrite)
    data, cfg = recipe.data, recipe.classifier

    # 1. Labelled texts and the label space.
    kw = dict(text_field=data.text_field, label_field=data.label_field, label_type=data.label_type,
              skip_bad_rows=data.skip_bad_rows)
    train, skipped = read_labeled(data.train, max_rows=data.max_rows, **kw)
    if data.validation:
        validation, _ = read_labeled(data.validation, **kw)
    else:
        train, validation = split_off(train, data.validation_fraction, recipe.training.seed)
    test, _ = read_labeled(data.test, **kw) if data.test else ([], 0)
    space = label_space(train, data.labels_file, data.train[0])  # the classes the head will actually see
    check_known(validation + test, space)
    if not (test or validation):
        raise TunesmithError("data: nothing to score; give data.test, data.validation or a validation_fraction > 0")
    console.print(f"data: {len(train):,} train / {len(validation):,} validation / {len(test):,} test texts, "
                  f"{len(space.names)} classes ({', '.join(space.names)}); skipped {skipped}")

    # 2. Frozen backbone and the embedding cache.
    runtime = pick_runtime(recipe.model)
    folder = resolve_base(recipe.model)
    backbone = load_backbone(folder, recipe.model, runtime)
    pooling = resolve_pooling(cfg.pooling, backbone.config)
    layers = candidate_layers(backbone.config.num_hidden_layers) if cfg.layer == "auto" else [cfg.layer]
    if len(layers) > 1 and not validation:
        raise TunesmithError("classifier.layer: auto picks a layer on the validation split; give data.validation "
                             "or a data.validation_fraction > 0")
    embedder = Embedder(backbone, load_tokenizer(folder), pooling, layers[0], cfg.max_length, cfg.embed_batch_size,
                        cfg.prompt)
    fingerprint = model_fingerprint(folder)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else tunesmith_home() / "embeddings"
    splits = {name: split for name, split in (("train", train), ("validation", validation), ("test", test)) if split}
    vectors, embed_report = {}, {}
    for name, split in splits.items():
        cached = _embed(embedder, [t.text for t in split], fingerprint, cache_dir, layers, console, name)
        vectors[name] = cached.vectors
        embed_report[name] = {"cached": cached.hit, "seconds": round(cached.seconds, 3), "texts": len(split),
                              "texts_per_second": None if cached.hit else round(len(split) / cached.seconds, 1)}
    labels = {name: torch.tensor([space.index(t.label) for t in split]) for name, split in splits.items()}
    console.print("embeddings: " + ", ".join(
        f"{k} {'cached' if v['cached'] else 'computed'} {v['seconds']:.1f} s" for k, v in embed_report.items()))

    # 3. The head on frozen vectors (one per candidate layer with layer: auto; the best on validation wins).
    fits = {}
    for layer in layers:
        head = Head(vectors["train"][layer].shape[1], len(space.names), cfg.head, cfg.hidden_sizes, cfg.dropout)
        fit = train_head(head, vectors["train"][layer], labels["train"], vectors.get("validation", {}).get(layer),
                         labels.get("validation"), cfg, recipe.training.seed)
        fits[layer] = (head, fit)
    layer = min(layers, key=lambda k: fits[k][1].best_loss)
    head, fit = fits[layer]
    embedder.layer = layer
    vectors = {name: by_layer[layer] for name, by_layer in vectors.items()}
    if len(layers) > 1:
        console.print("layers (validation accuracy): " + ", ".join(
            f"{k}: {fits[k][1].best_accuracy:.3f}" for k in layers) + f" → layer {layer}")
    console.print(f"head ({cfg.head}) trained in {fit.seconds:.1f} s: {fit.epochs} epochs, best at {fit.best_epoch}")
    dim = vectors["train"].shape[1]
    head.to(runtime.torch_device)

    # 4. Optional end-to-end tuning from the probe's solution.
    finetune = None
    if recipe.tuning.method != "none":
        embedder.model = apply_tuning(backbone, recipe.tuning, task_type=None)
        report = count_parameters(embedder.model)
        console.print(f"[bold]{report}[/bold] ({recipe.tuning.method}) + head")
        finetune = _finetune(embedder, head, train, labels["train"], validation, labels.get("validation"), recipe, console)

    # 5. Score, save, summarise.
    scored_name = "test" if test else "validation"
    scored = test or validation
    classifier = Classifier(ClassifierSpec(
        base=recipe.model.model_dump(mode="json"), base_folder=str(folder), pooling=pooling, layer=layer,
        max_length=cfg.max_length, labels=space.names, label_keys=space.keys,
        head={"dim": dim, "kind": cfg.head, "hidden_sizes": cfg.hidden_sizes, "dropout": cfg.dropout},
        tuning=recipe.tuning.method, prompt=cfg.prompt,
    ), embedder, head)
    if recipe.tuning.method == "none":
        with torch.no_grad():
            probabilities = torch.softmax(head(vectors[scored_name].to(runtime.torch_device)), dim=-1).cpu()
    else:
        with console.status(f"scoring {scored_name} with the tuned model..."):
            probabilities = classifier.predict_proba([t.text for t in scored]).cpu()
    report = classification_report(labels[scored_name].tolist(), probabilities.tolist(), space.names)

    out = open_output_dir(recipe, resume=False, overwrite=overwrite)
    classifier.save(out)
    confusion_plot(out / "confusion.png", report["confusion"], space.names,
                   f"{scored_name}: accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f}")
    true_names = [space.names[i] for i in labels[scored_name].tolist()]
    _write_predictions(out / f"predictions_{scored_name}.jsonl", scored, true_names, probabilities, space.names)
    summary = {
        "stage": "classify", "method": recipe.tuning.method, "base": recipe.model.path, "pooling": pooling,
        "layer": layer, "head": cfg.head, "classes": space.names, "scored_split": scored_name,
        "accuracy": round(report["accuracy"], 4), "macro_f1": round(report["macro_f1"], 4),
        "ece": round(report["ece"], 4), "embeddings": embed_report,
        "head_training": {"seconds": round(fit.seconds, 2), "epochs": fit.epochs, "best_epoch": fit.best_epoch},
        "layers_tried": {str(k): round(fits[k][1].best_accuracy, 4) for k in layers} if len(layers) > 1 else None,
        "finetune": finetune, **memory_report(),
    }
    write_text_atomic(out / "metrics.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    summary["report"] = report
    return summary


def _embed(embedder: Embedder, texts: list[str], fingerprint: str, cache_dir: Path, layers: list[int],
           console: Console, name: str):
    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(f"embedding {name}", total=len(texts))
        return cached_embed(embedder, texts, fingerprint, cache_dir, layers, on_batch=lambda n: progress.advance(task, n))


def _finetune(embedder: Embedder, head: Head, train: list[LabeledText], y: torch.Tensor,
              validation: list[LabeledText], val_y: torch.Tensor | None, recipe: Recipe, console: Console) -> dict:
    """Backbone (LoRA or top layers) and head together, on texts.

    Early stopping includes epoch 0: the probe alone. If no epoch beats it on validation loss,
    the probe's weights are kept, and the summary says so."""
    cfg, training = recipe.classifier, recipe.training
    torch.manual_seed(training.seed)
    trainable = [(n, p) for n, p in embedder.model.named_parameters() if p.requires_grad]
    params = [p for _, p in trainable] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.finetune_learning_rate, weight_decay=training.weight_decay)
    weights = class_weights(y, head.net[-1].out_features, cfg.class_weights)
    loss_fn = torch.nn.CrossEntropyLoss(weight=None if weights is None else weights.to(head.mean.device))
    batch, accumulate = training.micro_batch_size, training.gradient_accumulation
    y = y.to(head.mean.device)

    def validate(epoch: int, seconds: float) -> dict:
        record = {"epoch": epoch, "seconds": round(seconds, 1)}
        if validation:
            head.eval()
            with torch.no_grad():
                logits = head(embedder.embed([t.text for t in validation]).to(head.mean.device))
            record["val_loss"] = float(torch.nn.functional.cross_entropy(logits, val_y.to(logits.device)))
            record["val_accuracy"] = float((logits.argmax(-1).cpu() == val_y).float().mean())
        console.print(f"  fine-tune epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"))
        return record

    def snapshot() -> dict:
        return {"backbone": {n: p.detach().clone() for n, p in trainable},
                "head": {k: v.clone() for k, v in head.state_dict().items()}}

    history = [validate(0, 0.0)]
    best, best_state = history[0].get("val_loss", float("inf")), snapshot()
    start = time.perf_counter()
    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("fine-tuning", total=-(-len(train) // batch) * cfg.finetune_epochs)
        for epoch in range(1, cfg.finetune_epochs + 1):
            embedder.model.train()
            head.train()
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(training.seed + epoch)).tolist()
            for step, i in enumerate(range(0, len(order), batch), start=1):
                idx = order[i : i + batch]
                logits = head(embedder.forward([train[j].text for j in idx]))
                (loss_fn(logits, y[idx]) * len(idx) / (batch * accumulate)).backward()
                if step % accumulate == 0 or i + batch >= len(order):
                    if training.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(params, training.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                progress.advance(task)
            history.append(validate(epoch, time.perf_counter() - start))
            if not validation or history[-1]["val_loss"] < best:
                best, best_state = history[-1].get("val_loss", best), snapshot()
    seconds = time.perf_counter() - start
    kept = next(r["epoch"] for r in history if r.get("val_loss", best) == best) if validation else cfg.finetune_epochs
    with torch.no_grad():
        for name, param in trainable:
            param.copy_(best_state["backbone"][name])
    head.load_state_dict(best_state["head"])
    embedder.model.eval()
    head.eval()
    if kept == 0:
        console.print("  fine-tuning did not beat the frozen probe on validation loss: the probe is kept")
    return {"epochs": history, "kept_epoch": kept, "seconds": round(seconds, 1),
            "texts_per_second": round(len(train) * cfg.finetune_epochs / seconds, 1)}


def _write_predictions(path: Path, texts: list[LabeledText], true_names: list[str], probabilities: torch.Tensor,
                       names: list[str]) -> None:
    lines = []
    for text, true, probs in zip(texts, true_names, probabilities.tolist()):
        best = max(range(len(probs)), key=probs.__getitem__)
        lines.append(json.dumps({"where": text.where, "true": true, "label": names[best],
                                 "probabilities": dict(zip(names, (round(p, 6) for p in probs)))}))
    write_text_atomic(path, "\n".join(lines) + "\n")
