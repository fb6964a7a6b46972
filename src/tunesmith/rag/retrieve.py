"""Ranked chunks for a question: dense (cosine over embeddings), BM25 (full text), or hybrid, which
fuses the two rankings by reciprocal rank fusion (Cormack et al., 2009: score = sum of 1/(60 + rank))."""

from __future__ import annotations

from typing import Literal

from tunesmith.errors import TunesmithError
from tunesmith.rag.embed import TextEncoder, check_same_encoder
from tunesmith.rag.store import Hit, VectorStore

Mode = Literal["dense", "bm25", "hybrid"]
MODES: tuple[str, ...] = ("dense", "bm25", "hybrid")
RRF_K = 60


def rrf(rankings: list[list[Hit]], k: int, c: int = RRF_K) -> list[Hit]:
    """Fuse rankings: each hit scores sum(1 / (c + rank)) over the rankings it appears in (rank from 1).
    Ties keep the order of first appearance."""
    scores: dict[str, float] = {}
    first: dict[str, Hit] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, start=1):
            scores[hit.id] = scores.get(hit.id, 0.0) + 1.0 / (c + rank)
            first.setdefault(hit.id, hit)
    order = sorted(scores, key=lambda i: -scores[i])  # sorted() is stable: first appearance breaks ties
    return [Hit(**{**first[i].__dict__, "score": scores[i]}) for i in order[:k]]


class Retriever:
    def __init__(self, store: VectorStore, encoder: TextEncoder, kb: str = "", meta: dict | None = None) -> None:
        if meta is not None:
            check_same_encoder(kb, meta, encoder)
        self.store, self.encoder, self.kb = store, encoder, kb
        self._empty: bool | None = None

    def search(self, query: str, k: int = 5, mode: Mode = "hybrid", prefix: str | None = None) -> list[Hit]:
        if mode not in MODES:
            raise TunesmithError(f"--retriever {mode}: use one of {', '.join(MODES)}")
        if k < 1:
            raise TunesmithError(f"--k {k}: ask for at least 1 chunk")
        if self._empty is None:
            self._empty = self.store.count() == 0
        if self._empty:
            raise TunesmithError(f"knowledge base {self.kb!r} is empty; add documents with "
                                 f"`tunesmith rag ingest PATH --kb {self.kb}`")
        if mode == "dense":
            return self.store.dense(self.encoder.embed_one(query), k, prefix)
        if mode == "bm25":
            return self.store.text(query, k, prefix)
        depth = max(20, 4 * k)  # fuse deeper lists than asked for, as RRF needs overlap to work
        return rrf([self.store.dense(self.encoder.embed_one(query), depth, prefix),
                    self.store.text(query, depth, prefix)], k)
