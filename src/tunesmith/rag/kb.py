"""Knowledge bases by name: where each lives (a LanceDB folder, or tables in a Postgres database) and
which encoder built it. `$TUNESMITH_HOME/kb/NAME/kb.json` records both (never a password)."""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.files import write_text_atomic
from tunesmith.rag.store import LanceStore, PostgresStore, VectorStore

KB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,47}$")


def kb_root() -> Path:
    from tunesmith.models import tunesmith_home

    return tunesmith_home() / "kb"


def check_kb_name(name: str) -> str:
    if not KB_NAME.match(name):
        raise TunesmithError(f"--kb {name!r}: use 1-48 letters, digits, '-' or '_', starting with a letter or digit")
    return name


def is_postgres(store: str | None) -> bool:
    return bool(store) and store.split("://", 1)[0] in ("postgres", "postgresql")


def redact(dsn: str) -> str:
    """The DSN without its password (psycopg finds it again in PGPASSWORD or ~/.pgpass)."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1@", dsn)


def read_meta(name: str) -> dict | None:
    path = kb_root() / check_kb_name(name) / "kb.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def list_kbs() -> list[dict]:
    root = kb_root()
    if not root.is_dir():
        return []
    return [json.loads((p / "kb.json").read_text(encoding="utf-8")) for p in sorted(root.iterdir())
            if (p / "kb.json").is_file()]


def open_kb(name: str, store: str | None = None, create_with: dict | None = None) -> tuple[VectorStore, dict]:
    """Open knowledge base `name`; with `create_with` (encoder identity + chunking), create it if new.

    `store` is "lancedb" (default) or a postgresql:// DSN; for an existing KB it may repeat the DSN
    (with its password) but not name another store."""
    check_kb_name(name)
    meta = read_meta(name)
    if meta is None:
        if create_with is None:
            known = ", ".join(m["name"] for m in list_kbs()) or "none yet"
            raise TunesmithError(f"knowledge base {name!r} does not exist (known: {known}); create it with "
                                 f"`tunesmith rag ingest PATH --kb {name}`")
        meta = {"name": name, "store": "postgres" if is_postgres(store) else "lancedb",
                "dsn": redact(store) if is_postgres(store) else None,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **create_with}
    elif store and (meta["store"] == "postgres") != is_postgres(store):
        raise TunesmithError(f"knowledge base {name!r} lives in {meta['store']}; drop --store or give its own store")
    folder = kb_root() / name
    if meta["store"] == "postgres":
        backend: VectorStore = PostgresStore(store if is_postgres(store) else meta["dsn"], name,
                                             meta["dim"])
    else:
        backend = LanceStore(folder / "lance", meta["dim"])
    if not (folder / "kb.json").is_file():
        write_text_atomic(folder / "kb.json", json.dumps(meta, indent=2) + "\n")
    return backend, meta


def drop_kb(name: str, store: str | None = None) -> None:
    import shutil

    backend, _ = open_kb(name, store)
    backend.drop()
    backend.close()
    shutil.rmtree(kb_root() / name, ignore_errors=True)
