"""The C kernels in native.c, compiled once per machine with the system's C compiler and loaded with ctypes.

What needs the C here is one pass over memory that numpy and torch split into several (LoRA's
dropout: draw, compare, pack, multiply). It is built the way torch.compile builds its CPU kernels
(the same compiler, OpenMP, the host's vector instructions) but without torch's headers, so it
compiles in about a second; the library is cached under $TUNESMITH_HOME/kernels, named by a hash of
the source, the flags, the compiler and the CPU, written to a temporary file and renamed (processes
that build it at the same time do not see half a file). Without a compiler, or with
TUNESMITH_NATIVE=0, `library()` is None and callers use their numpy/torch path, which computes the
same results (tests/kernels compare the two).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("native.c")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-fopenmp")


def _cpu() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return "".join(line for line in info.splitlines() if line.startswith(("model name", "flags")))[:4096]


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(compiler: str, path: Path, flags: tuple[str, ...] = FLAGS) -> Path | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".so.tmp")
    os.close(handle)
    try:
        for flags in (flags, tuple(f for f in flags if f != "-fopenmp")):  # some compilers (Apple clang) lack OpenMP
            done = subprocess.run([compiler, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
            if done.returncode == 0:
                os.replace(tmp, path)
                return path
        log.warning("tunesmith: could not compile %s (%s); using the numpy path", SOURCE.name,
                    done.stderr.strip().splitlines()[-1:] or "no message")
        return None
    finally:
        Path(tmp).unlink(missing_ok=True)


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None where there is no compiler or TUNESMITH_NATIVE=0."""
    if os.environ.get("TUNESMITH_NATIVE", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        return None
    from tunesmith.models import tunesmith_home

    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, " ".join(FLAGS), _cpu()]).encode()).hexdigest()[:16]
    path = tunesmith_home() / "kernels" / f"tunesmith_native_{key}.so"
    if not path.exists() and _build(compiler, path) is None:
        return None
    return _load(path)


@cache
def has_avx512() -> bool:
    """Whether the host runs native.c's AVX-512 paths (the fused LoRA-A kernels exist only there)."""
    flags = _cpu()
    return all(f" {flag}" in flags for flag in ("avx512f", "avx512bw", "avx512dq"))


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    ptr, i64, u64, u32, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float, ctypes.c_int
    lib.tunesmith_dropout_forward.argtypes = [ptr, ptr, ptr, i64, u64, u32, f32, i32]
    lib.tunesmith_dropout_forward.restype = None
    lib.tunesmith_dropout_apply.argtypes = [ptr, ptr, ptr, i64, f32, i32]
    lib.tunesmith_dropout_apply.restype = None
    lib.tunesmith_unpack_bits.argtypes = [ptr, ptr, i64, i32]
    lib.tunesmith_unpack_bits.restype = None
    lib.tunesmith_lora_a.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, u64, u32, f32, i32]
    lib.tunesmith_lora_a_dx.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, f32, i32]
    lib.tunesmith_lora_a_dw.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, f32, i32]
    for fn in (lib.tunesmith_lora_a, lib.tunesmith_lora_a_dx, lib.tunesmith_lora_a_dw):
        fn.restype = i32
    return lib
