import pytest

from tunesmith.config import ModelConfig
from tunesmith.errors import TunesmithError
from tunesmith.models import load_model, load_tokenizer, pick_runtime, resolve_base, tunesmith_home


def test_tiny_is_a_cached_two_layer_llama_with_the_default_tokenizer(tiny_path, tokenizer):
    assert tiny_path.parent == tunesmith_home() / "models"
    assert resolve_base("tiny") == tiny_path
    model = load_model(tiny_path)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == len(tokenizer) == 49152
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template


def test_default_model_cache_is_a_complete_safetensors_folder():
    folder = resolve_base("smollm2-135m-instruct")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").stat().st_size > 500e6
    assert not list(folder.parent.glob(f".{folder.name}.tmp-*")), "no half-built cache left behind"
    tokenizer = load_tokenizer(folder)
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token == "<|im_end|>"


def test_a_plain_folder_is_used_as_is(tiny_path):
    assert resolve_base(str(tiny_path)) == tiny_path


def test_missing_paths_and_unreachable_hub_ids_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(TunesmithError, match="not found; give a Hugging Face model folder"):
        resolve_base(str(tmp_path / "nope"))
    with pytest.raises(TunesmithError, match="GGUF file .* not found"):
        resolve_base(str(tmp_path / "nope.gguf"))
    with pytest.raises(TunesmithError, match="holds no config.json"):
        resolve_base(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TunesmithError, match="not in the local cache and the hub is unreachable.*local folder"):
        resolve_base("someorg/some-model-that-is-not-here")


def test_cpu_runtime_refuses_bf16_and_qlora_with_the_field_named():
    assert pick_runtime(ModelConfig(device="cpu")).device == "cpu"
    with pytest.raises(TunesmithError, match="model.precision"):
        pick_runtime(ModelConfig(device="cpu", precision="bf16"))
    with pytest.raises(TunesmithError, match="model.quantization"):
        pick_runtime(ModelConfig(device="cpu", quantization="4bit"))
