"""Labelled texts for classification: read, validate, and fix the label space from the training split.

Labels are class ids (ints) or names (strings). Class names come from the labels
themselves (strings), from a labels file (a JSON list, or {id: name}), or default to the
ids. Every problem names `file:line: field`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tunesmith.data.formats import Problem, Row, raise_for_problems, read_rows
from tunesmith.errors import TunesmithError


@dataclass(frozen=True)
class LabeledText:
    where: str
    text: str
    label: int | str


@dataclass(frozen=True)
class LabelSpace:
    """Class i is named names[i]; `keys[i]` is the raw label (id or name) the data uses for it."""

    names: list[str]
    keys: list[int | str]

    def index(self, label: int | str) -> int:
        return self.keys.index(label)


def read_labeled(paths: list[str], text_field: str, label_field: str, label_type: str,
                 skip_bad_rows: bool = False, max_rows: int | None = None) -> tuple[list[LabeledText], int]:
    """Read and check rows; stop on problems unless they may be skipped. Returns (texts, skipped)."""
    rows = [row for path in paths for row in read_rows(path)]
    if max_rows is not None:
        rows = rows[:max_rows]
    kind = label_type if label_type != "auto" else _guess_label_type(rows, label_field)
    good, problems = [], []
    for row in rows:
        result = _check(row, text_field, label_field, kind)
        (problems if isinstance(result, Problem) else good).append(result)
    if not skip_bad_rows:
        raise_for_problems(problems, len(rows))
    if not good:
        raise TunesmithError(f"{paths[0]}: no valid labelled rows")
    return good, len(problems)


def _guess_label_type(rows: list[Row], label_field: str) -> str:
    values = [r.value.get(label_field) for r in rows if isinstance(r.value, dict)]
    return "int" if values and all(_as_int(v) is not None for v in values if v is not None) else "str"


def _as_int(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())  # CSV cells are strings
    return None


def _check(row: Row, text_field: str, label_field: str, kind: str) -> LabeledText | Problem:
    if not isinstance(row.value, dict):
        return Problem(row.where, "", f"expected an object, got {type(row.value).__name__}")
    text = row.value.get(text_field)
    if text is None:
        return Problem(row.where, text_field, "missing")
    if not isinstance(text, str):
        return Problem(row.where, text_field, f"expected a string, got {type(text).__name__}")
    if not text.strip():
        return Problem(row.where, text_field, "empty text")
    label = row.value.get(label_field)
    if label is None or (isinstance(label, str) and not label.strip()):
        return Problem(row.where, label_field, "missing")
    if kind == "int":
        number = _as_int(label)
        if number is None:
            return Problem(row.where, label_field, f"expected an integer class id, got {label!r} "
                                                   "(set data.label_type=str for named labels)")
        return LabeledText(row.where, text, number)
    if not isinstance(label, (str, int)) or isinstance(label, bool):
        return Problem(row.where, label_field, f"expected a string or an integer, got {type(label).__name__}")
    return LabeledText(row.where, text, str(label))


def label_space(train: list[LabeledText], labels_file: str | None, source: str) -> LabelSpace:
    """Classes seen in training, named from the labels file when there is one."""
    seen = sorted({t.label for t in train}, key=lambda v: (isinstance(v, str), v))
    names_by_key: dict = {}
    if labels_file:
        names_by_key = _read_labels_file(Path(labels_file), seen)
    if len(seen) < 2:
        raise TunesmithError(
            f"{source}: label: the training data has a single class ({seen[0]!r}); a classifier needs at least two"
        )
    order = list(names_by_key)
    keys = sorted(seen, key=lambda k: order.index(k)) if names_by_key else seen
    return LabelSpace([str(names_by_key.get(k, k)) for k in keys], keys)


def _read_labels_file(path: Path, seen: list) -> dict:
    if not path.is_file():
        raise TunesmithError(f"{path}: labels file not found; check data.labels_file")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TunesmithError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if isinstance(value, list):
        mapping = dict(enumerate(value))
    elif isinstance(value, dict):
        mapping = {(_as_int(k) if _as_int(k) is not None else k): v for k, v in value.items()}
    else:
        raise TunesmithError(f"{path}: a labels file is a JSON list of names or an object {{id: name}}")
    if seen and isinstance(seen[0], str):
        mapping = {name: name for name in mapping.values()}  # names already; the file fixes their order
    missing = [k for k in seen if k not in mapping]
    if missing:
        raise TunesmithError(f"{path}: label {missing[0]!r} appears in the training data but has no name here")
    return mapping


def check_known(texts: list[LabeledText], space: LabelSpace) -> None:
    """Every validation/test label must be a class the model can predict."""
    for t in texts:
        if t.label not in space.keys:
            raise TunesmithError(
                f"{t.where}: label: {t.label!r} never appears in the training data (classes: "
                f"{', '.join(map(str, space.keys))}); fix the label or add training examples of it"
            )
