import pytest
import torch

from tunesmith.data.formats import Example
from tunesmith.data.render import (IGNORE, Sample, as_rows, collate, count_targets, fit_length, marked_segments,
                                   pack_blocks, pack_sequences, render_chat, render_text)
from tunesmith.errors import TunesmithError


def trained_text(tokenizer, sample):
    return "".join(text for text, trained in marked_segments(tokenizer, sample) if trained)


def test_only_the_answer_and_its_end_token_carry_labels(tokenizer):
    messages = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]
    sample = render_chat(tokenizer, messages)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(sample.input_ids) == full
    assert trained_text(tokenizer, sample) == "5<|im_end|>"
    labelled = [i for i, label in enumerate(sample.labels) if label != IGNORE]
    assert sample.labels[labelled[-1]] == tokenizer.eos_token_id  # EOS is learned, not masked
    assert labelled == list(range(labelled[0], labelled[-1] + 1))
    assert all(sample.labels[i] == sample.input_ids[i] for i in labelled)
    assert labelled[-1] == len(sample.input_ids) - 2  # only the newline after <|im_end|> is left out


def test_every_assistant_turn_is_trained_in_multi_turn_chats(tokenizer):
    messages = [
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    sample = render_chat(tokenizer, messages)
    assert trained_text(tokenizer, sample) == "Hello.<|im_end|>Goodbye.<|im_end|>"


def test_text_is_all_targets_and_ends_with_eos(tokenizer):
    sample = render_text(tokenizer, "Aspirin inhibits COX-1.")
    assert sample.labels == sample.input_ids
    assert sample.input_ids[-1] == tokenizer.eos_token_id


def test_overlong_policy_truncates_with_a_count_or_names_the_row(tokenizer):
    long = Sample(list(range(10)), list(range(10)), "d.jsonl:7")
    short = Sample([1, 2, 3], [IGNORE, 2, 3], "d.jsonl:8")
    fitted, truncated = fit_length([long, short], 5, "truncate")
    assert truncated == 1 and fitted[0].input_ids == [0, 1, 2, 3, 4] and fitted[1] == short
    with pytest.raises(TunesmithError, match=r"d.jsonl:7: sample has 10 tokens, over training.max_length=5"):
        fit_length([long, short], 5, "error")


def test_truncation_that_cuts_the_whole_answer_drops_the_sample():
    prompt_only = Sample(list(range(10)), [IGNORE] * 8 + [8, 9], "x")
    fitted, truncated = fit_length([prompt_only], 6, "truncate")
    assert (fitted, truncated) == ([], 1)


def test_packing_keeps_whole_samples_and_restarts_positions():
    samples = [Sample([1] * n, [1] * n) for n in (6, 3, 5, 2)]
    rows = pack_sequences(samples, 8)
    assert sorted(len(r.input_ids) for r in rows) == [8, 8]
    for row in rows:
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        lengths = [b - a for a, b in zip(starts, starts[1:] + [len(row.position_ids)])]
        assert sorted(lengths) in ([2, 6], [3, 5])


def test_pack_blocks_restarts_positions_at_documents_and_blocks():
    docs = [Sample([1] * 5, [1] * 5), Sample([2] * 4, [2] * 4)]
    rows = pack_blocks(docs, 4)
    assert [r.position_ids for r in rows] == [[0, 1, 2, 3], [0, 0, 1, 2], [3]] or \
        [r.position_ids for r in rows] == [[0, 1, 2, 3], [0, 0, 1, 2]]
    assert rows[1].input_ids == [1, 2, 2, 2]


def test_collate_pads_as_a_separate_block_without_labels():
    batch = collate(as_rows([Sample([5, 6, 7], [IGNORE, 6, 7]), Sample([8], [8])]), pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]
    assert count_targets(batch) == 2


def test_packed_samples_do_not_attend_to_each_other(tiny_path, tokenizer):
    from tunesmith.models import load_model

    model = load_model(tiny_path).eval()
    a = render_chat(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}])
    b = render_text(tokenizer, "A completely different document about kidneys.")
    packed = collate(pack_sequences([a, b], 512), tokenizer.pad_token_id)
    assert packed["input_ids"].shape[0] == 1
    with torch.no_grad():
        # use_cache=False as in training: with a KV cache transformers ignores packed position ids
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        alone = {len(s.input_ids): model(input_ids=torch.tensor([s.input_ids])).logits[0] for s in (a, b)}
    first = len(packed["input_ids"][0]) - min(alone)  # pack_sequences puts the longer sample first
    longer, shorter = max(alone), min(alone)
    assert torch.allclose(together[:longer], alone[longer], atol=1e-5)
    assert torch.allclose(together[first:], alone[shorter], atol=1e-5)
    # and padding does not leak into a padded batch either
    padded = collate(as_rows([a, b]), tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=padded["input_ids"], position_ids=padded["position_ids"], use_cache=False).logits
    assert torch.allclose(logits[1, : len(b.input_ids)], alone[len(b.input_ids)], atol=1e-5)


def test_loss_matches_transformers_reference(tiny_path, tokenizer):
    from tunesmith.models import load_model
    from tunesmith.stages.loop import loss_sum

    model = load_model(tiny_path).eval()
    sample = render_chat(tokenizer, [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."}])
    batch = collate(as_rows([sample]), tokenizer.pad_token_id)
    with torch.no_grad():
        ours = loss_sum(model, batch) / count_targets(batch)
        reference = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert abs(float(ours) - float(reference)) < 1e-5
    assert float(ours) > 1.0


def test_render_refuses_a_template_that_drops_the_answer(tokenizer):
    import copy

    broken = copy.deepcopy(tokenizer)
    broken.chat_template = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(TunesmithError, match="f:1: rendering left no assistant token"):
        render_chat(broken, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "f:1")


def test_examples_render_by_kind(tokenizer):
    from tunesmith.data.render import render

    assert render(tokenizer, Example("x", text="abc")).labels[-1] == tokenizer.eos_token_id
