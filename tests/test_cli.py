"""Bad input through the real command: one line on stderr, exit code 2, no traceback, nothing half-written."""

import subprocess
import sys

import pytest

from conftest import chat_rows, run_cli, write_jsonl, write_recipe

GOOD = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}


def bad_data(folder, content):
    path = folder / "train.jsonl"
    path.write_text(content)
    return write_recipe(folder)


CASES = {
    "missing file": (lambda f: write_recipe(f), [], "train.jsonl: file not found"),
    "empty file": (lambda f: bad_data(f, ""), [], "train.jsonl: file is empty"),
    "malformed json line": (lambda f: bad_data(f, '{"instruction": "a", "output": "b"}\n{"instruction": \n'), [],
                            "train.jsonl:2: not valid JSON"),
    "missing field": (lambda f: bad_data(f, '{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n'), [],
                      "train.jsonl:2: output: missing"),
    "empty field": (lambda f: bad_data(f, '{"instruction": "", "output": "b"}\n'), [], "train.jsonl:1: instruction: empty"),
    "wrong type": (lambda f: bad_data(f, '{"instruction": "a", "output": 5}\n'), [],
                   "train.jsonl:1: output: expected a string, got int"),
    "unknown format": (lambda f: bad_data(f, '{"question": "a", "answer": "b"}\n'), [],
                       "cannot tell the data format from keys ['answer', 'question']"),
    "wrong format for stage": (lambda f: bad_data(f, '{"instruction": "a", "output": "b"}\n'), ["stage=pretrain"],
                               "data.format: stage 'pretrain' reads text data"),
    "unknown recipe key": (lambda f: bad_data(f, ""), ["training.max_step=3"], "did you mean 'max_steps'?"),
    "invalid value": (lambda f: bad_data(f, ""), ["training.learning_rate=-0.1"],
                      "training.learning_rate: Input should be greater than 0"),
    "model path not found": (lambda f: write_recipe(f), ["model=/nowhere/model"], "model.path: '/nowhere/model' not found"),
    "unreadable gguf": (lambda f: (f / "broken.gguf").write_bytes(b"GGUF\x00garbage") and write_recipe(f),
                        [], "cannot read GGUF file"),
    "bf16 on cpu": (lambda f: write_recipe(f), ["model.precision=bf16"], "model.precision: bf16 training on CPU"),
    "qlora on cpu": (lambda f: write_recipe(f), ["model.quantization=4bit"], "model.quantization: 4bit (QLoRA) needs a CUDA GPU"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    make, overrides, expected = CASES[case]
    recipe = make(tmp_path)
    if case == "unreadable gguf":
        overrides = [f"model={tmp_path / 'broken.gguf'}"]
        write_jsonl(tmp_path / "train.jsonl", chat_rows())
    if case in ("model path not found", "bf16 on cpu", "qlora on cpu"):
        write_jsonl(tmp_path / "train.jsonl", chat_rows())
    code, out, err = run_cli("train", str(recipe), *overrides, capsys=capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err
    assert "Traceback" not in err + out
    assert not (tmp_path / "out").exists(), "a failed run must not create its output folder"


def test_overlong_samples_error_policy_names_the_row(tmp_path, capsys):
    write_jsonl(tmp_path / "train.jsonl", [GOOD, {"instruction": "word " * 200, "input": "", "output": "x"}])
    recipe = write_recipe(tmp_path)
    code, _, err = run_cli("train", str(recipe), "data.overlong=error", capsys=capsys)
    assert code == 2 and "train.jsonl:2: sample has" in err and "over training.max_length=64" in err


def test_output_folder_holding_another_run_is_refused_and_kept(tmp_path, capsys):
    write_jsonl(tmp_path / "train.jsonl", chat_rows())
    recipe = write_recipe(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"precious")
    code, _, err = run_cli("train", str(recipe), capsys=capsys)
    assert code == 2 and "already holds a run; pass --resume to continue it, --overwrite to replace it" in err
    assert (out / "model.safetensors").read_bytes() == b"precious"
    # a bad recipe with --overwrite still fails before anything is deleted
    code, _, err = run_cli("train", str(recipe), "training.lr_schedule=wavy", "--overwrite", capsys=capsys)
    assert code == 2 and (out / "model.safetensors").read_bytes() == b"precious"


def test_data_inspect_marks_masked_tokens_and_prints_lengths(tmp_path, capsys):
    write_jsonl(tmp_path / "train.jsonl", chat_rows())
    code, out, err = run_cli("data", "inspect", str(write_recipe(tmp_path)), "--index", "1", capsys=capsys)
    assert code == 0, err
    assert "⟪<|im_start|>system" in out and "The number is" in out
    assert "median" in out and "over max length" in out


def test_real_process_has_no_traceback_and_help_is_fast(tmp_path):
    recipe = write_recipe(tmp_path)
    exe = [sys.executable, "-m", "tunesmith.cli"]
    result = subprocess.run([*exe, "train", str(recipe)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "file not found" in result.stderr
    assert "Traceback" not in result.stderr
    help_run = subprocess.run([*exe, "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0 and "train" in help_run.stdout
    probe = subprocess.run([sys.executable, "-c", "import sys, tunesmith.cli; print('torch' in sys.modules)"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "False", "the CLI must not import torch at start-up"


def test_quickstart_never_replaces_a_folder_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = run_cli("quickstart", "--out", str(out), capsys=capsys)
    assert code == 2 and "already holds a run" in err
    assert (out / "notes.txt").read_text() == "keep me"
