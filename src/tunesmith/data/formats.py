"""Read training files and validate every row before any training starts.

Files: .jsonl, .json (an array of objects), .csv, .parquet, or a folder written by
`datasets.Dataset.save_to_disk`. Formats: `text` (raw text for continued pre-training),
`alpaca` (instruction / input / output) and `messages` (OpenAI role/content; ShareGPT
from/value is accepted). Each valid row becomes an `Example`; each bad row a `Problem`
that names `file:line: field: problem`.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError

FORMATS = ("text", "alpaca", "messages")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
SHOWN_PROBLEMS = 10


@dataclass(frozen=True)
class Row:
    """One raw record and where it came from (a line for text files, a row number otherwise)."""

    path: Path
    line: int
    value: Any

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class Example:
    """A validated row: raw `text`, or a chat as `messages` (role/content dicts)."""

    where: str
    text: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Problem:
    where: str
    field: str
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.field}: {self.problem}" if self.field else f"{self.where}: {self.problem}"


# --- readers ----------------------------------------------------------------------------

def read_rows(path: str | Path) -> list[Row]:
    """Every record of one file, with its line (or row) number. Raises for unreadable files."""
    path = Path(path)
    if not path.exists():
        raise TunesmithError(f"{path}: file not found; check data.train / data.validation in the recipe")
    if path.is_dir():
        rows = _read_saved_dataset(path)
    else:
        suffix = path.suffix.lower()
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        if suffix not in readers:
            raise TunesmithError(f"{path}: unknown file type '{suffix}'; use .jsonl, .json, .csv, .parquet or a datasets folder")
        if path.stat().st_size == 0:
            raise TunesmithError(f"{path}: file is empty; it needs at least one row")
        rows = readers[suffix](path)
    if not rows:
        raise TunesmithError(f"{path}: no rows found; the file needs at least one record")
    return rows


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TunesmithError(f"{path}:{line_no}: not valid JSON ({exc.msg} at column {exc.colno}); fix or remove the line") from None
            rows.append(Row(path, line_no, value))
    return rows


def _read_json(path: Path) -> list[Row]:
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    start = len(text) - len(text.lstrip())
    if not text[start:].startswith("["):
        raise TunesmithError(f"{path}:1: a .json data file must hold an array of objects (use .jsonl for one object per line)")
    rows, pos = [], start + 1
    # Decode the array element by element so each row keeps the line it starts on.
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise TunesmithError(f"{path}:{text.count(chr(10), 0, pos) + 1}: not valid JSON (the array is not closed)")
        if text[pos] == "]":
            return rows
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise TunesmithError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        rows.append(Row(path, text.count("\n", 0, pos) + 1, value))
        pos = end


def _read_csv(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        start = 2
        for record in reader:
            rows.append(Row(path, start, {k: v for k, v in record.items() if k is not None}))
            start = reader.line_num + 1
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise TunesmithError(f"{path}: cannot read parquet ({exc})") from None
    return [Row(path, i, value) for i, value in enumerate(table.to_pylist(), start=1)]


def _read_saved_dataset(path: Path) -> list[Row]:
    if not any((path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise TunesmithError(f"{path}: a folder must be written by datasets' save_to_disk (no dataset_info.json found)")
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(path))
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise TunesmithError(f"{path}: dataset has splits {list(dataset)} but no 'train'; point at one split folder")
        dataset = dataset["train"]
    return [Row(path, i, value) for i, value in enumerate(dataset, start=1)]


# --- formats ----------------------------------------------------------------------------

def detect_format(rows: list[Row], text_field: str = "text") -> str:
    first = next((r for r in rows if isinstance(r.value, dict)), None)
    keys = set(first.value) if first else set()
    if keys & {"messages", "conversations"}:
        return "messages"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if text_field in keys:
        return "text"
    where = first.where if first else rows[0].where
    raise TunesmithError(
        f"{where}: cannot tell the data format from keys {sorted(keys)}; set data.format to text, alpaca or messages"
    )


def validate(rows: list[Row], fmt: str, text_field: str = "text") -> tuple[list[Example], list[Problem]]:
    """Check every row against `fmt`; return the good examples and one problem per bad row."""
    check = {"text": check_text, "alpaca": check_alpaca, "messages": check_messages}[fmt]
    examples, problems = [], []
    for row in rows:
        if not isinstance(row.value, dict):
            problems.append(Problem(row.where, "", f"expected an object, got {type(row.value).__name__}"))
            continue
        result = check(row, text_field) if fmt == "text" else check(row)
        (problems if isinstance(result, Problem) else examples).append(result)
    return examples, problems


def _string(row: Row, name: str, required: bool = True) -> str | Problem:
    value = row.value.get(name)
    if value is None:
        return Problem(row.where, name, "missing") if required else ""
    if not isinstance(value, str):
        return Problem(row.where, name, f"expected a string, got {type(value).__name__}")
    if required and not value.strip():
        return Problem(row.where, name, "empty")
    return value


def check_text(row: Row, text_field: str) -> Example | Problem:
    text = _string(row, text_field)
    return text if isinstance(text, Problem) else Example(row.where, text=text)


def check_alpaca(row: Row) -> Example | Problem:
    values = {}
    for name, required in (("instruction", True), ("input", False), ("output", True), ("system", False)):
        value = _string(row, name, required)
        if isinstance(value, Problem):
            return value
        values[name] = value
    prompt = values["instruction"] + (f"\n\n{values['input']}" if values["input"].strip() else "")
    messages = [{"role": "system", "content": values["system"]}] if values["system"].strip() else []
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": values["output"]}]
    return Example(row.where, messages=messages)


def check_messages(row: Row) -> Example | Problem:
    key = "messages" if "messages" in row.value else "conversations"
    chat = row.value.get(key)
    if chat is None:
        return Problem(row.where, "messages", "missing")
    if not isinstance(chat, list) or not chat:
        return Problem(row.where, key, "expected a non-empty list of messages")
    messages = []
    for i, message in enumerate(chat):
        name = f"{key}[{i}]"
        if not isinstance(message, dict):
            return Problem(row.where, name, f"expected an object, got {type(message).__name__}")
        sharegpt = "from" in message and "role" not in message
        role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
        role = message.get(role_key)
        role = SHAREGPT_ROLES.get(role) if sharegpt else role
        if role not in ROLES:
            return Problem(row.where, f"{name}.{role_key}", f"expected one of {', '.join(ROLES)}, got {message.get(role_key)!r}")
        content = message.get(content_key)
        if not isinstance(content, str):
            problem = "missing" if content is None else f"expected a string, got {type(content).__name__}"
            return Problem(row.where, f"{name}.{content_key}", problem)
        if role == "assistant" and not content.strip():
            return Problem(row.where, f"{name}.{content_key}", "empty assistant message")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        return Problem(row.where, key, "no assistant message to learn from")
    return Example(row.where, messages=messages)


# --- the whole step ---------------------------------------------------------------------

@dataclass
class LoadedData:
    format: str
    examples: list[Example]
    skipped: int


def load_examples(paths: list[str], fmt: str = "auto", text_field: str = "text", skip_bad_rows: bool = False,
                  max_rows: int | None = None) -> LoadedData:
    """Read and validate files; stop with every problem listed unless bad rows may be skipped."""
    rows = [row for path in paths for row in read_rows(path)]
    if max_rows is not None:
        rows = rows[:max_rows]
    if fmt == "auto":
        fmt = detect_format(rows, text_field)
    examples, problems = validate(rows, fmt, text_field)
    if not skip_bad_rows:
        raise_for_problems(problems, len(rows), f" for format '{fmt}'")
    if not examples:
        raise TunesmithError(f"{paths[0]}: no valid rows for format '{fmt}'")
    return LoadedData(fmt, examples, skipped=len(problems))


def raise_for_problems(problems: list[Problem], total: int, kind: str = "", skippable: bool = True) -> None:
    """Stop with every bad row named: one line for one problem; else the first ten, a count and what to do."""
    if len(problems) == 1:
        skip = ", or set data.skip_bad_rows=true to skip it" if skippable else ""
        raise TunesmithError(f"{problems[0]} (1 of {total} rows is invalid{kind}; fix it{skip})")
    if problems:
        shown = "\n".join(str(p) for p in problems[:SHOWN_PROBLEMS])
        more = f"\n... and {len(problems) - SHOWN_PROBLEMS} more bad rows" if len(problems) > SHOWN_PROBLEMS else ""
        skip = ", or set data.skip_bad_rows=true to skip them" if skippable else ""
        raise TunesmithError(f"{shown}{more}\n{len(problems)} of {total} rows are invalid{kind}; fix them{skip}")


def split_off(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a seeded random `fraction` (at least one item) of `items`; both parts keep their order."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, round(len(items) * fraction))])
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]
