"""`tunesmith synth`: SFT data written by a teacher model, filtered, with provenance, resumable.

Modes: `answer` (the teacher answers given prompts) and `expand` (self-instruct: the teacher writes
new instructions in the style of a seed set, which are filtered and then answered). Every kept row is
an alpaca record (`instruction`, `input`, `output`) that `stage: sft` reads directly, plus `id` and
`provenance` (teacher, template, mode, time). Rows are appended and fsynced as they are made; a
rejected row goes to `OUTPUT.rejected.jsonl` with its reason, so a rerun skips everything already
decided and never writes a row twice. A half-written last line (a killed run) is dropped on resume.

Quality: exact duplicates (normalised text) and near duplicates (MiniLM cosine at or above
`near_duplicate`) of kept rows and of the seeds are dropped; outputs shorter or longer than the
limits, and refusals, are dropped; with an evaluation set, instructions too similar to any of its
prompts are dropped (contamination).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tunesmith.data.teachers import Chat, TeacherError
from tunesmith.errors import TunesmithError

ANSWER_TEMPLATE = "{instruction}"
EXPAND_TEMPLATE = ("Here are examples of tasks a user might give an assistant:\n\n{examples}\n\nWrite one new task "
                   "in the same style, on a different topic than the examples. Reply with the task only.")
REFUSALS = re.compile(r"^\s*(i'?m sorry|i am sorry|sorry, (but )?i|i cannot|i can'?t|i am unable|i'?m unable|"
                      r"as an ai\b|as a language model)", re.IGNORECASE)


@dataclass
class Filters:
    min_chars: int = 1
    max_chars: int = 8000
    near_duplicate: float = 0.95  # cosine of MiniLM embeddings; 1.0 turns near-duplicate removal off
    contamination: float = 0.9
    drop_refusals: bool = True


@dataclass
class SynthReport:
    kept: int = 0
    already_done: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


def normalise(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def row_id(instruction: str, input_text: str = "") -> str:
    return hashlib.sha1(f"{normalise(instruction)}\0{normalise(input_text)}".encode()).hexdigest()[:16]


class Journal:
    """An append-only JSONL file: read back on start (dropping a torn last line), fsynced on every append."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict] = []
        if path.is_file():
            raw = path.read_bytes()
            lines = raw.split(b"\n")
            good = 0
            for line in lines:
                if not line.strip():
                    good += len(line) + 1
                    continue
                try:
                    self.rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn write: everything after it is dropped
                good += len(line) + 1
            if good < len(raw):
                with path.open("r+b") as handle:
                    handle.truncate(min(good, len(raw)))
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = path.open("a", encoding="utf-8")

    def append(self, rows: list[dict]) -> None:
        import os

        if not rows:
            return
        self.handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.rows += rows

    def close(self) -> None:
        self.handle.close()


class Deduper:
    """Exact (normalised) and near (embedding cosine) duplicate detection against everything kept so far."""

    def __init__(self, encoder, threshold: float) -> None:
        self.encoder, self.threshold = encoder, threshold
        self.exact: set[str] = set()
        self.vectors = np.zeros((0, encoder.dim if encoder else 1), dtype=np.float32)

    def add(self, texts: list[str]) -> None:
        self.exact.update(normalise(t) for t in texts)
        if self.encoder is not None and texts and self.threshold < 1.0:
            self.vectors = np.concatenate([self.vectors, self.encoder.embed(texts)])

    def verdict(self, text: str, vector: np.ndarray | None) -> str | None:
        if normalise(text) in self.exact:
            return "duplicate"
        if vector is not None and len(self.vectors) and float(np.max(self.vectors @ vector)) >= self.threshold:
            return "near-duplicate"
        return None


