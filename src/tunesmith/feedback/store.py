"""The ratings store: SQLite in WAL mode with synchronous=FULL, so a rating is on disk before the reviewer
sees the next item. One row per rating, keyed by an id the client makes up, so a retried submission is
stored once. Items (a prompt and its candidates) are stored too, so every reviewer sees the same ones."""

from __future__ import annotations

import datetime
import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import TunesmithError

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY, position INTEGER NOT NULL, prompt TEXT NOT NULL,
    candidates TEXT,            -- JSON [{"source": ..., "text": ...}], NULL until generated
    created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ratings (
    id TEXT PRIMARY KEY,        -- made by the client: a retry of the same rating is the same row
    item_id TEXT NOT NULL REFERENCES items(id), reviewer TEXT NOT NULL,
    verdict TEXT NOT NULL CHECK (verdict IN ('best', 'tie', 'skip')),
    best INTEGER, scores TEXT, comment TEXT, created TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS ratings_by_reviewer ON ratings (reviewer, item_id);
"""


@dataclass
class Item:
    id: str
    position: int
    prompt: str
    candidates: list[dict] | None


class Store:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a COMMIT is fsynced: acknowledged means on disk
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # --- items ------------------------------------------------------------------------------
    def add_items(self, items: list[tuple[str, str, list[dict] | None]]) -> int:
        """Add (id, prompt, candidates) items not stored yet; returns how many were new."""
        now = _now()
        with self.lock:
            start = self.db.execute("SELECT COALESCE(MAX(position), -1) + 1 FROM items").fetchone()[0]
            self.db.execute("BEGIN IMMEDIATE")
            before = self.db.total_changes
            for offset, (item_id, prompt, candidates) in enumerate(items):
                self.db.execute("INSERT OR IGNORE INTO items VALUES (?, ?, ?, ?, ?)",
                                (item_id, start + offset, prompt, json.dumps(candidates) if candidates else None, now))
            self.db.execute("COMMIT")
            return self.db.total_changes - before

    def set_candidates(self, item_id: str, candidates: list[dict]) -> None:
        with self.lock:
            self.db.execute("UPDATE items SET candidates = ? WHERE id = ? AND candidates IS NULL",
                            (json.dumps(candidates), item_id))

    def item(self, item_id: str) -> Item | None:
        row = self.db.execute("SELECT id, position, prompt, candidates FROM items WHERE id = ?", (item_id,)).fetchone()
        return _item(row) if row else None

    def items(self) -> list[Item]:
        return [_item(r) for r in self.db.execute("SELECT id, position, prompt, candidates FROM items ORDER BY position")]

    def next_item(self, reviewer: str) -> Item | None:
        row = self.db.execute(
            "SELECT id, position, prompt, candidates FROM items WHERE id NOT IN "
            "(SELECT item_id FROM ratings WHERE reviewer = ?) ORDER BY position LIMIT 1", (reviewer,)).fetchone()
        return _item(row) if row else None

    def progress(self, reviewer: str) -> tuple[int, int]:
        done = self.db.execute("SELECT COUNT(DISTINCT item_id) FROM ratings WHERE reviewer = ?", (reviewer,)).fetchone()[0]
        return done, self.db.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    # --- ratings ----------------------------------------------------------------------------
    def add_rating(self, rating_id: str, item_id: str, reviewer: str, verdict: str, best: int | None,
                   scores: list[int | None] | None, comment: str | None) -> bool:
        """Store one rating (committed and fsynced on return). False when this id was already stored."""
        item = self.item(item_id)
        if item is None:
            raise TunesmithError(f"item {item_id!r} does not exist")
        count = len(item.candidates or [])
        if verdict == "best" and (best is None or not 0 <= best < count):
            raise TunesmithError(f"best: pick a candidate between 0 and {count - 1}")
        if scores is not None and (len(scores) != count or any(s is not None and not 1 <= s <= 5 for s in scores)):
            raise TunesmithError(f"scores: give {count} values, each 1-5 or null")
        with self.lock:
            cursor = self.db.execute(
                "INSERT OR IGNORE INTO ratings VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (rating_id, item_id, reviewer, verdict, best if verdict == "best" else None,
                 json.dumps(scores) if scores is not None else None, comment or None, _now()))
            return cursor.rowcount == 1

    def ratings(self) -> list[dict]:
        rows = self.db.execute("SELECT id, item_id, reviewer, verdict, best, scores, comment, created FROM ratings "
                               "ORDER BY created, id").fetchall()
        keys = ("id", "item_id", "reviewer", "verdict", "best", "scores", "comment", "created")
        return [{**dict(zip(keys, r)), "scores": json.loads(r[5]) if r[5] else None} for r in rows]


def _item(row) -> Item:
    return Item(row[0], row[1], row[2], json.loads(row[3]) if row[3] else None)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
