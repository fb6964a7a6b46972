"""`tunesmith compare` on the tiny model: every route through the harness, the report's columns, the cache,
one-line task-file errors, and the scoring and recommendation logic on their own."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SAMPLES, run_cli

COST_COLUMNS = ("train/build s", "ms/example", "trainable params", "peak RAM GiB", "artifact MiB")
SMALL_LM = {"r": 4, "alpha": 8, "max_length": 128}


def write_task(folder: Path, **fields) -> Path:
    task = {"model": "tiny", "budget": {"max_steps": 2}, "threads": 1, **fields}
    path = folder / "task.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False), encoding="utf-8")
    return path


def classification_task(folder: Path, routes: dict) -> Path:
    docs = folder / "docs"
    docs.mkdir(exist_ok=True)
    (docs / "reviews.md").write_text("# Praise\nCritics found the film warm, funny and moving.\n\n"
                                     "# Complaints\nSome viewers called the plot dull and the pacing awful.\n")
    return write_task(folder, type="classification", documents="docs", routes=routes, data={
        "train": str(SAMPLES / "sst2_train_800.jsonl"), "test": str(SAMPLES / "sst2_test_300.jsonl"),
        "labels_file": str(SAMPLES / "sst2_labels.json"), "max_train": 24, "max_validation": 8, "max_test": 12})


EIGHT_ROUTES = {"zero_shot": None, "few_shot": {"k": 2}, "rag": {"k": 1}, "classifier_frozen": None,
                "classifier_lora": {"r": 4, "alpha": 8}, "lora_sft": SMALL_LM,
                "freeze": {"top_layers": 1, "max_length": 128, "budget": {"minutes": 0.003}}, "hybrid": {"k": 1}}


@pytest.fixture(scope="module")
def classification(tmp_path_factory):
    """One compare run with every route but `full` (the cache test adds it)."""
    folder = tmp_path_factory.mktemp("cls")
    task = classification_task(folder, EIGHT_ROUTES)
    code, out, err = run_cli("compare", str(task), capsys=_Capture())
    assert code == 0, err + out
    return folder, task


class _Capture:
    """capsys for a module-scoped fixture: run_cli only needs readouterr()."""

    def readouterr(self):
        return "", ""


def results(folder: Path) -> dict:
    return json.loads((folder / "task_report" / "results.json").read_text())


def table_rows(markdown: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in markdown.split("## Routes", 1)[1].split("##", 1)[0].splitlines() if line.startswith("|")]
    split = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return split[0], split[2:]


def test_every_route_runs_in_its_own_process_and_reports_every_cost(classification):
    folder, _ = classification
    report = folder / "task_report"
    data = results(folder)
    routes = {r["name"]: r for r in data["routes"]}
    assert list(routes) == ["zero_shot", "few_shot", "rag", "classifier_frozen", "classifier_lora", "lora_sft",
                            "freeze", "hybrid"]
    assert all(r["status"] == "ran" and r["examples"] == 12 for r in routes.values())
    assert all(0.0 <= r["low"] <= r["value"] <= r["high"] <= 1.0 for r in routes.values())
    assert all(r["peak_rss_bytes"] > 100 * 2**20 and r["inference_seconds"] > 0 for r in routes.values())
    assert routes["zero_shot"]["trainable_parameters"] == 0 and routes["zero_shot"]["train_seconds"] == 0
    assert routes["classifier_frozen"]["trainable_parameters"] == 2 * 64 + 2, "a linear head on 64 dims, 2 classes"
    assert routes["lora_sft"]["trainable_parameters"] > 0 and routes["lora_sft"]["details"]["steps"] == 2
    assert routes["freeze"]["details"]["budget"] == {"minutes": 0.003} and routes["freeze"]["details"]["steps"] >= 1
    assert routes["classifier_lora"]["details"]["texts"] == 2 * 8, "2 steps of 8 texts"
    for name in ("few_shot", "rag", "classifier_frozen", "classifier_lora", "lora_sft", "freeze", "hybrid"):
        assert routes[name]["artifact_bytes"] > 0 and routes[name]["train_seconds"] > 0, name
    hybrid = routes["hybrid"]
    assert hybrid["trainable_parameters"] == routes["lora_sft"]["trainable_parameters"]
    assert hybrid["train_seconds"] >= routes["lora_sft"]["train_seconds"], "the adapter's training is counted"
    assert data["skipped"] == {"full": "not listed under routes"}

    header, body = table_rows((report / "report.md").read_text())
    assert all(column in header for column in COST_COLUMNS)
    assert len(body) == 8 and all(len(row) == len(header) and "-" not in row[4:] for row in body)
    assert "## Recommendation" in (report / "report.md").read_text()
    page = (report / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "src='quality_vs_cost.png'" not in page
    assert (report / "quality_vs_cost.png").stat().st_size > 1000 and (report / "route_costs.png").is_file()
    assert "data/" in (report / ".gitignore").read_text()
    for name in routes:
        route_dir = next((report / "routes").glob(f"{name}-*"))
        assert len((route_dir / "predictions.jsonl").read_text().splitlines()) == 12


def test_a_rerun_with_one_more_route_runs_only_that_route(classification, capsys):
    folder, task = classification
    before = {p.parent.name: p.stat().st_mtime_ns for p in (folder / "task_report" / "routes").glob("*/result.json")}
    spec = yaml.safe_load(task.read_text())
    spec["routes"]["full"] = {"max_length": 128}
    task.write_text(yaml.safe_dump(spec, sort_keys=False))
    code, out, err = run_cli("compare", str(task), capsys=capsys)
    assert code == 0, err
    statuses = {r["name"]: r["status"] for r in results(folder)["routes"]}
    assert statuses.pop("full") == "ran" and set(statuses.values()) == {"cached"}
    after = {p.parent.name: p.stat().st_mtime_ns for p in (folder / "task_report" / "routes").glob("*/result.json")}
    assert {k: v for k, v in after.items() if not k.startswith("full-")} == before, "earlier routes were not rerun"
    assert out.count("cached") >= 8 and "full: ran" in out
    _, body = table_rows((folder / "task_report" / "report.md").read_text())
    assert len(body) == 9


def test_qa_with_documents_scores_stated_labels_and_retrieval_recall(tmp_path, capsys):
    sample = SAMPLES / "rag_pubmedqa_60"
    task = write_task(tmp_path, type="qa_with_documents", documents=str(sample / "corpus.jsonl"), data_changes="often",
                      data={"queries": str(sample / "queries.jsonl"), "answers": str(sample / "answers.jsonl"),
                            "qrels": str(sample / "qrels.jsonl"), "max_test": 6},
                      routes={"zero_shot": None, "rag": {"k": 2}})
    code, out, err = run_cli("compare", str(task), capsys=capsys)
    assert code == 0, err
    routes = {r["name"]: r for r in results(tmp_path)["routes"]}
    assert routes["rag"]["secondary"]["recall_at_k"] >= 0.8, "each question's own abstract is in the corpus"
    assert "recall_at_k" not in routes["zero_shot"]["secondary"]
    records = [json.loads(x) for x in next(tmp_path.glob("task_report/routes/rag-*/predictions.jsonl")).read_text().splitlines()]
    assert len(records) == 6 and all(r["predicted"] in ("yes", "no", "maybe", None) for r in records)
    markdown = (tmp_path / "task_report" / "report.md").read_text()
    assert "recall@2" in markdown and "the data changes often" in markdown


def test_instruction_scores_generated_answers_against_references(tmp_path, capsys):
    task = write_task(tmp_path, type="instruction", data={"train": str(SAMPLES / "alpaca_500.jsonl"), "max_train": 16,
                                                          "max_validation": 4, "max_test": 4},
                      routes={"zero_shot": {"max_new_tokens": 4}, "lora_sft": {**SMALL_LM, "max_new_tokens": 4}})
    code, _, err = run_cli("compare", str(task), capsys=capsys)
    assert code == 0, err
    routes = {r["name"]: r for r in results(tmp_path)["routes"]}
    assert set(routes) == {"zero_shot", "lora_sft"}
    assert all(set(r["secondary"]) == {"token_f1", "eval_loss"} and r["secondary"]["eval_loss"] > 0
               for r in routes.values())
    skipped = results(tmp_path)["skipped"]
    assert "no documents" in skipped["rag"] and "classification tasks only" in skipped["classifier_frozen"]


def test_a_failing_route_is_reported_with_its_reason_and_not_cached(tmp_path, capsys):
    task = classification_task(tmp_path, {"zero_shot": None, "classifier_frozen": {"layer": 99}})
    code, out, _ = run_cli("compare", str(task), capsys=capsys)
    assert code == 1, "the report is written, and the exit code says a route failed"
    routes = {r["name"]: r for r in results(tmp_path)["routes"]}
    assert routes["zero_shot"]["status"] == "ran" and routes["classifier_frozen"]["status"] == "failed"
    assert "classifier.layer: 99 is outside" in routes["classifier_frozen"]["error"]
    failed = next((tmp_path / "task_report" / "routes").glob("classifier_frozen-*"))
    assert not (failed / "result.json").exists() and (failed / "error.json").is_file()
    assert "failed: classifier.layer: 99" in (tmp_path / "task_report" / "report.md").read_text()


@pytest.mark.parametrize("edit, expected", [
    (lambda t: t["data"].update(maxtest=3), r"task\.yaml:\d+: data\.maxtest: unknown key; did you mean 'max_test'\?"),
    (lambda t: t["routes"].update(lora_sfft={}), r"task\.yaml:\d+: routes\.lora_sfft: unknown key; did you mean 'lora_sft'\?"),
    (lambda t: t.update(type="regression"), r"task\.yaml:\d+: type: Input should be 'classification'"),
    (lambda t: t.update(metric="rouge_l"), r"task\.yaml:\d+: metric: classification tasks are scored by accuracy, macro_f1"),
    (lambda t: t["budget"].update(minutes=3), r"task\.yaml:\d+: budget: give exactly one of max_steps or minutes"),
    (lambda t: t.pop("documents"), r"task\.yaml:\d+: routes\.rag: no documents to retrieve from"),
    (lambda t: t["data"].pop("train"), r"task\.yaml:\d+: data\.train: required for classification tasks"),
])
def test_a_bad_task_file_is_one_line_naming_file_line_and_field(tmp_path, capsys, edit, expected):
    task = classification_task(tmp_path, {"zero_shot": None, "rag": None})
    spec = yaml.safe_load(task.read_text())
    edit(spec)
    task.write_text(yaml.safe_dump(spec, sort_keys=False))
    code, _, err = run_cli("compare", str(task), capsys=capsys)
    assert code == 2 and err.strip().count("\n") == 0, err
    assert re.search(expected, err), err
    assert not (tmp_path / "task_report").exists(), "nothing runs before the task file is valid"


def test_shipped_task_files_are_valid():
    from tunesmith.compare.task import load_task, plan

    shipped = sorted((REPO / "examples" / "compare").glob("*.yaml"))
    assert len(shipped) >= 2
    for path in shipped:
        task = load_task(path)
        assert task.model.path == "smollm2-135m-instruct" and plan(task)[0], path
        assert "tunesmith compare examples/compare/" in path.read_text().splitlines()[1], "header gives the command"


# --- the pieces on their own ------------------------------------------------------------------------

def test_label_scoring_and_reference_loss_equal_one_sequence_at_a_time(tiny_path, tokenizer):
    import torch

    from tunesmith.compare.predict import label_logprobs, reference_losses, reply_ids
    from tunesmith.generate import chat_prompt_ids
    from tunesmith.models import load_model

    model = load_model(tiny_path).eval()
    chats = [[{"role": "user", "content": "short"}], [{"role": "user", "content": "a much longer message " * 5}],
             [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]]
    labels = ["negative", "positive", "mixed feelings"]

    def naive(chat, reply):
        prompt, ids = chat_prompt_ids(tokenizer, chat), reply_ids(tokenizer, model, chat, reply)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([prompt + ids])).logits[0].float(), -1)
        return sum(float(logprobs[len(prompt) - 1 + t, token]) for t, token in enumerate(ids)), len(ids)

    fast = label_logprobs(model, tokenizer, chats, labels, batch_size=2)
    for chat, scores in zip(chats, fast):
        assert scores == pytest.approx([naive(chat, label)[0] for label in labels], abs=1e-3)
    losses = reference_losses(model, tokenizer, chats, labels, batch_size=2)
    for (loss, tokens), chat, label in zip(losses, chats, labels):
        expected, n = naive(chat, label)
        assert tokens == n and loss == pytest.approx(-expected, abs=1e-3)


def test_reference_scores_and_bootstrap():
    import numpy as np

    from tunesmith.evaluate.metrics import bootstrap_ci, rouge_l_f1, token_f1

    assert rouge_l_f1("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert token_f1("The cat sat.", "a cat sat down") == pytest.approx(0.8)
    assert rouge_l_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    correct = np.array([1.0] * 70 + [0.0] * 30)
    low, high = bootstrap_ci(lambda rows: correct[rows].mean(axis=1), 100, seed=0)
    assert low < 0.7 < high and (low, high) == bootstrap_ci(lambda rows: correct[rows].mean(axis=1), 100, seed=0)
    assert 0.05 < high - low < 0.25


def _row(name, value, low, high, seconds):
    from tunesmith.compare.scores import RouteRow

    return RouteRow(name, "ran", value=value, low=low, high=high, examples=100, train_seconds=seconds,
                    inference_seconds=1.0)


def test_recommendation_names_the_cheapest_tied_route_and_the_checks():
    from tunesmith.compare.recommend import recommend

    rows = [_row("zero_shot", 0.60, 0.55, 0.65, 0.0), _row("few_shot", 0.84, 0.79, 0.88, 4.0),
            _row("rag", 0.80, 0.74, 0.85, 9.0), _row("lora_sft", 0.86, 0.81, 0.90, 99.0)]
    advice = recommend(rows, "accuracy", False, 1000, "rarely", False, True, 0.95)
    text = " ".join(advice.lines)
    assert advice.best == "lora_sft" and advice.tied == "few_shot" and advice.pick == "few_shot"
    assert "20× cheaper" in text and "0.860" in text and "0.840" in text

    advice = recommend(rows[::3], "accuracy", False, 1000, "rarely", False, True, 0.95)
    assert advice.pick == "lora_sft" and "No cheaper route is statistically tied" in " ".join(advice.lines)
    advice = recommend(rows[::3], "accuracy", False, 1000, "rarely", False, True, 0.95, baseline=("yes", 0.85))
    assert "answering `yes` every time scores 0.850" in " ".join(advice.lines) and "includes it" in " ".join(advice.lines)

    advice = recommend(rows[::3], "accuracy", False, 120, "rarely", False, True, 0.95)
    assert advice.pick == "zero_shot" and "only 120 training examples" in " ".join(advice.lines)

    advice = recommend([rows[3], rows[2]], "accuracy", False, 5000, "often", False, True, 0.95)
    assert advice.pick == "rag" and "re-ingest" in " ".join(advice.lines)

    advice = recommend([_row("zero_shot", 2.1, 2.0, 2.2, 0.0), _row("lora_sft", 1.5, 1.4, 1.6, 50.0)], "eval_loss",
                       True, 5000, "rarely", False, False, 0.95)
    assert advice.pick == "lora_sft", "lower is better for eval loss"
