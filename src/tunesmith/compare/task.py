"""The task file of `tunesmith compare`: base model, data, task type, metric, documents, budget, routes.

A typed pydantic model like the recipe (unknown keys are errors with a suggestion). Every problem is one
line naming `file:line: field`. Paths are relative to the task file.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunesmith.config import ModelConfig, read_yaml_mapping
from tunesmith.errors import TunesmithError, where

TaskType = Literal["classification", "instruction", "qa_with_documents"]
ROUTES = ("zero_shot", "few_shot", "rag", "classifier_frozen", "classifier_lora", "lora_sft", "freeze", "full", "hybrid")
OPT_IN = ("freeze", "full")  # they train (and store) the most: run only when the task file asks
TRAINED = ("classifier_frozen", "classifier_lora", "lora_sft", "freeze", "full", "hybrid")  # routes that change weights
RETRIEVAL = ("rag", "hybrid")
METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "macro_f1"),
    "instruction": ("rouge_l", "token_f1", "eval_loss"),
    "qa_with_documents": ("answer_accuracy", "recall_at_k"),
}
LOWER_IS_BETTER = frozenset({"eval_loss"})
DEFAULT_PROMPT = "{text}\n\nAnswer with one of: {labels}."


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Budget(_Strict):
    """How much training a trained route gets: optimizer steps, or minutes (timed, then turned into steps)."""

    max_steps: int | None = Field(None, gt=0)
    minutes: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_limit(self) -> Budget:
        if (self.max_steps is None) == (self.minutes is None):
            raise ValueError("give exactly one of max_steps or minutes")
        return self


class DataSpec(_Strict):
    """Where the examples are. Splits not given as files are split off train (seeded)."""

    train: list[str] | None = Field(None, description="classification / instruction: training file(s)")
    validation: list[str] | None = Field(None, description="held-out file(s); default: validation_fraction of train")
    test: list[str] | None = Field(None, description="the test set every route is scored on; default: test_fraction of train")
    validation_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    max_train: int | None = Field(None, gt=0, description="at most this many training examples (a seeded sample)")
    max_validation: int | None = Field(None, gt=0)
    max_test: int | None = Field(None, gt=0, description="at most this many test examples (a seeded sample)")
    seed: int = 0
    text_field: str = Field("text", description="classification: column with the text")
    label_field: str = Field("label", description="classification: column with the label")
    labels_file: str | None = Field(None, description="classification: JSON of class names (a list, or {id: name})")
    queries: str | None = Field(None, description="qa_with_documents: JSONL id, text[, split]")
    answers: str | None = Field(None, description="qa_with_documents: JSONL query_id, final_decision (yes/no/maybe)")
    qrels: str | None = Field(None, description="qa_with_documents: JSONL query_id, doc_id[, score] (retrieval recall)")
    train_split: str | None = Field(None, description="qa_with_documents: queries of this split are the training pool")
    test_split: str | None = Field(None, description="qa_with_documents: queries of this split are the test set")

    @field_validator("train", "validation", "test", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class Retrieval(_Strict):
    embedder: str = Field("minilm", description="retrieval encoder (also picks few-shot examples)")
    chunk_tokens: int = Field(200, ge=16)
    overlap: int = Field(40, ge=0)


class Prompting(_Strict):
    batch_size: int = Field(8, gt=0, description="prompts per forward pass")
    max_new_tokens: int = Field(128, gt=0, description="instruction: longest generated answer")


class ZeroShotRoute(Prompting):
    pass


class FewShotRoute(Prompting):
    k: int = Field(4, gt=0, description="demonstrations per prompt, the most similar training examples")


class RagRoute(Prompting):
    k: int = Field(3, gt=0, description="retrieved chunks per prompt")
    retriever: Literal["dense", "bm25", "hybrid"] = "hybrid"
    context_tokens: int = Field(768, ge=64, description="tokens of retrieved context at most")


class TrainedRoute(Prompting):
    budget: Budget | None = Field(None, description="default: the task's budget")
    learning_rate: float = Field(2e-4, gt=0)
    micro_batch_size: int = Field(8, gt=0)
    gradient_accumulation: int = Field(1, gt=0)
    max_length: int = Field(512, gt=1)
    seed: int = 0


class LoraSftRoute(TrainedRoute):
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)


class FreezeRoute(TrainedRoute):
    learning_rate: float = Field(5e-5, gt=0)
    top_layers: int = Field(2, gt=0, description="train only the top N blocks (and the final norm)")


class FullRoute(TrainedRoute):
    learning_rate: float = Field(2e-5, gt=0)


class ClassifierFrozenRoute(_Strict):
    layer: int | Literal["auto"] = Field(-1, description="hidden layer to pool; auto tries several on validation")
    head: Literal["linear", "mlp"] = "linear"
    max_length: int = Field(128, gt=1)
    batch_size: int = Field(32, gt=0, description="texts per embedding batch")


class ClassifierLoraRoute(ClassifierFrozenRoute):
    budget: Budget | None = Field(None, description="default: the task's budget; steps x micro_batch_size texts are tuned")
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    learning_rate: float = Field(1e-4, gt=0)
    micro_batch_size: int = Field(8, gt=0)
    seed: int = 0


class HybridRoute(RagRoute):
    """The lora_sft route's adapter answering with retrieved context."""


