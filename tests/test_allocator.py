"""Training processes run on jemalloc when it is installed; the choice is checked and never loops."""

import json
import os
import subprocess
import sys

import pytest

from conftest import chat_rows, write_jsonl, write_recipe
from tunesmith import allocator
from tunesmith.errors import TunesmithError


def test_an_unknown_choice_is_a_one_line_error():
    assert allocator.choice({}) == "jemalloc"
    assert allocator.choice({allocator.ENV: "System"}) == "system"
    with pytest.raises(TunesmithError, match="TUNESMITH_ALLOCATOR=tcmalloc: give one of jemalloc, system"):
        allocator.choice({allocator.ENV: "tcmalloc"})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is the Linux loader's")
def test_the_environment_preloads_jemalloc_once_and_keeps_other_preloads():
    env = allocator.preload_env({"PATH": "/bin", "LD_PRELOAD": "libother.so"}, library="/lib/libjemalloc.so.2")
    assert env == {"PATH": "/bin", "LD_PRELOAD": "/lib/libjemalloc.so.2 libother.so"}
    assert allocator.preload_env(env, library="/lib/libjemalloc.so.2") is None  # already there: no second re-run
    assert allocator.preload_env({allocator.ENV: "system"}, library="/lib/libjemalloc.so.2") is None


def test_nothing_to_do_without_the_library(monkeypatch):
    monkeypatch.setattr(allocator, "jemalloc_library", lambda: None)
    assert allocator.preload_env({}) is None


@pytest.mark.parametrize("choice", ["jemalloc", "system"])
def test_a_training_run_reports_the_allocator_it_ran_on(tmp_path, choice):
    write_jsonl(tmp_path / "train.jsonl", chat_rows())
    recipe = write_recipe(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | {allocator.ENV: choice}
    run = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", str(recipe), "training.max_steps=1"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    installed = allocator.jemalloc_library() is not None and sys.platform.startswith("linux")
    assert summary["allocator"] == ("jemalloc" if choice == "jemalloc" and installed else "system")
    assert f"({summary['allocator']} allocator)" in run.stdout


def test_a_bad_choice_stops_the_command_with_exit_2(tmp_path):
    run = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", str(tmp_path / "recipe.yaml")],
                         capture_output=True, text=True, env=os.environ | {allocator.ENV: "fast"})
    assert run.returncode == 2 and run.stderr.startswith("error: TUNESMITH_ALLOCATOR=fast")
    assert "Traceback" not in run.stderr


@pytest.mark.skipif(allocator.jemalloc_library() is None, reason="needs jemalloc installed")
def test_training_keeps_freed_pages_and_puts_the_decay_back(tmp_path):
    """Under jemalloc the decay times are -1 (never purge) inside the context and the old ones after it."""
    script = tmp_path / "decay.py"
    script.write_text(
        "import ctypes\n"
        "from tunesmith import allocator\n"
        "m = allocator._mallctl()\n"
        "def decay(name):\n"
        "    v, size = ctypes.c_ssize_t(0), ctypes.c_size_t(8)\n"
        "    assert m(name, ctypes.byref(v), ctypes.byref(size), None, 0) == 0\n"
        "    return v.value\n"
        "before = decay(b'arena.0.dirty_decay_ms'), decay(b'arenas.dirty_decay_ms')\n"
        "with allocator.keep_freed_pages():\n"
        "    inside = decay(b'arena.0.dirty_decay_ms'), decay(b'arenas.dirty_decay_ms'), decay(b'arena.0.muzzy_decay_ms')\n"
        "after = decay(b'arena.0.dirty_decay_ms'), decay(b'arenas.dirty_decay_ms')\n"
        "print(before, inside, after)\n"
        "assert inside == (-1, -1, -1) and after == before and before[0] > 0\n")
    env = {**os.environ, "LD_PRELOAD": allocator.jemalloc_library()}
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_without_jemalloc_keeping_pages_does_nothing():
    if allocator.active() == "jemalloc":
        pytest.skip("this process runs on jemalloc")
    assert allocator._mallctl() is None
    with allocator.keep_freed_pages():
        pass
