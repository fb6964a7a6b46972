"""The adapter pool: base checks, least-recently-used unloading, and back to the plain base."""

from __future__ import annotations

import json

import pytest
import torch

from tunesmith.models import load_model
from tunesmith.serve.engine import Request, generate
from tunesmith.serve.pool import AdapterError, AdapterPool


@pytest.fixture()
def pool(tiny_path, adapter_dirs):
    pool = AdapterPool(load_model(tiny_path).eval(), str(tiny_path), tiny_path, max_loaded=2)
    for name in ("cats", "dogs", "birds"):
        pool.register(name, adapter_dirs[name])
    return pool


def test_least_recently_used_adapters_are_unloaded_and_answers_stay_the_same(pool, tokenizer):
    ids = tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    first = {}
    for name in ("cats", "dogs", "cats", "birds", "dogs", "cats"):
        pool.ensure({name}, busy=set())
        out = generate(pool.model, tokenizer, [Request(ids, name, max_tokens=6)])[0].token_ids
        assert first.setdefault(name, out) == out
        assert len(pool.loaded) <= 2
    assert list(pool.loaded) == ["dogs", "cats"], "most recently used last"
    assert pool.evictions >= 3


def test_busy_adapters_are_never_evicted(pool):
    pool.ensure({"cats", "dogs"}, busy=set())
    with pytest.raises(AdapterError) as caught:
        pool.ensure({"birds"}, busy={"cats", "dogs"})
    assert caught.value.status == 429


def test_unloading_the_last_adapter_leaves_the_plain_base(pool, tiny_path):
    reference = load_model(tiny_path).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    pool.ensure({"cats"}, busy=set())
    with torch.no_grad(), pool.lora.rows(["cats"]):
        assert not torch.equal(pool.model(input_ids=ids).logits, reference(input_ids=ids).logits)
    pool.unregister("cats", busy=set())
    assert not pool.loaded and not pool.lora.adapters
    with torch.no_grad():
        assert torch.equal(pool.model(input_ids=ids).logits, reference(input_ids=ids).logits)
    with pytest.raises(AdapterError, match="not being served"):
        pool.ensure({"cats"}, busy=set())


def test_unregistering_a_busy_adapter_waits_for_its_rows(pool):
    pool.ensure({"dogs"}, busy=set())
    pool.unregister("dogs", busy={"dogs"})
    assert "dogs" in pool.loaded and "dogs" not in pool.servable
    pool.collect(busy=set())
    assert "dogs" not in pool.loaded


def test_an_adapter_for_another_base_is_refused_by_name(pool, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/another-model"}))
    with pytest.raises(AdapterError, match="trained on base 'org/another-model'"):
        pool.register("other", tmp_path)
    with pytest.raises(AdapterError, match="adapter name"):
        pool.register("../../etc", tmp_path)
