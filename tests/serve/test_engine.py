"""Mixed-adapter batches: every row decodes as if it ran alone with its own adapter."""

import pytest
import torch

from tunesmith.errors import TunesmithError
from tunesmith.generate import chat_prompt_ids, generate_reply
from tunesmith.models import load_model, load_tokenizer
from tunesmith.serve.engine import Request, choose_token, generate

ADAPTERS = ("cats", "dogs", "birds")


@pytest.fixture(scope="module")
def served(adapter_dirs, tiny_path):
    """The tiny base with three distinct adapters in one PEFT model."""
    from peft import PeftModel

    tokenizer = load_tokenizer(tiny_path)
    runs = {name: adapter_dirs[name] for name in ADAPTERS}
    model = PeftModel.from_pretrained(load_model(tiny_path), runs["cats"], adapter_name="cats")
    for name in ADAPTERS[1:]:
        model.load_adapter(runs[name], adapter_name=name)
    model.eval()
    return model, tokenizer, runs


def prompt(tokenizer, text="Tell me something."):
    return chat_prompt_ids(tokenizer, [{"role": "user", "content": text}])


def test_a_mixed_batch_equals_each_request_alone(served):
    model, tokenizer, _ = served
    requests = [Request(prompt(tokenizer), adapter, max_tokens=12) for adapter in ("cats", None, "dogs", "birds", "cats")]
    requests[1] = Request(prompt(tokenizer, "Hi"), None, max_tokens=12)  # another prompt length: real padding
    together = generate(model, tokenizer, requests)
    alone = [generate(model, tokenizer, [r])[0] for r in requests]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert together[0].token_ids == together[4].token_ids
    assert len({tuple(together[i].token_ids) for i in (0, 2, 3)}) == 3, "each adapter answers differently"


@pytest.mark.parametrize("name", ADAPTERS)
def test_engine_matches_the_chat_command_path(served, name):
    model, tokenizer, runs = served
    from tunesmith.adapters import load_trained

    alone, alone_tokenizer = load_trained(runs[name], device="cpu")
    expected = generate_reply(alone, alone_tokenizer, [{"role": "user", "content": "Tell me something."}], 12)
    got = generate(model, tokenizer, [Request(prompt(tokenizer), name, max_tokens=12)])[0]
    assert got.text.strip() == expected


def test_stop_strings_budgets_and_streaming(served):
    model, tokenizer, _ = served
    full = generate(model, tokenizer, [Request(prompt(tokenizer), "dogs", max_tokens=12)])[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    pieces: list[tuple[int, str]] = []
    out = generate(model, tokenizer, [Request(prompt(tokenizer), "dogs", max_tokens=12, stop=[stop]),
                                      Request(prompt(tokenizer), "cats", max_tokens=2)],
                   on_text=lambda row, text: pieces.append((row, text)))
    assert (out[0].text, out[0].finish_reason) == (full[: full.find(stop)], "stop")
    assert out[1].finish_reason == "length" and len(out[1].token_ids) == 2
    assert "".join(t for row, t in pieces if row == 0) == out[0].text


def test_sampling_is_reproducible_with_a_seed_and_top_p_keeps_the_head():
    logits = torch.tensor([2.0, 1.0, 0.5, -3.0])
    draws = [choose_token(logits, Request([], temperature=1.0, seed=7), torch.Generator().manual_seed(7))
             for _ in range(2)]
    assert draws[0] == draws[1]
    assert all(choose_token(logits, Request([], temperature=1.0, top_p=0.1), torch.Generator().manual_seed(s)) == 0
               for s in range(20))


def test_unknown_adapters_are_refused(served):
    model, tokenizer, _ = served
    with pytest.raises(TunesmithError, match="adapter 'fish' is not loaded"):
        generate(model, tokenizer, [Request(prompt(tokenizer), "fish")])


def test_rows_that_join_a_running_batch_decode_as_if_alone(served):
    from tunesmith.serve.engine import Batch

    model, tokenizer, _ = served
    first = [Request(prompt(tokenizer), "cats", max_tokens=10), Request(prompt(tokenizer, "Hi"), None, max_tokens=3)]
    later = [Request(prompt(tokenizer, "A much longer question about birds and their songs?"), "birds", max_tokens=8),
             Request(prompt(tokenizer, "Yo"), "dogs", max_tokens=6)]
    batch, done = Batch(model, tokenizer), {}
    batch.add(first, keys=[0, 1])
    for step in range(40):
        if step == 2:
            batch.add(later[:1], keys=[2])  # wider than the running rows
        if step == 5:
            batch.add(later[1:], keys=[3])  # after row 1 retired and the batch was trimmed
        done.update({e.key: e.done for e in batch.step() if e.done})
        if not batch.rows and step > 5:
            break
    alone = [generate(model, tokenizer, [r])[0] for r in first + later]
    assert [done[i].token_ids for i in range(4)] == [c.token_ids for c in alone]


def test_a_cancelled_row_leaves_and_the_others_go_on(served):
    from tunesmith.serve.engine import Batch

    model, tokenizer, _ = served
    requests = [Request(prompt(tokenizer), "cats", max_tokens=8), Request(prompt(tokenizer), "dogs", max_tokens=8)]
    batch, done = Batch(model, tokenizer), {}
    batch.add(requests, keys=["a", "b"])
    batch.step()
    batch.cancel("a")
    while batch.rows:
        done.update({e.key: e.done for e in batch.step() if e.done})
    assert done["a"].finish_reason == "cancelled" and len(done["a"].token_ids) == 1
    assert done["b"].token_ids == generate(model, tokenizer, [requests[1]])[0].token_ids
