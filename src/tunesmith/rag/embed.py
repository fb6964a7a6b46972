"""Text encoders for retrieval: the shipped all-MiniLM-L6-v2 by default, or any sentence-transformers
or Hugging Face encoder folder. Vectors are L2-normalised, so cosine similarity is a dot product.

Pooling and length follow the folder's sentence-transformers config when it has one
(1_Pooling/config.json, sentence_bert_config.json): plain `AutoModel` plus that pooling gives the
same vectors as sentence-transformers (measured in the shared stack notes), without the dependency.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tunesmith.errors import TunesmithError

DEFAULT_EMBEDDER = "minilm"


class TextEncoder:
    def __init__(self, spec: str = DEFAULT_EMBEDDER, batch_size: int = 64, device: str = "cpu") -> None:
        from transformers import AutoModel

        from tunesmith.embeddings import Embedder
        from tunesmith.models import load_tokenizer, resolve_base

        self.spec = spec
        folder = Path(resolve_base(spec))
        pooling, max_length = _sentence_transformers_settings(folder)
        model = AutoModel.from_pretrained(folder).to(device).eval()
        self.embedder = Embedder(model, load_tokenizer(folder), pooling, -1, max_length, batch_size)
        self.tokenizer = self.embedder.tokenizer
        self.dim = int(model.config.hidden_size)
        self.fingerprint = content_fingerprint(folder)
        self.max_length = max_length

    @property
    def identity(self) -> dict:
        return {"embedder": self.spec, "fingerprint": self.fingerprint, "dim": self.dim}

    def embed(self, texts: list[str], on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.embedder.embed(texts, on_batch).numpy().astype(np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)

    def embed_one(self, text: str) -> np.ndarray:
        return self.embed([text])[0]


def check_same_encoder(kb_name: str, recorded: dict, encoder: TextEncoder) -> None:
    """A knowledge base answers only to the encoder that built it: vectors of two models do not compare."""
    if recorded.get("dim") != encoder.dim or recorded.get("fingerprint") != encoder.fingerprint:
        raise TunesmithError(
            f"knowledge base {kb_name!r} was built with embedder {recorded.get('embedder')!r} "
            f"({recorded.get('dim')} dims), but this query uses {encoder.spec!r} ({encoder.dim} dims); "
            f"query with --embedder {recorded.get('embedder')} or re-ingest into a new knowledge base")


def content_fingerprint(folder: Path) -> str:
    """Identify an encoder by content, not file times (a reinstall must not orphan a knowledge base):
    its config and, per weight file, the size and the first and last MiB."""
    import hashlib

    digest = hashlib.sha256()
    for name in ("config.json", "1_Pooling/config.json"):
        if (folder / name).is_file():
            digest.update((folder / name).read_bytes())
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as handle:
            digest.update(handle.read(1 << 20))
            handle.seek(max(0, size - (1 << 20)))
            digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


def _sentence_transformers_settings(folder: Path) -> tuple[str, int]:
    pooling, max_length = "mean", 256
    config = folder / "1_Pooling" / "config.json"
    if config.is_file():
        settings = json.loads(config.read_text(encoding="utf-8"))
        if settings.get("pooling_mode_cls_token"):
            pooling = "cls"
        elif settings.get("pooling_mode_lasttoken"):
            pooling = "last"
    st = folder / "sentence_bert_config.json"
    if st.is_file():
        max_length = int(json.loads(st.read_text(encoding="utf-8")).get("max_seq_length", max_length))
    else:
        model_config = folder / "config.json"
        if model_config.is_file():
            positions = json.loads(model_config.read_text(encoding="utf-8")).get("max_position_embeddings", 512)
            max_length = min(int(positions), 512)
    return pooling, max_length
