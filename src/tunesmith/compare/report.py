"""report.md and report.html (self-contained: the PNGs embedded as base64) from a compare run:
the table of routes, quality against cost, per-route bars, the skipped routes and the recommendation."""

from __future__ import annotations

import base64
import html
import json
from dataclasses import asdict
from pathlib import Path

from tunesmith.compare.harness import CompareRun
from tunesmith.compare.recommend import MIN_FINE_TUNE_EXAMPLES, Recommendation, recommend
from tunesmith.compare.scores import LABELS, NAMES, RouteRow, summarize
from tunesmith.compare.task import LOWER_IS_BETTER, METRICS
from tunesmith.compare.plots import quality_cost_plot, route_bars
from tunesmith.files import write_text_atomic

SCATTER, BARS = "quality_vs_cost.png", "route_costs.png"


def build(run: CompareRun) -> tuple[list[RouteRow], Recommendation]:
    task = run.task
    metric = task.primary_metric
    rows = summarize(run.runs, metric, METRICS[task.type], run.prepared.labels, task.bootstrap_resamples,
                     task.confidence)
    advice = recommend(rows, metric, metric in LOWER_IS_BETTER, len(run.prepared.train), task.data_changes,
                       task.per_user_context, bool(task.documents), task.confidence,
                       majority(run) if metric in ("accuracy", "answer_accuracy") else None)
    return rows, advice


def majority(run: CompareRun) -> tuple[str, float] | None:
    """The most common answer of the test set and the accuracy of always giving it (the trivial baseline)."""
    from collections import Counter

    key = {"classification": "label", "qa_with_documents": "answer"}.get(run.task.type)
    if key is None:
        return None
    answer, count = Counter(row[key] for row in run.prepared.test).most_common(1)[0]
    return answer, count / len(run.prepared.test)


def write(run: CompareRun) -> tuple[list[RouteRow], Recommendation, Path]:
    """Write report.md, report.html, the two PNGs and results.json into the report folder."""
    out = Path(run.task.output_dir)
    rows, advice = build(run)
    scored = [r for r in rows if r.value is not None]
    metric_name = NAMES[run.task.primary_metric]
    level = f"{run.task.confidence:.0%}"
    if scored:
        quality_cost_plot(out / SCATTER, [(r.label, r.cost_seconds, r.value, r.low, r.high) for r in scored],
                          "seconds to train or build + answer the test set (log scale)",
                          f"{metric_name} ({level} bootstrap CI)", f"{run.task.name}: quality vs cost")
        route_bars(out / BARS, [r.label for r in scored], [
            (metric_name, [r.value for r in scored], [(r.low, r.high) for r in scored]),
            ("train / build s", [r.train_seconds for r in scored], None),
            ("ms per test example", [r.per_example_ms for r in scored], None),
            ("peak RAM GiB", [r.peak_rss_bytes / 2**30 for r in scored], None),
            ("artifact MiB", [r.artifact_bytes / 2**20 for r in scored], None),
        ], f"{run.task.name}: per route")
    markdown = _markdown(run, rows, advice, bool(scored))
    write_text_atomic(out / "report.md", markdown)
    write_text_atomic(out / "report.html", _html(run, rows, advice, out if scored else None))
    results = {"task": run.task.name, "type": run.task.type, "model": run.model_identity["spec"],
               "metric": run.task.primary_metric, "data": run.prepared.sizes(), "seconds": round(run.seconds, 1),
               "routes": [asdict(r) for r in rows], "skipped": run.skipped, "recommendation": asdict(advice)}
    write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    return rows, advice, out


# --- the table ----------------------------------------------------------------------------------------

COLUMNS = ("route", "status", "{metric} [{level} CI]", "other metrics", "train/build s", "ms/example",
           "trainable params", "peak RAM GiB", "artifact MiB")


