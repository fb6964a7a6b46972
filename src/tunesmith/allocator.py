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

import contextlib
import ctypes.util
import os
import sys
from collections.abc import Iterator, Mapping
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


def _mallctl():
    """jemalloc's `mallctl` when this process runs on jemalloc, else None."""
    if active() != "jemalloc":
        return None
    try:
        fn = ctypes.CDLL(None).mallctl
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p, ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def _decay_names(mallctl) -> list[bytes]:
    count, size = ctypes.c_uint(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_uint))
    if mallctl(b"arenas.narenas", ctypes.byref(count), ctypes.byref(size), None, 0):
        return []
    names = [b"arenas.dirty_decay_ms", b"arenas.muzzy_decay_ms"]  # the defaults of arenas made later
    for i in range(count.value):
        names += [f"arena.{i}.dirty_decay_ms".encode(), f"arena.{i}.muzzy_decay_ms".encode()]
    return names


def _swap_decay(mallctl, values: dict[bytes, int]) -> dict[bytes, int]:
    """Set each named decay time (ms; -1: never purge); returns the values replaced (arenas not in use are skipped)."""
    old = {}
    for name, new in values.items():
        before, size = ctypes.c_ssize_t(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_ssize_t))
        value = ctypes.c_ssize_t(new)
        if mallctl(name, ctypes.byref(before), ctypes.byref(size), ctypes.byref(value), ctypes.sizeof(value)) == 0:
            old[name] = before.value
    return old


@contextlib.contextmanager
def keep_freed_pages() -> Iterator[None]:
    """While training, jemalloc keeps the pages of freed buffers instead of purging them over its 10 s decay.

    A training step frees and reallocates the same gradient and activation buffers every step; with
    the default decay, part of each step's freed pages went back to the system and were faulted in
    again the next step (a full fine-tuning step of SmolLM2-135M took ~139k page faults). The pages are
    reused by the next step, so the peak of a compiled loop grows little (+0.05 GiB full fine-tuning,
    +0.08 GiB LoRA) for +4-10% tokens/s in alternating runs; an eager loop's many temporaries of varying
    sizes pile up instead (+0.6 GiB), so the loop asks for this only when compiled. The old decay times
    come back afterwards, and with them the purge."""
    mallctl = _mallctl()
    if mallctl is None:
        yield
        return
    old = _swap_decay(mallctl, dict.fromkeys(_decay_names(mallctl), -1))
    try:
        yield
    finally:
        _swap_decay(mallctl, old)
