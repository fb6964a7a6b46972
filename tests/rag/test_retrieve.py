"""Fusion, citations, few-shot selection and the retrieval metrics, each against a hand-checked answer."""

from __future__ import annotations

import math

import pytest

from tunesmith.evaluate.metrics import ndcg_at_k, recall_at_k, reciprocal_rank, retrieval_report
from tunesmith.rag.answer import citations, context_block, rag_messages
from tunesmith.rag.fewshot import Example, FewShot, read_examples
from tunesmith.rag.retrieve import rrf
from tunesmith.rag.store import Hit


def hit(name: str, score: float = 0.0, source: str | None = None) -> Hit:
    return Hit(name, source or f"/docs/{name}.md", name.upper(), 0, 10, f"text of {name}", score)


def test_reciprocal_rank_fusion_by_hand():
    dense = [hit("a"), hit("b"), hit("c")]
    bm25 = [hit("c"), hit("d"), hit("a")]
    fused = rrf([dense, bm25], k=4)
    # a: 1/61 + 1/63, c: 1/63 + 1/61 (tie: a appeared first), b: 1/62, d: 1/62 (tie: b first)
    assert [h.id for h in fused] == ["a", "c", "b", "d"]
    assert fused[0].score == pytest.approx(1 / 61 + 1 / 63) and fused[2].score == pytest.approx(1 / 62)
    assert [h.id for h in rrf([dense, bm25], k=2)] == ["a", "c"]


def test_citations_map_numbers_to_the_sources_shown(tokenizer):
    hits = [hit("owls", source="/kb/owls.md"), hit("gulls", source="/kb/gulls.txt"), hit("bees", source="/kb/bees.html")]
    messages, used = rag_messages("What do gulls eat?", hits, tokenizer, budget=1000)
    content = messages[0]["content"]
    assert content.index("[1] OWLS") < content.index("[2] GULLS") < content.index("[3] BEES")
    found = citations("Gulls eat fish [2]. Owls hunt [1, 3]; see also [2] and [7].", used)
    assert [(c.number, c.source) for c in found] == [(2, "/kb/gulls.txt"), (1, "/kb/owls.md"), (3, "/kb/bees.html")]


def test_the_context_respects_the_token_budget(tokenizer):
    hits = [Hit(str(i), f"/d/{i}", f"T{i}", 0, 1, "word " * 100, 0.0) for i in range(5)]
    block, used = context_block(hits, tokenizer, budget=250)
    assert len(used) == 2 and len(tokenizer(block, add_special_tokens=False)["input_ids"]) <= 250
    block, used = context_block(hits, tokenizer, budget=40)
    assert len(used) == 1 and len(tokenizer(block, add_special_tokens=False)["input_ids"]) <= 40


def test_few_shot_picks_the_most_similar_examples(encoder, tmp_path):
    examples = [Example("The movie was wonderful and moving.", "positive"),
                Example("Stock prices fell on Monday.", "finance"),
                Example("A dull, boring film.", "negative"),
                Example("Interest rates rose again.", "finance")]
    shots = FewShot(examples, encoder)
    picked = shots.select("What a boring, dull movie.", 2)
    assert picked[-1].output == "negative" and {e.output for e in picked} <= {"negative", "positive"}
    messages = shots.messages("Bond yields climbed.", 2, instruction="Label the text.")
    assert messages[0]["role"] == "system" and messages[-1] == {"role": "user", "content": "Bond yields climbed."}
    assert [m["content"] for m in messages if m["role"] == "assistant"] == ["finance", "finance"]
    path = tmp_path / "shots.jsonl"
    path.write_text('{"text": "fine", "label": 1}\n{"instruction": "Add", "input": "1+1", "output": "2"}\n'
                    '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    assert [(e.input, e.output) for e in read_examples(path)] == [("fine", "1"), ("Add\n\n1+1", "2"), ("hi", "hello")]


def test_retrieval_metrics_by_hand():
    ranked = ["d3", "d1", "d7", "d2"]
    relevant = {"d1": 1, "d2": 2}
    assert recall_at_k(ranked, relevant, 1) == 0 and recall_at_k(ranked, relevant, 2) == 0.5
    assert recall_at_k(ranked, relevant, 10) == 1.0
    assert reciprocal_rank(ranked, relevant) == 0.5
    dcg = 1 / math.log2(3) + 2 / math.log2(5)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at_k(ranked, relevant, 10) == pytest.approx(dcg / idcg)
    report = retrieval_report({"q1": ranked, "q2": ["d9"], "q3": ["x"]}, {"q1": relevant, "q2": {"d9": 1}})
    assert report["queries"] == 2 and report["mrr"] == pytest.approx(0.75) and report["recall@1"] == 0.5
