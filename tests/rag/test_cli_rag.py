"""`tunesmith rag` as a user runs it, on the shipped PubMedQA sample."""

from __future__ import annotations

import json

import pytest
from conftest import SAMPLES, run_cli

SAMPLE = SAMPLES / "rag_pubmedqa_60"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("home")


@pytest.fixture()
def kb(home, monkeypatch, capsys):
    monkeypatch.setattr("tunesmith.rag.kb.kb_root", lambda: home / "kb")
    if not (home / "kb" / "pubmed").is_dir():
        code, out, err = run_cli("rag", "ingest", str(SAMPLE / "corpus.jsonl"), "--kb", "pubmed", capsys=capsys)
        assert code == 0, err
        assert "1 added" in out and "0 failed" in out and "chunks/s" in out
    return "pubmed"


def test_query_shows_ranked_chunks_with_sources(kb, capsys):
    question = json.loads((SAMPLE / "queries.jsonl").read_text().split("\n")[0])
    code, out, _ = run_cli("rag", "query", kb, question["text"], "--k", "3", "--json", capsys=capsys)
    hits = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(hits) == 3
    assert hits[0]["source"].endswith(f"corpus.jsonl#{question['id'][1:]}"), "the question's own abstract ranks first"
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]


def test_eval_reports_every_retriever_and_answer_accuracy(kb, capsys, tmp_path, tiny_path):
    output = tmp_path / "eval.json"
    code, out, err = run_cli("rag", "eval", kb, "--queries", str(SAMPLE / "queries.jsonl"), "--qrels",
                             str(SAMPLE / "qrels.jsonl"), "--answers", str(SAMPLE / "answers.jsonl"),
                             "--answer-limit", "6", "--model", str(tiny_path), "--output", str(output), capsys=capsys)
    assert code == 0, err
    report = json.loads(output.read_text())
    assert set(report["retrieval"]) == {"dense", "bm25", "hybrid"}
    assert all(r["queries"] == 60 for r in report["retrieval"].values())
    assert report["retrieval"]["dense"]["recall@10"] >= 0.9 and report["retrieval"]["hybrid"]["mrr"] >= 0.8
    for result in report["answers"].values():
        assert result["questions"] == 6 and 0.0 <= result["accuracy"] <= 1.0
        assert sum(result["stated"].values()) == 6
    assert "recall@10" in out and "yes/no/maybe accuracy" in out


def test_answer_prints_the_sources_its_citations_point_to(kb, capsys, tiny_path):
    code, out, err = run_cli("rag", "answer", kb, "Is aspirin useful?", "--model", str(tiny_path), "--k", "2",
                             "--max-new-tokens", "8", capsys=capsys)
    assert code == 0, err
    assert "sources:" in out and "[1] " in out and "corpus.jsonl#" in out


def test_rag_errors_are_one_line(kb, capsys, tmp_path):
    code, _, err = run_cli("rag", "query", "nope", "question", capsys=capsys)
    assert code == 2 and "does not exist" in err and err.strip().count("\n") == 0
    code, _, err = run_cli("rag", "query", kb, "q", "--retriever", "magic", capsys=capsys)
    assert code == 2 and "dense, bm25, hybrid" in err
    code, _, err = run_cli("rag", "ingest", str(tmp_path / "nothing.md"), "--kb", "x", capsys=capsys)
    assert code == 2 and "no such file" in err
    code, _, err = run_cli("rag", "ingest", str(SAMPLE / "corpus.jsonl"), "--kb", "bad/name", capsys=capsys)
    assert code == 2 and "--kb" in err


def test_list_and_drop(kb, capsys):
    code, out, _ = run_cli("rag", "list", capsys=capsys)
    assert code == 0 and "pubmed: lancedb, embedder minilm (384 dims)" in out


def test_fewshot_answers_with_similar_examples(capsys, tmp_path, tiny_path):
    examples = tmp_path / "shots.jsonl"
    examples.write_text('{"text": "great film", "label": "positive"}\n{"text": "awful plot", "label": "negative"}\n'
                        '{"text": "stocks fell", "label": "finance"}\n')
    code, out, err = run_cli("rag", "fewshot", "--examples", str(examples), "a great movie", "--k", "2",
                             "--model", str(tiny_path), "--max-new-tokens", "4", "--show-prompt", capsys=capsys)
    assert code == 0, err
    assert out.index("great film") < out.index("a great movie") and "stocks fell" not in out


def test_answer_with_a_registry_adapter_is_the_hybrid_route(kb, capsys, tmp_path, monkeypatch, adapter_dirs):
    from tunesmith.adapters import add_adapter

    monkeypatch.setattr("tunesmith.adapters.registry_dir", lambda: tmp_path / "adapters")
    add_adapter(adapter_dirs["owls"], "owls", root=tmp_path / "adapters")
    code, out, err = run_cli("rag", "answer", kb, "Is aspirin useful?", "--adapter", "owls", "--k", "1",
                             "--max-new-tokens", "6", capsys=capsys)
    assert code == 0, err
    assert "[1] " in out and "corpus.jsonl#" in out
    code, _, err = run_cli("rag", "answer", kb, "q", "--adapter", "nobody", capsys=capsys)
    assert code == 2 and "not registered" in err