SETTINGS: dict[str, type[BaseModel]] = {
    "zero_shot": ZeroShotRoute, "few_shot": FewShotRoute, "rag": RagRoute, "classifier_frozen": ClassifierFrozenRoute,
    "classifier_lora": ClassifierLoraRoute, "lora_sft": LoraSftRoute, "freeze": FreezeRoute, "full": FullRoute,
    "hybrid": HybridRoute,
}


class Routes(_Strict):
    """The routes to run, each with its settings; a route not listed does not run."""

    zero_shot: ZeroShotRoute | None = None
    few_shot: FewShotRoute | None = None
    rag: RagRoute | None = None
    classifier_frozen: ClassifierFrozenRoute | None = None
    classifier_lora: ClassifierLoraRoute | None = None
    lora_sft: LoraSftRoute | None = None
    freeze: FreezeRoute | None = None
    full: FullRoute | None = None
    hybrid: HybridRoute | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        # `routes: [zero_shot, lora_sft]` and `zero_shot:` (no settings) both mean default settings.
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = {name: {} for name in value}
        if isinstance(value, dict):
            value = {k: ({} if v is None else v) for k, v in value.items()}
        return value

    def listed(self) -> list[str]:
        return [name for name in ROUTES if name in self.model_fields_set]


class Task(_Strict):
    """What to compare: one base, one task, one test set, every route that applies."""

    name: str | None = Field(None, description="title of the report (default: the task file's name)")
    model: ModelConfig = Field(default_factory=ModelConfig)
    type: TaskType
    data: DataSpec
    documents: list[str] | None = Field(None, description="files or folders for retrieval (rag, hybrid)")
    retrieval: Retrieval = Field(default_factory=Retrieval)
    prompt: str | None = Field(None, description="classification: the user turn, with a {text} slot and "
                                                 f"optionally {{labels}} (default {DEFAULT_PROMPT!r})")
    metric: str | None = Field(None, description="the quality metric routes are ranked by (default per type)")
    budget: Budget = Field(default_factory=lambda: Budget(max_steps=50), description="default budget of trained routes")
    data_changes: Literal["often", "rarely"] = Field("rarely", description="often: knowledge belongs in retrieval")
    per_user_context: bool = Field(False, description="true: each user brings own context (retrieval, not weights)")
    routes: Routes | None = Field(None, description="routes to run (default: every one that applies, but the opt-in)")
    threads: int | None = Field(None, gt=0, description="torch CPU threads in each route's process (default: all "
                                "cores); on a machine shared with other jobs fewer threads avoid oversubscription. "
                                "Changes speed and float rounding, not what is computed: not part of the cache key")
    bootstrap_resamples: int = Field(1000, ge=100)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    output_dir: str | None = Field(None, description="report folder (default: <task file name>_report beside it)")

    @field_validator("documents", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("prompt")
    @classmethod
    def _has_slot(cls, value: str | None) -> str | None:
        if value is not None and "{text}" not in value:
            raise ValueError("the prompt needs a {text} slot where the text goes")
        return value

    @property
    def primary_metric(self) -> str:
        return self.metric or METRICS[self.type][0]

    @property
    def classification_prompt(self) -> str:
        return self.prompt or DEFAULT_PROMPT


# --- which routes run ------------------------------------------------------------------------

def not_applicable(task: Task, name: str) -> str | None:
    """Why a route cannot run on this task (None when it can)."""
    if name in ("classifier_frozen", "classifier_lora") and task.type != "classification":
        return "classifier repurposing needs a fixed label set (classification tasks only)"
    if name in RETRIEVAL and not task.documents:
        return "no documents to retrieve from (task field `documents`)"
    if name == "hybrid" and "lora_sft" not in planned_names(task):
        return "the hybrid is the lora_sft route's adapter with retrieval; add lora_sft"
    return None


def planned_names(task: Task) -> list[str]:
    if task.routes is not None:
        return task.routes.listed()
    return [n for n in ROUTES if n not in OPT_IN and n != "hybrid" and not_applicable(task, n) is None] + (
        ["hybrid"] if task.documents else [])


def plan(task: Task) -> tuple[dict[str, BaseModel], dict[str, str]]:
    """(routes to run with their settings, routes skipped with why), both in ROUTES order."""
    names = planned_names(task)
    run: dict[str, BaseModel] = {}
    skipped: dict[str, str] = {}
    for name in ROUTES:
        reason = not_applicable(task, name)
        if name in names and reason is None:
            given = getattr(task.routes, name) if task.routes is not None else None
            run[name] = given if given is not None else SETTINGS[name]()
        elif reason is not None:
            skipped[name] = reason
        elif name in OPT_IN and task.routes is None:
            skipped[name] = f"opt-in (trains and stores the most): add `{name}: {{}}` under routes"
        else:
            skipped[name] = "not listed under routes"
    return run, skipped


def budget_of(task: Task, settings: BaseModel) -> Budget:
    return getattr(settings, "budget", None) or task.budget


# --- reading a task file -----------------------------------------------------------------------

PATH_FIELDS = ("train", "validation", "test", "labels_file", "queries", "answers", "qrels")


def load_task(path: str | Path) -> Task:
    """Read and validate a task file; resolve its paths against the file's folder."""
    path = Path(path)
    raw, lines = read_yaml_mapping(path, "task file", "see examples/compare/", "model, type, data, routes")
    try:
        task = Task.model_validate(raw)
    except ValidationError as exc:
        raise TunesmithError(_explain(exc, path, lines)) from None
    _check(task, path, lines)
    return _resolve_paths(task, path.parent, path.stem)


def _check(task: Task, path: Path, lines: dict) -> None:
    """What the types cannot say: fields each task type needs, metrics it has, routes that apply."""

    def fail(keys: tuple[str, ...], message: str) -> None:
        line = next((lines[keys[:n]] for n in range(len(keys), 0, -1) if keys[:n] in lines), None)
        raise TunesmithError(f"{where(path, line)}: {'.'.join(keys)}: {message}")

    data = task.data
    if task.type in ("classification", "instruction") and not data.train:
        fail(("data", "train"), f"required for {task.type} tasks")
    if task.type == "qa_with_documents":
        for key in ("queries", "answers"):
            if getattr(data, key) is None:
                fail(("data", key), "required for qa_with_documents tasks")
        if not task.documents:
            fail(("documents",), "required for qa_with_documents tasks (the files answers come from)")
        if (data.train_split is None) != (data.test_split is None):
            fail(("data", "test_split" if data.test_split is None else "train_split"),
                 "give both train_split and test_split, or neither (then test_fraction splits the queries)")
    if task.metric is not None and task.metric not in METRICS[task.type]:
        fail(("metric",), f"{task.type} tasks are scored by {', '.join(METRICS[task.type])} (got {task.metric!r})")
    if task.metric == "recall_at_k" and not data.qrels:
        fail(("metric",), "recall_at_k needs data.qrels")
    if task.retrieval.overlap >= task.retrieval.chunk_tokens:
        fail(("retrieval", "overlap"), "must be smaller than retrieval.chunk_tokens")
    if task.routes is not None:
        if not task.routes.listed():
            fail(("routes",), f"list at least one route: {', '.join(ROUTES)}")
        for name in task.routes.listed():
            reason = not_applicable(task, name)
            if reason:
                fail(("routes", name), reason)


def _resolve_paths(task: Task, folder: Path, stem: str) -> Task:
    def resolve(value: str) -> str:
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else folder / p)

    updates = {}
    for key in PATH_FIELDS:
        value = getattr(task.data, key)
        if isinstance(value, list):
            updates[key] = [resolve(v) for v in value]
        elif isinstance(value, str):
            updates[key] = resolve(value)
    data = task.data.model_copy(update=updates)
    documents = [resolve(d) for d in task.documents] if task.documents else None
    output_dir = resolve(task.output_dir) if task.output_dir else str(folder / f"{stem}_report")
    return task.model_copy(update={"data": data, "documents": documents, "output_dir": output_dir,
                                   "name": task.name or stem})


