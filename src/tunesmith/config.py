"""The typed recipe: one YAML file, validated by pydantic, overridable with `key.sub=value`.

The recipe is the CLI: `tunesmith train RECIPE training.max_steps=3 model=tiny` reads the
YAML, applies the overrides, and validates the result. Every problem is reported as one
line naming the file, the line and the field, with a "did you mean" for misspelled keys.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunesmith.errors import TunesmithError, where

DEFAULT_MODEL = "smollm2-135m-instruct"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Which base to start from and how to hold it in memory."""

    path: str = Field(DEFAULT_MODEL, description="built-in name (smollm2-135m-instruct, tiny), HF folder, hub id or .gguf file")
    gguf_file: str | None = Field(None, description="GGUF file name inside `path` when `path` is a folder")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU")
    quantization: Literal["none", "4bit"] = Field("none", description="4bit: QLoRA through bitsandbytes (CUDA only)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        # `model: tiny` is the common case; it means `model: {path: tiny}`.
        return {"path": value} if isinstance(value, str) else value


class DataConfig(_Strict):
    """Where the examples are and how to read them."""

    train: list[str] = Field(..., description="file(s): .jsonl .json .csv .parquet or a `datasets` folder")
    validation: list[str] | None = Field(None, description="held-out file(s); default: split validation_fraction off train")
    validation_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    test: list[str] | None = Field(None, description="classify: file(s) scored once at the end (accuracy, F1, calibration)")
    format: Literal["auto", "text", "alpaca", "messages", "classification"] = "auto"
    text_field: str = Field("text", description="column holding raw text (formats text and classification)")
    label_field: str = Field("label", description="classify: column holding the label")
    label_type: Literal["auto", "int", "str"] = Field("auto", description="classify: labels are ints (class ids) or strings (names)")
    labels_file: str | None = Field(None, description="classify: JSON of class names: a list, or {id: name}")
    max_rows: int | None = Field(None, gt=0, description="read at most this many training rows")
    skip_bad_rows: bool = Field(False, description="skip invalid rows (and count them) instead of stopping")
    overlong: Literal["truncate", "error"] = Field("truncate", description="samples longer than training.max_length")

    @field_validator("train", "validation", "test", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("train")
    @classmethod
    def _not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one training file")
        return value


class LoraConfig(_Strict):
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    dora: bool = False


class TuningConfig(_Strict):
    """What is trainable."""

    method: Literal["none", "full", "freeze", "lora"] = Field("lora", description="none: the base stays frozen (classify)")
    freeze_layers: int = Field(0, ge=0, description="freeze: freeze the embeddings and the bottom N blocks")
    top_layers: int = Field(0, ge=0, description="freeze: train only the top N blocks (and the final norm)")
    trainable_modules: list[str] = Field(default_factory=list, description="freeze: train only parameters matching these names")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    init_adapter: str | None = Field(None, description="lora: continue training this adapter (the output folder of a "
                                     "LoRA run) instead of a new one; dpo/rl: its frozen copy is the reference")

    @model_validator(mode="after")
    def _freeze_needs_a_rule(self) -> TuningConfig:
        rules = sum(bool(x) for x in (self.freeze_layers, self.top_layers, self.trainable_modules))
        if self.method == "freeze" and rules != 1:
            raise ValueError("method freeze needs exactly one of freeze_layers > 0, top_layers > 0 or trainable_modules")
        if self.init_adapter and self.method != "lora":
            raise ValueError(f"init_adapter continues a LoRA adapter; set method lora (got {self.method})")
        return self


class TrainingConfig(_Strict):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs")
    learning_rate: float = Field(2e-4, gt=0)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    micro_batch_size: int = Field(4, gt=0)
    gradient_accumulation: int = Field(1, gt=0)
    max_length: int = Field(512, gt=1)
    packing: bool = Field(False, description="pack samples into rows of max_length (attention never crosses samples)")
    seed: int = 42
    eval_every: int | None = Field(None, gt=0, description="evaluate every N optimizer steps (and always before and after)")
    eval_max_batches: int | None = Field(None, gt=0, description="cap evaluation at N micro-batches")
    save_every: int | None = Field(None, gt=0, description="checkpoint every N optimizer steps")
    keep_checkpoints: int = Field(2, gt=0)
    threads: int | None = Field(None, gt=0, description="torch CPU threads; default: all cores")
    parallel: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="with --nproc: ddp keeps a whole model on every process; fsdp shards weights, gradients "
        "and optimizer state across them (full fine-tuning of a model too big for one device); deepspeed hands "
        "gradient sync and the optimizer step to DeepSpeed ZeRO (stage 1 or 2; pip install deepspeed)")
    deepspeed: str | None = Field(None, description="parallel deepspeed: a DeepSpeed JSON config whose ZeRO, offload and "
                                  "communication settings pass through (batch sizes, clipping, optimizer and schedule "
                                  "come from this recipe); default: ZeRO stage 2")
    activation_checkpointing: bool = Field(False, description="recompute each block's activations in the backward pass "
                                           "instead of keeping them: less memory, ~30% more compute")
    compile: bool = Field(False, description="torch.compile each transformer block (compiled once, reused by every "
                          "layer; the first steps wait for the compiler): faster steps and less activation memory")


class ClassifierConfig(_Strict):
    """stage classify: how texts become vectors and which head learns the labels."""

    pooling: Literal["auto", "last", "mean", "cls"] = Field("auto", description="auto: last token for decoders, mean for encoders")
    layer: int | Literal["auto"] = Field(-1, description="hidden layer to pool: -1 the last, -2 the one below, 0 the "
                                               "embeddings; auto: try several in one pass, keep the best on validation")
    max_length: int = Field(256, gt=1, description="tokens per text when embedding")
    prompt: str | None = Field(None, description="wrap each text, e.g. 'Review: {text}\\nSentiment:' (decoders pool "
                                                 "the last token, so a task prompt focuses it)")
    embed_batch_size: int = Field(32, gt=0)
    cache_dir: str | None = Field(None, description="embedding cache folder (default $TUNESMITH_HOME/embeddings)")
    head: Literal["linear", "mlp"] = "linear"
    hidden_sizes: list[int] = Field(default_factory=lambda: [256], description="mlp: sizes of the hidden layers")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    epochs: int = Field(100, gt=0, description="most epochs for the head (early stopping usually ends sooner)")
    patience: int = Field(5, gt=0, description="stop after this many epochs without a better validation loss")
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(64, gt=0)
    class_weights: Literal["none", "balanced"] = Field("none", description="balanced: weight classes by inverse frequency")
    finetune_epochs: int = Field(1, gt=0, description="tuning lora/freeze: epochs of end-to-end training after the head")
    finetune_learning_rate: float = Field(1e-4, gt=0)

    @field_validator("prompt")
    @classmethod
    def _has_slot(cls, value: str | None) -> str | None:
        if value is not None and "{text}" not in value:
            raise ValueError("the prompt needs a {text} slot where the text goes")
        return value

    @field_validator("hidden_sizes")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or any(v <= 0 for v in value):
            raise ValueError("give one or more positive layer sizes")
        return value


class RewardConfig(_Strict):
    """stage reward: a scalar head scores (prompt, reply); Bradley-Terry loss on preference pairs."""

    center_rewards: float = Field(0.0, ge=0, description="weight of a penalty on (r_chosen + r_rejected)^2 that keeps "
                                                         "scores centred on 0 (0.01 is common; 0 turns it off)")


class DpoConfig(_Strict):
    """stage dpo: direct preference optimisation against a frozen reference."""

    loss: Literal["sigmoid", "ipo"] = Field("sigmoid", description="sigmoid: DPO; ipo: squared loss on length-normalised "
                                                                    "log-ratios (robust to deterministic preferences)")
    beta: float = Field(0.1, gt=0, description="strength of the pull toward the reference (IPO's tau)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="sigmoid: assumed share of flipped labels (cDPO)")


class RlConfig(_Strict):
    """stage rl: sample replies, score them, and push the policy toward higher reward with a KL leash."""

    algorithm: Literal["grpo", "rloo"] = Field("grpo", description="grpo: group-normalised advantages, KL in the loss; "
                                                                   "rloo: leave-one-out baseline, KL in the reward")
    reward_model: str | None = Field(None, description="output folder of a `stage: reward` run")
    reward_function: str | None = Field(None, description="python reward instead: 'module:function' or "
                                        "'file.py:function', called as f(prompts, completions) -> list of floats")
    samples_per_prompt: int = Field(4, ge=2, description="replies sampled per prompt (the group the baseline comes from)")
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, description="sampling temperature (> 0: the group needs different replies)")
    top_p: float = Field(1.0, description="nucleus sampling mass, in (0, 1]")
    kl_coef: float = Field(0.05, ge=0, description="weight of the KL penalty to the reference")
    clip_range: float = Field(0.2, gt=0, lt=1, description="PPO clip on the probability ratio")
    updates_per_batch: int = Field(1, gt=0, description="optimizer steps on each batch of samples (PPO epochs); "
                                   "above 1 the ratio moves off 1 and clipping engages")
    scale_rewards: bool = Field(True, description="grpo: divide advantages by the group's reward std")
    sample_every: int = Field(10, gt=0, description="log sample replies every N steps (samples.jsonl)")
    eval_prompts: int = Field(16, ge=0, description="held-out prompts answered greedily to measure mean reward")

    @field_validator("temperature")
    @classmethod
    def _sampling(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be > 0: at temperature 0 every sample of a prompt is the same reply, so "
                             "advantages are all 0 and nothing is learned")
        return value

    @field_validator("top_p")
    @classmethod
    def _mass(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError("must be in (0, 1]")
        return value

    @field_validator("reward_function")
    @classmethod
    def _import_path(cls, value: str | None) -> str | None:
        if value is not None and (value.count(":") != 1 or not all(value.split(":"))):
            raise ValueError("write it as 'package.module:function' or 'path/to/file.py:function'")
        return value

    @model_validator(mode="after")
    def _one_reward(self) -> RlConfig:
        if (self.reward_model is None) == (self.reward_function is None):
            raise ValueError("give exactly one of reward_model (a trained reward model) or reward_function")
        return self


class Recipe(_Strict):
    """A whole run: base model, stage, data, what is trainable, how to train, where results go."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    stage: Literal["pretrain", "sft", "classify", "reward", "dpo", "rl"] = "sft"
    data: DataConfig
    tuning: TuningConfig = Field(default_factory=TuningConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    rl: RlConfig | None = Field(None, description="stage rl: required")
    output_dir: str

    @model_validator(mode="before")
    @classmethod
    def _classify_defaults_to_a_frozen_base(cls, value: Any) -> Any:
        # Repurposing starts from frozen embeddings; other stages start from LoRA.
        if isinstance(value, dict) and value.get("stage") == "classify" and "method" not in (value.get("tuning") or {}):
            value = {**value, "tuning": {**(value.get("tuning") or {}), "method": "none"}}
        return value

    @model_validator(mode="after")
    def _stage_fits_tuning(self) -> Recipe:
        if self.tuning.method == "none" and self.stage != "classify":
            raise ValueError(f"tuning.method none trains nothing in stage {self.stage}; use full, freeze or lora")
        if self.tuning.method == "full" and self.stage == "classify":
            raise ValueError("stage classify trains a head on a frozen base (none), with LoRA (lora) or top layers (freeze)")
        if self.training.parallel == "fsdp" and self.tuning.method not in ("full", "freeze"):
            raise ValueError("training.parallel fsdp shards a fully trained model; LoRA trains a few MB of weights, "
                             "keep parallel ddp")
        if self.training.compile and self.stage in ("rl", "classify"):
            raise ValueError(f"training.compile applies to pretrain, sft, reward and dpo; stage {self.stage} spends its "
                             "time in generation or cached embeddings, where recompiling per length would not pay")
        if self.training.compile and self.training.parallel != "ddp":
            raise ValueError(f"training.compile is not combined with parallel {self.training.parallel} yet; use parallel "
                             "ddp or compile false")
        if self.training.deepspeed and self.training.parallel != "deepspeed":
            raise ValueError("training.deepspeed names a DeepSpeed config; set training.parallel deepspeed to use it")
        if self.training.parallel == "deepspeed":
            from tunesmith.distributed import deepspeed_config

            deepspeed_config(self.training)  # the file is read and checked before anything runs
        if self.stage == "rl" and self.rl is None:
            raise ValueError("stage rl needs an rl section naming reward_model or reward_function")
        if self.stage != "rl" and self.rl is not None:
            raise ValueError(f"the rl section only applies to stage rl (this recipe is stage {self.stage})")
        if self.tuning.init_adapter and self.stage in ("reward", "classify"):
            raise ValueError(f"stage {self.stage} puts a new head on the base; init_adapter applies to pretrain, sft, dpo, rl")
        if self.stage == "rl" and self.rl.max_new_tokens >= self.training.max_length:
            raise ValueError(f"rl.max_new_tokens ({self.rl.max_new_tokens}) must leave room for the prompt within "
                             f"training.max_length ({self.training.max_length})")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --- reading a recipe -------------------------------------------------------------------

def load_recipe(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> Recipe:
    """Read a YAML recipe (or start from `base`), apply `key.sub=value` overrides, validate.

    Data paths written in the recipe are relative to the recipe file, so a recipe works from
    any working directory; paths given as overrides are relative to the working directory.
    """
    lines: dict[tuple[str, ...], int] = {}
    if path is not None:
        path = Path(path)
        raw, lines = read_yaml_mapping(path, "recipe", "see examples/", "model, stage, data, training")
        _resolve_data_paths(raw, path.parent)
    else:
        raw = dict(base or {})
    from_cli: set[tuple[str, ...]] = set()
    for item in overrides:
        keys = _apply_override(raw, item)
        from_cli.add(keys)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise TunesmithError(_explain(exc, path, lines, from_cli)) from None


# --- chained recipes ------------------------------------------------------------------------

CHAIN_SHARED = ("model", "tuning", "training")  # chain-level sections every stage inherits (a stage's own values win)
STEP_KINDS = ("pretrain", "sft", "classify", "reward", "dpo", "rl", "export")


@dataclass
class ChainStep:
    name: str
    kind: str  # a recipe stage, or "export" (merge the policy adapter into its base)
    output_dir: Path
    recipe: Recipe | None  # None for export
    source: str | None = None  # export: the adapter folder it merges


@dataclass
class Chain:
    path: Path
    output_dir: Path
    steps: list[ChainStep]


def is_chain(path: str | Path) -> bool:
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and "stages" in raw


def load_chain(path: str | Path, overrides: list[str] = ()) -> Chain:
    """A recipe whose `stages:` run in order, each starting from the previous stage's artifact.

    Each stage's folder is `output_dir/NN-name`. The policy flows down the chain: after a LoRA
    stage the next LoRA stage continues that adapter (`tuning.init_adapter`); after a full or
    frozen-layer stage the next stage starts from that model (`model.path`); `export` merges the
    current adapter into its base. A reward stage's model feeds the next rl stage that names no
    reward. Overrides `stages.N.key=value` change one stage, `output_dir=` the chain's folder; any other
    override applies to every stage."""
    path = Path(path)
    raw, lines = read_yaml_mapping(path, "chained recipe", "see examples/chain_rlhf.yaml", "model, output_dir, stages")
    own = [o for o in overrides if o.partition("=")[0].strip().split(".")[0] in ("stages", "output_dir")]
    every = [o for o in overrides if o not in own]
    for item in own:
        _apply_override(raw, item)
    unknown = sorted(set(raw) - {"stages", "output_dir", *CHAIN_SHARED})
    if unknown:
        raise TunesmithError(f"{where(path, lines.get((unknown[0],)))}: {unknown[0]}: not a chain key; a chained recipe "
                             f"has {', '.join(('stages', 'output_dir', *CHAIN_SHARED))}; put stage settings under a stage")
    stages = raw.get("stages")
    if not isinstance(stages, list) or not stages:
        raise TunesmithError(f"{where(path, lines.get(('stages',)))}: stages: give a list of stages (each a recipe "
                             "without model and output_dir)")
    if not isinstance(raw.get("output_dir"), str):
        raise TunesmithError(f"{where(path, lines.get(('output_dir',)))}: output_dir: required (each stage writes a subfolder)")
    out = Path(raw["output_dir"])
    base_model = raw.get("model", DEFAULT_MODEL)
    policy: tuple[str, str] | None = None  # ("adapter" | "model", folder) of the latest trained policy
    reward_model: str | None = None
    steps, names = [], set()
    for i, step in enumerate(stages):
        at = where(path, lines.get(("stages", str(i))))
        if not isinstance(step, dict) or "stage" not in step:
            raise TunesmithError(f"{at}: stages.{i}: each stage is a mapping with at least `stage:` "
                                 f"({', '.join(STEP_KINDS)})")
        for key in ("model", "output_dir"):
            if key in step:
                raise TunesmithError(f"{where(path, lines.get(('stages', str(i), key)))}: stages.{i}.{key}: set once for "
                                     f"the whole chain (stage folders are output_dir/NN-name)")
        kind, name = step["stage"], str(step.get("name") or step["stage"])
        if kind not in STEP_KINDS:
            raise TunesmithError(f"{where(path, lines.get(('stages', str(i), 'stage')))}: stages.{i}.stage: unknown "
                                 f"stage {kind!r}; one of {', '.join(STEP_KINDS)}")
        if name in names:
            raise TunesmithError(f"{at}: stages.{i}.name: {name!r} is used twice; give each stage its own name")
        names.add(name)
        folder = out / f"{i + 1:02d}-{name}"
        if kind == "export":
            if policy is None or policy[0] != "adapter":
                raise TunesmithError(f"{at}: stages.{i}: export merges a LoRA adapter into its base; no LoRA stage comes "
                                     "before it")
            steps.append(ChainStep(name, kind, folder, None, policy[1]))
            policy = ("model", str(folder))
            continue
        merged = {k: v for k, v in step.items() if k != "name"}
        for key in CHAIN_SHARED:
            if key in raw and key != "model":
                merged[key] = _deep_merge(raw[key], merged.get(key) or {})
        merged["model"] = base_model
        merged["output_dir"] = str(folder)
        _resolve_data_paths(merged, path.parent)  # before overrides: theirs are relative to the working directory
        for item in every:
            _apply_override(merged, item)
        method = (merged.get("tuning") or {}).get("method", "none" if kind == "classify" else "lora")
        if policy and kind in ("pretrain", "sft", "dpo", "rl"):
            if policy[0] == "adapter":
                if method != "lora":
                    raise TunesmithError(f"{at}: stages.{i}: trains {method} after a LoRA stage; add `- stage: export` "
                                         "before it to merge the adapter into the base first")
                merged.setdefault("tuning", {}).setdefault("init_adapter", policy[1])
            else:
                merged["model"] = _with_path(merged["model"], policy[1])
        elif policy and policy[0] == "model":  # reward and classify start from the latest whole model
            merged["model"] = _with_path(merged["model"], policy[1])
        if kind == "rl":
            rl = merged.setdefault("rl", {})
            if isinstance(rl, dict) and not rl.get("reward_model") and not rl.get("reward_function"):
                if reward_model is None:
                    raise TunesmithError(f"{at}: stages.{i}: rl needs a reward: put a reward stage before it, or set "
                                         "rl.reward_model / rl.reward_function")
                rl["reward_model"] = reward_model
        try:
            recipe = Recipe.model_validate(merged)
        except ValidationError as exc:
            raise TunesmithError(_explain_step(exc, path, lines, i)) from None
        steps.append(ChainStep(name, kind, folder, recipe))
        if kind == "reward":
            reward_model = str(folder)
        elif kind in ("pretrain", "sft", "dpo", "rl"):
            policy = ("adapter" if recipe.tuning.method == "lora" else "model", str(folder))
    return Chain(path, out, steps)


def _deep_merge(shared: Any, own: Any) -> Any:
    if isinstance(shared, dict) and isinstance(own, dict):
        return {**shared, **{k: _deep_merge(shared.get(k), v) for k, v in own.items()}}
    return own


def _with_path(model: Any, folder: str) -> dict:
    settings = dict(model) if isinstance(model, dict) else {}
    settings["path"] = folder
    settings.pop("gguf_file", None)
    return settings


def _explain_step(exc: ValidationError, path: Path, lines: dict, index: int) -> str:
    errors = exc.errors()
    first = dict(errors[0])
    loc = tuple(str(p) for p in first["loc"])
    first["loc"] = ("stages", str(index), *loc)
    message = _explain_one(first, path, lines, set())
    # Keys inherited from the chain level point at their own lines when the stage does not set them.
    if (("stages", str(index), *loc[:1]) not in lines) and (loc[:1] in lines):
        first["loc"] = loc
        message = _explain_one(first, path, lines, set()).replace(f": {'.'.join(loc)}:", f": stages.{index}: {'.'.join(loc)}:", 1)
    extra = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return message + extra


def read_yaml_mapping(path: Path, what: str, where_to_look: str, keys: str) -> tuple[dict, dict[tuple[str, ...], int]]:
    """A YAML file that must hold a mapping, and the line of each key; every problem is one line naming the file."""
    if not path.is_file():
        raise TunesmithError(f"{path}: {what} not found; give the path of a YAML {what} ({where_to_look})")
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text) or {}
        lines = _key_lines(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise TunesmithError(f"{where(path, mark.line + 1 if mark else None)}: not valid YAML "
                             f"({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise TunesmithError(f"{path}: a {what} is a YAML mapping with keys like {keys}")
    return raw, lines


def _apply_override(raw: dict, item: str) -> tuple[str, ...]:
    if "=" not in item:
        raise TunesmithError(f"override '{item}': write it as key.sub=value, e.g. training.max_steps=3")
    key, _, value_text = item.partition("=")
    keys = tuple(k for k in key.strip().split(".") if k)
    if not keys:
        raise TunesmithError(f"override '{item}': the key is empty")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        value = value_text
    node = raw
    for depth, k in enumerate(keys[:-1]):
        if isinstance(node, list):  # stages.2.training.max_steps
            if not k.isdigit() or int(k) >= len(node):
                raise TunesmithError(f"override '{item}': {k!r} is not an index of the list here (0-{len(node) - 1})")
            node = node[int(k)]
            continue
        child = node.get(k)
        if isinstance(child, list):
            node = child
            continue
        if k == "model" and depth == 0 and isinstance(child, str):
            child = {"path": child}
        if not isinstance(child, dict):
            child = {}
        node[k] = child
        node = child
    if keys[0] == "data" and keys[-1] in ("train", "validation", "test") and len(keys) == 2 and value:
        value = [str(Path(v).expanduser()) for v in ([value] if isinstance(value, str) else value)]
    node[keys[-1]] = value
    return keys


def _resolve_data_paths(raw: dict, folder: Path) -> None:
    # Inputs (data, a reward function's file) are relative to the recipe; run artifacts (output_dir,
    # init_adapter, reward_model) to the working directory, where the runs that made them wrote them.
    rl = raw.get("rl")
    if isinstance(rl, dict):
        function = rl.get("reward_function")
        if isinstance(function, str) and function.partition(":")[0].endswith(".py"):
            file, _, name = function.partition(":")
            rl["reward_function"] = f"{_relative_to(folder, file)}:{name}"
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    for key in ("train", "validation", "test"):
        value = data.get(key)
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            data[key] = [str(_relative_to(folder, v)) if isinstance(v, str) else v for v in value]
    if isinstance(data.get("labels_file"), str):
        data["labels_file"] = str(_relative_to(folder, data["labels_file"]))


def _relative_to(folder: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (folder / p)


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path in the YAML text to the 1-based line it is written on."""
    out: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                keys = prefix + (str(key_node.value),)
                out[keys] = key_node.start_mark.line + 1
                walk(value_node, keys)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                out[prefix + (str(i),)] = item.start_mark.line + 1
                walk(item, prefix + (str(i),))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return out


def _explain(exc: ValidationError, path: Path | None, lines: dict, from_cli: set) -> str:
    errors = exc.errors()
    messages = [_explain_one(err, path, lines, from_cli) for err in errors]
    extra = f" (and {len(messages) - 1} more problem{'s' if len(messages) > 2 else ''})" if len(messages) > 1 else ""
    return messages[0] + extra


def _explain_one(err: dict, path: Path | None, lines: dict, from_cli: set) -> str:
    loc = tuple(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[")))
    # pydantic puts union branches into loc (e.g. 'list[str]'); keep only real keys.
    loc = tuple(p for p in loc if "[" not in p)
    field = ".".join(loc) or "recipe"
    if any(loc[: len(k)] == k or k[: len(loc)] == loc for k in from_cli):
        source = "command-line override"
    elif path is not None:
        line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
        source = where(path, line)
    else:
        source = "recipe"
    kind = err["type"]
    if kind == "extra_forbidden":
        known = _known_keys(loc[:-1])
        guess = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
        hint = f"; did you mean '{guess[0]}'?" if guess else f"; known keys here: {', '.join(known)}"
        return f"{source}: {field}: unknown key{hint}"
    if kind == "missing":
        return f"{source}: {field}: required but missing"
    message = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    shown = f" (got {value!r})" if value is not None and not isinstance(value, (dict, list)) else ""
    return f"{source}: {field}: {message}{shown}"


def _known_keys(loc: tuple[str, ...]) -> list[str]:
    if loc[:1] == ("stages",):  # a stage of a chained recipe is a recipe
        loc = loc[2:]
    model: type[BaseModel] | None = Recipe
    for key in loc:
        field = model.model_fields.get(key) if model else None
        annotation = field.annotation if field else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return list(model.model_fields) if model else []
