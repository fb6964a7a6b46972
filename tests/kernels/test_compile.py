"""`training.compile`: the compiled blocks train to the same losses as eager."""

import pytest

from conftest import chat_rows, write_jsonl, write_recipe


@pytest.mark.slow
@pytest.mark.parametrize("tuning", [{"method": "full"},
                                    {"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
                                    # the fused dropout's backward is traced as tensor ops under compile
                                    {"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.1}}])
def test_compiled_training_gives_the_eager_losses(tmp_path, tuning):
    import torch._dynamo

    from stages.helpers import losses, train

    write_jsonl(tmp_path / "train.jsonl", chat_rows())
    recipe = write_recipe(tmp_path, tuning=tuning)
    train(recipe, [f"output_dir={tmp_path / 'eager'}", "training.packing=true"])
    torch._dynamo.reset()
    train(recipe, [f"output_dir={tmp_path / 'compiled'}", "training.packing=true", "training.compile=true"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the blocks did go through the compiler
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)


@pytest.mark.parametrize("override, words", [("stage=rl", "applies to pretrain"),
                                             ("training.parallel=fsdp", "not combined with parallel fsdp")])
def test_compile_is_refused_where_it_is_not_supported(tmp_path, capsys, override, words):
    from conftest import run_cli

    write_jsonl(tmp_path / "train.jsonl", chat_rows())
    recipe = write_recipe(tmp_path, tuning={"method": "full"})
    code, _, err = run_cli("train", str(recipe), "training.compile=true", override, capsys=capsys)
    assert code == 2 and words in err and "Traceback" not in err
