"""Documents to chunks of at most `max_tokens` tokens, overlapping by about `overlap` tokens.

Chunks end at paragraph boundaries where they can, and a heading always starts a new chunk (its
section's title goes with every chunk of the section). A paragraph too long for one chunk is
split at sentence ends, and a sentence too long at token boundaries. Each chunk is an exact
character span [start, end) of its document's text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tunesmith.rag.documents import Document

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")


@dataclass
class Chunk:
    source: str
    title: str
    start: int
    end: int
    text: str
    index: int = 0


@dataclass
class _Piece:
    start: int
    end: int
    tokens: int
    section: int  # pieces of one section (heading to heading) may share a chunk
    section_title: str


def chunk_document(document: Document, tokenizer, max_tokens: int = 200, overlap: int = 40) -> list[Chunk]:
    if overlap >= max_tokens:
        raise ValueError("overlap must be smaller than max_tokens")
    pieces = _pieces(document, tokenizer, max_tokens)
    chunks: list[Chunk] = []
    i = 0
    while i < len(pieces):
        j, total = i, 0
        while j < len(pieces) and pieces[j].section == pieces[i].section and total + pieces[j].tokens <= max_tokens:
            total += pieces[j].tokens
            j += 1
        j = max(j, i + 1)
        start, end = pieces[i].start, pieces[j - 1].end
        section = pieces[i].section_title
        title = document.title if section in ("", document.title) else f"{document.title} > {section}"
        chunks.append(Chunk(document.source, title, start, end, document.text[start:end], len(chunks)))
        if j >= len(pieces):
            break
        if pieces[j].section != pieces[j - 1].section:
            i = j  # a new section starts clean
            continue
        back, carried = j, 0  # step back over trailing pieces worth at most `overlap` tokens
        while back - 1 > i and carried + pieces[back - 1].tokens <= overlap:
            back -= 1
            carried += pieces[back].tokens
        i = back
    return chunks


def _pieces(document: Document, tokenizer, max_tokens: int) -> list[_Piece]:
    text = document.text
    spans: list[tuple[int, int, int, str]] = []  # start, end, section, section title
    section, section_title = 0, ""
    for block in document.blocks:
        if block.kind == "heading":
            section += 1
            section_title = text[block.start : block.end].lstrip("#").strip()
        spans.append((block.start, block.end, section, section_title))
    if not spans and text.strip():
        spans = [(0, len(text), 0, "")]
    counts = _count(tokenizer, [text[s:e] for s, e, _, _ in spans])
    pieces: list[_Piece] = []
    for (start, end, sec, title), tokens in zip(spans, counts):
        if tokens <= max_tokens:
            pieces.append(_Piece(start, end, tokens, sec, title))
            continue
        sentences = _sentences(text, start, end)
        for (s, e), n in zip(sentences, _count(tokenizer, [text[s:e] for s, e in sentences])):
            if n <= max_tokens:
                pieces.append(_Piece(s, e, n, sec, title))
            else:
                pieces += [_Piece(a, b, m, sec, title) for a, b, m in _windows(tokenizer, text, s, e, max_tokens)]
    return pieces


def _count(tokenizer, texts: list[str]) -> list[int]:
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _sentences(text: str, start: int, end: int) -> list[tuple[int, int]]:
    spans, cursor = [], start
    for match in SENTENCE_END.finditer(text, start, end):
        spans.append((cursor, match.start()))
        cursor = match.end()
    spans.append((cursor, end))
    return [(s, e) for s, e in spans if text[s:e].strip()]


def _windows(tokenizer, text: str, start: int, end: int, size: int) -> list[tuple[int, int, int]]:
    """Cut text[start:end] into spans of at most `size` tokens, at token boundaries."""
    offsets = tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    out = []
    for i in range(0, len(offsets), size):
        window = offsets[i : i + size]
        a = start + window[0][0]
        b = start + (offsets[i + size][0] if i + size < len(offsets) else end - start)
        out.append((a, b, len(window)))
    return out
