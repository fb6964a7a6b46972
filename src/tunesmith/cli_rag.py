"""`tunesmith rag ...`: knowledge bases (ingest, query, answer, eval, list, drop) and few-shot prompting.
Thin: parse, call tunesmith.rag, print."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

rag_app = typer.Typer(no_args_is_help=True, help="Retrieval augmentation: knowledge bases of your documents, "
                                                 "cited answers, retrieval evaluation, few-shot prompts.")

KbArg = Annotated[str, typer.Argument(help="knowledge base name")]
StoreOpt = Annotated[Optional[str], typer.Option(help="lancedb (default, embedded) or a postgresql:// DSN; "
                                                      "an existing KB remembers its store")]
EmbedderOpt = Annotated[str, typer.Option(help="minilm (shipped), or a sentence-transformers / HF encoder folder")]
RetrieverOpt = Annotated[str, typer.Option("--retriever", help="dense, bm25 or hybrid (reciprocal rank fusion)")]


def _console():
    from tunesmith.cli import _console as console

    return console()


def _quiet() -> None:
    from tunesmith.cli import _quiet_libraries

    _quiet_libraries()


def _retriever(kb: str, store: str | None, embedder: str | None):
    from tunesmith.rag.embed import TextEncoder
    from tunesmith.rag.kb import open_kb
    from tunesmith.rag.retrieve import Retriever

    backend, meta = open_kb(kb, store)
    return Retriever(backend, TextEncoder(embedder or meta["embedder"]), kb, meta)


def _generator(model: str, adapter: str | None):
    from tunesmith.adapters import load_trained

    if adapter:
        from tunesmith.adapters import get_adapter, registry_dir

        return load_trained(registry_dir() / get_adapter(adapter).name)
    return load_trained(model)


class _IngestProgress:
    """Files read and chunks embedded, as two rich progress bars."""

    def __init__(self, progress) -> None:
        self.progress = progress
        self.files = progress.add_task("files", total=None)
        self.chunks = progress.add_task("chunks embedded", total=0)

    def start(self, files: int) -> None:
        self.progress.update(self.files, total=files)

    def file_done(self, chunks: int) -> None:
        self.progress.advance(self.files)
        self.progress.update(self.chunks, total=self.progress.tasks[self.chunks].total + chunks)

    def advance(self, chunks: int) -> None:
        self.progress.advance(self.chunks, chunks)


@rag_app.command("ingest")
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="files and folders: .txt .md .html .pdf .jsonl .csv")],
    kb: Annotated[str, typer.Option("--kb", help="knowledge base name (created if new)")],
    store: StoreOpt = None,
    embedder: EmbedderOpt = "minilm",
    text_field: Annotated[str, typer.Option(help=".jsonl/.csv: the column holding the text")] = "text",
    title_field: Annotated[str, typer.Option(help=".jsonl/.csv: the column holding a title")] = "title",
    id_field: Annotated[str, typer.Option(help=".jsonl/.csv: the column holding the document id")] = "id",
    chunk_tokens: Annotated[int, typer.Option(min=16, help="largest chunk, in the embedder's tokens")] = 200,
    overlap: Annotated[int, typer.Option(min=0, help="tokens shared by consecutive chunks")] = 40,
) -> None:
    """Add files to a knowledge base; re-running skips unchanged files, replaces changed ones, drops deleted ones."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tunesmith.rag.documents import RowFields
    from tunesmith.rag.ingest import ingest as run

    _quiet()
    console = _console()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:
        report = run(paths, kb, store, embedder, RowFields(text_field, title_field, id_field), chunk_tokens, overlap,
                     progress=_IngestProgress(progress))
    console.print(f"knowledge base {kb}: {len(report.added)} added, {len(report.replaced)} replaced, "
                  f"{len(report.unchanged)} unchanged, {len(report.removed)} removed, {len(report.failed)} failed; "
                  f"{report.chunks_written:,} chunks written in {report.seconds:.1f} s "
                  f"({report.chunks_per_second:.0f} chunks/s); {report.chunks_total:,} chunks in all")
    for problem in report.failed:
        console.print(f"[yellow]skipped[/yellow] {problem}")


