"""Answers grounded in retrieved chunks, with citations: the prompt numbers each chunk [1], [2], ...
within a token budget, and every [n] in the answer maps back to that chunk's source and offsets.
With an adapter or a merged model as the generator, this is the hybrid route (fine-tuned + retrieval)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tunesmith.rag.store import Hit

INSTRUCTION = ("Answer the question using the numbered sources below. Cite the sources you use with their "
               "numbers in square brackets, like [1]. If the sources do not answer the question, say so.")
CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


@dataclass
class Citation:
    number: int
    source: str
    title: str
    start: int
    end: int


@dataclass
class Answer:
    text: str
    citations: list[Citation]
    context: list[Hit]  # the chunks the prompt showed, in their numbered order


def context_block(hits: list[Hit], tokenizer, budget: int) -> tuple[str, list[Hit]]:
    """'[n] title\\ntext' for as many hits (best first) as fit in `budget` tokens; the best one always goes in,
    cut to the budget if it alone is too long."""
    parts, used, spent = [], [], 0
    for hit in hits:
        part = f"[{len(used) + 1}] {hit.title}\n{hit.text.strip()}"
        cost = len(tokenizer(part, add_special_tokens=False)["input_ids"]) + 2
        if spent + cost > budget:
            if used:
                break
            ids = tokenizer(part, add_special_tokens=False)["input_ids"][: max(budget - 2, 1)]
            part, cost = tokenizer.decode(ids), budget
        parts.append(part)
        used.append(hit)
        spent += cost
    return "\n\n".join(parts), used


def rag_messages(question: str, hits: list[Hit], tokenizer, budget: int = 1024,
                 instruction: str = INSTRUCTION) -> tuple[list[dict[str, str]], list[Hit]]:
    context, used = context_block(hits, tokenizer, budget)
    content = f"{instruction}\n\nSources:\n{context}\n\nQuestion: {question}" if used else question
    return [{"role": "user", "content": content}], used


def citations(text: str, used: list[Hit]) -> list[Citation]:
    """Every distinct [n] (or [n, m]) in the answer that names a shown chunk, in order of first mention."""
    seen, out = set(), []
    for match in CITATION.finditer(text):
        for number in (int(n) for n in match.group(1).split(",")):
            if 1 <= number <= len(used) and number not in seen:
                seen.add(number)
                hit = used[number - 1]
                out.append(Citation(number, hit.source, hit.title, hit.start, hit.end))
    return out


def answer(model, tokenizer, question: str, hits: list[Hit], budget: int = 1024, max_new_tokens: int = 256,
           on_text=None) -> Answer:
    from tunesmith.generate import generate_reply

    messages, used = rag_messages(question, hits, tokenizer, budget)
    text = generate_reply(model, tokenizer, messages, max_new_tokens, on_text=on_text)
    return Answer(text, citations(text, used), used)
