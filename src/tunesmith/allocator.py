"""The memory allocator of training processes: jemalloc when the system has it, else the C library's.

A training step allocates and frees the same few hundred activation buffers (1-4 MB each on a
small model) every step. glibc's malloc serves them from heaps it cannot hand back in pieces, so
the freed pages stay resident and the peak RSS carries ~0.3 GiB that no tensor holds (a 512-token
LoRA step of SmolLM2-135M: 1.88 GiB peak with glibc, 1.57 GiB with jemalloc, the same speed;
`bench/sft_throughput.py`). Preloading jemalloc is what PyTorch's own CPU launcher does
(`python -m torch.backends.xeon.run_cpu --enable-jemalloc`); `tunesmith train` does it itself by
re-running once with `LD_PRELOAD` when the library is installed (Debian/Ubuntu: `apt install
libjemalloc2`). `TUNESMITH_ALLOCATOR=system` keeps the C library's allocator.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from tunesmith.errors import TunesmithError

ENV = "TUNESMITH_ALLOCATOR"
CHOICES = ("jemalloc", "system")
_KNOWN = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
          "/usr/lib64/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so")


def choice(environ: Mapping[str, str]) -> str:
    value = environ.get(ENV, "jemalloc").strip().lower() or "jemalloc"
    if value not in CHOICES:
        raise TunesmithError(f"{ENV}={value}: give one of {', '.join(CHOICES)} (jemalloc is used when installed)")
    return value


def jemalloc_library() -> str | None:
    """The path of an installed jemalloc shared library, or None."""
    for path in _KNOWN:
        if Path(path).is_file():
            return path
    return ctypes.util.find_library("jemalloc")  # the loader's search path (a soname LD_PRELOAD resolves)


def preload_env(environ: Mapping[str, str], library: str | None = None) -> dict[str, str] | None:
    """The environment to run this process again with jemalloc preloaded, or None if there is nothing to
    do: not Linux, turned off, already preloaded (so a re-run never loops), or not installed."""
    if not sys.platform.startswith("linux") or choice(environ) == "system":
        return None
    preloaded = environ.get("LD_PRELOAD", "")
    if "jemalloc" in preloaded:
        return None
    library = library or jemalloc_library()
    if not library:
        return None
    return {**environ, "LD_PRELOAD": f"{library} {preloaded}".strip()}


def rerun_with_jemalloc(argv: list[str]) -> None:
    """Replace this process by `python -m tunesmith.cli ARGV` with jemalloc preloaded, when that applies."""
    env = preload_env(os.environ)
    if env is not None:
        sys.stdout.flush(), sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "tunesmith.cli", *argv], env)


def active() -> str:
    """The allocator this process runs on: "jemalloc" or "system"."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "jemalloc" if "libjemalloc" in maps else "system"
