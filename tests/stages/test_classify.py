import io
import json

import pytest
import torch

from conftest import run_cli, write_jsonl
from tunesmith.classifier import load_classifier
from tunesmith.config import load_recipe
from tunesmith.stages import classify

POSITIVE = ["good", "great", "lovely", "superb", "wonderful"]
NEGATIVE = ["bad", "awful", "dull", "terrible", "boring"]


def toy_rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        words = POSITIVE if i % 2 else NEGATIVE
        rows.append({"text": f"{words[i % 5]} {words[(i + 2) % 5]} film number {i}", "label": "pos" if i % 2 else "neg"})
    return rows


def make_recipe(tmp_path, **extra):
    write_jsonl(tmp_path / "train.jsonl", toy_rows(60))
    write_jsonl(tmp_path / "test.jsonl", toy_rows(20, offset=100))
    import yaml

    recipe = {
        "model": "tiny", "stage": "classify",
        "data": {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl"), "validation_fraction": 0.2},
        "classifier": {"pooling": "mean", "learning_rate": 0.05, "epochs": 200, "patience": 20, "max_length": 32,
                       "cache_dir": str(tmp_path / "embeddings")},
        "training": {"seed": 0, "micro_batch_size": 8},
        "output_dir": str(tmp_path / "out"),
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run(path, overrides=(), overwrite=False):
    from rich.console import Console

    return classify.run(load_recipe(path, list(overrides)), Console(file=io.StringIO()), overwrite=overwrite)


def predictions_file(out):
    return [json.loads(line) for line in (out / "predictions_test.jsonl").read_text().splitlines()]


def test_frozen_head_separates_the_toy_set_and_reuses_cached_embeddings(tmp_path):
    path = make_recipe(tmp_path)
    first = run(path)
    assert first["accuracy"] == 1.0 and first["method"] == "none"
    assert not any(v["cached"] for v in first["embeddings"].values())
    out = tmp_path / "out"
    for name in ("classifier.json", "head.safetensors", "metrics.json", "summary.json", "confusion.png", "recipe.yaml"):
        assert (out / name).is_file(), name
    second = run(path, ["classifier.head=mlp"], overwrite=True)
    assert all(v["cached"] for v in second["embeddings"].values())  # another head, same embeddings


@pytest.mark.parametrize("tuning, artifact", [({"method": "lora", "lora": {"r": 4, "alpha": 8}}, "adapter"),
                                              ({"method": "freeze", "top_layers": 1}, "backbone.safetensors")])
def test_end_to_end_tuning_saves_a_classifier_that_loads_on_its_own(tmp_path, tuning, artifact):
    path = make_recipe(tmp_path, tuning=tuning)
    summary = run(path, ["classifier.finetune_learning_rate=0.01"])
    out = tmp_path / "out"
    assert (out / artifact).exists()
    assert summary["finetune"]["epochs"][0]["val_accuracy"] is not None
    loaded = load_classifier(out)
    saved = predictions_file(out)
    texts = [row["text"] for row in toy_rows(20, offset=100)]
    probs = loaded.predict_proba(texts)
    expected = torch.tensor([[p["probabilities"][n] for n in loaded.spec.labels] for p in saved])
    assert torch.allclose(probs, expected, atol=1e-4)


def test_predict_writes_jsonl_csv_and_reads_stdin(tmp_path, capsys, monkeypatch):
    run(make_recipe(tmp_path))
    out = tmp_path / "out"
    code, stdout, err = run_cli("predict", str(out), "--input", str(tmp_path / "test.jsonl"), capsys=capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert len(rows) == 20 and set(rows[0]) == {"text", "label", "probabilities"}
    assert set(rows[0]["probabilities"]) == {"neg", "pos"} and abs(sum(rows[0]["probabilities"].values()) - 1) < 1e-5
    assert [r["label"] for r in rows] == [row["label"] for row in toy_rows(20, offset=100)]
    code, _, err = run_cli("predict", str(out), "--input", str(tmp_path / "test.jsonl"), "--output",
                           str(tmp_path / "p.csv"), capsys=capsys)
    assert code == 0, err
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "text,label,p_neg,p_pos" and len(lines) == 21
    monkeypatch.setattr("sys.stdin", io.StringIO("great superb film\n\n{\"text\": \"awful dull film\"}\n"))
    code, stdout, err = run_cli("predict", str(out), "--input", "-", capsys=capsys)
    assert code == 0, err
    assert [json.loads(line)["label"] for line in stdout.splitlines()] == ["pos", "neg"]


BAD = {
    "unseen test label": ({"test": [{"text": "fine", "label": "meh"}]}, "test.jsonl:1: label: 'meh' never appears"),
    "empty text": ({"train_extra": [{"text": "", "label": "pos"}]}, "train.jsonl:61: text: empty text"),
    "non-numeric label declared int": ({"train": [{"text": "good", "label": 1}, {"text": "bad", "label": "0"},
                                                  {"text": "meh", "label": "neutral"}], "override": ["data.label_type=int"]},
                                       "train.jsonl:3: label: expected an integer class id, got 'neutral'"),
    "single class": ({"train": [{"text": "good", "label": "pos"}] * 4}, "label: the training data has a single class"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_classification_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    change, expected = BAD[case]
    path = make_recipe(tmp_path)
    if "test" in change:
        write_jsonl(tmp_path / "test.jsonl", change["test"])
    if "train" in change:
        write_jsonl(tmp_path / "train.jsonl", change["train"])
    if "train_extra" in change:
        write_jsonl(tmp_path / "train.jsonl", toy_rows(60) + change["train_extra"])
    code, _, err = run_cli("train", str(path), *change.get("override", []), capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "out").exists()


def test_predict_refuses_a_folder_without_a_classifier(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("hello\n")
    code, _, err = run_cli("predict", str(tmp_path), "--input", str(tmp_path / "t.txt"), capsys=capsys)
    assert code == 2 and "no classifier.json here" in err


def test_nothing_to_score_is_refused_before_any_embedding(tmp_path, capsys):
    path = make_recipe(tmp_path)
    code, _, err = run_cli("train", str(path), "data.test=null", "data.validation_fraction=0", capsys=capsys)
    assert code == 2 and "nothing to score" in err
    assert not (tmp_path / "embeddings").exists()
