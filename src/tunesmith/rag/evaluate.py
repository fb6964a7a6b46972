"""`tunesmith rag eval`: retrieval quality per retriever (recall@1/5/10, MRR, nDCG@10 at the document
level), and, where gold answers exist, answer accuracy with and without retrieved context.

Files (BEIR style, as in rag_pubmedqa): queries {id, text[, split]}, qrels {query_id, doc_id, score},
answers {query_id, final_decision} for yes/no/maybe questions. A chunk's document id is the row id
of its .jsonl/.csv source, or its file name.
"""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.evaluate.metrics import retrieval_report
from tunesmith.rag.retrieve import MODES, Retriever

LABELS = ("yes", "no", "maybe")
LABEL_INSTRUCTION = "Answer the question with one word: yes, no or maybe."


def _jsonl(path: str | Path, required: tuple[str, ...]) -> list[dict]:
    from tunesmith.data.formats import read_rows

    rows = []
    for row in read_rows(path):
        if not isinstance(row.value, dict):
            raise TunesmithError(f"{row.where}: expected an object")
        for name in required:
            if name not in row.value:
                raise TunesmithError(f"{row.where}: {name}: missing")
        rows.append(row.value)
    return rows


def read_queries(path: str | Path, split: str | None = None, limit: int | None = None) -> list[tuple[str, str]]:
    rows = [r for r in _jsonl(path, ("id", "text")) if split is None or r.get("split") == split]
    if not rows:
        raise TunesmithError(f"{path}: no queries{f' in split {split!r}' if split else ''}")
    return [(str(r["id"]), r["text"]) for r in rows[:limit]]


def read_qrels(path: str | Path) -> dict[str, dict[str, float]]:
    qrels: dict[str, dict[str, float]] = {}
    for r in _jsonl(path, ("query_id", "doc_id")):
        qrels.setdefault(str(r["query_id"]), {})[str(r["doc_id"])] = float(r.get("score", 1))
    return qrels


def read_answers(path: str | Path) -> dict[str, str]:
    out = {}
    for r in _jsonl(path, ("query_id", "final_decision")):
        label = str(r["final_decision"]).strip().lower()
        if label not in LABELS:
            raise TunesmithError(f"{path}: query {r['query_id']}: final_decision {label!r} is not yes, no or maybe")
        out[str(r["query_id"])] = label
    return out


def ranked_documents(retriever: Retriever, query: str, mode: str, depth: int = 50) -> list[str]:
    """Document ids in rank order: a document ranks where its best chunk does."""
    return list(dict.fromkeys(hit.doc_id for hit in retriever.search(query, depth, mode)))


def evaluate_retrieval(retriever: Retriever, queries: list[tuple[str, str]], qrels: dict[str, dict[str, float]],
                       modes: tuple[str, ...] = MODES, on_query=None) -> dict[str, dict[str, float]]:
    results = {}
    for mode in modes:
        rankings, latencies = {}, []
        for qid, text in queries:
            started = time.perf_counter()
            rankings[qid] = ranked_documents(retriever, text, mode)
            latencies.append(time.perf_counter() - started)
            if on_query:
                on_query()
        report = retrieval_report(rankings, qrels)
        report["p50_ms"] = statistics.median(latencies) * 1000
        results[mode] = report
    return results


def stated_label(text: str) -> str | None:
    """The first yes/no/maybe the model states, as a whole word."""
    match = re.search(r"\b(yes|no|maybe)\b", text.lower())
    return match.group(1) if match else None


def answer_messages(question: str, tokenizer, hits: list | None = None, budget: int = 768) -> list[dict[str, str]]:
    """The yes/no/maybe prompt: the question (after numbered sources when there are hits), the instruction last,
    where small models follow it best."""
    from tunesmith.rag.answer import rag_messages

    if hits:
        messages, _ = rag_messages(question, hits, tokenizer, budget, instruction="Use the numbered sources.")
    else:
        messages = [{"role": "user", "content": f"Question: {question}"}]
    messages[0]["content"] += f"\n\n{LABEL_INSTRUCTION}"
    return messages


def evaluate_answers(model, tokenizer, retriever: Retriever | None, queries: list[tuple[str, str]],
                     answers: dict[str, str], k: int = 3, budget: int = 768, batch_size: int = 8,
                     mode: str = "hybrid", on_batch=None) -> dict:
    """Accuracy of the stated label, for every query with a gold label; with `retriever`, the top-k chunks
    go in the prompt."""
    from tunesmith.generate import chat_prompt_ids
    from tunesmith.serve.engine import Request, generate

    todo = [(qid, text) for qid, text in queries if qid in answers]
    if not todo:
        raise TunesmithError("no query has a gold answer; check that --answers matches --queries")
    stated: dict[str, str | None] = {}
    for start in range(0, len(todo), batch_size):
        group = todo[start : start + batch_size]
        requests = []
        for _, question in group:
            hits = retriever.search(question, k, mode) if retriever is not None else None
            messages = answer_messages(question, tokenizer, hits, budget)
            requests.append(Request(chat_prompt_ids(tokenizer, messages), max_tokens=16))
        for (qid, _), completion in zip(group, generate(model, tokenizer, requests)):
            stated[qid] = stated_label(completion.text)
        if on_batch:
            on_batch(len(group))
    correct = sum(stated[q] == answers[q] for q, _ in todo)
    counts = {label: sum(v == label for v in stated.values()) for label in (*LABELS, None)}
    return {"questions": len(todo), "accuracy": correct / len(todo),
            "stated": {str(k): v for k, v in counts.items()},
            "majority_baseline": max(sum(answers[q] == label for q, _ in todo) for label in LABELS) / len(todo)}
