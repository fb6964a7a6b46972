"""A classifier made from a language model: backbone + pooling + a small head; train, save, load, predict.

The head standardises its input with the training set's mean and spread (LLM hidden
states have a few huge dimensions that otherwise dominate) and is a linear layer
(logistic regression) or a small MLP. A saved classifier is a folder:
`classifier.json` (base, pooling, layer, max_length, label names, head shape), `head.safetensors`,
and, when the backbone was tuned, `adapter/` (PEFT) or `backbone.safetensors` (trained layers).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from tunesmith.config import ClassifierConfig, ModelConfig
from tunesmith.embeddings import Embedder
from tunesmith.errors import TunesmithError

CLASSIFIER_FILE = "classifier.json"


class Head(nn.Module):
    def __init__(self, dim: int, n_classes: int, kind: str = "linear", hidden_sizes: list[int] = (), dropout: float = 0.0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        layers: list[nn.Module] = []
        width = dim
        if kind == "mlp":
            for size in hidden_sizes:
                layers += [nn.Linear(width, size), nn.GELU(), nn.Dropout(dropout)]
                width = size
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)

    def standardise_with(self, vectors: torch.Tensor) -> None:
        self.mean.copy_(vectors.mean(dim=0))
        self.scale.copy_(vectors.std(dim=0).clamp(min=1e-6))

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.net((vectors - self.mean) / self.scale)


@dataclass
class HeadTraining:
    epochs: int
    best_epoch: int
    seconds: float
    history: list[dict] = field(default_factory=list)

    @property
    def best_loss(self) -> float:
        return self.history[self.best_epoch - 1]["val_loss"]

    @property
    def best_accuracy(self) -> float | None:
        return self.history[self.best_epoch - 1]["val_accuracy"]


def class_weights(labels: torch.Tensor, n_classes: int, mode: str) -> torch.Tensor | None:
    """balanced: n / (k * count_c), so every class weighs the same in the loss."""
    if mode == "none":
        return None
    counts = torch.bincount(labels, minlength=n_classes).float().clamp(min=1)
    return len(labels) / (n_classes * counts)


def train_head(head: Head, x: torch.Tensor, y: torch.Tensor, val_x: torch.Tensor | None, val_y: torch.Tensor | None,
               cfg: ClassifierConfig, seed: int) -> HeadTraining:
    """Mini-batch AdamW with early stopping on validation loss (training loss when there is no validation)."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    head.standardise_with(x)
    n_classes = head.net[-1].out_features
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(y, n_classes, cfg.class_weights))
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    best, best_state, best_epoch, history = float("inf"), None, 0, []
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(1, cfg.epochs + 1):
        head.train()
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss = loss_fn(head(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        head.eval()
        with torch.no_grad():
            train_loss = float(loss_fn(head(x), y))
            if val_x is not None and len(val_x):
                logits = head(val_x)
                watched = float(nn.functional.cross_entropy(logits, val_y))
                accuracy = float((logits.argmax(-1) == val_y).float().mean())
            else:
                watched, accuracy = train_loss, None
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": watched, "val_accuracy": accuracy})
        if watched < best - 1e-6:
            best, best_epoch = watched, epoch
            best_state = {k: v.clone() for k, v in head.state_dict().items()}
        elif epoch - best_epoch >= cfg.patience:
            break
    head.load_state_dict(best_state)
    head.eval()
    return HeadTraining(len(history), best_epoch, time.perf_counter() - start, history)


# --- the saved classifier ------------------------------------------------------------------

@dataclass
class ClassifierSpec:
    base: dict
    base_folder: str
    pooling: str
    layer: int
    max_length: int
    labels: list[str]
    label_keys: list
    head: dict
    tuning: str
    prompt: str | None = None
    format_version: int = 1


class Classifier:
    """Backbone (maybe tuned) + head; `predict_proba` maps texts to class probabilities."""

    def __init__(self, spec: ClassifierSpec, embedder: Embedder, head: Head):
        self.spec, self.embedder, self.head = spec, embedder, head

    @torch.no_grad()
    def predict_proba(self, texts: list[str]) -> torch.Tensor:
        vectors = self.embedder.embed(texts)
        return torch.softmax(self.head(vectors.to(self.head.mean.device)), dim=-1)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        from tunesmith.files import write_text_atomic

        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, folder / "head.safetensors")
        backbone = self.embedder.model
        if self.spec.tuning == "lora":
            backbone.save_pretrained(folder / "adapter")
        elif self.spec.tuning == "freeze":
            trained = {n: p.detach().cpu().contiguous() for n, p in backbone.named_parameters() if p.requires_grad}
            save_file(trained, folder / "backbone.safetensors")
        write_text_atomic(folder / CLASSIFIER_FILE, json.dumps(asdict(self.spec), indent=2) + "\n")


def load_classifier(folder: str | Path, device: str = "cpu") -> Classifier:
    """Load a saved classifier on its own: the base it names, the tuned parts, the head."""
    from safetensors.torch import load_file

    from tunesmith.models import load_backbone, load_tokenizer, pick_runtime, resolve_base

    folder = Path(folder)
    path = folder / CLASSIFIER_FILE
    if not path.is_file():
        raise TunesmithError(f"{folder}: no {CLASSIFIER_FILE} here; give the output folder of a `stage: classify` run")
    spec = ClassifierSpec(**json.loads(path.read_text(encoding="utf-8")))
    config = ModelConfig.model_validate({**spec.base, "device": device})
    base = resolve_base(config)
    backbone = load_backbone(base, config, pick_runtime(config))
    if spec.tuning == "lora":
        from peft import PeftModel

        backbone = PeftModel.from_pretrained(backbone, folder / "adapter")
    elif spec.tuning == "freeze":
        unexpected = backbone.load_state_dict(load_file(folder / "backbone.safetensors"), strict=False).unexpected_keys
        if unexpected:
            raise TunesmithError(f"{folder / 'backbone.safetensors'}: weights {unexpected[:3]} do not fit the base model")
    backbone.eval()
    head_cfg = spec.head
    head = Head(head_cfg["dim"], len(spec.labels), head_cfg["kind"], head_cfg["hidden_sizes"], head_cfg["dropout"])
    head.load_state_dict(load_file(folder / "head.safetensors"))
    head.to(next(backbone.parameters()).device).eval()
    embedder = Embedder(backbone, load_tokenizer(base), spec.pooling, spec.layer, spec.max_length, prompt=spec.prompt)
    return Classifier(spec, embedder, head)
