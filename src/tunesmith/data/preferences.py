"""Preference pairs for reward models and DPO: a prompt (as a chat) and a chosen and a rejected reply.

Accepted rows (auto-detected per row):
- `prompt`, `chosen`, `rejected` as strings: what `tunesmith feedback export` writes. A prompt in the
  Anthropic hh-rlhf transcript form ("\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nAssistant:") becomes the
  multi-turn chat it records; any other string is one user turn.
- `prompt` as a list of messages, `chosen`/`rejected` as strings or as one-message lists.
- `chosen` and `rejected` as whole conversations (TRL's conversational form): the shared turns are
  the prompt, and the last assistant turn of each is the reply.
Every bad row is reported as `file:line: field: problem`, like the other readers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tunesmith.data.formats import Problem, Row, raise_for_problems, read_rows
from tunesmith.errors import TunesmithError

if TYPE_CHECKING:
    from tunesmith.data.render import Sample

TURN = re.compile(r"\n\n(Human|Assistant):")
ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass
class PreferencePair:
    where: str
    prompt: list[dict[str, str]]  # the chat up to (not including) the reply
    chosen: str
    rejected: str


def parse_transcript(text: str) -> list[dict[str, str]] | None:
    """hh-rlhf transcript -> messages (the trailing empty Assistant turn dropped); None if it is not one."""
    if not TURN.search(text) or not text.lstrip("\n").startswith("Human:"):
        return None
    parts = TURN.split("\n\n" + text.lstrip("\n"))
    messages = [{"role": ROLES[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts) - 1, 2)]
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages if messages and messages[-1]["role"] == "user" else None


def read_preferences(paths: list[str | Path], skip_bad_rows: bool = False) -> tuple[list[PreferencePair], int]:
    """Every pair in the files; stops with all problems listed unless bad rows may be skipped."""
    rows = [row for path in paths for row in read_rows(path)]
    pairs, problems = [], []
    for row in rows:
        result = _pair(row)
        (problems if isinstance(result, Problem) else pairs).append(result)
    if not skip_bad_rows:
        raise_for_problems(problems, len(rows), " for preference pairs")
    if not pairs:
        raise TunesmithError(f"{paths[0]}: no valid preference pairs (rows need prompt/chosen/rejected)")
    return pairs, len(problems)


def _pair(row: Row) -> PreferencePair | Problem:
    value = row.value
    if not isinstance(value, dict):
        return Problem(row.where, "", f"expected an object, got {type(value).__name__}")
    for name in ("chosen", "rejected"):
        if name not in value:
            return Problem(row.where, name, "missing")
    prompt, chosen, rejected = value.get("prompt"), value["chosen"], value["rejected"]
    if prompt is None:
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            return Problem(row.where, "prompt", "missing (or give chosen and rejected as whole conversations)")
        shared = _shared_prefix(chosen, rejected)
        if not shared or shared[-1].get("role") != "user":
            return Problem(row.where, "chosen", "the two conversations must share the turns up to a user turn")
        prompt, chosen, rejected = shared, chosen[len(shared):], rejected[len(shared):]
    messages = prompt_messages(prompt)
    if isinstance(messages, str):
        return Problem(row.where, "prompt", messages)
    replies = []
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        text = _reply_text(reply)
        if text is None:
            return Problem(row.where, name, "expected a string or one assistant message")
        if not text.strip():
            return Problem(row.where, name, "empty")
        replies.append(text.strip())
    if replies[0] == replies[1]:
        return Problem(row.where, "rejected", "identical to chosen: the pair teaches nothing")
    return PreferencePair(row.where, messages, replies[0], replies[1])


def prompt_messages(prompt) -> list[dict[str, str]] | str:
    if isinstance(prompt, str):
        if not prompt.strip():
            return "empty"
        return parse_transcript(prompt) or [{"role": "user", "content": prompt.strip()}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                   and m.get("role") in ("system", "user", "assistant") for m in prompt):
        if prompt[-1]["role"] != "user":
            return "the last message must be the user's"
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    return "expected a string or a list of role/content messages"


def _reply_text(reply) -> str | None:
    if isinstance(reply, str):
        return reply
    if isinstance(reply, list) and len(reply) == 1 and isinstance(reply[0], dict) \
            and reply[0].get("role") == "assistant" and isinstance(reply[0].get("content"), str):
        return reply[0]["content"]
    return None


def _shared_prefix(a: list, b: list) -> list:
    shared = []
    for x, y in zip(a, b):
        if x != y:
            break
        shared.append(x)
    return shared


# --- rendering ------------------------------------------------------------------------------

@dataclass
class PairRow:
    """A pair as token rows: prompt + reply through the chat template, labels on the reply only."""

    chosen: "Sample"
    rejected: "Sample"
    where: str


@dataclass
class RenderedPairs:
    rows: list[PairRow]
    truncated: int  # pairs cut to max_length (the reply's end is lost)
    dropped: int  # pairs with no reply token left, or identical once cut


def render_pairs(tokenizer, pairs: list[PreferencePair], max_length: int, overlong: str = "truncate") -> RenderedPairs:
    """Render each side as the model will see it at inference; cut to max_length (the end goes, as in SFT).

    `overlong="error"` names the first pair over max_length instead."""
    from tunesmith.data.render import IGNORE, Sample, render_chat

    rows, truncated, dropped = [], 0, 0
    for pair in pairs:
        sides = [render_chat(tokenizer, pair.prompt + [{"role": "assistant", "content": reply}], pair.where,
                             last_turn_only=True) for reply in (pair.chosen, pair.rejected)]
        if any(len(s.input_ids) > max_length for s in sides):
            if overlong == "error":
                longest = max(len(s.input_ids) for s in sides)
                raise TunesmithError(f"{pair.where}: pair has {longest} tokens, over training.max_length={max_length}; "
                                     "raise max_length or set data.overlong=truncate")
            truncated += 1
            sides = [Sample(s.input_ids[:max_length], s.labels[:max_length], s.where) for s in sides]
        if any(all(label == IGNORE for label in s.labels[1:]) for s in sides) or sides[0].input_ids == sides[1].input_ids:
            dropped += 1
            continue
        rows.append(PairRow(sides[0], sides[1], pair.where))
    if not rows:
        raise TunesmithError(f"{pairs[0].where if pairs else 'data'}: no pair keeps a reply within "
                             f"training.max_length={max_length}; raise max_length")
    return RenderedPairs(rows, truncated, dropped)


# --- rows to score with a reward model -------------------------------------------------------

@dataclass
class ScoreItem:
    where: str
    prompt: list[dict[str, str]]
    replies: dict[str, str]  # "response", or "chosen" and "rejected"
    row: dict


def read_score_items(path: str | Path) -> list[ScoreItem]:
    """Rows with `prompt` + `response`, a preference pair, or `messages` ending in the assistant's reply."""
    items, problems = [], []
    rows = read_rows(path)
    for row in rows:
        value = row.value
        if isinstance(value, dict) and "chosen" in value:
            pair = _pair(row)
            if isinstance(pair, Problem):
                problems.append(pair)
            else:
                items.append(ScoreItem(row.where, pair.prompt, {"chosen": pair.chosen, "rejected": pair.rejected}, value))
            continue
        if isinstance(value, dict) and isinstance(value.get("messages"), list) and "prompt" not in value:
            chat = value["messages"]
            last = chat[-1] if chat else None
            prompt = prompt_messages(chat[:-1]) if chat[:-1] else "needs the user's turn before the reply"
            if not isinstance(last, dict) or last.get("role") != "assistant" or not isinstance(last.get("content"), str):
                problems.append(Problem(row.where, "messages", "the last message must be the assistant's reply to score"))
            elif isinstance(prompt, str):
                problems.append(Problem(row.where, "messages", prompt))
            else:
                items.append(ScoreItem(row.where, prompt, {"response": last["content"]}, value))
            continue
        if not isinstance(value, dict) or "response" not in value:
            problems.append(Problem(row.where, "response", "missing (give prompt + response, prompt + chosen + "
                                                          "rejected, or messages ending with the reply)"))
            continue
        prompt = prompt_messages(value.get("prompt", ""))
        if isinstance(prompt, str):
            problems.append(Problem(row.where, "prompt", prompt))
        elif not isinstance(value["response"], str):
            problems.append(Problem(row.where, "response", "expected a string"))
        else:
            items.append(ScoreItem(row.where, prompt, {"response": value["response"]}, value))
    raise_for_problems(problems, len(rows), " to score", skippable=False)
    if not items:
        raise TunesmithError(f"{path}: no rows to score")
    return items
