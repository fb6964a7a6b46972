"""What every causal-LM stage shares: reading the split, the output folder, the model, the artifacts.

Order matters for "nothing already saved is lost": a stage validates the recipe, reads and
checks all data and renders it before it touches the output folder.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tunesmith import allocator
from tunesmith.config import Recipe
from tunesmith.data.formats import Example, load_examples, split_off
from tunesmith.data.render import PackedRow, Sample, fit_length, render
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.plots import loss_plot
from tunesmith.files import building_dir, write_text_atomic
from tunesmith.models import Runtime, load_model, load_tokenizer, pick_runtime, resolve_base
from tunesmith.kernels.compile import compile_blocks
from tunesmith.kernels.dropout import fuse_lora_dropout
from tunesmith.tuning import TrainableReport, apply_tuning, count_parameters

STAGE_FORMATS = {"pretrain": ("text",), "sft": ("alpaca", "messages")}
# Settings a resumed run may change: how long to train and how often to report or save.
RESUMABLE_CHANGES = {"max_steps", "epochs", "eval_every", "eval_max_batches", "save_every", "keep_checkpoints", "threads"}
RECIPE_FILE = "recipe.yaml"


@dataclass
class Split:
    train: list[Example]
    validation: list[Example]
    format: str
    skipped: int


def load_split(recipe: Recipe) -> Split:
    """Read and validate train (and validation) data; split off a seeded validation share if none is given."""
    data = recipe.data
    wanted = STAGE_FORMATS[recipe.stage]
    loaded = load_examples(data.train, data.format, data.text_field, data.skip_bad_rows, data.max_rows)
    if loaded.format not in wanted:
        raise TunesmithError(
            f"{data.train[0]}: data.format: stage '{recipe.stage}' reads {' or '.join(wanted)} data, "
            f"but this file is '{loaded.format}'; change the stage or the data"
        )
    train, skipped = loaded.examples, loaded.skipped
    if data.validation:
        held = load_examples(data.validation, loaded.format, data.text_field, data.skip_bad_rows)
        return Split(train, held.examples, loaded.format, skipped + held.skipped)
    train, held_out = split_off(train, data.validation_fraction, recipe.training.seed)
    return Split(train, held_out, loaded.format, skipped)


def render_all(tokenizer, examples: list[Example], max_length: int, policy: str) -> tuple[list[Sample], int, int]:
    """Render examples; apply the over-length policy. Returns (samples, truncated, dropped)."""
    samples = [render(tokenizer, e) for e in examples]
    fitted, truncated = fit_length(samples, max_length, policy)
    return fitted, truncated, len(samples) - len(fitted)


# --- the output folder -----------------------------------------------------------------------

def check_output_dir(recipe: Recipe, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a different run; on resume, insist on the same recipe (but for run length)."""
    out = Path(recipe.output_dir)
    if resume and overwrite:
        raise TunesmithError("--resume and --overwrite contradict each other; pick one")
    holds_run = out.is_dir() and any(out.iterdir())
    if out.exists() and not out.is_dir():
        raise TunesmithError(f"output_dir: {out} is a file; give a folder")
    if resume:
        saved = out / RECIPE_FILE
        if not saved.is_file():
            raise TunesmithError(f"{out}: no {RECIPE_FILE} here, so there is no run to resume; drop --resume")
        before = yaml.safe_load(saved.read_text()) or {}
        changed = _changed_fields(before, recipe.model_dump(mode="json"))
        if changed:
            raise TunesmithError(
                f"{saved}: {changed[0]}: differs from the run being resumed; resume with the same recipe "
                f"(only training length and eval/save cadence may change) or start a new output_dir"
            )
    elif holds_run and not overwrite:
        raise TunesmithError(
            f"output_dir: {out} already holds a run; pass --resume to continue it, --overwrite to replace it, "
            "or choose another output_dir"
        )


