import torch

from tunesmith.embeddings import Embedder, cached_embed, candidate_layers, model_fingerprint, pool, resolve_pooling
from tunesmith.models import load_backbone, load_tokenizer

TEXTS = ["a fine film", "the worst plot in years", "ok", "an enduring, warm and very funny story"]


def test_pooling_by_hand():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert pool(hidden, mask, "last").tolist() == [[2.0, 3.0], [10.0, 11.0]]
    assert pool(hidden, mask, "mean").tolist() == [[1.0, 2.0], [8.0, 9.0]]
    assert pool(hidden, mask, "cls").tolist() == [[0.0, 1.0], [6.0, 7.0]]


def test_auto_pooling_is_last_for_decoders_and_mean_for_encoders(tiny_path):
    from transformers import AutoConfig

    from tunesmith.models import resolve_base

    assert resolve_pooling("auto", AutoConfig.from_pretrained(tiny_path)) == "last"
    assert resolve_pooling("auto", AutoConfig.from_pretrained(resolve_base("minilm"))) == "mean"


def test_batched_sorted_embedding_equals_one_text_at_a_time(tiny_path):
    embedder = Embedder(load_backbone(tiny_path), load_tokenizer(tiny_path), "last", layer=-2, batch_size=3)
    together = embedder.embed(TEXTS)
    alone = torch.cat([embedder.embed([t]) for t in TEXTS])
    assert torch.allclose(together, alone, atol=1e-5)
    with torch.no_grad():
        batch = embedder.encode(TEXTS[:1])
        reference = embedder.model(**batch, output_hidden_states=True).hidden_states[-2][0, -1]
    assert torch.allclose(together[0], reference, atol=1e-5)


def test_cache_hits_and_content_changes_miss(tiny_path, tmp_path):
    embedder = Embedder(load_backbone(tiny_path), load_tokenizer(tiny_path), "mean")
    key = model_fingerprint(tiny_path)
    first = cached_embed(embedder, TEXTS, key, tmp_path)
    again = cached_embed(embedder, TEXTS, key, tmp_path)
    assert (first.hit, again.hit) == (False, True)
    assert torch.equal(first.vectors[-1], again.vectors[-1])
    changed = cached_embed(embedder, TEXTS[:-1] + ["a different last text"], key, tmp_path)
    assert not changed.hit and changed.paths[-1] != first.paths[-1]
    both = cached_embed(embedder, TEXTS, key, tmp_path, layers=[-1, 1])  # layer -1 cached, layer 1 computed
    assert not both.hit and torch.equal(both.vectors[-1], first.vectors[-1])
    assert cached_embed(embedder, TEXTS, key, tmp_path, layers=[1]).hit
    assert len(list(tmp_path.glob("*.safetensors"))) == 3 and not list(tmp_path.glob(".emb-*"))


def test_several_layers_in_one_pass_equal_one_layer_at_a_time(tiny_path):
    embedder = Embedder(load_backbone(tiny_path), load_tokenizer(tiny_path), "last", layer=1)
    stacked = embedder.embed(TEXTS, layers=[-1, 1, 0])
    assert stacked.shape[1] == 3
    assert torch.allclose(stacked[:, 1], embedder.embed(TEXTS), atol=1e-6)


def test_candidate_layers_span_the_upper_three_quarters():
    assert candidate_layers(30) == [-1, -4, -7, -10, -13, -16, -19, -23]
    assert candidate_layers(2) == [-1, -2]


def test_a_prompt_wraps_each_text_and_is_part_of_the_cache_key(tiny_path, tmp_path):
    plain = Embedder(load_backbone(tiny_path), load_tokenizer(tiny_path), "last")
    prompted = Embedder(plain.model, plain.tokenizer, "last", prompt="Review: {text}\nSentiment:")
    assert prompted.encode(["fun"])["input_ids"].tolist() == plain.encode(["Review: fun\nSentiment:"])["input_ids"].tolist()
    key = model_fingerprint(tiny_path)
    cached_embed(plain, TEXTS, key, tmp_path)
    assert not cached_embed(prompted, TEXTS, key, tmp_path).hit
