"""The `tunesmith` command: parse, call, print. Heavy imports stay inside the commands."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tunesmith.errors import TunesmithError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Adapt a pretrained language model to your task, and measure which route wins.")
data_app = typer.Typer(no_args_is_help=True, help="Look at data the way the model will see it.")
app.add_typer(data_app, name="data")
adapters_app = typer.Typer(no_args_is_help=True, help="The adapter registry: named LoRA adapters on disk ($TUNESMITH_HOME/adapters).")
app.add_typer(adapters_app, name="adapters")
feedback_app = typer.Typer(no_args_is_help=True, help="Human feedback: a rating page, its SQLite store, preference pairs.")
app.add_typer(feedback_app, name="feedback")

Overrides = Annotated[Optional[list[str]], typer.Argument(help="recipe overrides: key.sub=value ...", show_default=False)]


def _console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# --- train ---------------------------------------------------------------------------------

@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe (see examples/)")],
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option(help="continue the run in output_dir from its last checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace whatever output_dir holds")] = False,
    nproc: Annotated[int, typer.Option(help="data-parallel processes on this machine (torchrun; gloo on CPU, NCCL "
                                            "on GPUs); pretrain and sft")] = 1,
) -> None:
    """Train a model as the recipe says (stage: pretrain | sft | classify | reward | dpo | rl), or run a chained
    recipe's `stages:` in order, each from the previous stage's artifact."""
    from tunesmith.config import is_chain, load_chain, load_recipe

    if nproc > 1:
        from tunesmith import distributed

        if is_chain(recipe):
            raise TunesmithError("--nproc runs one recipe; run a chain's stages one by one to spread them")
        config = load_recipe(recipe, overrides or [])  # check it here, once, before starting processes
        if config.stage not in ("pretrain", "sft"):
            raise TunesmithError(f"--nproc: stage {config.stage} runs in one process; data-parallel runs are for "
                                 "pretrain and sft")
        argv = ["train", str(recipe), *(overrides or [])] + (["--resume"] if resume else []) + (
            ["--overwrite"] if overwrite else [])
        raise typer.Exit(distributed.launch(nproc, argv))

    if recipe.is_file() and is_chain(recipe):
        from tunesmith.chain import run_chain

        _quiet_libraries()
        run_chain(load_chain(recipe, overrides or []), run_recipe, _console(), resume=resume, overwrite=overwrite)
        return
    config = load_recipe(recipe, overrides or [])
    run_recipe(config, resume=resume, overwrite=overwrite)


def run_recipe(config, resume: bool = False, overwrite: bool = False, preview_tokens: int = 48) -> dict:
    _quiet_libraries()
    console = _console()
    from tunesmith import distributed

    if distributed.launched():  # started by torchrun (--nproc): join the group; only rank 0 speaks
        if config.stage not in ("pretrain", "sft"):
            raise TunesmithError(f"stage {config.stage} runs in one process; launch pretrain or sft with several")
        from tunesmith.models import pick_runtime

        distributed.init(pick_runtime(config.model).torch_device.type)
        if not distributed.is_main():
            import io

            from rich.console import Console

            console = Console(file=io.StringIO())
    console.print(f"[bold]tunesmith[/bold] {config.stage} · {config.tuning.method} · model {config.model.path} "
                  f"→ {config.output_dir}")
    if config.stage == "classify":
        from tunesmith.stages import classify

        summary = classify.run(config, console, resume=resume, overwrite=overwrite)
        _print_classification(console, summary, Path(config.output_dir))
        return summary
    if config.stage in ("reward", "dpo", "rl"):
        from tunesmith.stages import dpo, reward, rl

        if config.stage == "reward":
            summary = reward.run(config, console, resume=resume, overwrite=overwrite)
        elif config.stage == "dpo":
            summary = dpo.run(config, console, resume=resume, overwrite=overwrite, preview_tokens=preview_tokens)
        else:
            summary = rl.run(config, console, resume=resume, overwrite=overwrite)
        _print_preference(console, summary, Path(config.output_dir))
        return summary
    if config.stage == "pretrain":
        from tunesmith.stages import pretrain

        summary = pretrain.run(config, console, resume=resume, overwrite=overwrite)
    else:
        from tunesmith.stages import sft

        summary = sft.run(config, console, resume=resume, overwrite=overwrite, preview_tokens=preview_tokens)
    if distributed.launched():
        distributed.finish()
        if "files" not in summary:  # not rank 0: it wrote and prints the results
            return summary
    _print_summary(console, summary, Path(config.output_dir))
    return summary


def _peak_memory(summary: dict) -> str:
    allocator = f" ({summary['allocator']} allocator)" if summary.get("allocator") else ""
    gpu = f", {summary['peak_gpu_gib']:.2f} GiB on the GPU" if summary.get("peak_gpu_gib") is not None else ""
    return f"{summary['peak_rss_gib']:.2f} GiB RSS{allocator}{gpu}"


def _print_summary(console, summary: dict, out: Path) -> None:
    from rich.table import Table

    table = Table(title="summary", show_header=False, box=None)
    rows = []
    for label, key, digits in (("eval loss", "eval_loss", 4), ("perplexity", "perplexity", 2)):
        before, after = summary[f"{key}_before"], summary[f"{key}_after"]
        if after is not None:
            rows.append((label, (f"{before:.{digits}f} → " if before is not None else "") + f"{after:.{digits}f}"))
    rows += [
        ("trained", f"{summary['steps']} steps, {summary['tokens']:,} tokens in {summary['train_seconds']:.0f} s "
                    f"({summary['tokens_per_second']:.0f} tok/s)"),
        ("parameters", f"{summary['trainable_parameters']:,} trainable of {summary['total_parameters']:,}"),
        ("peak memory", _peak_memory(summary)),
        ("output", f"{out} (loss plot: {out / 'loss.png'})"),
    ]
    for key, value in rows:
        table.add_row(f"[bold]{key}[/bold]", value)
    console.print(table)
    if summary.get("answer_after") is not None:
        console.print(f"[bold]prompt:[/bold] {summary['prompt']}", markup=True)
        console.print(f"[bold]answer before:[/bold] {summary['answer_before']}")
        console.print(f"[bold]answer after:[/bold]  {summary['answer_after']}")


def _print_preference(console, summary: dict, out: Path) -> None:
    """The summary of a reward, DPO or RL run: what moved on held-out data, and what it cost."""
    from rich.table import Table

    def change(key: str, digits: int = 3, sign: str = "") -> str | None:
        before, after = summary.get(f"{key}_before"), summary.get(f"{key}_after")
        if after is None:
            return None
        return (f"{before:{sign}.{digits}f} → " if before is not None else "") + f"{after:{sign}.{digits}f}"

    stage = summary["stage"]
    rows = []
    if stage == "reward":
        rows += [("held-out accuracy", change("accuracy")), ("held-out mean margin", change("margin", sign="+")),
                 ("held-out loss", change("eval_loss", 4))]
        plots = "loss.png, margins.png"
    elif stage == "dpo":
        if summary.get("reward_accuracy") is not None:
            rows += [("held-out reward accuracy", f"{summary['reward_accuracy']:.3f}"),
                     ("held-out reward margin", f"{summary['reward_margin']:+.4f}"),
                     ("held-out loss", change("eval_loss", 4))]
        rows.append(("reference", summary["reference"]))
        plots = "loss.png, margins.png"
    else:
        rows += [("held-out mean reward", change("eval_reward", 4, "+")),
                 ("rollout reward", f"{summary['reward_first_steps']:+.4f} (first 5 steps) → "
                                    f"{summary['reward_last_steps']:+.4f} (last 5)" if summary["reward_last_steps"]
                                    is not None else None),
                 ("KL to reference", f"{summary['kl_last']:.4f} nats per reply (last step)" if summary["kl_last"]
                                     is not None else None),
                 ("reference", summary["reference"])]
        plots = "rl.png, loss.png; sample replies in samples.jsonl"
    speed = (f"{summary['steps_per_minute']:.2f} steps/min" if stage == "rl" else
             f"{summary['tokens']:,} tokens, {summary['tokens_per_second']:.0f} tok/s")
    rows += [("trained", f"{summary['steps']} steps in {summary['train_seconds']:.0f} s ({speed})"),
             ("parameters", f"{summary['trainable_parameters']:,} trainable of {summary['total_parameters']:,}"),
             ("peak memory", _peak_memory(summary)),
             ("output", f"{out} ({plots})")]
    table = Table(title=f"{stage} summary", show_header=False, box=None)
    for key, value in rows:
        if value is not None:
            table.add_row(f"[bold]{key}[/bold]", value)
    console.print(table)
    if summary.get("answer_after") is not None:
        console.print(f"[bold]prompt:[/bold] {summary['prompt']}")
        console.print(f"[bold]answer before:[/bold] {summary['answer_before']}")
        console.print(f"[bold]answer after:[/bold]  {summary['answer_after']}")


def _print_classification(console, summary: dict, out: Path) -> None:
    from rich.table import Table

    report = summary["report"]
    table = Table(title=f"{summary['scored_split']}: accuracy {report['accuracy']:.4f} · macro-F1 "
                        f"{report['macro_f1']:.4f} · ECE {report['ece']:.4f} ({report['examples']:,} texts)")
    for column in ("class", "precision", "recall", "F1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, row in report["per_class"].items():
        table.add_row(name, f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}", f"{row['support']:,}")
    console.print(table)
    embeds = ", ".join(f"{k} {'cached' if v['cached'] else 'computed'} {v['seconds']:.1f} s"
                       for k, v in summary["embeddings"].items())
    console.print(f"embeddings: {embeds}; head: {summary['head_training']['seconds']:.1f} s; "
                  f"peak memory {_peak_memory(summary)}")
    console.print(f"output: {out} (confusion matrix: {out / 'confusion.png'}); "
                  f"predict with: tunesmith predict {out} --input FILE")


# --- data inspect ----------------------------------------------------------------------------

@data_app.command("inspect")
def data_inspect(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe")],
    overrides: Overrides = None,
    index: Annotated[int, typer.Option(help="which training example to show")] = 0,
) -> None:
    """Show one rendered training sample (masked tokens marked ⟪like this⟫) and token-length statistics."""
    from rich.table import Table
    from rich.text import Text

    from tunesmith.config import load_recipe
    from tunesmith.data.render import length_stats, marked_segments, render
    from tunesmith.stages.common import load_split, open_base

    _quiet_libraries()
    config = load_recipe(recipe, overrides or [])
    split = load_split(config)
    base = open_base(config)
    if not 0 <= index < len(split.train):
        raise TunesmithError(f"--index: {index} is out of range; the training split has {len(split.train)} examples")
    samples = [render(base.tokenizer, e) for e in split.train]
    sample = samples[index]
    console = _console()
    trained = sum(1 for label in sample.labels if label != -100)
    console.print(f"[bold]{sample.where}[/bold]: {len(sample.input_ids)} tokens, {trained} trained on "
                  f"(loss); masked text is dim and wrapped ⟪like this⟫")
    text = Text()
    for segment, is_trained in marked_segments(base.tokenizer, sample):
        text.append(segment, style="bold green") if is_trained else text.append(f"⟪{segment}⟫", style="dim")
    console.print(text)
    stats = length_stats(samples, config.training.max_length)
    table = Table(title=f"token lengths ({split.format}, {config.stage})")
    for key in ("samples", "min", "median", "p95", "max", "over_max_length", "target_tokens"):
        table.add_column(key.replace("_", " "), justify="right")
    table.add_row(*(f"{stats[k]:,}" if isinstance(stats[k], int) else f"{stats[k]:,.1f}" for k in
                    ("samples", "min", "median", "p95", "max", "over_max_length", "target_tokens")))
    console.print(table)
    if stats["over_max_length"]:
        console.print(f"{stats['over_max_length']} samples exceed training.max_length={config.training.max_length} "
                      f"(policy: data.overlong={config.data.overlong})")


# --- merge, chat, generate ---------------------------------------------------------------------

@app.command()
def merge(
    adapter_dir: Annotated[Path, typer.Argument(help="output folder of a LoRA run")],
    out: Annotated[Path, typer.Option("--out", help="folder for the standalone merged model")],
    tolerance: Annotated[float, typer.Option(help="largest allowed |logit| difference merged vs base+adapter")] = 1e-3,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty --out folder")] = False,
) -> None:
    """Merge a LoRA adapter into its base and save a standalone model (checked against base+adapter)."""
    from tunesmith.adapters import merge_adapter

    _quiet_libraries()
    report = merge_adapter(adapter_dir, out, tolerance=tolerance, overwrite=overwrite)
    _console().print(f"merged into {report.out_dir}; max |logit difference| vs base+adapter on "
                     f"{report.prompts} prompts: {report.max_abs_diff:.2e} (tolerance {tolerance:g})")


@app.command()
def chat(
    model: Annotated[str, typer.Option(help="built-in name, HF folder, .gguf, or a tunesmith output folder")] = "smollm2-135m-instruct",
    prompt: Annotated[Optional[str], typer.Option(help="answer this one prompt and exit")] = None,
    system: Annotated[Optional[str], typer.Option(help="system message")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
) -> None:
    """Talk to a base, adapter or merged model; tokens stream as they are generated."""
    from tunesmith.adapters import load_trained
    from tunesmith.generate import generate_reply

    _quiet_libraries()
    loaded, tokenizer = load_trained(model)
    messages = [{"role": "system", "content": system}] if system else []

    def turn(text: str) -> None:
        messages.append({"role": "user", "content": text})
        reply = generate_reply(loaded, tokenizer, messages, max_new_tokens, temperature,
                               on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()))
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})

    if prompt is not None:
        turn(prompt)
        return
    console = _console()
    console.print("[dim]type a message; an empty line or Ctrl-D quits[/dim]")
    while True:
        try:
            text = console.input("[bold]> [/bold]")
        except (EOFError, KeyboardInterrupt):
            break
        if not text.strip():
            break
        turn(text)


@app.command()
def generate(
    input: Annotated[Path, typer.Option("--input", help="prompts: .jsonl with 'prompt' or 'messages' (or alpaca rows), or .txt, one per line")],
    output: Annotated[Path, typer.Option("--output", help="answers as JSONL")],
    model: Annotated[str, typer.Option(help="built-in name, HF folder, .gguf, or a tunesmith output folder")] = "smollm2-135m-instruct",
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
) -> None:
    """Answer a file of prompts (greedy, batched) into a JSONL of {prompt, answer}."""
    from rich.progress import track

    from tunesmith.adapters import load_trained
    from tunesmith.data.prompts import read_prompts
    from tunesmith.files import write_text_atomic
    from tunesmith.generate import generate_batch

    _quiet_libraries()
    conversations = read_prompts(input)
    loaded, tokenizer = load_trained(model)
    answers: list[str] = []
    starts = range(0, len(conversations), batch_size)
    for start in track(starts, description="generating", console=_console()):
        answers += generate_batch(loaded, tokenizer, conversations[start : start + batch_size], max_new_tokens, batch_size)
    lines = [json.dumps({"prompt": c[-1]["content"], "answer": a}) for c, a in zip(conversations, answers)]
    write_text_atomic(output, "\n".join(lines) + "\n")
    _console().print(f"wrote {len(answers)} answers to {output}")


@app.command()
def predict(
    classifier: Annotated[Path, typer.Argument(help="output folder of a `stage: classify` run")],
    input: Annotated[str, typer.Option("--input", help="texts: .jsonl/.json/.csv/.parquet with a text column, .txt (one per line), or - for stdin lines")],
    output: Annotated[Optional[Path], typer.Option("--output", help="where to write; .csv for CSV, else JSONL (default: stdout)")] = None,
    text_field: Annotated[str, typer.Option(help="column holding the text")] = "text",
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
) -> None:
    """Label texts with a saved classifier: the label and every class probability, as JSONL or CSV."""
    from tunesmith.classifier import load_classifier
    from tunesmith.data.prompts import read_texts
    from tunesmith.files import write_text_atomic

    _quiet_libraries()
    texts = read_texts(input, text_field, stdin=sys.stdin)
    model = load_classifier(classifier)
    model.embedder.batch_size = batch_size
    probabilities = model.predict_proba(texts).tolist()
    names = model.spec.labels
    if output is not None and output.suffix.lower() == ".csv":
        import csv
        import io

        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["text", "label", *(f"p_{n}" for n in names)])
        for text, probs in zip(texts, probabilities):
            writer.writerow([text, names[max(range(len(probs)), key=probs.__getitem__)], *(f"{p:.6f}" for p in probs)])
        write_text_atomic(output, buffer.getvalue())
    else:
        lines = [json.dumps({"text": text, "label": names[max(range(len(probs)), key=probs.__getitem__)],
                             "probabilities": dict(zip(names, (round(p, 6) for p in probs)))})
                 for text, probs in zip(texts, probabilities)]
        if output is None:
            sys.stdout.write("\n".join(lines) + "\n")
            return
        write_text_atomic(output, "\n".join(lines) + "\n")
    _console().print(f"wrote {len(texts)} predictions to {output}")


@app.command()
def score(
    reward_model: Annotated[Path, typer.Argument(help="output folder of a `stage: reward` run")],
    input: Annotated[Path, typer.Option("--input", help="JSONL/JSON/CSV rows: prompt + response, prompt + chosen + "
                                                        "rejected, or messages ending with the reply")],
    output: Annotated[Optional[Path], typer.Option("--output", help="JSONL with the scores added (default: stdout)")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
) -> None:
    """Score replies with a trained reward model; pairs also get their margin, and the accuracy is printed."""
    from tunesmith.data.preferences import read_score_items
    from tunesmith.files import write_text_atomic
    from tunesmith.rewards import load_reward_model

    _quiet_libraries()
    items = read_score_items(input)
    model = load_reward_model(reward_model, batch_size=batch_size)
    keys = [(i, name) for i, item in enumerate(items) for name in item.replies]
    scores = model.score([items[i].prompt + [{"role": "assistant", "content": items[i].replies[name]}] for i, name in keys])
    scored: list[dict] = [dict(item.row) for item in items]
    for (i, name), value in zip(keys, scores):
        scored[i]["score" if name == "response" else f"score_{name}"] = round(value, 6)
    pairs = [row for row in scored if "score_chosen" in row]
    for row in pairs:
        row["margin"] = round(row["score_chosen"] - row["score_rejected"], 6)
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in scored)
    if output is None:
        sys.stdout.write(lines)
    else:
        write_text_atomic(output, lines)
    console = _console() if output is not None else _console_err()
    console.print(f"scored {len(scores)} replies in {len(items)} rows (mean {sum(scores) / len(scores):+.4f})"
                  + (f"; pairs: {len(pairs)}, accuracy {sum(r['margin'] > 0 for r in pairs) / len(pairs):.3f}, mean margin "
                     f"{sum(r['margin'] for r in pairs) / len(pairs):+.4f}" if pairs else "")
                  + (f"; wrote {output}" if output else ""))


def _console_err():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True, stderr=True)


# --- synth -------------------------------------------------------------------------------------

@app.command()
def synth(
    output: Annotated[Path, typer.Option("--output", help="JSONL of alpaca rows that `stage: sft` reads; reruns continue it")],
    prompts: Annotated[Optional[Path], typer.Option(help="mode answer: prompts to answer (.txt lines, or prompt / messages / alpaca rows)")] = None,
    seeds: Annotated[Optional[Path], typer.Option(help="mode expand: seed instructions to write new ones like")] = None,
    count: Annotated[int, typer.Option(min=1, help="mode expand: how many new instructions")] = 100,
    teacher: Annotated[Optional[str], typer.Option(help="a local teacher: built-in name, HF folder, .gguf or run folder")] = None,
    base_url: Annotated[Optional[str], typer.Option(help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")] = None,
    model: Annotated[Optional[str], typer.Option(help="the endpoint's model name")] = None,
    api_key_env: Annotated[Optional[str], typer.Option(help="environment variable holding the endpoint's API key")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="requests in flight (endpoint) or batch size (local)")] = 4,
    timeout: Annotated[float, typer.Option(min=0.1, help="seconds per request")] = 60.0,
    retries: Annotated[int, typer.Option(min=0, help="retries per request on timeouts, 429 and 5xx")] = 3,
    max_tokens: Annotated[int, typer.Option(min=1)] = 512,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.7,
    min_chars: Annotated[int, typer.Option(min=0, help="drop answers shorter than this")] = 1,
    max_chars: Annotated[int, typer.Option(min=1, help="drop answers longer than this")] = 8000,
    near_duplicate: Annotated[float, typer.Option(min=0.0, max=1.0, help="MiniLM cosine at which a row is a near duplicate (1 = off)")] = 0.95,
    keep_refusals: Annotated[bool, typer.Option(help="keep answers that refuse")] = False,
    eval_set: Annotated[Optional[Path], typer.Option(help="prompts that must not leak into the data (contamination cut)")] = None,
    contamination: Annotated[float, typer.Option(min=0.0, max=1.0, help="MiniLM cosine to an eval prompt that drops a row")] = 0.9,
) -> None:
    """Teacher-written SFT data: answer prompts, or expand seed instructions (self-instruct) and answer them."""
    from rich.progress import Progress

    from tunesmith.data.prompts import read_prompts
    from tunesmith.data.synth import Filters, SynthReport, answer_prompts, expand_instructions
    from tunesmith.data.teachers import EndpointTeacher, LocalTeacher

    _quiet_libraries()
    if (prompts is None) == (seeds is None):
        raise TunesmithError("give exactly one of --prompts (answer them) or --seeds (write new instructions like them)")
    if (teacher is None) == (base_url is None):
        raise TunesmithError("give exactly one teacher: --teacher MODEL (local) or --base-url URL --model NAME (endpoint)")
    if base_url and not model:
        raise TunesmithError("--base-url needs --model: the endpoint's model name")
    if output.suffix != ".jsonl":
        raise TunesmithError(f"--output {output}: use a .jsonl file")
    last_user = lambda chat: chat[-1]["content"]  # noqa: E731
    texts = [last_user(c) for c in read_prompts(prompts or seeds)]
    evals = [last_user(c) for c in read_prompts(eval_set)] if eval_set else None
    from tunesmith.rag.embed import TextEncoder

    encoder = TextEncoder() if near_duplicate < 1.0 or evals else None
    chosen = (EndpointTeacher(base_url, model, api_key_env, concurrency, timeout, retries, max_tokens=max_tokens,
                              temperature=temperature) if base_url
              else LocalTeacher(teacher, concurrency, max_tokens, temperature))
    filters = Filters(min_chars, max_chars, near_duplicate, contamination, not keep_refusals)
    report = SynthReport()
    console = _console()
    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        if seeds is not None:
            task = progress.add_task("writing instructions", total=count)
            texts = expand_instructions(chosen, texts, count, output.with_name(output.stem + ".instructions.jsonl"),
                                        encoder, filters, evals, on_batch=lambda n: progress.advance(task, n),
                                        report=report)
        task = progress.add_task("answering", total=len(texts))
        answer_prompts(chosen, texts, output, filters, encoder, evals, batch_size=max(concurrency, 8),
                       mode="expand" if seeds is not None else "answer", on_batch=lambda n: progress.advance(task, n),
                       report=report)
    if report.errors and not report.kept and not report.already_done:
        raise TunesmithError(f"the teacher answered nothing: {report.errors[0]} ({len(report.errors)} failed requests)")
    dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(report.rejected.items())) or "none"
    console.print(f"{output}: {report.kept} rows added ({report.already_done} already done) in {report.seconds:.1f} s; "
                  f"dropped: {dropped}")
    for error in report.errors[:3]:
        console.print(f"[yellow]teacher error[/yellow] {error}")
    if len(report.errors) > 3:
        console.print(f"... and {len(report.errors) - 3} more teacher errors; rerun the command to retry them")


# --- feedback ----------------------------------------------------------------------------------

@feedback_app.command("serve")
def feedback_serve(
    db: Annotated[Path, typer.Option(help="the SQLite store (created if new); ratings survive restarts")],
    items: Annotated[Optional[Path], typer.Option(help="JSONL: prompt + candidates (strings or {source, text})")] = None,
    prompts: Annotated[Optional[Path], typer.Option(help="prompts whose candidates the --model generators write on the fly")] = None,
    model: Annotated[Optional[list[str]], typer.Option("--model", help="a generator (built-in, folder, run dir, registry adapter); repeat for each")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    host: Annotated[str, typer.Option(help="anything but loopback needs --token")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8100,
    token: Annotated[Optional[str], typer.Option(envvar="TUNESMITH_FEEDBACK_TOKEN", help="reviewers open /?token=...")] = None,
) -> None:
    """Serve the rating page: reviewers pick the best answer, mark ties, score 1-5, skip, comment."""
    import uvicorn

    from tunesmith.feedback.app import Candidates, check_exposure, create_app
    from tunesmith.feedback.items import read_items
    from tunesmith.feedback.store import Store

    check_exposure(host, token)
    if items is None and prompts is None and not db.exists():
        raise TunesmithError("give --items (prompts with candidates) or --prompts with --model generators")
    if prompts is not None and not model:
        raise TunesmithError("--prompts needs at least one --model to write the candidates")
    store = Store(db)
    added = store.add_items(read_items(items, prompts, min_candidates=1 if prompts else 2)) if items or prompts else 0
    generators = []
    if model:
        from tunesmith.adapters import load_trained

        _quiet_libraries()
        generators = [(spec, *load_trained(_model_or_adapter(spec))) for spec in model]
    done, total = store.progress("")
    _console().print(f"{db}: {total} items ({added} new); rating page on http://{host}:{port}/"
                     f"{'?token=...' if token else ''}")
    uvicorn.run(create_app(store, token, Candidates(store, generators, max_new_tokens)), host=host, port=port,
                log_level="warning")


def _model_or_adapter(spec: str) -> str:
    """A registry adapter's name stands for its folder; anything else is a model spec as it is."""
    from tunesmith.adapters import NAME_PATTERN, registry_dir

    if not Path(spec).exists() and NAME_PATTERN.match(spec) and (registry_dir() / spec / "adapter_config.json").is_file():
        return str(registry_dir() / spec)
    return spec