def _explain(exc: ValidationError, path: Path, lines: dict) -> str:
    messages = [_explain_one(err, path, lines) for err in exc.errors()]
    extra = f" (and {len(messages) - 1} more problem{'s' if len(messages) > 2 else ''})" if len(messages) > 1 else ""
    return messages[0] + extra


def _explain_one(err: dict, path: Path, lines: dict) -> str:
    # pydantic puts union branches and validator names into loc; keep only real keys.
    loc = tuple(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[")) and "[" not in str(p))
    field = ".".join(loc) or "task"
    line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
    source = where(path, line)
    if err["type"] == "extra_forbidden":
        known = _known_keys(loc[:-1])
        guess = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
        hint = f"; did you mean '{guess[0]}'?" if guess else f"; known keys here: {', '.join(known)}"
        return f"{source}: {field}: unknown key{hint}"
    if err["type"] == "missing":
        return f"{source}: {field}: required but missing"
    value = err.get("input")
    shown = f" (got {value!r})" if value is not None and not isinstance(value, (dict, list)) else ""
    return f"{source}: {field}: {err['msg'].removeprefix('Value error, ')}{shown}"


def _known_keys(loc: tuple[str, ...]) -> list[str]:
    model: type[BaseModel] | None = Task
    for key in loc:
        field = model.model_fields.get(key) if model else None
        model = _model_in(field.annotation) if field else None
    return list(model.model_fields) if model else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation like `Routes | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for m in map(_model_in, typing.get_args(annotation)) if m is not None), None)