@rag_app.command("query")
def query(
    kb: KbArg,
    question: Annotated[str, typer.Argument()],
    k: Annotated[int, typer.Option(min=1)] = 5,
    retriever: RetrieverOpt = "hybrid",
    prefix: Annotated[Optional[str], typer.Option(help="only sources whose path starts with this")] = None,
    store: StoreOpt = None,
    embedder: Annotated[Optional[str], typer.Option(help="default: the KB's own")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON lines instead of a table")] = False,
) -> None:
    """Ranked chunks for a question, with scores and sources."""
    from rich.table import Table

    _quiet()
    engine = _retriever(kb, store, embedder)
    hits = engine.search(question, k, retriever, _prefix(prefix))
    if as_json:
        sys.stdout.write("".join(json.dumps(h.__dict__) + "\n" for h in hits))
        return
    table = Table(title=f"{retriever} top {k} in {kb}")
    for column in ("#", "score", "source", "chars", "text"):
        table.add_column(column, overflow="fold")
    for rank, hit in enumerate(hits, start=1):
        snippet = " ".join(hit.text.split())
        table.add_row(str(rank), f"{hit.score:.4f}", f"{hit.source}\n{hit.title}", f"{hit.start}-{hit.end}",
                      snippet[:240] + ("..." if len(snippet) > 240 else ""))
    _console().print(table if hits else "no matching chunks")


@rag_app.command("answer")
def answer(
    kb: KbArg,
    question: Annotated[str, typer.Argument()],
    model: Annotated[str, typer.Option(help="generator: built-in name, HF folder, .gguf, or a run folder")] = "smollm2-135m-instruct",
    adapter: Annotated[Optional[str], typer.Option(help="registry adapter as the generator (the hybrid route)")] = None,
    k: Annotated[int, typer.Option(min=1)] = 4,
    budget: Annotated[int, typer.Option(min=64, help="tokens of context at most")] = 1024,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    retriever: RetrieverOpt = "hybrid",
    prefix: Annotated[Optional[str], typer.Option(help="only sources whose path starts with this")] = None,
    store: StoreOpt = None,
) -> None:
    """Answer from retrieved chunks with numbered citations that map to sources."""
    from tunesmith.rag.answer import answer as run

    _quiet()
    engine = _retriever(kb, store, None)
    hits = engine.search(question, k, retriever, _prefix(prefix))
    loaded, tokenizer = _generator(model, adapter)
    result = run(loaded, tokenizer, question, hits, budget, max_new_tokens,
                 on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()))
    sys.stdout.write("\n\n")
    cited = {c.number for c in result.citations}
    console = _console()
    console.print("sources:" if result.context else "no sources fit the budget")
    for number, hit in enumerate(result.context, start=1):
        mark = "cited" if number in cited else "shown"
        console.print(f"  [{number}] {hit.title} — {hit.source} (chars {hit.start}-{hit.end}, {mark})")


