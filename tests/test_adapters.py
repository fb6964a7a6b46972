import json

import pytest
import torch

from conftest import chat_rows, run_cli, write_jsonl, write_recipe
from stages.helpers import train
from tunesmith.adapters import adapter_base, load_trained, merge_adapter
from tunesmith.errors import TunesmithError
from tunesmith.models import load_tokenizer


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    write_jsonl(folder / "train.jsonl", chat_rows(16))
    # A high learning rate so the adapter moves the logits far from the base.
    train(write_recipe(folder, tuning={"method": "lora", "lora": {"r": 4, "alpha": 16, "dropout": 0.0}}),
          ["training.max_steps=4", "training.learning_rate=0.05"])
    return folder / "out"


def test_output_is_a_standard_peft_adapter_with_its_base(lora_run, tiny_path):
    config = json.loads((lora_run / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert config["base_model_name_or_path"] == str(tiny_path)
    assert adapter_base(lora_run).path == "tiny"
    for name in ("adapter_model.safetensors", "recipe.yaml", "metrics.jsonl", "loss.png", "summary.json",
                 "tokenizer.json", "chat_template.jinja"):
        assert (lora_run / name).is_file(), name


def test_chat_template_is_saved_and_renders_the_same(lora_run, tokenizer):
    saved = load_tokenizer(lora_run)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert saved.chat_template == tokenizer.chat_template
    assert saved.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_merged_model_equals_base_plus_adapter(lora_run, tmp_path):
    report = merge_adapter(lora_run, tmp_path / "merged")
    assert report.max_abs_diff < 1e-4
    with_adapter, tokenizer = load_trained(lora_run, device="cpu")
    merged, _ = load_trained(tmp_path / "merged", device="cpu")
    base, _ = load_trained("tiny", device="cpu")
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        a, b, c = (m.eval()(input_ids=ids).logits for m in (with_adapter, merged, base))
    assert float((a - b).abs().max()) < 1e-4
    assert float((a - c).abs().max()) > 1e-2  # the adapter really changed the model
    assert not (tmp_path / "merged" / "adapter_config.json").exists()


def test_merge_refuses_a_non_adapter_and_a_full_folder(lora_run, tmp_path, tiny_path):
    with pytest.raises(TunesmithError, match="no adapter_config.json here"):
        merge_adapter(tiny_path, tmp_path / "m")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(TunesmithError, match="folder is not empty"):
        merge_adapter(lora_run, tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_merge_command_prints_the_difference(lora_run, tmp_path, capsys):
    code, out, err = run_cli("merge", str(lora_run), "--out", str(tmp_path / "m"), capsys=capsys)
    assert code == 0, err
    assert "max |logit difference|" in out and (tmp_path / "m" / "model.safetensors").is_file()


def test_chat_and_generate_commands_answer_with_the_adapter(lora_run, tmp_path, capsys):
    code, out, err = run_cli("chat", "--model", str(lora_run), "--prompt", "Say the number 3.",
                             "--max-new-tokens", "8", capsys=capsys)
    assert code == 0, err
    assert out.strip()
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Say the number 1."}, {"instruction": "Say the number 2."}])
    code, _, err = run_cli("generate", "--model", str(lora_run), "--input", str(prompts), "--output",
                           str(tmp_path / "a.jsonl"), "--max-new-tokens", "6", capsys=capsys)
    assert code == 0, err
    answers = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [a["prompt"] for a in answers] == ["Say the number 1.", "Say the number 2."]
    assert all(isinstance(a["answer"], str) for a in answers)