@feedback_app.command("export")
def feedback_export(
    db: Annotated[Path, typer.Option(help="the SQLite store")],
    output: Annotated[Path, typer.Option(help="JSONL of preference pairs: prompt, chosen, rejected, raters, agreement")],
    min_agreement: Annotated[float, typer.Option(min=0.0, max=1.0, help="share of votes the chosen answer needs")] = 0.5,
) -> None:
    """Preference pairs from the ratings, with agreement statistics; ties and split votes are dropped."""
    from tunesmith.feedback.export import export_pairs
    from tunesmith.feedback.store import Store
    from tunesmith.files import write_text_atomic

    if not db.is_file():
        raise TunesmithError(f"{db}: no such store")
    pairs, stats = export_pairs(Store(db), min_agreement)
    write_text_atomic(output, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    dropped = ", ".join(f"{n} {why}" for why, n in sorted(stats["dropped"].items())) or "none"
    _console().print(f"{output}: {stats['pairs']} pairs from {stats['exported_items']} of {stats['rated_items']} rated "
                     f"items ({stats['ratings']} ratings, {stats['mean_raters']:.1f} raters per item, mean agreement "
                     f"{stats['mean_agreement']:.2f}); dropped items: {dropped}")


# --- serve -------------------------------------------------------------------------------------

@app.command()
def serve(
    model: Annotated[str, typer.Option(help="the base: built-in name, HF folder, hub id or .gguf")] = "smollm2-135m-instruct",
    adapter: Annotated[Optional[list[str]], typer.Option("--adapter", help="serve NAME=FOLDER too (repeatable)")] = None,
    registry: Annotated[bool, typer.Option(help="serve every registry adapter trained on this base")] = True,
    host: Annotated[str, typer.Option(help="address to bind; anything but loopback needs --api-key")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    api_key: Annotated[Optional[str], typer.Option(envvar="TUNESMITH_API_KEY", help="Bearer key every request must send")] = None,
    admin_key: Annotated[Optional[str], typer.Option(envvar="TUNESMITH_ADMIN_KEY", help="Bearer key for /v1/load_lora_adapter and /v1/unload_lora_adapter (disabled without one)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    max_loaded_adapters: Annotated[int, typer.Option(min=1, help="adapters kept in memory; least recently used are unloaded")] = 16,
    max_batch_rows: Annotated[int, typer.Option(min=1, help="rows decoded together")] = 32,
    max_queue: Annotated[int, typer.Option(min=1, help="waiting requests before 429")] = 256,
    max_prompt_tokens: Annotated[int, typer.Option(min=1)] = 4096,
    max_tokens_cap: Annotated[int, typer.Option(min=1, help="largest max_tokens a request may ask for")] = 1024,
    max_body_bytes: Annotated[int, typer.Option(min=1024)] = 1 << 20,
) -> None:
    """OpenAI-compatible server: one base, many LoRA adapters, the adapter chosen per request by `model`."""
    from tunesmith.serve.app import ServeSettings, serve as run_server

    _quiet_libraries()
    extra = {}
    for item in adapter or []:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise TunesmithError(f"--adapter {item}: write NAME=FOLDER")
        extra[name] = folder
    settings = ServeSettings(model=model, adapters=extra, registry=registry, host=host, port=port, api_key=api_key,
                             admin_key=admin_key, device=device, max_loaded_adapters=max_loaded_adapters,
                             max_batch_rows=max_batch_rows, max_queue=max_queue, max_prompt_tokens=max_prompt_tokens,
                             max_tokens_cap=max_tokens_cap, max_body_bytes=max_body_bytes)
    console = _console()

    def ready(served) -> None:
        names = sorted(served.pool.servable)
        console.print(f"serving {served.base_id} with {len(names)} adapter(s)"
                      f"{': ' + ', '.join(names[:10]) + (' ...' if len(names) > 10 else '') if names else ''}")
        for line in served.skipped:
            console.print(f"[yellow]skipped[/yellow] {line}")
        console.print(f"OpenAI-compatible API on http://{host}:{port}/v1  (API key: "
                      f"{'required' if api_key else 'none'}; adapter loading: {'on' if admin_key else 'off'})")

    run_server(settings, on_ready=ready)


# --- adapters registry -------------------------------------------------------------------------

@adapters_app.command("list")
def adapters_list() -> None:
    """Registered adapters: name, base, task, size, created, eval loss."""
    from rich.table import Table

    from tunesmith.adapters import list_adapters, registry_dir

    entries = list_adapters()
    table = Table(title=f"adapters in {registry_dir()}")
    for column in ("name", "base", "task", "size", "created", "eval loss"):
        table.add_column(column)
    for e in entries:
        loss = e.metrics.get("eval_loss_after")
        table.add_row(e.name, e.base, e.task, f"{e.size_bytes / 2**20:.1f} MiB", e.created,
                      "-" if loss is None else f"{loss:.4f}")
    _console().print(table if entries else "no adapters registered; add one with `tunesmith adapters add RUN_DIR`")


@adapters_app.command("add")
def adapters_add(
    source: Annotated[Path, typer.Argument(help="output folder of a LoRA run, or any PEFT adapter folder")],
    name: Annotated[Optional[str], typer.Option(help="registry name (default: the folder's name)")] = None,
    task: Annotated[Optional[str], typer.Option(help="what it is for (default: the run's stage)")] = None,
    replace: Annotated[bool, typer.Option(help="replace an adapter registered under the same name")] = False,
) -> None:
    """Register an adapter under a name."""
    from tunesmith.adapters import add_adapter

    entry = add_adapter(source, name, task, replace)
    _console().print(f"registered {entry.name!r} (base {entry.base}, {entry.size_bytes / 2**20:.1f} MiB)")


@adapters_app.command("show")
def adapters_show(name: Annotated[str, typer.Argument()]) -> None:
    """Everything the registry knows about one adapter."""
    from tunesmith.adapters import get_adapter

    print(json.dumps(get_adapter(name).__dict__, indent=2))


@adapters_app.command("remove")
def adapters_remove(name: Annotated[str, typer.Argument()]) -> None:
    """Delete an adapter from the registry."""
    from tunesmith.adapters import remove_adapter

    _console().print(f"removed {remove_adapter(name).name!r}")


@adapters_app.command("export")
def adapters_export(
    name: Annotated[str, typer.Argument()],
    merged: Annotated[Path, typer.Option("--merged", help="folder for the standalone merged model")],
    tolerance: Annotated[float, typer.Option(help="largest allowed |logit| difference merged vs base+adapter")] = 1e-3,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty --merged folder")] = False,
) -> None:
    """Merge a registered adapter into its base (checked against base+adapter) and save it standalone."""
    from tunesmith.adapters import get_adapter, merge_adapter, registry_dir

    _quiet_libraries()
    entry = get_adapter(name)
    report = merge_adapter(registry_dir() / entry.name, merged, tolerance=tolerance, overwrite=overwrite)
    _console().print(f"merged {entry.name!r} into {report.out_dir}; max |logit difference| vs base+adapter: "
                     f"{report.max_abs_diff:.2e} (tolerance {tolerance:g})")


# --- quickstart ----------------------------------------------------------------------------------

@app.command()
def quickstart(
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/quickstart"),
    overrides: Overrides = None,
) -> None:
    """LoRA SFT of the default model on 500 shipped Alpaca rows (~4 min on 2 CPU cores): loss and an answer before/after."""
    from tunesmith.config import load_recipe

    recipe_path = Path(__file__).parent / "samples" / "quickstart.yaml"
    config = load_recipe(recipe_path, [f"output_dir={out}", *(overrides or [])])
    run_recipe(config, overwrite=_holds_quickstart(out, config.data.train))
    _console().print(f"\ntalk to it: [bold]tunesmith chat --model {out}[/bold]")


def _holds_quickstart(out: Path, train_files: list[str]) -> bool:
    """A re-run may replace an earlier quickstart's folder, never anything else."""
    import yaml

    saved = out / "recipe.yaml"
    if not saved.is_file():
        return False
    data = (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("data") or {}
    return data.get("train") == train_files


from tunesmith.cli_rag import rag_app  # noqa: E402  (after the helpers it uses)

app.add_typer(rag_app, name="rag")
from tunesmith.cli_compare import compare; app.command("compare")(compare)  # noqa: E402,E702


TRAINING_COMMANDS = ("train", "quickstart", "compare")  # long runs whose peak memory the allocator sets


def entry() -> None:
    """The process entry point (`tunesmith`, `python -m tunesmith.cli`): training commands first re-run
    themselves on jemalloc when it is installed (allocator.py says why). Tests call `main` in-process."""
    main(rerun_on_jemalloc=True)


def main(rerun_on_jemalloc: bool = False) -> None:
    try:
        if rerun_on_jemalloc and len(sys.argv) > 1 and sys.argv[1] in TRAINING_COMMANDS:
            from tunesmith import allocator

            allocator.rerun_with_jemalloc(sys.argv[1:])
        app()
    except TunesmithError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; a run with checkpoints continues with `tunesmith train RECIPE --resume`", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    entry()