def provenance(teacher, template: str, mode: str) -> dict:
    return {"teacher": teacher.name, "template": template, "mode": mode,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def answer_prompts(teacher, prompts: list[str], output: Path, filters: Filters = Filters(), encoder=None,
                   eval_prompts: list[str] | None = None, batch_size: int = 16, mode: str = "answer",
                   seeds: list[str] | None = None, on_batch=None, report: SynthReport | None = None) -> SynthReport:
    """Answer each prompt with the teacher; keep the rows that pass the filters. Resumes from `output`."""
    import time

    started = time.perf_counter()
    report = report or SynthReport()
    kept = Journal(output)
    rejected = Journal(output.with_name(output.name.removesuffix(".jsonl") + ".rejected.jsonl"))
    try:
        done = {r["id"] for r in kept.rows} | {r["id"] for r in rejected.rows}
        dedup = Deduper(encoder, filters.near_duplicate)
        dedup.add([r["instruction"] + "\n" + r["output"] for r in kept.rows])
        contamination = encoder.embed(eval_prompts) if (encoder is not None and eval_prompts) else None
        todo, seen = [], set()
        for prompt in prompts:
            key = row_id(prompt)
            if key in done:
                report.already_done += 1
            elif key not in seen:
                seen.add(key)
                todo.append((key, prompt))
        for start in range(0, len(todo), batch_size):
            group = todo[start : start + batch_size]
            chats: list[Chat] = [[{"role": "user", "content": p}] for _, p in group]
            answers = teacher.complete(chats, seeds=[int(k[:8], 16) for k, _ in group])
            keep, drop = [], []
            texts = [p + "\n" + (a if isinstance(a, str) else "") for (_, p), a in zip(group, answers)]
            vectors = encoder.embed(texts) if encoder is not None and filters.near_duplicate < 1.0 else [None] * len(group)
            prompt_vectors = encoder.embed([p for _, p in group]) if contamination is not None else None
            for i, ((key, prompt), answer) in enumerate(zip(group, answers)):
                if isinstance(answer, TeacherError):
                    report.errors.append(str(answer))
                    report.reject("teacher error")
                    continue  # not journalled: a rerun tries it again
                reason = _reason(prompt, answer, filters, contamination,
                                 prompt_vectors[i] if prompt_vectors is not None else None)
                reason = reason or dedup.verdict(texts[i], vectors[i])
                row = {"id": key, "instruction": prompt, "input": "", "output": answer.strip(),
                       "provenance": provenance(teacher, ANSWER_TEMPLATE, mode)}
                if reason:
                    report.reject(reason)
                    drop.append({**row, "reason": reason})
                else:
                    keep.append(row)
                    dedup.add([texts[i]])
            kept.append(keep)
            rejected.append(drop)
            report.kept += len(keep)
            if on_batch:
                on_batch(len(group))
    finally:
        kept.close()
        rejected.close()
    report.seconds += time.perf_counter() - started
    return report


def _reason(prompt: str, answer: str, filters: Filters, contamination, prompt_vector) -> str | None:
    text = answer.strip()
    if len(text) < filters.min_chars:
        return "too short"
    if len(text) > filters.max_chars:
        return "too long"
    if filters.drop_refusals and REFUSALS.match(text):
        return "refusal"
    if contamination is not None and prompt_vector is not None and float(np.max(contamination @ prompt_vector)) >= filters.contamination:
        return "contaminated"
    return None


def expand_instructions(teacher, seeds: list[str], count: int, output: Path, encoder=None,
                        filters: Filters = Filters(), eval_prompts: list[str] | None = None, examples_per_prompt: int = 3,
                        batch_size: int = 16, on_batch=None, report: SynthReport | None = None) -> list[str]:
    """Self-instruct: new instructions in the seeds' style, deduplicated against the seeds and each other.
    Journalled to `output` (one row per accepted instruction) so a rerun continues; returns all accepted."""
    if not seeds:
        raise TunesmithError("expand: the seed set is empty")
    report = report or SynthReport()
    journal = Journal(output)
    try:
        accepted = [r["instruction"] for r in journal.rows]
        dedup = Deduper(encoder, filters.near_duplicate)
        dedup.add(seeds + accepted)
        contamination = encoder.embed(eval_prompts) if (encoder is not None and eval_prompts) else None
        # attempts are numbered (the seed of the example draw and of the teacher), so a rerun draws new ones
        attempt = max((r.get("attempt", -1) for r in journal.rows), default=-1) + 1
        tries = 0
        while len(accepted) < count and tries < 4 * count:
            need = min(batch_size, count - len(accepted))
            chats, numbers = [], []
            for _ in range(need):
                rng = random.Random(attempt)
                shown = rng.sample(seeds, min(examples_per_prompt, len(seeds)))
                chats.append([{"role": "user", "content": EXPAND_TEMPLATE.format(
                    examples="\n".join(f"{i + 1}. {s}" for i, s in enumerate(shown)))}])
                numbers.append(attempt)
                attempt += 1
            tries += need
            rows = []
            for number, text in zip(numbers, teacher.complete(chats, seeds=numbers)):
                if isinstance(text, TeacherError):
                    report.errors.append(str(text))
                    report.reject("teacher error")
                    continue
                instruction = _clean_instruction(text)
                vector = encoder.embed([instruction])[0] if encoder is not None and instruction else None
                reason = "too short" if len(instruction) < 8 else dedup.verdict(instruction, vector)
                if not reason and contamination is not None and vector is not None \
                        and float(np.max(contamination @ vector)) >= filters.contamination:
                    reason = "contaminated"
                if reason:
                    report.reject(f"instruction {reason}")
                    continue
                dedup.add([instruction])
                accepted.append(instruction)
                rows.append({"instruction": instruction, "attempt": number,
                             "provenance": provenance(teacher, EXPAND_TEMPLATE, "expand")})
            journal.append(rows)
            if on_batch:
                on_batch(len(rows))
    finally:
        journal.close()
    return accepted[:count]


def _clean_instruction(text: str) -> str:
    """The first paragraph, without list numbering, 'Task:' labels or quotes."""
    first = next((p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()), "")
    first = re.sub(r"^\s*(\d+[.)]|[-*]|task\s*\d*\s*:|new task\s*:)\s*", "", first.strip(), flags=re.IGNORECASE)
    return first.strip().strip('"').strip()
