"""The task's data, prepared once per run: train / validation / test written as plain JSONL in the report
folder (every route reads the same files), and a fingerprint of their content (the cache key's data part).

Rows: classification {text, label (the class name)}; instruction {messages} (the last turn is the
reference answer); qa_with_documents {id, question, answer (yes/no/maybe)}.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.compare.task import Task
from tunesmith.data.formats import split_off
from tunesmith.errors import TunesmithError
from tunesmith.files import write_text_atomic

SPLITS = ("train", "validation", "test")


@dataclass
class Prepared:
    folder: Path
    type: str
    train: list[dict]
    validation: list[dict]
    test: list[dict]
    labels: list[str] = field(default_factory=list)  # classification: class names, in class order
    qrels: dict[str, dict[str, float]] = field(default_factory=dict)  # qa: test query id -> {doc id: grade}
    fingerprint: str = ""  # the splits, labels and qrels
    documents_fingerprint: str = ""  # the documents' bytes (retrieval routes only)

    def path(self, split: str) -> Path:
        return self.folder / f"{split}.jsonl"

    @property
    def labels_path(self) -> Path:
        return self.folder / "labels.json"

    def sizes(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in SPLITS}


def prepare(task: Task, folder: Path) -> Prepared:
    """Read, split, cap and write the task's data; fingerprint it."""
    reader = {"classification": _classification, "instruction": _instruction, "qa_with_documents": _qa}[task.type]
    prepared = reader(task, folder)
    if not prepared.test:
        raise TunesmithError("data: the test set is empty; give data.test or a larger train set")
    if not prepared.train:
        raise TunesmithError("data: the training set is empty after splitting off validation and test")
    digest = hashlib.sha256(task.type.encode())
    for split in SPLITS:
        text = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in getattr(prepared, split))
        write_text_atomic(prepared.path(split), text)
        digest.update(f"\0{split}\0".encode() + text.encode())
    digest.update(json.dumps([prepared.labels, prepared.qrels], sort_keys=True).encode())
    if prepared.labels:
        write_text_atomic(prepared.labels_path, json.dumps(prepared.labels) + "\n")
    prepared.fingerprint = digest.hexdigest()
    prepared.documents_fingerprint = documents_fingerprint(task.documents) if task.documents else ""
    return prepared


def documents_fingerprint(paths: list[str]) -> str:
    """Content of every document file (names relative to what was given, so a moved checkout keeps the key)."""
    from tunesmith.rag.documents import file_hash, find_files

    files, problems = find_files(paths)
    if problems:
        raise TunesmithError(f"documents: {problems[0]}")
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{file_hash(path)}\0".encode())
    return digest.hexdigest()


def _sample(items: list, n: int | None, seed: int) -> list:
    """At most n items, a seeded sample kept in source order."""
    if n is None or len(items) <= n:
        return items
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), n))]


def _splits(task: Task, train: list, validation: list | None, test: list | None) -> tuple[list, list, list]:
    data = task.data
    if test is None:
        train, test = split_off(train, data.test_fraction, data.seed)
    if validation is None:
        train, validation = split_off(train, data.validation_fraction, data.seed + 1)
    return (_sample(train, data.max_train, data.seed), _sample(validation, data.max_validation, data.seed),
            _sample(test, data.max_test, data.seed))


def _classification(task: Task, folder: Path) -> Prepared:
    from tunesmith.data.classification import check_known, label_space, read_labeled

    data = task.data
    kw = dict(text_field=data.text_field, label_field=data.label_field, label_type="auto")
    train, _ = read_labeled(data.train, **kw)
    validation = read_labeled(data.validation, **kw)[0] if data.validation else None
    test = read_labeled(data.test, **kw)[0] if data.test else None
    space = label_space(train, data.labels_file, data.train[0])
    check_known((validation or []) + (test or []), space)
    train, validation, test = _splits(task, train, validation, test)

    def rows(texts):
        return [{"text": t.text, "label": space.names[space.index(t.label)]} for t in texts]

    return Prepared(folder, task.type, rows(train), rows(validation), rows(test), labels=list(space.names))


def _instruction(task: Task, folder: Path) -> Prepared:
    from tunesmith.data.formats import load_examples

    data = task.data

    def read(paths):
        loaded = load_examples(paths)
        if loaded.format not in ("alpaca", "messages"):
            raise TunesmithError(f"{paths[0]}: data: instruction tasks read alpaca or messages rows, "
                                 f"but this file is '{loaded.format}'")
        bad = next((e for e in loaded.examples if e.messages[-1]["role"] != "assistant"), None)
        if bad is not None:
            raise TunesmithError(f"{bad.where}: messages: the last turn must be the assistant's reference answer")
        return [{"messages": e.messages} for e in loaded.examples]

    train = read(data.train)
    validation = read(data.validation) if data.validation else None
    test = read(data.test) if data.test else None
    return Prepared(folder, task.type, *_splits(task, train, validation, test))


def _qa(task: Task, folder: Path) -> Prepared:
    from tunesmith.rag.evaluate import read_answers, read_qrels, read_queries

    data = task.data
    gold = read_answers(data.answers)

    def rows(queries):
        return [{"id": qid, "question": text, "answer": gold[qid]} for qid, text in queries if qid in gold]

    if data.train_split:
        train = rows(read_queries(data.queries, data.train_split))
        test = rows(read_queries(data.queries, data.test_split))
    else:
        train, test = rows(read_queries(data.queries)), None
    if not train and not test:
        raise TunesmithError(f"{data.answers}: no query has a gold answer; check that answers match queries")
    train, validation, test = _splits(task, train, None, test)
    qrels = read_qrels(data.qrels) if data.qrels else {}
    qrels = {row["id"]: qrels[row["id"]] for row in test if row["id"] in qrels}
    return Prepared(folder, task.type, train, validation, test, qrels=qrels)
