"""Texts to vectors with any base model: pooling over a chosen layer, and an on-disk cache.

The cache key covers everything that changes a vector: the model's weights (a
fingerprint of its files), the layer, the pooling, max_length and the exact texts. A hit
loads a safetensors file instead of running the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tunesmith.errors import TunesmithError

if TYPE_CHECKING:
    import torch

ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "deberta", "deberta-v2",
                 "modernbert", "albert"}


def is_decoder(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith("ForCausalLM") for a in archs) or config.model_type not in ENCODER_TYPES


def resolve_pooling(pooling: str, config) -> str:
    """auto: the last real token for decoders (it has seen the whole text), mean for encoders."""
    if pooling != "auto":
        return pooling
    return "last" if is_decoder(config) else "mean"


def pool(hidden: "torch.Tensor", attention_mask: "torch.Tensor", pooling: str) -> "torch.Tensor":
    """[batch, tokens, dim] -> [batch, dim]; rows are right-padded."""
    import torch

    if pooling == "last":
        last = attention_mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    if pooling == "cls":
        return hidden[:, 0]
    raise TunesmithError(f"classifier.pooling: unknown pooling {pooling!r}; use last, mean or cls")


@dataclass
class Embedder:
    """Pools one hidden layer of `model` (an AutoModel backbone) over texts."""

    model: "torch.nn.Module"
    tokenizer: object
    pooling: str
    layer: int = -1
    max_length: int = 256
    batch_size: int = 32
    prompt: str | None = None

    def __post_init__(self) -> None:
        self.tokenizer.padding_side = "right"
        n_layers = self.model.config.num_hidden_layers
        if not -(n_layers + 1) <= self.layer <= n_layers:
            raise TunesmithError(f"classifier.layer: {self.layer} is outside this model's layers "
                                 f"(-{n_layers + 1} .. {n_layers})")

    def encode(self, texts: list[str]) -> dict:
        device = next(self.model.parameters()).device
        if self.prompt:
            texts = [self.prompt.replace("{text}", t) for t in texts]
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    def forward(self, texts: list[str], layers: list[int] | None = None) -> "torch.Tensor":
        """Pooled vectors for one batch (with gradients if the model has trainable parameters).

        With `layers`, returns [batch, len(layers), dim]: every layer from the same forward pass.
        """
        import torch

        batch = self.encode(texts)
        wanted = layers if layers is not None else [self.layer]
        all_layers = wanted != [-1]
        out = self.model(**batch, output_hidden_states=all_layers)
        hidden = [out.hidden_states[k] if all_layers else out.last_hidden_state for k in wanted]
        pooled = [pool(h, batch["attention_mask"], self.pooling).float() for h in hidden]
        return torch.stack(pooled, dim=1) if layers is not None else pooled[0]

    def embed(self, texts: list[str], on_batch: Callable[[int], None] | None = None,
              layers: list[int] | None = None) -> "torch.Tensor":
        """Vectors for all texts, in order ([n, dim], or [n, len(layers), dim] with `layers`).

        Batches group texts of similar length, so little compute goes to padding."""
        import torch

        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = [None] * len(texts)
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                vectors = self.forward([texts[i] for i in idx], layers).cpu()
                for i, v in zip(idx, vectors):
                    out[i] = v
                if on_batch:
                    on_batch(len(idx))
        self.model.train(was_training)
        return torch.stack(out) if out else torch.empty(0)


def candidate_layers(n_layers: int) -> list[int]:
    """Layers worth trying as features: evenly from a quarter of the depth up to the last (as negative indices)."""
    picks = {round(n_layers * f) for f in (0.25, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)} | {n_layers}
    return sorted((k - n_layers - 1 for k in picks if 1 <= k <= n_layers), reverse=True)


def model_fingerprint(folder: str | Path) -> str:
    """Identify a model's weights cheaply: its config plus the names, sizes and times of its weight files."""
    folder = Path(folder)
    digest = hashlib.sha256((folder / "config.json").read_bytes() if (folder / "config.json").is_file() else b"")
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def cache_key(fingerprint: str, embedder: Embedder, texts: list[str], layer: int) -> str:
    digest = hashlib.sha256(json.dumps({
        "model": fingerprint, "pooling": embedder.pooling, "layer": layer, "max_length": embedder.max_length,
        "prompt": embedder.prompt,
    }, sort_keys=True).encode())
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:32]


@dataclass
class CachedEmbeddings:
    vectors: dict[int, "torch.Tensor"]
    hit: bool
    seconds: float
    paths: dict[int, Path]


def cached_embed(embedder: Embedder, texts: list[str], fingerprint: str, cache_dir: Path,
                 layers: list[int] | None = None, on_batch: Callable[[int], None] | None = None) -> CachedEmbeddings:
    """Embed texts once per (model, layer, pooling, max_length, texts); later calls read the files.

    Layers missing from the cache are computed together in one forward pass."""
    from safetensors.torch import load_file, save_file

    start = time.perf_counter()
    layers = layers if layers is not None else [embedder.layer]
    paths = {k: Path(cache_dir) / f"{cache_key(fingerprint, embedder, texts, k)}.safetensors" for k in layers}
    vectors = {k: load_file(p)["embeddings"] for k, p in paths.items() if p.is_file()}
    missing = [k for k in layers if k not in vectors]
    if missing:
        computed = embedder.embed(texts, on_batch, layers=missing)
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        for j, k in enumerate(missing):
            vectors[k] = computed[:, j].contiguous()
            fd, tmp = tempfile.mkstemp(prefix=".emb-", suffix=".safetensors", dir=cache_dir)
            os.close(fd)
            try:
                save_file({"embeddings": vectors[k]}, tmp)
                os.replace(tmp, paths[k])
            finally:
                Path(tmp).unlink(missing_ok=True)
    return CachedEmbeddings(vectors, not missing, time.perf_counter() - start, paths)
