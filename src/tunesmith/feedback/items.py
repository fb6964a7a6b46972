"""Items to rate: prompts with candidates from a JSONL file, or prompts whose candidates are generated later."""

from __future__ import annotations

from pathlib import Path

from tunesmith.data.formats import read_rows
from tunesmith.errors import TunesmithError


def read_items(items: Path | None, prompts: Path | None, min_candidates: int = 2) -> list[tuple[str, str, list | None]]:
    from tunesmith.feedback.app import item_id

    out = []
    if items is not None:
        for row in read_rows(items):
            value = row.value
            if not isinstance(value, dict) or not isinstance(value.get("prompt"), str) or not value["prompt"].strip():
                raise TunesmithError(f"{row.where}: prompt: missing or not text")
            raw = value.get("candidates", value.get("responses"))
            if not isinstance(raw, list) or len(raw) < min_candidates:
                raise TunesmithError(f"{row.where}: candidates: give a list of at least {min_candidates} answers")
            candidates = []
            for i, c in enumerate(raw):
                if isinstance(c, str):
                    candidates.append({"source": f"candidate {i + 1}", "text": c})
                elif isinstance(c, dict) and isinstance(c.get("text"), str):
                    candidates.append({"source": str(c.get("source", f"candidate {i + 1}")), "text": c["text"]})
                else:
                    raise TunesmithError(f"{row.where}: candidates[{i}]: expected text or {{source, text}}")
            out.append((item_id(value["prompt"]), value["prompt"], candidates))
    if prompts is not None:
        from tunesmith.data.prompts import read_prompts

        for chat in read_prompts(prompts):
            out.append((item_id(chat[-1]["content"]), chat[-1]["content"], None))
    return out
