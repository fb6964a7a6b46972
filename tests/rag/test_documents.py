"""Readers and chunking: blocks and offsets from every file type; chunks within budget, cut at paragraphs."""

from __future__ import annotations

import json

import pytest

from tunesmith.errors import TunesmithError
from tunesmith.rag.chunking import chunk_document
from tunesmith.rag.documents import RowFields, find_files, read_documents

MARKDOWN = """# Field guide

Birds are warm-blooded vertebrates. They lay eggs.

## Owls

Owls hunt at night. Their feathers make no sound.

```
# not a heading: inside a code fence
```

## Gulls

Gulls live by the sea.
"""


def blocks(document):
    return [(b.kind, document.text[b.start : b.end]) for b in document.blocks]


def test_markdown_headings_paragraphs_and_exact_offsets(tmp_path):
    path = tmp_path / "guide.md"
    path.write_text(MARKDOWN)
    [document] = read_documents(path)
    assert document.title == "Field guide" and document.text == MARKDOWN
    found = blocks(document)
    assert found[0] == ("heading", "# Field guide")
    assert ("heading", "## Owls") in found and ("paragraph", "Gulls live by the sea.") in found
    assert ("paragraph", "```\n# not a heading: inside a code fence\n```") in found


def test_html_drops_scripts_keeps_headings_and_title(tmp_path):
    path = tmp_path / "page.html"
    path.write_text("<html><head><title>Owl facts</title><style>p{}</style></head><body><h1>Owls</h1>"
                    "<p>Owls &amp; eagles are raptors.</p><script>var x = 1;</script><ul><li>Barn owl</li>"
                    "<li>Snowy owl</li></ul></body></html>")
    [document] = read_documents(path)
    assert document.title == "Owl facts"
    assert blocks(document) == [("heading", "Owls"), ("paragraph", "Owls & eagles are raptors."),
                                ("paragraph", "Barn owl"), ("paragraph", "Snowy owl")]


def test_pdf_text_is_extracted_page_by_page(tmp_path):
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_title("Owl report")
    for page_text in ("Owls hunt at night.", "Gulls live by the sea."):
        pdf.add_page()
        pdf.set_font("Helvetica", size=12)
        pdf.multi_cell(0, 10, page_text)
    path = tmp_path / "report.pdf"
    pdf.output(str(path))
    [document] = read_documents(path)
    assert document.title == "Owl report"
    assert "Owls hunt at night." in document.text and "Gulls live by the sea." in document.text
    assert document.text.index("Owls") < document.text.index("Gulls")


def test_rows_of_jsonl_and_csv_are_documents_with_ids(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"id": "a1", "title": "First", "body": "Alpha text."}) + "\n"
                     + json.dumps({"body": "Beta text."}) + "\n")
    docs = read_documents(jsonl, RowFields(text="body"))
    assert [(d.source.split("#")[1], d.title, d.text) for d in docs] == [("a1", "First", "Alpha text."),
                                                                         ("line2", "line2", "Beta text.")]
    csv_path = tmp_path / "docs.csv"
    csv_path.write_text("id,text\n7,Seven.\n")
    assert read_documents(csv_path)[0].source.endswith("docs.csv#7")
    with pytest.raises(TunesmithError, match=r"docs.jsonl:1: text: missing"):
        read_documents(jsonl)


@pytest.mark.parametrize("name, content, needle", [
    ("latin1.txt", b"caf\xe9 au lait", "not UTF-8"),
    ("broken.pdf", b"%PDF-1.4 this is not really a pdf", "PDF"),
])
def test_unreadable_files_raise_a_clear_error(tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(TunesmithError, match=needle):
        read_documents(path)


def test_find_files_walks_folders_and_reports_what_it_cannot_use(tmp_path):
    (tmp_path / "a.md").write_text("a")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("b")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "c.txt").write_text("c")
    (tmp_path / "image.png").write_bytes(b"x")
    files, problems = find_files([tmp_path, tmp_path / "image.png", tmp_path / "missing.txt"])
    assert [f.name for f in files] == ["a.md", "b.txt"]
    assert any("unsupported file type '.png'" in p for p in problems) and any("no such file" in p for p in problems)


def test_chunks_fit_the_budget_follow_sections_and_overlap(tmp_path, encoder):
    long_section = " ".join(f"Sentence number {i} is about owls and their silent flight." for i in range(40))
    text = f"# Guide\n\nShort intro.\n\n## Owls\n\n{long_section}\n\n## Gulls\n\nGulls live by the sea.\n"
    path = tmp_path / "guide.md"
    path.write_text(text)
    [document] = read_documents(path)
    chunks = chunk_document(document, encoder.tokenizer, max_tokens=64, overlap=16)
    count = lambda s: len(encoder.tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert all(count(c.text) <= 64 for c in chunks)
    assert all(text[c.start : c.end] == c.text for c in chunks), "offsets are exact"
    owl_chunks = [c for c in chunks if c.title == "Guide > Owls"]
    assert len(owl_chunks) > 3 and owl_chunks[0].text.startswith("## Owls")
    for a, b in zip(owl_chunks, owl_chunks[1:]):
        assert a.start < b.start < a.end, "consecutive chunks of a section overlap"
    gulls = [c for c in chunks if "Gulls live" in c.text]
    assert len(gulls) == 1 and gulls[0].title == "Guide > Gulls" and gulls[0].text.startswith("## Gulls")
    assert not any("Sentence number" in c.text and "Gulls" in c.text for c in chunks), "no chunk spans two sections"


def test_a_sentence_longer_than_a_chunk_is_cut_at_token_boundaries(encoder):
    from tunesmith.rag.documents import _plain

    text = "word " * 300
    chunks = chunk_document(_plain("x.txt", "x", text, markdown=False), encoder.tokenizer, max_tokens=50, overlap=0)
    assert len(chunks) >= 6 and all(len(encoder.tokenizer(c.text, add_special_tokens=False)["input_ids"]) <= 50
                                    for c in chunks)
    assert "".join(c.text for c in chunks).split() == text.split()