def table(run: CompareRun, rows: list[RouteRow]) -> tuple[list[str], list[list[str]]]:
    metric_name = NAMES[run.task.primary_metric]
    header = [c.format(metric=metric_name, level=f"{run.task.confidence:.0%}") for c in COLUMNS]
    body = []
    for r in rows:
        if r.value is None:
            body.append([r.label, r.status, f"failed: {r.error}" if r.error else "-", *["-"] * (len(COLUMNS) - 3)])
            continue
        others = ", ".join(f"{_metric_name(m, r)} {v:.3f}" for m, v in r.secondary.items()) or "-"
        body.append([r.label, r.status, f"{r.value:.3f} [{r.low:.3f}, {r.high:.3f}]", others,
                     f"{r.train_seconds:,.1f}", f"{r.per_example_ms:,.1f}", f"{r.trainable_parameters:,}",
                     f"{r.peak_rss_bytes / 2**30:.2f}", f"{r.artifact_bytes / 2**20:,.2f}"])
    return header, body


def _metric_name(metric: str, row: RouteRow) -> str:
    return f"recall@{row.details['recall_k']}" if metric == "recall_at_k" and "recall_k" in row.details else NAMES[metric]


def _setup(run: CompareRun) -> list[str]:
    task, sizes = run.task, run.prepared.sizes()
    docs = f"; documents: {len(task.documents)} path(s)" if task.documents else "; no documents"
    lines = [
        f"Task type **{task.type}**, base model **{task.model.path}**, ranked by **{NAMES[task.primary_metric]}** "
        f"({task.confidence:.0%} percentile bootstrap, {task.bootstrap_resamples:,} seeded resamples of the test set).",
        f"Data: {sizes['train']:,} train / {sizes['validation']:,} validation / {sizes['test']:,} test examples{docs}; "
        f"data changes {task.data_changes}; per-user context: {'yes' if task.per_user_context else 'no'}.",
        f"Budget of trained routes: {_budget(task.budget)} unless a route sets its own. Torch threads per route: "
        f"{', '.join(sorted({str(r.result.get('threads', '?')) for r in run.runs if r.result})) or '-'}. "
        f"The routes took {sum(r.result['wall_seconds'] for r in run.runs if r.result) / 60:.1f} min in all, each "
        f"in its own process; this invocation took {run.seconds / 60:.1f} min "
        f"({sum(r.status == 'ran' for r in run.runs)} route(s) ran, {sum(r.status == 'cached' for r in run.runs)} cached).",
    ]
    trivial = majority(run)
    if trivial is not None:
        lines.append(f"Always answering the most common answer of the test set (`{trivial[0]}`) scores "
                     f"{trivial[1]:.3f} accuracy.")
    if sizes["train"] < MIN_FINE_TUNE_EXAMPLES:
        lines.append(f"Fewer than {MIN_FINE_TUNE_EXAMPLES} training examples: see the checks below.")
    return lines


def _budget(budget) -> str:
    return f"{budget.max_steps} optimizer steps" if budget.max_steps else f"{budget.minutes:g} min of training"


def _route_notes(rows: list[RouteRow]) -> list[str]:
    notes = []
    for r in rows:
        d = r.details
        bits = []
        if "steps" in d:
            bits.append(f"{d['steps']} steps ({_budget_text(d.get('budget'))})")
        if d.get("texts"):
            bits.append(f"{d['texts']:,} texts tuned")
        if d.get("validation_loss_after") is not None:
            bits.append(f"validation loss {d['validation_loss_before']} → {d['validation_loss_after']}")
        if "index" in d:
            i = d["index"]
            bits.append(f"index of {i['chunks']:,} chunks from {i['files']} file(s), built in {i['seconds']:.1f} s")
        if "k" in d:
            bits.append(f"{d['k']} demonstrations from a pool of {d['pool']:,}")
        if d.get("adapter"):
            bits.append(f"adapter from {d['adapter']} (its training time is counted)")
        if "layer" in d:
            bits.append(f"layer {d['layer']}, {d['head']} head")
        if r.predicted:
            bits.append("answers: " + ", ".join(f"{k} {v:,}" for k, v in r.predicted.items()))
        if bits:
            notes.append(f"- **{r.label}**: " + "; ".join(bits) + f"; whole route {r.wall_seconds:.0f} s in its process.")
    return notes


def _budget_text(budget: dict | None) -> str:
    if not budget:
        return "budget"
    return f"budget {budget['max_steps']} steps" if "max_steps" in budget else f"budget {budget['minutes']:g} min"


