"""Turn examples into token rows: chat templating, response-only loss masks, packing.

A chat is rendered once through the model's own chat template (the same one inference
uses); the loss mask comes from character offsets of the assistant turns, so it is exact
for any template that renders a conversation as a growing prefix. The end-of-turn token
after each answer stays in the labels, so the model learns to stop.

Rows carry `position_ids` that restart at 0 for every sample. With no attention mask,
transformers turns those into a block-diagonal causal mask, so attention never crosses
samples packed into one row (and padding is its own block).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tunesmith.data.formats import Example
from tunesmith.errors import TunesmithError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

IGNORE = -100


@dataclass
class Sample:
    """Token ids of one example and its labels (IGNORE where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]
    where: str = ""


@dataclass
class PackedRow:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]

    @property
    def n_samples(self) -> int:
        return sum(1 for p in self.position_ids if p == 0)


def render_chat(tokenizer: "PreTrainedTokenizerBase", messages: list[dict[str, str]], where: str = "",
                last_turn_only: bool = False) -> Sample:
    """Render a chat with the tokenizer's template; only assistant turns (and their end token) carry labels
    (only the last one with `last_turn_only`: the reply a preference pair compares)."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or (last_turn_only and i != len(messages) - 1):
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(through) or not through.startswith(before):
            raise TunesmithError(
                f"{where}: the chat template does not render conversations as a growing prefix, so the "
                "response-only mask cannot be built; use a template that does (most do)"
            )
        end = len(through.rstrip())  # the answer and its end-of-turn token, not the newline after it
        spans.append((len(before), end))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [IGNORE] * len(ids)
    for index, (start, stop) in enumerate(encoded["offset_mapping"]):
        if any(start >= s and stop <= e and stop > start for s, e in spans):
            labels[index] = ids[index]
    if all(label == IGNORE for label in labels):
        raise TunesmithError(f"{where}: rendering left no assistant token to learn from; check the chat template")
    return Sample(ids, labels, where)


def render_text(tokenizer: "PreTrainedTokenizerBase", text: str, where: str = "") -> Sample:
    """Raw text for continued pre-training: every token is a target, EOS closes the document."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Sample(ids, list(ids), where)


def render(tokenizer: "PreTrainedTokenizerBase", example: Example) -> Sample:
    if example.text is not None:
        return render_text(tokenizer, example.text, example.where)
    return render_chat(tokenizer, example.messages, example.where)


def fit_length(samples: list[Sample], max_length: int, policy: str) -> tuple[list[Sample], int]:
    """Apply the over-length policy: `truncate` (count them) or `error` (name the first)."""
    too_long = [s for s in samples if len(s.input_ids) > max_length]
    if too_long and policy == "error":
        first = too_long[0]
        raise TunesmithError(
            f"{first.where}: sample has {len(first.input_ids)} tokens, over training.max_length={max_length} "
            f"({len(too_long)} such samples); raise max_length or set data.overlong=truncate"
        )
    fitted = [Sample(s.input_ids[:max_length], s.labels[:max_length], s.where) for s in samples]
    return [s for s in fitted if any(label != IGNORE for label in s.labels[1:])], len(too_long)


def as_rows(samples: list[Sample]) -> list[PackedRow]:
    """One sample per row (no packing)."""
    return [PackedRow(s.input_ids, s.labels, list(range(len(s.input_ids)))) for s in samples]


def pack_sequences(samples: list[Sample], max_length: int) -> list[PackedRow]:
    """Pack whole samples into rows of at most max_length tokens (first-fit decreasing).

    Samples are never split, so a response is never cut from its prompt; position ids
    restart at each sample so attention stays inside it.
    """
    rows = []
    for group in pack_groups([len(s.input_ids) for s in samples], max_length):
        row = PackedRow([], [], [])
        for i in group:
            row.input_ids += samples[i].input_ids
            row.labels += samples[i].labels
            row.position_ids += list(range(len(samples[i].input_ids)))
        rows.append(row)
    return rows


def pack_groups(lengths: list[int], max_length: int) -> list[list[int]]:
    """First-fit decreasing: indices of the items that share each row of at most max_length tokens
    (an item longer than max_length gets a row of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    free: list[int] = []
    for i in order:
        slot = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if slot is None:
            groups.append([])
            free.append(max_length)
            slot = len(groups) - 1
        groups[slot].append(i)
        free[slot] -= lengths[i]
    return groups


def pack_blocks(samples: list[Sample], block_size: int) -> list[PackedRow]:
    """Continued pre-training: concatenate documents and cut into blocks of block_size.

    Documents may span blocks (standard for pre-training); position ids restart at each
    document start and at each block start, so no token attends across a document edge.
    """
    ids: list[int] = []
    positions: list[int] = []
    for sample in samples:
        ids += sample.input_ids
        positions += list(range(len(sample.input_ids)))
    rows = []
    for start in range(0, len(ids), block_size):
        block_ids = ids[start : start + block_size]
        if len(block_ids) < 2:
            continue
        block_pos = positions[start : start + block_size]
        offset = block_pos[0]
        # A document continuing from the previous block restarts its positions at 0 here.
        fixed, seen_start = [], False
        for p in block_pos:
            seen_start = seen_start or p == 0
            fixed.append(p if seen_start else p - offset)
        rows.append(PackedRow(block_ids, list(block_ids), fixed))
    return rows


def collate(rows: list[PackedRow], pad_token_id: int) -> dict[str, "torch.Tensor"]:
    """Right-pad rows to the longest; padding gets its own position block and no labels."""
    import torch

    width = max(len(r.input_ids) for r in rows)
    ids, labels, positions = [], [], []
    for row in rows:
        pad = width - len(row.input_ids)
        ids.append(row.input_ids + [pad_token_id] * pad)
        labels.append(row.labels + [IGNORE] * pad)
        positions.append(row.position_ids + list(range(pad)))
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": torch.tensor(positions, dtype=torch.long),
    }


def count_targets(batch: dict[str, "torch.Tensor"]) -> int:
    """Tokens that contribute to the loss (labels shift left by one)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


# --- showing what the model will see -------------------------------------------------

def length_stats(samples: list[Sample], max_length: int) -> dict[str, float]:
    lengths = sorted(len(s.input_ids) for s in samples)
    p95 = lengths[min(len(lengths) - 1, int(round(0.95 * (len(lengths) - 1))))]
    return {
        "samples": len(lengths), "min": lengths[0], "median": statistics.median(lengths), "p95": p95,
        "max": lengths[-1], "over_max_length": sum(1 for n in lengths if n > max_length),
        "target_tokens": sum(sum(1 for label in s.labels if label != IGNORE) for s in samples),
    }


def marked_segments(tokenizer: "PreTrainedTokenizerBase", sample: Sample) -> list[tuple[str, bool]]:
    """Split a sample into runs of text that are trained on (True) or masked out (False)."""
    segments: list[tuple[str, bool]] = []
    run: list[int] = []
    trained = None
    for token, label in zip(sample.input_ids, sample.labels):
        is_trained = label != IGNORE
        if trained is not None and is_trained != trained:
            segments.append((tokenizer.decode(run), trained))
            run = []
        run.append(token)
        trained = is_trained
    if run:
        segments.append((tokenizer.decode(run), bool(trained)))
    return segments
