"""Read prompts to answer: a .txt file (one per line) or records with `prompt`, `messages` or alpaca fields
(so preference-pair files, whose `prompt` may be an hh-rlhf transcript, serve as prompts too)."""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.data.formats import Problem, Row, check_alpaca, check_messages, read_rows
from tunesmith.data.preferences import parse_transcript, prompt_messages
from tunesmith.errors import TunesmithError


def read_prompts(path: str | Path) -> list[list[dict[str, str]]]:
    """Each prompt as a chat that ends with the user's turn (a trailing assistant answer is dropped)."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        return [[{"role": "user", "content": line}] for line in read_lines(path, "prompt")]
    return [_prompt_of(row) for row in read_rows(path)]


def read_lines(path: Path, what: str) -> list[str]:
    """The non-blank lines of a .txt file, one item each."""
    if not path.is_file():
        raise TunesmithError(f"{path}: file not found")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise TunesmithError(f"{path}: file is empty; write one {what} per line")
    return lines


def _prompt_of(row: Row) -> list[dict[str, str]]:
    value = row.value
    if not isinstance(value, dict):
        raise TunesmithError(f"{row.where}: expected an object with 'prompt', 'messages' or 'instruction'")
    if "prompt" in value:
        prompt = value["prompt"]
        if isinstance(prompt, list):  # a chat (as preference files may hold it)
            messages = prompt_messages(prompt)
            if isinstance(messages, str):
                raise TunesmithError(f"{row.where}: prompt: {messages}")
            return messages
        if not isinstance(prompt, str) or not prompt.strip():
            raise TunesmithError(f"{row.where}: prompt: expected a non-empty string or a list of messages")
        return parse_transcript(prompt) or [{"role": "user", "content": prompt}]  # hh-rlhf transcripts keep their turns
    if "messages" in value or "conversations" in value:
        chat = value.get("messages", value.get("conversations"))
        if isinstance(chat, list) and chat and isinstance(chat[-1], dict) and chat[-1].get("role", chat[-1].get("from")) in ("assistant", "gpt"):
            chat = chat[:-1]
        checked = check_messages(Row(row.path, row.line, {"messages": chat + [{"role": "assistant", "content": "-"}]}))
        if isinstance(checked, Problem):
            raise TunesmithError(str(checked))
        return checked.messages[:-1]
    if "instruction" in value:
        checked = check_alpaca(Row(row.path, row.line, {**value, "output": "-"}))
        if isinstance(checked, Problem):
            raise TunesmithError(str(checked))
        return checked.messages[:-1]
    raise TunesmithError(f"{row.where}: expected a 'prompt', 'messages' or 'instruction' field, found {sorted(value)}")


def read_texts(source: str, text_field: str = "text", stdin=None) -> list[str]:
    """Texts to classify: a data file with a text column, a .txt file (one per line), or `-` (stdin lines;
    a line holding a JSON object gives its text field)."""
    if source == "-":
        lines = [(i, line) for i, line in enumerate(stdin or [], start=1) if line.strip()]
        texts = []
        for i, line in lines:
            value = line.strip()
            if value.startswith("{"):
                try:
                    value = json.loads(value).get(text_field, value)
                except json.JSONDecodeError:
                    pass
            if not isinstance(value, str) or not value.strip():
                raise TunesmithError(f"<stdin>:{i}: {text_field}: expected a non-empty string")
            texts.append(value)
        if not texts:
            raise TunesmithError("<stdin>: no texts; give one per line")
        return texts
    path = Path(source)
    if path.suffix.lower() == ".txt":
        return read_lines(path, "text")
    texts = []
    for row in read_rows(path):
        value = row.value.get(text_field) if isinstance(row.value, dict) else None
        if not isinstance(value, str) or not value.strip():
            problem = "missing" if value is None else "expected a non-empty string"
            raise TunesmithError(f"{row.where}: {text_field}: {problem}")
        texts.append(value)
    return texts
