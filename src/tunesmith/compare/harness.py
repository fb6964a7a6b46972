"""Run the planned routes, each in its own child process, with results cached by what determines them.

A route's folder is `routes/<name>-<key>`, where the key hashes the route's name and settings (budget
resolved), the task settings it reads (prompt, retrieval), the prepared data's content and the base
model's identity. A folder holding `result.json` is a finished run: a later compare reuses it, so adding
one route to the task file runs only that route.

Children come from a fork server that imported torch once (each route starts in well under a second)
and measure their own peak RSS, so memory is per route, not the maximum of the whole run.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import BaseModel

from tunesmith.compare.data import Prepared, prepare
from tunesmith.compare.task import Task, budget_of, plan
from tunesmith.errors import TunesmithError
from tunesmith.files import write_text_atomic

RESULT_FILE, PREDICTIONS_FILE, ERROR_FILE, LOG_FILE = "result.json", "predictions.jsonl", "error.json", "log.txt"
CACHE_VERSION = 1  # bump when a route's results would differ for the same key
GITIGNORE = """\
# written by tunesmith compare: weights, indexes, embeddings and prepared data stay out of version control;
# the reports, plots and each route's result.json and predictions.jsonl are small and worth keeping
data/
index-*/
routes/*/artifact/
routes/*/sft_data/
routes/*/embedding_cache/
routes/*/log.txt
routes/*/error.json
"""


@dataclass
class RouteRun:
    name: str
    folder: Path
    status: str  # ran | cached | failed
    result: dict | None = None
    error: str | None = None


@dataclass
class CompareRun:
    task: Task
    prepared: Prepared
    runs: list[RouteRun]
    skipped: dict[str, str]
    model_identity: dict
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[RouteRun]:
        return [r for r in self.runs if r.status == "failed"]


def model_identity(task: Task) -> dict:
    """The base by content (config and weight bytes), not by path or file times: a moved checkout or a
    re-downloaded model keeps its cached results, a different model does not."""
    from tunesmith.models import resolve_base
    from tunesmith.rag.embed import content_fingerprint

    folder = resolve_base(task.model)
    return {"spec": task.model.path, "fingerprint": content_fingerprint(folder)}


def route_key(name: str, settings: BaseModel, task: Task, prepared: Prepared, model: dict, depends: dict) -> str:
    reads = {"version": CACHE_VERSION, "route": name, "settings": settings.model_dump(mode="json"),
             "budget": budget_of(task, settings).model_dump(mode="json") if hasattr(settings, "budget") else None,
             "task_type": task.type, "data": prepared.fingerprint, "model": model["fingerprint"],
             "prompt": task.classification_prompt if task.type == "classification" else None,
             "retrieval": task.retrieval.model_dump(mode="json") if name in ("few_shot", "rag", "hybrid") else None,
             "documents": prepared.documents_fingerprint if name in ("rag", "hybrid") else None,
             "depends": {k: v for k, v in sorted(depends.items())}}
    return hashlib.sha256(json.dumps(reads, sort_keys=True).encode()).hexdigest()[:12]


def run_compare(task: Task, console, rerun: bool = False) -> CompareRun:
    """Prepare the data, run (or reuse) every planned route, and return what each produced."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    started = time.perf_counter()
    out = Path(task.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / ".gitignore").exists():
        write_text_atomic(out / ".gitignore", GITIGNORE)
    with console.status("reading the data..."):
        prepared = prepare(task, out / "data")
        identity = model_identity(task)
    sizes = prepared.sizes()
    console.print(f"[bold]{task.name}[/bold] ({task.type}, model {task.model.path}): {sizes['train']:,} train / "
                  f"{sizes['validation']:,} validation / {sizes['test']:,} test examples → {out}")
    planned, skipped = plan(task)
    runs: list[RouteRun] = []
    keys: dict[str, str] = {}
    columns = [SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        for name, settings in planned.items():
            depends = {"lora_sft": keys["lora_sft"]} if name == "hybrid" else {}
            keys[name] = route_key(name, settings, task, prepared, identity, depends)
            folder = out / "routes" / f"{name}-{keys[name]}"
            dep_runs = {d: next(r for r in runs if r.name == d) for d in depends}
            if any(r.status == "failed" for r in dep_runs.values()):
                runs.append(RouteRun(name, folder, "failed", error=f"{', '.join(depends)} failed, so {name} did not run"))
                continue
            if not rerun and (folder / RESULT_FILE).is_file():
                runs.append(RouteRun(name, folder, "cached", _read_result(folder)))
                progress.add_task(f"{name}: cached ({folder.relative_to(out)})", total=1, completed=1)
                continue
            job = progress.add_task(f"{name}: running (log: {folder.relative_to(out) / LOG_FILE})", total=None)
            run = _run_child(name, settings, task, prepared, folder, out,
                             {d: (str(r.folder), r.result) for d, r in dep_runs.items()})
            runs.append(run)
            seconds = run.result["wall_seconds"] if run.result else None
            progress.update(job, total=1, completed=1, description=(
                f"{name}: ran in {seconds:.0f} s" if run.status == "ran" else f"[red]{name}: failed[/red] ({run.error})"))
    return CompareRun(task, prepared, runs, skipped, identity, time.perf_counter() - started)


def _read_result(folder: Path) -> dict:
    result = json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
    path = folder / PREDICTIONS_FILE
    result["records"] = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return result


# --- the child process -----------------------------------------------------------------------------

_CONTEXT = None
# Imported once by the fork server, not again by every route (a few seconds each on 2 cores).
PRELOAD = ["tunesmith.compare.routes", "tunesmith.stages.sft", "tunesmith.stages.classify", "tunesmith.adapters",
           "tunesmith.rag.embed", "peft", "transformers.models.llama.modeling_llama", "matplotlib.pyplot"]


def _context():
    """A fork server that imported torch and the routes once; children fork from it."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def _run_child(name: str, settings: BaseModel, task: Task, prepared: Prepared, folder: Path, shared: Path,
               depends: dict) -> RouteRun:
    folder.mkdir(parents=True, exist_ok=True)
    for stale in (RESULT_FILE, ERROR_FILE):
        (folder / stale).unlink(missing_ok=True)
    request = {"name": name, "settings": settings.model_dump(mode="json"), "task": task.model_dump(mode="json"),
               "prepared": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(prepared).items()},
               "folder": str(folder), "shared": str(shared), "depends": depends}
    process = _context().Process(target=child_main, args=(json.dumps(request),), name=f"tunesmith-{name}")
    process.start()
    process.join()
    if (folder / RESULT_FILE).is_file():
        return RouteRun(name, folder, "ran", _read_result(folder))
    error = folder / ERROR_FILE
    message = (json.loads(error.read_text(encoding="utf-8"))["message"] if error.is_file()
               else f"the route's process ended with exit code {process.exitcode} (out of memory?)")
    return RouteRun(name, folder, "failed", error=message)


def child_main(request_json: str) -> None:
    """Entry point of a route's process: output to the route's log, result (or error) to files."""
    import resource
    import traceback

    request = json.loads(request_json)
    folder = Path(request["folder"])
    log = os.open(folder / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    started = time.perf_counter()
    try:
        import torch
        from rich.console import Console

        from tunesmith.cli import _quiet_libraries
        from tunesmith.compare.routes import RUNNERS, RouteContext
        from tunesmith.compare.task import SETTINGS

        _quiet_libraries()
        name = request["name"]
        task = Task.model_validate(request["task"])
        if task.threads:
            torch.set_num_threads(task.threads)
        prepared = Prepared(**{**request["prepared"], "folder": Path(request["prepared"]["folder"])})
        ctx = RouteContext(name, task, SETTINGS[name].model_validate(request["settings"]), prepared, folder,
                           Path(request["shared"]), Console(file=sys.stdout, highlight=False, width=120),
                           {k: (Path(p), r) for k, (p, r) in request["depends"].items()})
        result = RUNNERS[name](ctx)
        summary = {k: v for k, v in asdict(result).items() if k not in ("records", "peak_rss_floor")}
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
        summary.update(examples=len(result.records), threads=torch.get_num_threads(),
                       wall_seconds=round(time.perf_counter() - started, 2), peak_rss_bytes=max(peak, result.peak_rss_floor))
        write_text_atomic(folder / PREDICTIONS_FILE,
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.records))
        write_text_atomic(folder / RESULT_FILE, json.dumps(summary, indent=2) + "\n")
    except TunesmithError as exc:
        print(f"error: {exc.message}", flush=True)
        write_text_atomic(folder / ERROR_FILE, json.dumps({"message": exc.message}) + "\n")
        sys.exit(2)
    except BaseException as exc:  # a bug: keep the traceback in the log, a one-line reason for the report
        traceback.print_exc()
        sys.stdout.flush()
        message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        write_text_atomic(folder / ERROR_FILE, json.dumps({"message": f"{message} (traceback in {LOG_FILE})"}) + "\n")
        sys.exit(1)
