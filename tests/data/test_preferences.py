"""Preference pairs from every accepted shape, hh-rlhf transcripts included, with errors that name the row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SHARED_DATA, write_jsonl

from tunesmith.data.preferences import parse_transcript, read_preferences
from tunesmith.errors import TunesmithError


def test_the_accepted_shapes(tmp_path):
    rows = [
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
        {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"}],
         "chosen": [{"role": "assistant", "content": "Hello there"}], "rejected": "Go away"},
        {"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
         "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]},
        {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant:",
         "chosen": " Why did the chicken cross the road?", "rejected": " No."},
    ]
    pairs, skipped = read_preferences([write_jsonl(tmp_path / "p.jsonl", rows)])
    assert skipped == 0 and [p.chosen for p in pairs] == ["Hi!", "Hello there", "4", "Why did the chicken cross the road?"]
    assert pairs[1].prompt[0] == {"role": "system", "content": "Be kind."}
    assert pairs[2].prompt == [{"role": "user", "content": "2+2?"}]
    assert pairs[3].prompt == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                               {"role": "user", "content": "Tell me a joke."}]


def test_bad_rows_are_named_or_skipped(tmp_path):
    rows = [{"prompt": "Q", "chosen": "A", "rejected": "A"}, {"prompt": "Q", "chosen": "A"},
            {"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
            {"prompt": "Q", "chosen": "good", "rejected": "bad"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(TunesmithError) as caught:
        read_preferences([path])
    message = str(caught.value)
    assert "p.jsonl:1: rejected: identical to chosen" in message and "p.jsonl:2: rejected: missing" in message
    assert "p.jsonl:3: prompt: the last message must be the user's" in message
    pairs, skipped = read_preferences([path], skip_bad_rows=True)
    assert (len(pairs), skipped) == (1, 3)


def test_transcripts_and_the_shared_hh_data():
    assert parse_transcript("plain question") is None
    hh = SHARED_DATA / "hh_rlhf_harmless" / "test.jsonl"
    if not hh.is_file():
        pytest.skip("../shared/data is not beside this checkout")
    pairs, skipped = read_preferences([hh])
    lines = [line for line in Path(hh).read_text().split("\n") if line.strip()]
    assert skipped == 0 and len(pairs) == len(lines)
    assert all(p.prompt[-1]["role"] == "user" for p in pairs)
    first = json.loads(Path(hh).read_text().split("\n")[0])
    assert pairs[0].chosen == first["chosen"].strip() and pairs[0].prompt[0]["content"].startswith("Is there a way")


def test_render_pairs_labels_only_the_reply_and_cuts_to_length(tmp_path, tokenizer):
    from tunesmith.data.preferences import PreferencePair, render_pairs

    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
              {"role": "user", "content": "Tell me more."}]
    pairs = [PreferencePair("a:1", prompt, "Sure, here is more.", "No."),
             PreferencePair("a:2", [{"role": "user", "content": "word " * 80}], "Yes.", "No.")]
    rendered = render_pairs(tokenizer, pairs, 64)
    assert len(rendered.rows) == 1 and rendered.truncated == 1 and rendered.dropped == 1  # the long prompt left no reply
    row = rendered.rows[0]
    chosen = tokenizer.decode([t for t, lab in zip(row.chosen.input_ids, row.chosen.labels) if lab != -100])
    assert chosen == "Sure, here is more.<|im_end|>"
    with pytest.raises(TunesmithError, match="a:2: pair has .* tokens, over training.max_length=64"):
        render_pairs(tokenizer, pairs, 64, overlong="error")


def test_score_items_in_three_shapes_and_errors(tmp_path):
    from tunesmith.data.preferences import read_score_items

    rows = [{"prompt": "Hi", "response": "Hello"}, {"prompt": "Hi", "chosen": "Hello", "rejected": "Go"},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}]
    items = read_score_items(write_jsonl(tmp_path / "s.jsonl", rows))
    assert [sorted(i.replies) for i in items] == [["response"], ["chosen", "rejected"], ["response"]]
    assert items[2].prompt == [{"role": "user", "content": "Hi"}]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    with pytest.raises(TunesmithError, match="bad.jsonl:1: messages: the last message must be the assistant's"):
        read_score_items(bad)


def test_prompts_from_a_preference_file_keep_hh_turns(tmp_path):
    from tunesmith.data.prompts import read_prompts

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Joke?\n\nAssistant:",
                                                "chosen": "x", "rejected": "y"}])
    assert read_prompts(path) == [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                   {"role": "user", "content": "Joke?"}]]
