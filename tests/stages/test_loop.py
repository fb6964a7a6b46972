"""The loop's contracts: accumulation normalised by tokens, data order, step planning."""

import pytest
import torch

from conftest import chat_rows, write_jsonl
from tunesmith.config import TrainingConfig, TuningConfig
from tunesmith.data.formats import load_examples
from tunesmith.data.render import as_rows, render
from tunesmith.models import load_model
from tunesmith.stages.loop import Loop, micro_batch_rows, plan_steps
from tunesmith.tuning import apply_tuning


def first_step_gradients(tiny_path, tokenizer, tmp_path, micro, accumulation):
    rows_in = chat_rows(8)
    for i, row in enumerate(rows_in):  # unequal lengths make the normalisation matter
        row["output"] += " and more words" * (i % 4)
    loaded = load_examples([str(write_jsonl(tmp_path / "t.jsonl", rows_in))])
    rows = as_rows([render(tokenizer, e) for e in loaded.examples])
    torch.manual_seed(0)
    model = apply_tuning(load_model(tiny_path), TuningConfig(method="full"))
    training = TrainingConfig(max_steps=1, micro_batch_size=micro, gradient_accumulation=accumulation,
                              max_grad_norm=None, seed=3)
    loop = Loop(model, rows, [], training, tmp_path, tokenizer.pad_token_id, torch.device("cpu"))
    grads = {}
    loop.optimizer.register_step_pre_hook(
        lambda *_: grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    loop.run()
    return grads


def test_accumulated_micro_batches_give_the_gradient_of_the_whole_batch(tiny_path, tokenizer, tmp_path):
    whole = first_step_gradients(tiny_path, tokenizer, tmp_path / "a", micro=4, accumulation=1)
    split = first_step_gradients(tiny_path, tokenizer, tmp_path / "b", micro=1, accumulation=4)
    assert whole.keys() == split.keys()
    for name in whole:
        assert torch.allclose(whole[name], split[name], atol=1e-6, rtol=1e-4), name


def test_data_order_is_a_function_of_seed_and_epoch(tmp_path):
    rows = list(range(10))
    training = TrainingConfig(micro_batch_size=3, seed=1)
    plan = plan_steps(len(rows), training)
    assert plan.micro_batches_per_epoch == 4
    epoch0 = [micro_batch_rows(rows, i, training, 4) for i in range(4)]
    assert sorted(r for batch in epoch0 for r in batch) == rows  # every row once per epoch
    assert epoch0 == [micro_batch_rows(rows, i, training, 4) for i in range(4)]
    assert [micro_batch_rows(rows, i, training, 4) for i in range(4, 8)] != epoch0  # reshuffled next epoch


def test_plan_counts_steps_from_epochs_or_max_steps():
    assert plan_steps(10, TrainingConfig(micro_batch_size=2, gradient_accumulation=2, epochs=2)).total_steps == 5
    assert plan_steps(10, TrainingConfig(max_steps=7)).total_steps == 7


@pytest.mark.parametrize("vocab", [500, 9000])  # 9000: logits built in vocabulary blocks of 4096, 4096, 808
def test_chunked_cross_entropy_equals_the_plain_one(vocab):
    import torch.nn.functional as F

    from tunesmith.stages.loop import chunked_cross_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(32, vocab, bias=False)
    hidden = torch.randn(700, 32, requires_grad=True)
    targets = torch.randint(0, vocab, (700,))
    plain = F.cross_entropy(head(hidden), targets, reduction="sum") / 17  # scaled, as the loop divides by targets
    plain.backward()
    grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    chunked = chunked_cross_entropy(head, hidden, targets, chunk=128) / 17
    chunked.backward(retain_graph=True)
    assert float(chunked.detach()) == pytest.approx(float(plain.detach()), rel=1e-6)
    assert torch.allclose(hidden.grad, grads[0], atol=1e-6) and torch.allclose(head.weight.grad, grads[1], atol=1e-5)
    with pytest.raises(RuntimeError, match="differentiated twice"):  # its gradients are scaled in place: used up
        chunked.backward()


def test_the_loss_log_softmax_in_place_equals_torchs_and_the_logits_buffer_is_kept():
    """The fused loss runs log_softmax in place on CPU (the kernel reads a row before writing it) into a
    logits buffer kept across chunks and steps (no fresh 50 MB allocation, no page faults per chunk)."""
    from tunesmith.stages.loop import _head_logits, _log_softmax_

    torch.manual_seed(0)
    for shape in [(3, 49152), (256, 5000), (1, 7)]:
        x = torch.randn(shape) * 20
        assert torch.equal(_log_softmax_(x.clone()), torch.log_softmax(x, -1))
    weight, h = torch.randn(9000, 16), torch.randn(100, 16)
    first = _head_logits(h, weight, chunk=256)
    assert torch.allclose(first, h @ weight.t(), atol=1e-4)
    again = _head_logits(h[:60], weight, chunk=256)
    assert again.data_ptr() == first.data_ptr()  # the same buffer, a shorter view


def test_activation_checkpointing_changes_no_loss(tmp_path):
    from conftest import chat_rows, write_jsonl, write_recipe

    from stages.helpers import losses, train

    write_jsonl(tmp_path / "train.jsonl", chat_rows())
    recipe = write_recipe(tmp_path, tuning={"method": "full"})
    train(recipe, [f"output_dir={tmp_path / 'plain'}"])
    train(recipe, [f"output_dir={tmp_path / 'ckpt'}", "training.activation_checkpointing=true"])
    assert losses(tmp_path / "ckpt") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)


