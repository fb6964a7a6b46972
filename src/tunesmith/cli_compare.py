"""`tunesmith compare TASK.yaml`: every route side by side, with cost, and a recommendation.
Thin: read the task, run the harness, write the report, print the summary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def compare(
    task: Annotated[Path, typer.Argument(help="YAML task file (see examples/compare/)")],
    out: Annotated[Optional[Path], typer.Option("--out", help="report folder (default: the task's output_dir)")] = None,
    rerun: Annotated[bool, typer.Option(help="run every route again instead of reusing cached results")] = False,
) -> None:
    """Compare prompting, few-shot, RAG, classifier repurposing and fine-tuning on one test set: quality with
    confidence intervals, time, parameters, memory, artifact size; writes report.md and report.html."""
    from rich.table import Table

    from tunesmith.cli import _console, _quiet_libraries
    from tunesmith.compare import report
    from tunesmith.compare.harness import run_compare
    from tunesmith.compare.task import load_task

    spec = load_task(task)
    if out is not None:
        spec = spec.model_copy(update={"output_dir": str(out)})
    _quiet_libraries()
    console = _console()
    if not console.is_terminal:
        console.width = 160  # logs: the summary table stays readable
    run = run_compare(spec, console, rerun=rerun)
    rows, advice, folder = report.write(run)
    header, body = report.table(run, rows)
    summary = Table(title=f"{spec.name}: {len(run.prepared.test):,} test examples")
    for column in header:
        summary.add_column(column, justify="left" if column in ("route", "status") else "right")
    for row in body:
        summary.add_row(*row)
    console.print(summary)
    for line in advice.lines:
        console.print(line.replace("**", ""))
    console.print(f"report: {folder / 'report.md'} and {folder / 'report.html'}")
    if run.failed:
        raise typer.Exit(1)
