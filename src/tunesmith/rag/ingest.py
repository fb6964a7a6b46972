"""`tunesmith rag ingest`: files -> documents -> chunks -> vectors -> the knowledge base, incrementally.

A file whose content hash is already stored is skipped; a changed file has its chunks replaced; a
file that was ingested from one of the given folders and is gone now has its chunks removed. A
file that cannot be read is reported and skipped; the run goes on and ends with a summary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tunesmith.errors import TunesmithError
from tunesmith.rag.chunking import Chunk, chunk_document
from tunesmith.rag.documents import RowFields, file_hash, find_files, read_documents
from tunesmith.rag.embed import TextEncoder, check_same_encoder
from tunesmith.rag.kb import open_kb

EMBED_BATCH_CHUNKS = 256  # files are embedded together until this many chunks are pending


@dataclass
class IngestReport:
    kb: str
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # "path: reason"
    chunks_written: int = 0
    chunks_total: int = 0
    seconds: float = 0.0

    @property
    def chunks_per_second(self) -> float:
        return self.chunks_written / self.seconds if self.seconds else 0.0


def ingest(paths: list[str | Path], kb: str, store: str | None = None, embedder: str = "minilm",
           fields: RowFields = RowFields(), chunk_tokens: int = 200, overlap: int = 40,
           encoder: TextEncoder | None = None, progress=None) -> IngestReport:
    """Bring the knowledge base `kb` up to date with the files under `paths`."""
    started = time.perf_counter()
    if overlap >= chunk_tokens:
        raise TunesmithError(f"--overlap {overlap}: must be smaller than --chunk-tokens {chunk_tokens}")
    files, problems = find_files(paths)
    if not files and problems:
        raise TunesmithError(problems[0])
    encoder = encoder or TextEncoder(embedder)
    if chunk_tokens > encoder.max_length:
        raise TunesmithError(f"--chunk-tokens {chunk_tokens}: the embedder reads at most {encoder.max_length} tokens")
    chunking = {"chunk_tokens": chunk_tokens, "overlap": overlap}
    backend, meta = open_kb(kb, store, create_with={**encoder.identity, "chunking": chunking})
    report = IngestReport(kb, failed=list(problems))
    try:
        check_same_encoder(kb, meta, encoder)
        known = backend.files()
        current = {str(f.resolve()) for f in files}
        roots = [str(Path(p).resolve()) for p in paths if Path(p).is_dir()]
        for stale in sorted(f for f in known if f not in current and any(f.startswith(r.rstrip("/") + "/") for r in roots)):
            backend.delete_file(stale)
            report.removed.append(stale)
        pending: list[tuple[str, str, list[Chunk]]] = []

        def flush() -> None:
            chunks = [c for _, _, cs in pending for c in cs]
            vectors = encoder.embed([c.text for c in chunks], on_batch=progress.advance if progress else None)
            at = 0
            for key, digest, cs in pending:
                backend.replace_file(key, digest, cs, vectors[at : at + len(cs)] if cs else np.zeros((0, encoder.dim)))
                at += len(cs)
                report.chunks_written += len(cs)
            pending.clear()

        if progress:
            progress.start(len(files))
        for path in files:
            key = str(path.resolve())
            try:
                digest = file_hash(path)
            except OSError as e:
                report.failed.append(f"{path}: cannot read ({e.strerror})")
                continue
            if known.get(key) == digest:
                report.unchanged.append(key)
                if progress:
                    progress.file_done(0)
                continue
            try:
                documents = read_documents(path.resolve(), fields)
            except TunesmithError as e:
                report.failed.append(str(e))
                if progress:
                    progress.file_done(0)
                continue
            chunks = [c for d in documents for c in chunk_document(d, encoder.tokenizer, chunk_tokens, overlap)]
            (report.replaced if key in known else report.added).append(key)
            pending.append((key, digest, chunks))
            if progress:
                progress.file_done(len(chunks))
            if sum(len(cs) for _, _, cs in pending) >= EMBED_BATCH_CHUNKS:
                flush()
        if pending:
            flush()
        backend.finish()
        report.chunks_total = backend.count()
    finally:
        backend.close()
    report.seconds = time.perf_counter() - started
    return report