def _changed_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            if key in RESUMABLE_CHANGES and prefix == "training.":
                continue
            out += _changed_fields(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def open_output_dir(recipe: Recipe, resume: bool, overwrite: bool) -> Path:
    from tunesmith import distributed

    out = Path(recipe.output_dir)
    if distributed.is_main():  # in a run of several processes only rank 0 writes
        if overwrite and out.is_dir():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            write_text_atomic(out / RECIPE_FILE, recipe.to_yaml())
    distributed.barrier()
    return out


def shared_rows(recipe: Recipe, build):
    """Tokenise once: rank 0 builds the rows and hands them to the other processes (one process: just build)."""
    from tunesmith import distributed
    from tunesmith.models import tunesmith_home

    key = json.dumps({k: v for k, v in recipe.model_dump(mode="json").items() if k in ("model", "stage", "data", "training")},
                     sort_keys=True)
    return distributed.shared(key, build, tunesmith_home() / "cache" / "rows")


# --- model ---------------------------------------------------------------------------------

@dataclass
class Base:
    folder: Path
    runtime: Runtime
    tokenizer: Any


def open_base(recipe: Recipe) -> Base:
    runtime = pick_runtime(recipe.model)
    folder = resolve_base(recipe.model)
    base = Base(folder, runtime, load_tokenizer(folder))
    check_init_adapter(recipe, base)
    return base


def build_model(recipe: Recipe, base: Base, model: Any = None, task_type: str = "CAUSAL_LM") -> tuple[Any, TrainableReport]:
    """Load the base (unless given) and make trainable what the recipe says: a new adapter, or the
    adapter named by `tuning.init_adapter` to continue."""
    import torch

    if recipe.training.threads:
        torch.set_num_threads(recipe.training.threads)
    if model is None:
        model = load_model(base.folder, recipe.model, base.runtime)
    torch.manual_seed(recipe.training.seed)  # LoRA init and dropout start from the recipe's seed
    if recipe.training.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if recipe.tuning.init_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, recipe.tuning.init_adapter, is_trainable=True)
    else:
        model = apply_tuning(model, recipe.tuning, task_type)
    fuse_lora_dropout(model)
    if recipe.tuning.method == "lora":
        from tunesmith.kernels.lora_scaling import scale_on_rank

        scale_on_rank(model)
    if recipe.training.compile:
        compile_blocks(model)
    return model, count_parameters(model)


def check_init_adapter(recipe: Recipe, base: Base) -> None:
    """The adapter to continue exists and was trained on this recipe's base (checked before any output)."""
    from tunesmith.adapters import adapter_base, is_adapter_dir

    folder = recipe.tuning.init_adapter
    if not folder:
        return
    if not is_adapter_dir(folder):
        raise TunesmithError(f"tuning.init_adapter: {folder} holds no LoRA adapter (adapter_config.json); give the "
                             "output folder of a LoRA run")
    trained_on = adapter_base(Path(folder))
    if resolve_base(trained_on).resolve() != Path(base.folder).resolve():
        raise TunesmithError(f"tuning.init_adapter: {folder} was trained on {trained_on.path}, but this recipe's "
                             f"model is {recipe.model.path}; use the same base")


def load_pair_split(recipe: Recipe) -> tuple[list, list, int]:
    """Preference pairs for training and held out (validation files, or a seeded fraction): (train, held, skipped)."""
    from tunesmith.data.preferences import read_preferences

    data = recipe.data
    train, skipped = read_preferences(data.train, data.skip_bad_rows)
    if data.max_rows:
        train = train[: data.max_rows]
    if data.validation:
        held, more = read_preferences(data.validation, data.skip_bad_rows)
        return train, held, skipped + more
    train, held = split_off(train, data.validation_fraction, recipe.training.seed)
    return train, held, skipped


def save_final(model: Any, tokenizer: Any, out: Path, state_dict: dict | None = None) -> list[str]:
    """Write the adapter (PEFT) or full model (safetensors) and the tokenizer with its chat template
    (`state_dict`: the gathered weights of a sharded model)."""
    with building_dir(out / ".final") as tmp:
        if hasattr(model, "peft_config"):  # only the trained adapter (a frozen reference copy stays behind)
            model.save_pretrained(tmp, safe_serialization=True, selected_adapters=[model.active_adapter])
        else:
            model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        names = sorted(p.name for p in tmp.iterdir())
        for path in tmp.iterdir():  # each file lands whole (rename), the folder keeps other artifacts
            path.replace(out / path.name)
    shutil.rmtree(out / ".final", ignore_errors=True)
    return names


def write_summary(out: Path, summary: dict, train_losses, eval_losses, title: str, **plot) -> Path:
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return loss_plot(out / "loss.png", train_losses, eval_losses, title, **plot)


@contextmanager
def training_progress(console: Console, total: int, done: int, describe=None):
    """Yield the callback the loop calls after each logged record: a live bar on a terminal,
    a plain line every ~10% of the run in logs. `describe(record)` says what a step record shows."""

    def default_describe(record: dict) -> str:
        return f"loss {record['loss']:.4f}  {record['tokens_per_s']:,.0f} tok/s"

    describe = describe or default_describe

    def print_eval(record: dict) -> None:
        for key, value in record.items():
            if key.startswith("eval_"):
                console.print(f"  step {record['step']}: {key.replace('_', ' ')} {value:.4f}")

    if not console.is_terminal:
        every = max(1, total // 10)

        def on_line(record: dict) -> None:
            if "loss" not in record:
                print_eval(record)
            elif record["step"] % every == 0 or record["step"] == total:
                console.print(f"  step {record['step']}/{total}: {describe(record)}  {record['seconds']:.0f} s")

        yield on_line
        return
    columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("train", total=total, completed=done, info="")

        def on_record(record: dict) -> None:
            if "loss" in record:
                progress.update(task, completed=record["step"], info=describe(record))
            else:
                print_eval(record)

        yield on_record


def format_rows(rows: list[PackedRow]) -> str:
    tokens = sum(len(r.input_ids) for r in rows)
    return f"{len(rows):,} rows, {tokens:,} tokens"


# --- the run shared by pre-training and SFT --------------------------------------------------

def peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024)


