"""Files to documents: text split into blocks (headings and paragraphs) with character offsets.

Readers: .txt, .md (headings from `#` lines), .html/.htm (block elements; script and style
dropped), .pdf (pypdf, one page after another), and .jsonl/.csv where each row is a document
(`text_field`, optional `title_field` and `id_field`). For .txt and .md the offsets point into the
file's own text; for the others into the extracted text, which is what a chunk stores.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from tunesmith.errors import TunesmithError

SUFFIXES = {".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".jsonl", ".csv"}


@dataclass
class Block:
    kind: str  # "heading" or "paragraph"
    start: int
    end: int


@dataclass
class Document:
    source: str  # the file, or file#id for a row of a .jsonl/.csv
    title: str
    text: str
    blocks: list[Block] = field(default_factory=list)


@dataclass(frozen=True)
class RowFields:
    text: str = "text"
    title: str = "title"
    id: str = "id"


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for piece in iter(lambda: handle.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def find_files(paths: list[str | Path]) -> tuple[list[Path], list[str]]:
    """Files to ingest under `paths` (folders walked, hidden entries skipped), and problems with the paths."""
    found, problems = [], []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            if path.suffix.lower() in SUFFIXES:
                found.append(path)
            else:
                problems.append(f"{path}: unsupported file type '{path.suffix}' (use {', '.join(sorted(SUFFIXES))})")
        else:
            problems.append(f"{path}: no such file or folder")
    return list(dict.fromkeys(found)), problems


def read_documents(path: Path, fields: RowFields = RowFields()) -> list[Document]:
    """The documents in one file. Raises TunesmithError (naming the file) when it cannot be read."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".csv"):
            return _rows(path, fields)
        if suffix == ".pdf":
            return [_pdf(path)]
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TunesmithError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise TunesmithError(f"{path}: cannot read ({e.strerror})") from None
    if suffix in (".html", ".htm"):
        return [_html(path, raw)]
    return [_plain(str(path), path.stem, raw, markdown=suffix in (".md", ".markdown"))]


def _plain(source: str, title: str, text: str, markdown: bool) -> Document:
    """Blocks are runs of non-blank lines; in Markdown a `#` line is a heading block of its own."""
    blocks: list[Block] = []
    in_fence = False
    start = content_end = None
    offset = 0
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if markdown and stripped.startswith("```"):
            in_fence = not in_fence
        heading = markdown and not in_fence and re.match(r"#{1,6}\s", stripped)
        if (not stripped and not in_fence) or heading:
            if start is not None:
                blocks.append(Block("paragraph", start, content_end))
                start = None
            if heading:
                blocks.append(Block("heading", offset, offset + len(line.rstrip("\r\n"))))
        else:
            if start is None:
                start = offset
            content_end = offset + len(line.rstrip("\r\n"))
        offset += len(line)
    if start is not None:
        blocks.append(Block("paragraph", start, content_end))
    if markdown:
        first = next((b for b in blocks if b.kind == "heading"), None)
        if first is not None:
            title = text[first.start : first.end].lstrip("#").strip() or title
    return Document(source, title, text, [b for b in blocks if text[b.start : b.end].strip()])


def _assemble(source: str, title: str, parts: list[tuple[str, str]]) -> Document:
    """A document from (kind, text) parts, joined by blank lines."""
    text, blocks = "", []
    for kind, part in parts:
        part = part.strip()
        if not part:
            continue
        if text:
            text += "\n\n"
        blocks.append(Block(kind, len(text), len(text) + len(part)))
        text += part
    return Document(source, title, text, blocks)


class _HtmlText(HTMLParser):
    BLOCKS = {"p", "div", "li", "pre", "blockquote", "td", "th", "section", "article", "br", "tr", "dd", "dt",
              "figcaption", "caption"}
    HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
    SKIP = {"script", "style", "noscript", "template", "head"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[tuple[str, str]] = []
        self.current: list[str] = []
        self.kind = "paragraph"
        self.skip = 0
        self.title = ""
        self.in_title = False

    def flush(self) -> None:
        text = re.sub(r"\s+", " ", "".join(self.current)).strip()
        if text:
            self.parts.append((self.kind, text))
        self.current, self.kind = [], "paragraph"

    def handle_starttag(self, tag, attrs) -> None:
        if tag == "title":
            self.in_title = True
        if tag in self.SKIP:
            self.skip += 1
        elif tag in self.BLOCKS or tag in self.HEADINGS:
            self.flush()
            if tag in self.HEADINGS:
                self.kind = "heading"

    def handle_endtag(self, tag) -> None:
        if tag == "title":
            self.in_title = False
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCKS or tag in self.HEADINGS:
            self.flush()

    def handle_data(self, data) -> None:
        if self.in_title:
            self.title += data
        elif not self.skip:
            self.current.append(data)


def _html(path: Path, raw: str) -> Document:
    parser = _HtmlText()
    parser.feed(raw)
    parser.close()
    parser.flush()
    first_heading = next((t for k, t in parser.parts if k == "heading"), "")
    title = re.sub(r"\s+", " ", parser.title).strip() or first_heading or path.stem
    return _assemble(str(path), title, parser.parts)


def _pdf(path: Path) -> Document:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
        pages = [page.extract_text() or "" for page in reader.pages]
        meta_title = (reader.metadata.title if reader.metadata else None) or ""
    except (PdfReadError, ValueError, KeyError, OSError) as e:
        raise TunesmithError(f"{path}: not a readable PDF ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    parts = [("paragraph", p) for page in pages for p in re.split(r"\n\s*\n", page)]
    if not any(text.strip() for _, text in parts):
        raise TunesmithError(f"{path}: the PDF has no extractable text (scanned images need OCR first)")
    return _assemble(str(path), meta_title.strip() or path.stem, parts)


def _rows(path: Path, fields: RowFields) -> list[Document]:
    records: list[tuple[int, dict]] = []
    if path.suffix.lower() == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    records.append((number, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise TunesmithError(f"{path}:{number}: not valid JSON ({e.msg}); fix or remove the line") from None
    else:
        with path.open(encoding="utf-8", newline="") as handle:
            records = [(number, row) for number, row in enumerate(csv.DictReader(handle), start=2)]
    documents = []
    for number, record in records:
        if not isinstance(record, dict) or not isinstance(record.get(fields.text), str):
            raise TunesmithError(f"{path}:{number}: {fields.text}: missing or not text; choose the column with "
                                 "--text-field")
        ident = record.get(fields.id)
        ident = str(ident) if ident not in (None, "") else f"line{number}"
        title = record.get(fields.title) if isinstance(record.get(fields.title), str) else ""
        document = _plain(f"{path}#{ident}", title or ident, record[fields.text], markdown=False)
        document.title = title or ident
        documents.append(document)
    return documents