def test_the_gradient_norm_is_clip_grad_norms_and_clipping_in_the_fused_step_equals_clipping_first():
    from tunesmith.stages.loop import grad_l2_norm

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in [(300, 70), (70,), (5000, 3)]]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, twin in zip(params, twins):
        p.grad = torch.randn_like(p) * 3
        twin.grad = p.grad.clone()
    exact = sum(float((p.grad.double() ** 2).sum()) for p in params) ** 0.5
    norm = grad_l2_norm(twins)
    assert float(norm) == pytest.approx(exact, rel=1e-6)
    reference = torch.optim.AdamW(params, lr=0.1, fused=True)
    assert float(torch.nn.utils.clip_grad_norm_(params, 1.0)) == pytest.approx(float(norm), rel=1e-5)
    reference.step()
    fused = torch.optim.AdamW(twins, lr=0.1, fused=True)
    fused.grad_scale = torch.clamp((norm + 1e-6) / 1.0, min=1.0)  # what the loop does
    fused.step()
    for p, twin in zip(params, twins):
        assert torch.allclose(p, twin, atol=1e-6)


def test_a_tied_embedding_sends_sparse_rows_and_the_tied_weight_gets_the_same_dense_gradient(tiny_path):
    from torch.profiler import profile

    from tunesmith.stages.loop import _sparse_tied_embedding, loss_sum

    batch = {"input_ids": torch.randint(5, 500, (2, 12)), "position_ids": torch.arange(12).repeat(2, 1)}
    batch["labels"] = batch["input_ids"].clone()
    grads = []
    for sparse in (False, True):
        torch.manual_seed(0)
        model = load_model(tiny_path)
        assert _sparse_tied_embedding(model) if sparse else model.get_input_embeddings().weight is model.lm_head.weight
        weight = model.get_input_embeddings().weight
        with profile(record_shapes=True) as prof:
            for _ in range(2):  # two micro-batches: the second adds to the first's gradient
                loss_sum(model, batch).backward()
        assert not weight.grad.is_sparse
        grads.append(weight.grad)
        if sparse:  # the head's dense gradient becomes the leaf's .grad; the sparse rows are added to it in place
            vocab = list(weight.shape)
            assert not [e for e in prof.key_averages(group_by_input_shape=True)
                        if e.key == "aten::copy_" and e.input_shapes[:2] == [vocab, vocab]]
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    lora = apply_tuning(load_model(tiny_path), TuningConfig(method="lora"))
    assert not _sparse_tied_embedding(lora)  # a frozen embedding has no gradient to send
