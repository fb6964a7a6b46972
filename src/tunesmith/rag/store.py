"""Vector stores behind one small protocol: LanceDB (embedded, the default) and PostgreSQL + pgvector.

Both hold the same rows (one per chunk: file, source, title, offsets, text, vector) and a table of
ingested files with their content hashes, and answer the same calls; tests/rag/test_store.py runs
one suite against each. Dense search is cosine similarity; text search is BM25 on LanceDB and
Postgres full-text ranking (`ts_rank`, any query term may match) on Postgres.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from tunesmith.errors import TunesmithError
from tunesmith.rag.chunking import Chunk

ANN_MIN_ROWS = 20_000  # below this, exact search is fast enough (and exact)


@dataclass
class Hit:
    id: str
    source: str
    title: str
    start: int
    end: int
    text: str
    score: float

    @property
    def doc_id(self) -> str:
        """The document a chunk came from: the row id for .jsonl/.csv rows, else the file name."""
        return self.source.split("#", 1)[1] if "#" in self.source else Path(self.source).name


def chunk_id(chunk: Chunk, digest: str) -> str:
    return hashlib.sha1(f"{chunk.source}\0{chunk.index}\0{digest}".encode()).hexdigest()[:20]


class VectorStore(Protocol):
    kind: str

    def files(self) -> dict[str, str]: ...
    def replace_file(self, file: str, digest: str, chunks: list[Chunk], vectors: np.ndarray) -> None: ...
    def delete_file(self, file: str) -> None: ...
    def count(self) -> int: ...
    def dense(self, vector: np.ndarray, k: int, prefix: str | None = None) -> list[Hit]: ...
    def text(self, query: str, k: int, prefix: str | None = None) -> list[Hit]: ...
    def finish(self) -> None: ...
    def drop(self) -> None: ...
    def close(self) -> None: ...


# --- LanceDB ---------------------------------------------------------------------------------------

class LanceStore:
    """A LanceDB database in a folder: tables `chunks` and `files`."""

    kind = "lancedb"
    COLUMNS = ["id", "source", "title", "start", "end", "text"]

    def __init__(self, folder: Path, dim: int) -> None:
        import os

        os.environ.setdefault("LANCE_INCLUDE_VECTOR_CENTROIDS", "false")  # index listings stay small (and quiet)
        import lancedb
        import pyarrow as pa

        self.folder, self.dim = Path(folder), dim
        self.db = lancedb.connect(str(self.folder))
        self.chunk_schema = pa.schema([
            pa.field("id", pa.string()), pa.field("file", pa.string()), pa.field("source", pa.string()),
            pa.field("title", pa.string()), pa.field("start", pa.int64()), pa.field("end", pa.int64()),
            pa.field("chunk", pa.int64()), pa.field("text", pa.string()), pa.field("vector", pa.list_(pa.float32(), dim)),
        ])
        self.file_schema = pa.schema([pa.field("file", pa.string()), pa.field("hash", pa.string()),
                                      pa.field("chunks", pa.int64())])
        names = set(self.db.list_tables().tables)
        self.chunks = (self.db.open_table("chunks") if "chunks" in names
                       else self.db.create_table("chunks", schema=self.chunk_schema))
        self.file_table = (self.db.open_table("files") if "files" in names
                           else self.db.create_table("files", schema=self.file_schema))

    def files(self) -> dict[str, str]:
        return {row["file"]: row["hash"] for row in self.file_table.to_arrow().to_pylist()}

    def replace_file(self, file: str, digest: str, chunks: list[Chunk], vectors: np.ndarray) -> None:
        self.chunks.delete(f"file = {_quote(file)}")
        if chunks:
            self.chunks.add([{"id": chunk_id(c, digest), "file": file, "source": c.source, "title": c.title,
                              "start": c.start, "end": c.end, "chunk": c.index, "text": c.text, "vector": v}
                             for c, v in zip(chunks, vectors.astype(np.float32))])
        self.file_table.delete(f"file = {_quote(file)}")
        self.file_table.add([{"file": file, "hash": digest, "chunks": len(chunks)}])  # last: a crash re-ingests

    def delete_file(self, file: str) -> None:
        self.chunks.delete(f"file = {_quote(file)}")
        self.file_table.delete(f"file = {_quote(file)}")

    def count(self) -> int:
        return self.chunks.count_rows()

    def dense(self, vector: np.ndarray, k: int, prefix: str | None = None) -> list[Hit]:
        query = self.chunks.search(np.asarray(vector, dtype=np.float32), vector_column_name="vector")
        query = query.metric("cosine").select([*self.COLUMNS, "_distance"]).limit(k)
        if self._has_index("vector"):
            # probe 20 partitions, widen the HNSW beam, rerank 10x the candidates on exact vectors (tests: top-1 = exact)
            query = query.nprobes(20).ef(max(64, 10 * k)).refine_factor(10)  # HNSW must yield all 10k candidates
        if prefix:
            query = query.where(f"starts_with(source, {_quote(prefix)})", prefilter=True)
        return [self._hit(row, 1.0 - row["_distance"]) for row in query.to_list()]

    def text(self, query: str, k: int, prefix: str | None = None) -> list[Hit]:
        if not query.strip() or not self.count():
            return []
        search = self.chunks.search(query, query_type="fts", fts_columns="text").select([*self.COLUMNS, "_score"]).limit(k)
        if prefix:
            search = search.where(f"starts_with(source, {_quote(prefix)})", prefilter=True)
        return [self._hit(row, row["_score"]) for row in search.to_list()]

    def finish(self) -> None:
        """After writes: compact, make sure the full-text index exists, and index vectors once the table is large."""
        from lancedb.index import FTS, IvfHnswSq

        rows = self.count()
        if not rows:
            return
        if not self._has_index("text"):
            self.chunks.create_index("text", config=FTS(), replace=True)
        if rows >= ANN_MIN_ROWS and not self._has_index("vector"):
            # partitions of ~4k rows, each searched through its own HNSW graph over scalar-quantized vectors
            self.chunks.create_index("vector", config=IvfHnswSq(distance_type="cosine",
                                                                num_partitions=max(1, rows // 4096)))
        self.chunks.optimize()  # merges small fragments and brings new rows into the indexes
        self.file_table.optimize()

    def drop(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)

    def close(self) -> None:
        pass

    def _has_index(self, column: str) -> bool:
        return any(column in index.columns for index in self.chunks.list_indices())

    @staticmethod
    def _hit(row: dict, score: float) -> Hit:
        return Hit(row["id"], row["source"], row["title"], int(row["start"]), int(row["end"]), row["text"], float(score))


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


# --- PostgreSQL + pgvector -------------------------------------------------------------------------

class PostgresStore:
    """Tables `tunesmith_chunks__NAME` and `tunesmith_files__NAME` in a PostgreSQL database with pgvector."""

    kind = "postgres"

    def __init__(self, dsn: str, name: str, dim: int) -> None:
        import psycopg
        from pgvector.psycopg import register_vector
        from psycopg import sql

        self.dim, self.name = dim, name
        try:
            self.conn = psycopg.connect(dsn, autocommit=True)
        except psycopg.OperationalError as e:
            raise TunesmithError(f"cannot connect to PostgreSQL: {str(e).strip().splitlines()[0]}") from None
        try:
            self.conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except psycopg.Error as e:
            raise TunesmithError(f"PostgreSQL: the pgvector extension is not available ({str(e).strip().splitlines()[0]}); "
                                 "install pgvector on the server") from None
        register_vector(self.conn)
        self.conn.execute("SET hnsw.iterative_scan = strict_order")  # filtered HNSW scans keep going until k rows
        self.conn.execute("SET hnsw.ef_search = 200")  # pgvector's default 40 loses near neighbours (bench/rag.py)
        self.chunks = sql.Identifier(f"tunesmith_chunks__{name}")
        self.file_table = sql.Identifier(f"tunesmith_files__{name}")
        self.sql = sql
        self.conn.execute(sql.SQL("""
            CREATE TABLE IF NOT EXISTS {chunks} (
                id text PRIMARY KEY, file text NOT NULL, source text NOT NULL, title text NOT NULL,
                start_char integer NOT NULL, end_char integer NOT NULL, chunk integer NOT NULL, text text NOT NULL,
                embedding vector({dim}) NOT NULL,
                tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED)""").format(
            chunks=self.chunks, dim=sql.Literal(dim)))
        self.conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (file text PRIMARY KEY, hash text NOT NULL, "
                                  "chunks integer NOT NULL)").format(self.file_table))
        self.conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (file)").format(
            sql.Identifier(f"tunesmith_chunks__{name}_file"), self.chunks))
        self.conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING gin (tsv)").format(
            sql.Identifier(f"tunesmith_chunks__{name}_tsv"), self.chunks))

    def files(self) -> dict[str, str]:
        return dict(self.conn.execute(self.sql.SQL("SELECT file, hash FROM {}").format(self.file_table)).fetchall())

    def replace_file(self, file: str, digest: str, chunks: list[Chunk], vectors: np.ndarray) -> None:
        sql = self.sql
        with self.conn.transaction():
            self.conn.execute(sql.SQL("DELETE FROM {} WHERE file = %s").format(self.chunks), (file,))
            with self.conn.cursor().copy(sql.SQL(
                    "COPY {} (id, file, source, title, start_char, end_char, chunk, text, embedding) FROM STDIN"
            ).format(self.chunks)) as copy:
                for c, v in zip(chunks, vectors.astype(np.float32)):
                    copy.write_row((chunk_id(c, digest), file, c.source, c.title, c.start, c.end, c.index, c.text,
                                    "[" + ",".join(map(repr, v.tolist())) + "]"))
            self.conn.execute(sql.SQL("INSERT INTO {} (file, hash, chunks) VALUES (%s, %s, %s) ON CONFLICT (file) "
                                      "DO UPDATE SET hash = excluded.hash, chunks = excluded.chunks").format(
                self.file_table), (file, digest, len(chunks)))

    def delete_file(self, file: str) -> None:
        with self.conn.transaction():
            self.conn.execute(self.sql.SQL("DELETE FROM {} WHERE file = %s").format(self.chunks), (file,))
            self.conn.execute(self.sql.SQL("DELETE FROM {} WHERE file = %s").format(self.file_table), (file,))

    def count(self) -> int:
        return self.conn.execute(self.sql.SQL("SELECT count(*) FROM {}").format(self.chunks)).fetchone()[0]

    def dense(self, vector: np.ndarray, k: int, prefix: str | None = None) -> list[Hit]:
        vector = np.asarray(vector, dtype=np.float32)
        where = self.sql.SQL("WHERE source LIKE %s ESCAPE '\\'") if prefix else self.sql.SQL("")
        rows = self.conn.execute(self.sql.SQL(
            "SELECT id, source, title, start_char, end_char, text, 1 - (embedding <=> %s) FROM {} {} "
            "ORDER BY embedding <=> %s LIMIT %s").format(self.chunks, where),
            (vector, *_like(prefix), vector, k)).fetchall()
        return [Hit(*row[:6], float(row[6])) for row in rows]

    def text(self, query: str, k: int, prefix: str | None = None) -> list[Hit]:
        where = self.sql.SQL("AND source LIKE %s ESCAPE '\\'") if prefix else self.sql.SQL("")
        # any query term may match (plainto_tsquery would need all of them), ranked by term frequency:
        # on PubMedQA ts_rank finds the right abstract first 95% of the time, ts_rank_cd 77%
        rows = self.conn.execute(self.sql.SQL(
            "SELECT id, source, title, start_char, end_char, text, ts_rank(tsv, q) AS score FROM {}, "
            "to_tsquery('simple', replace(plainto_tsquery('english', %s)::text, '&', '|')) AS q "
            "WHERE tsv @@ q {} ORDER BY score DESC, id LIMIT %s").format(self.chunks, where),
            (query, *_like(prefix), k)).fetchall()
        return [Hit(*row[:6], float(row[6])) for row in rows]

    def finish(self) -> None:
        self.conn.execute("SET maintenance_work_mem = '1GB'")  # an HNSW build that fits in memory is many times faster
        self.conn.execute(self.sql.SQL(
            "CREATE INDEX IF NOT EXISTS {} ON {} USING hnsw (embedding vector_cosine_ops) "
            "WITH (m = 16, ef_construction = 128)").format(
            self.sql.Identifier(f"tunesmith_chunks__{self.name}_hnsw"), self.chunks))
        self.conn.execute(self.sql.SQL("ANALYZE {}").format(self.chunks))

    def drop(self) -> None:
        self.conn.execute(self.sql.SQL("DROP TABLE IF EXISTS {}, {}").format(self.chunks, self.file_table))

    def close(self) -> None:
        self.conn.close()



def _like(prefix: str | None) -> tuple:
    if not prefix:
        return ()
    return (prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%",)
