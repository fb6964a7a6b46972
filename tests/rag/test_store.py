"""One suite, two stores: LanceDB (embedded) and PostgreSQL + pgvector (a real server) behave the same."""

from __future__ import annotations

import numpy as np
import pytest

from tunesmith.rag.chunking import Chunk
from tunesmith.rag.store import LanceStore, PostgresStore

DIM = 8
TEXTS = {
    "/kb/pets/cats.md": ["Cats purr when they are content.", "A cat sleeps most of the day."],
    "/kb/pets/dogs.md": ["Dogs bark at strangers.", "A loyal dog guards the house."],
    "/kb/finance/stocks.txt": ["The stock market fell sharply today.", "Bond yields rose as stocks fell."],
}


@pytest.fixture(params=["lancedb", "postgres"])
def store(request, tmp_path):
    if request.param == "lancedb":
        backend = LanceStore(tmp_path / "lance", DIM)
    else:
        backend = PostgresStore(request.getfixturevalue("postgres_dsn"), f"suite_{request.node.name[-12:]}"
                                .replace("[", "_").replace("]", ""), DIM)
        backend.drop()
        backend = PostgresStore(request.getfixturevalue("postgres_dsn"), backend.name, DIM)
    yield backend
    backend.drop()
    backend.close()


def vectors_for(texts: list[str], seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((len(texts), DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def fill(store) -> dict[str, np.ndarray]:
    out = {}
    for seed, (file, texts) in enumerate(TEXTS.items()):
        chunks = [Chunk(file, file.rsplit("/", 1)[1], i * 100, i * 100 + len(t), t, i) for i, t in enumerate(texts)]
        out[file] = vectors_for(texts, seed)
        store.replace_file(file, f"hash-{seed}", chunks, out[file])
    store.finish()
    return out


def test_files_count_and_replacement(store):
    fill(store)
    assert store.count() == 6
    assert store.files() == {"/kb/pets/cats.md": "hash-0", "/kb/pets/dogs.md": "hash-1", "/kb/finance/stocks.txt": "hash-2"}
    store.replace_file("/kb/pets/cats.md", "hash-new", [Chunk("/kb/pets/cats.md", "cats", 0, 5, "Kittens!", 0)],
                       vectors_for(["x"], 9))
    assert store.count() == 5 and store.files()["/kb/pets/cats.md"] == "hash-new"
    store.delete_file("/kb/pets/dogs.md")
    assert store.count() == 3 and "/kb/pets/dogs.md" not in store.files()


def test_dense_search_ranks_by_exact_cosine(store):
    vectors = fill(store)
    rows = [(f, i) for f in TEXTS for i in range(len(TEXTS[f]))]
    matrix = np.concatenate([vectors[f] for f in TEXTS])
    query = vectors_for(["q"], 42)[0]
    expected = [TEXTS[rows[i][0]][rows[i][1]] for i in np.argsort(-(matrix @ query))]
    hits = store.dense(query, 6)
    assert [h.text for h in hits] == expected
    assert hits[0].score == pytest.approx(float(np.max(matrix @ query)), abs=1e-5)
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))


def test_text_search_finds_the_words_and_keeps_offsets(store):
    fill(store)
    hits = store.text("stocks market", 3)
    assert hits and hits[0].source == "/kb/finance/stocks.txt"
    assert {h.source for h in hits} == {"/kb/finance/stocks.txt"}
    top = store.text("purr", 1)[0]
    assert (top.text, top.start, top.end, top.title) == ("Cats purr when they are content.", 0, 32, "cats.md")
    assert store.text("zebra", 3) == []


def test_prefix_filters_apply_to_both_searches(store):
    fill(store)
    query = vectors_for(["q"], 7)[0]
    assert {h.source for h in store.dense(query, 6, prefix="/kb/pets/")} == {"/kb/pets/cats.md", "/kb/pets/dogs.md"}
    assert len(store.dense(query, 6, prefix="/kb/pets/")) == 4
    assert {h.source for h in store.text("stocks fell dog", 5, prefix="/kb/pets/")} == {"/kb/pets/dogs.md"}
    assert store.dense(query, 3, prefix="/kb/100%_sure/") == []  # LIKE wildcards in a prefix are literal


def test_a_large_lancedb_table_gets_an_ann_index_that_finds_the_exact_neighbours(tmp_path):
    from tunesmith.rag.store import ANN_MIN_ROWS

    rng = np.random.default_rng(0)
    n, dim = ANN_MIN_ROWS, 16
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store = LanceStore(tmp_path / "big", dim)
    chunks = [Chunk("/big.jsonl#%d" % i, "t", 0, 1, f"row {i}", i) for i in range(n)]
    store.replace_file("/big.jsonl", "h", chunks, vectors)
    store.finish()
    assert store._has_index("vector") and store._has_index("text")
    queries = rng.standard_normal((20, dim)).astype(np.float32)
    found = sum(store.dense(q, 1)[0].text == f"row {int(np.argmax(vectors @ q))}" for q in queries)
    assert found >= 19, f"ANN top-1 matched exact search for {found}/20 queries"
    top50 = {h.text for h in store.dense(queries[0], 50)}
    exact50 = {f"row {i}" for i in np.argsort(-(vectors @ queries[0]))[:50]}
    assert len(top50 & exact50) >= 45, "deep searches (k * refine beyond the default beam) work and stay accurate"
