"""Ingest is incremental by content hash, on both stores; unreadable files are reported, not fatal."""

from __future__ import annotations

import pytest

from tunesmith.errors import TunesmithError
from tunesmith.rag.ingest import ingest
from tunesmith.rag.kb import open_kb
from tunesmith.rag.retrieve import Retriever


@pytest.fixture(autouse=True)
def kb_home(tmp_path, monkeypatch):
    monkeypatch.setattr("tunesmith.rag.kb.kb_root", lambda: tmp_path / "kb")


@pytest.fixture(params=["lancedb", "postgres"])
def store_uri(request):
    return None if request.param == "lancedb" else request.getfixturevalue("postgres_dsn")


def write_corpus(folder):
    folder.mkdir(exist_ok=True)
    (folder / "owls.md").write_text("# Owls\n\nOwls hunt at night and fly without a sound.\n")
    (folder / "gulls.txt").write_text("Gulls live by the sea and eat fish.\n")
    (folder / "page.html").write_text("<h1>Bees</h1><p>Bees make honey from nectar.</p>")
    return folder


def test_reingest_skips_unchanged_replaces_changed_and_removes_deleted(tmp_path, encoder, store_uri, request):
    kb = f"inc-{request.node.callspec.id}"
    docs = write_corpus(tmp_path / "docs")
    first = ingest([docs], kb, store_uri, encoder=encoder)
    assert (len(first.added), first.failed, first.chunks_total) == (3, [], 3)
    again = ingest([docs], kb, store_uri, encoder=encoder)
    assert (len(again.unchanged), again.added, again.replaced, again.chunks_written) == (3, [], [], 0)
    (docs / "gulls.txt").write_text("Gulls live by the sea.\n\nThey steal chips from tourists.\n")
    (docs / "page.html").unlink()
    third = ingest([docs], kb, store_uri, encoder=encoder)
    assert [p.rsplit("/", 1)[1] for p in third.replaced] == ["gulls.txt"]
    assert [p.rsplit("/", 1)[1] for p in third.removed] == ["page.html"]
    assert len(third.unchanged) == 1
    backend, meta = open_kb(kb, store_uri)
    retriever = Retriever(backend, encoder, kb, meta)
    top = retriever.search("who steals chips?", 1, "dense")[0]
    assert top.source.endswith("gulls.txt") and "chips" in top.text
    assert not retriever.search("honey from nectar", 5, "bm25"), "the deleted file's chunks are gone"
    assert sorted(p.rsplit("/", 1)[1] for p in backend.files()) == ["gulls.txt", "owls.md"]
    backend.close()


def test_unreadable_files_are_reported_and_the_rest_ingested(tmp_path, encoder):
    docs = write_corpus(tmp_path / "docs")
    (docs / "latin1.txt").write_bytes(b"caf\xe9")
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 nonsense")
    report = ingest([docs, tmp_path / "nowhere.md"], "mixed", encoder=encoder)
    assert len(report.added) == 3 and len(report.failed) == 3
    assert any("latin1.txt: not UTF-8" in f for f in report.failed)
    assert any("broken.pdf" in f and "PDF" in f for f in report.failed)
    assert any("nowhere.md: no such file" in f for f in report.failed)


def test_a_kb_answers_only_to_its_own_encoder_and_an_empty_kb_says_so(tmp_path, encoder, tiny_path):
    from tunesmith.rag.embed import TextEncoder

    docs = write_corpus(tmp_path / "docs")
    ingest([docs], "mini", encoder=encoder)
    backend, meta = open_kb("mini")
    other = TextEncoder(str(tiny_path))
    with pytest.raises(TunesmithError, match=r"built with embedder 'minilm' \(384 dims\).*64 dims"):
        Retriever(backend, other, "mini", meta)
    with pytest.raises(TunesmithError, match="built with embedder"):
        ingest([docs], "mini", encoder=other)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    ingest([empty_dir], "empty", encoder=encoder)
    backend, meta = open_kb("empty")
    with pytest.raises(TunesmithError, match="'empty' is empty; add documents"):
        Retriever(backend, encoder, "empty", meta).search("anything")
    with pytest.raises(TunesmithError, match="does not exist"):
        open_kb("never-made")