@rag_app.command("eval")
def evaluate(
    kb: KbArg,
    queries: Annotated[Path, typer.Option(help="JSONL: id, text[, split]")],
    qrels: Annotated[Path, typer.Option(help="JSONL: query_id, doc_id[, score]")],
    answers: Annotated[Optional[Path], typer.Option(help="JSONL: query_id, final_decision (yes/no/maybe)")] = None,
    split: Annotated[Optional[str], typer.Option(help="only queries of this split")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="only the first N queries")] = None,
    answer_limit: Annotated[Optional[int], typer.Option(min=1, help="answer only the first N (generation is slow)")] = None,
    model: Annotated[str, typer.Option(help="generator for answer accuracy")] = "smollm2-135m-instruct",
    adapter: Annotated[Optional[str], typer.Option(help="registry adapter as the generator")] = None,
    k: Annotated[int, typer.Option(min=1, help="chunks in the prompt for answers")] = 3,
    store: StoreOpt = None,
    output: Annotated[Optional[Path], typer.Option(help="write the results as JSON")] = None,
) -> None:
    """Recall@1/5/10, MRR, nDCG@10 per retriever; answer accuracy with and without retrieval."""
    from rich.progress import Progress
    from rich.table import Table

    from tunesmith.files import write_text_atomic
    from tunesmith.rag import evaluate as ev

    _quiet()
    console = _console()
    engine = _retriever(kb, store, None)
    chosen = ev.read_queries(queries, split, limit)
    results: dict = {"kb": kb, "store": engine.store.kind, "queries": len(chosen)}
    results["retrieval"] = ev.evaluate_retrieval(engine, chosen, ev.read_qrels(qrels))
    table = Table(title=f"retrieval on {kb} ({engine.store.kind}, {len(chosen)} queries)")
    for column in ("retriever", "recall@1", "recall@5", "recall@10", "MRR", "nDCG@10", "p50 ms"):
        table.add_column(column, justify="right")
    for mode, r in results["retrieval"].items():
        table.add_row(mode, *(f"{r[m]:.3f}" for m in ("recall@1", "recall@5", "recall@10", "mrr", "ndcg@10")),
                      f"{r['p50_ms']:.1f}")
    console.print(table)
    if answers is not None:
        gold = ev.read_answers(answers)
        loaded, tokenizer = _generator(model, adapter)
        asked = [q for q in chosen if q[0] in gold][:answer_limit]
        results["answers"] = {}
        with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
            for label, retriever in (("without retrieval", None), (f"with retrieval (hybrid, top {k})", engine)):
                task = progress.add_task(f"answering {label}", total=len(asked))
                results["answers"][label] = ev.evaluate_answers(
                    loaded, tokenizer, retriever, asked, gold, k=k,
                    on_batch=lambda n, task=task: progress.advance(task, n))
        table = Table(title=f"yes/no/maybe accuracy ({len(asked)} questions, {model if not adapter else adapter})")
        for column in ("prompt", "accuracy", "yes", "no", "maybe", "no label", "majority"):
            table.add_column(column, justify="right")
        for label, r in results["answers"].items():
            s = r["stated"]
            table.add_row(label, f"{r['accuracy']:.3f}", str(s["yes"]), str(s["no"]), str(s["maybe"]), str(s["None"]),
                          f"{r['majority_baseline']:.3f}")
        console.print(table)
    if output:
        write_text_atomic(output, json.dumps(results, indent=2) + "\n")
        console.print(f"wrote {output}")


@rag_app.command("list")
def list_kbs() -> None:
    """Knowledge bases: store, embedder, created."""
    from tunesmith.rag.kb import list_kbs as known

    kbs = known()
    for meta in kbs:
        where = meta["dsn"] if meta["store"] == "postgres" else "lancedb"
        _console().print(f"{meta['name']}: {where}, embedder {meta['embedder']} ({meta['dim']} dims), created {meta['created']}")
    if not kbs:
        _console().print("no knowledge bases yet; create one with `tunesmith rag ingest PATH --kb NAME`")


@rag_app.command("drop")
def drop(kb: KbArg, store: StoreOpt = None) -> None:
    """Delete a knowledge base (its chunks and its record)."""
    from tunesmith.rag.kb import drop_kb

    drop_kb(kb, store)
    _console().print(f"dropped knowledge base {kb}")


@rag_app.command("fewshot")
def fewshot(
    examples: Annotated[Path, typer.Option(help="labelled rows (text, label) or instructions (alpaca / messages)")],
    query: Annotated[str, typer.Argument(help="the input to answer")],
    k: Annotated[int, typer.Option(min=1, help="examples in the prompt")] = 4,
    model: Annotated[str, typer.Option()] = "smollm2-135m-instruct",
    adapter: Annotated[Optional[str], typer.Option(help="registry adapter as the generator")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 128,
    show_prompt: Annotated[bool, typer.Option(help="print the chosen examples first")] = False,
) -> None:
    """In-context learning: answer with the k most similar examples as demonstrations."""
    from tunesmith.generate import generate_reply
    from tunesmith.rag.embed import TextEncoder
    from tunesmith.rag.fewshot import FewShot, read_examples

    _quiet()
    shots = FewShot(read_examples(examples), TextEncoder())
    messages = shots.messages(query, k)
    if show_prompt:
        for m in messages:
            _console().print(f"[dim]{m['role']}:[/dim] {m['content']}")
    loaded, tokenizer = _generator(model, adapter)
    generate_reply(loaded, tokenizer, messages, max_new_tokens, on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()))
    sys.stdout.write("\n")


def _prefix(prefix: str | None) -> str | None:
    """A prefix that names an existing path (or starts with ./ or ../) is made absolute, as sources are."""
    if prefix is None:
        return None
    path = Path(prefix)
    if path.exists() or prefix.startswith(("./", "../")):
        resolved = str(path.resolve())
        return resolved + "/" if prefix.endswith("/") and not resolved.endswith("/") else resolved
    return prefix