EXPLAIN = [
    "**status**: ran now, or cached (reused from an earlier run with the same route settings, data and model).",
    "**train/build s**: wall time to make the route ready: fine-tuning (model loading and evaluations included), "
    "embedding + head for classifiers, building the retrieval index, embedding the few-shot pool; 0 for zero-shot.",
    "**ms/example**: wall time to answer the whole test set (prompt building and retrieval included, model loading "
    "not), divided by the number of test examples; batched as the route runs.",
    "**trainable params**: parameters the route trained (LoRA matrices, a classifier head, unfrozen layers).",
    "**peak RAM GiB**: peak resident memory of the process that ran the route (one process per route); the hybrid "
    "reports its adapter's training peak when that is higher.",
    "**artifact MiB**: what must be stored beyond the base model: adapter or model weights, a classifier head, "
    "the retrieval index, the few-shot pool.",
]


# --- markdown ------------------------------------------------------------------------------------------

def _markdown(run: CompareRun, rows: list[RouteRow], advice: Recommendation, plots: bool) -> str:
    header, body = table(run, rows)
    parts = [f"# {run.task.name}: which route wins\n", *[f"{line}\n" for line in _setup(run)], "## Routes\n",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|",
             *["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body], ""]
    if run.skipped:
        parts += ["Skipped:", "", *[f"- {LABELS[n]} (`{n}`): {why}" for n, why in run.skipped.items()], ""]
    parts += ["## Recommendation\n", *[f"{line}\n" for line in advice.lines]]
    if plots:
        parts += ["## Quality vs cost\n", f"![quality vs cost]({SCATTER})\n", f"![per-route bars]({BARS})\n"]
    notes = _route_notes(rows)
    if notes:
        parts += ["## Route details\n", *notes, ""]
    parts += ["## Columns\n", *[f"- {line}" for line in EXPLAIN], ""]
    return "\n".join(parts)


# --- HTML ----------------------------------------------------------------------------------------------

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;font-size:14px;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px}
td:nth-child(n+3){text-align:right}th{background:#f3f3f3}img{max-width:100%;margin:.5em 0}
.pick{background:#eef6ee;border-left:4px solid #4a4;padding:.5em 1em}code{background:#f3f3f3;padding:0 3px}"""


def _inline(text: str) -> str:
    """Markdown's **bold** and `code` of our own sentences, as HTML (everything else escaped)."""
    import re

    escaped = html.escape(text)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)


def _html(run: CompareRun, rows: list[RouteRow], advice: Recommendation, folder: Path | None) -> str:
    header, body = table(run, rows)
    title = html.escape(f"{run.task.name}: which route wins")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style></head>"
             f"<body><h1>{title}</h1>", *[f"<p>{_inline(line)}</p>" for line in _setup(run)], "<h2>Routes</h2><table>",
             "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>",
             *["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body], "</table>"]
    if run.skipped:
        parts.append("<p>Skipped:</p><ul>" + "".join(
            f"<li>{html.escape(LABELS[n])} (<code>{n}</code>): {_inline(why)}</li>" for n, why in run.skipped.items()) + "</ul>")
    parts.append("<h2>Recommendation</h2><div class='pick'>" + "".join(f"<p>{_inline(x)}</p>" for x in advice.lines) + "</div>")
    if folder is not None:
        parts.append("<h2>Quality vs cost</h2>")
        for name, alt in ((SCATTER, "quality vs cost"), (BARS, "per-route bars")):
            data = base64.b64encode((folder / name).read_bytes()).decode("ascii")
            parts.append(f"<img alt='{alt}' src='data:image/png;base64,{data}'>")
    notes = _route_notes(rows)
    if notes:
        parts.append("<h2>Route details</h2><ul>" + "".join(f"<li>{_inline(n[2:])}</li>" for n in notes) + "</ul>")
    parts.append("<h2>Columns</h2><ul>" + "".join(f"<li>{_inline(x)}</li>" for x in EXPLAIN) + "</ul></body></html>")
    return "\n".join(parts) + "\n"