def memory_report() -> dict:
    """The run's peak resident memory and the allocator it ran on (and the GPU's peak, on CUDA), for its summary."""
    import torch

    report = {"peak_rss_gib": round(peak_rss_gib(), 2), "allocator": allocator.active()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        report["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return report


def train_causal_lm(recipe: Recipe, base: Base, rows: list[PackedRow], eval_rows: list[PackedRow], console: Console,
                    resume: bool, overwrite: bool, summary: dict, preview=None) -> dict:
    """Open the output folder, build the model, evaluate, train, evaluate, save; return the summary.

    `preview(model) -> (prompt, answer)` shows one answer before and after training.
    """
    from tunesmith.evaluate.metrics import perplexity
    from tunesmith.stages.loop import Loop, read_metrics

    from tunesmith import distributed

    out = open_output_dir(recipe, resume, overwrite)
    main = distributed.is_main()
    sharded = distributed.in_group() and recipe.training.parallel == "fsdp"
    preview = None if sharded else preview  # generating from rank 0 alone cannot gather the other ranks' shards
    model, report = build_model(recipe, base)
    processes = distributed.world()[1]
    ranks = "processes" if processes > 1 else "process (torchrun)"
    console.print(f"[bold]{report}[/bold] ({recipe.tuning.method})"
                  + (f"; {processes} {ranks}, global batch {recipe.training.micro_batch_size * processes} rows x "
                     f"{recipe.training.gradient_accumulation} accumulation" if distributed.in_group() else ""))
    loop = Loop(model, rows, eval_rows, recipe.training, out, base.tokenizer.pad_token_id,
                base.runtime.torch_device, base.runtime.autocast_bf16)
    start_step = loop.resume() if resume else 0
    samples_path = out / "samples.jsonl"
    before = None
    if start_step:
        console.print(f"resumed from step {start_step} of {loop.plan.total_steps}")
        before = next((r["eval_loss"] for r in read_metrics(loop.metrics_path) if r.get("step") == 0 and "eval_loss" in r),
                      None)
    else:
        if main:
            loop.metrics_path.unlink(missing_ok=True)  # a fresh start (or a resume with no checkpoint yet)
        if eval_rows:
            with console.status("evaluating before training..."):
                before = loop.evaluate()
            loop.log({"step": 0, "eval_loss": round(before, 6)})
            console.print(f"eval loss before: {before:.4f} (perplexity {perplexity(before):.2f})")
        else:
            console.print("no validation split (data.validation_fraction=0): eval loss is not measured")
        if preview and main:
            with console.status("answering before training..."):
                prompt, answer = preview(model)
            write_text_atomic(samples_path, json.dumps({"when": "before", "prompt": prompt, "answer": answer}) + "\n")
            console.print(f"[bold]prompt:[/bold] {prompt}\n[bold]answer before:[/bold] {answer}")

    with training_progress(console, loop.plan.total_steps, start_step) as on_record:
        loop.on_step = on_record
        result = loop.run()
    after = None
    if eval_rows:
        with console.status("evaluating after training..."):
            after = loop.evaluate()
        loop.log({"step": loop.step, "eval_loss": round(after, 6), "final": True})
        result.eval_losses.append((loop.step, after))

    summary = {
        **summary,
        "stage": recipe.stage, "method": recipe.tuning.method, "base": recipe.model.path, "processes": processes,
        "trainable_parameters": report.trainable, "total_parameters": report.total,
        "steps": result.steps, "tokens": result.tokens,
        "train_seconds": round(result.seconds, 1), "tokens_per_second": round(result.tokens_per_second, 1),
        "eval_loss_before": _round(before, 4), "eval_loss_after": _round(after, 4),
        "perplexity_before": None if before is None else round(perplexity(before), 3),
        "perplexity_after": None if after is None else round(perplexity(after), 3),
    }
    state = None
    if sharded:  # every rank takes part in gathering the whole model; rank 0 writes it
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if getattr(model.config, "tie_word_embeddings", False):  # saved once, as save_pretrained does unsharded
            head = next(name for name, module in model.named_modules() if module is model.get_output_embeddings())
            state.pop(f"{head}.weight", None)
    if not main:  # the other ranks are done: rank 0 writes the artifacts
        return summary
    if preview:
        prompt, answer = preview(model)
        lines = [r for r in read_metrics(samples_path) if r.get("when") == "before"]
        lines.append({"when": "after", "prompt": prompt, "answer": answer})
        write_text_atomic(samples_path, "".join(json.dumps(r) + "\n" for r in lines))
        summary["answer_before"] = lines[0]["answer"] if len(lines) > 1 else None
        summary["answer_after"] = answer
        summary["prompt"] = prompt
    summary["files"] = save_final(model, base.tokenizer, out, state)
    summary.update(memory_report())
    write_summary(out, summary, result.train_losses, result.eval_losses,
                  f"{recipe.stage} · {recipe.tuning.method} · {Path(recipe.model.path).name}")
    return summary


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
