"""The CPU backend: which BLAS MLX's CPU matrix products call, how large blocks are allocated, and the
streams that large elementwise work is split over.

A backend module holds what differs per execution backend (as tinygrad's runtime/ops_*.py). The Linux
`mlx[cpu]` wheel carries the reference (unoptimised) BLAS, many times slower than an optimised one (see
benchmarks/RESULTS.md). MLX's CPU matmul is a call to `cblas_sgemm` (its linear algebra calls LAPACK's
`sgetrf_` and the like), which the dynamic linker resolves when `mlx.core` is imported (Python loads
extension modules with `RTLD_NOW`). A library loaded with `RTLD_GLOBAL` before that sits in the process's
global symbol scope, which the linker searches before `libmlx.so`'s own dependencies, so MLX's calls go to
it; MLX itself is unchanged, and the products stay float32 BLAS products.

`select_blas()` runs when `mad` is imported, so `import mad` must come before `import mlx.core`: when MLX
is already loaded, it warns that the fast BLAS could not be used. What it loads is chosen by the
environment variable `MAD_BLAS`:

    unset or "auto"   Intel oneMKL's `libmkl_rt` when the `mkl` package is installed (the `cpu` extra
                      installs it on x86-64 Linux); otherwise nothing
    "mlx"             nothing: MLX's own BLAS
    a file path       that library, e.g. /usr/lib/x86_64-linux-gnu/libopenblas.so.0; it must export
                      `cblas_sgemm`

`BLAS` is the path of the library in use (None for MLX's own), reported by `mad bench --json` and the
benchmark scripts. Elsewhere than Linux nothing is loaded: MLX uses Accelerate on macOS and cuBLAS on
CUDA.

In a process that also runs PyTorch, PyTorch's work slows once MKL has run (benchmarks/probes/probe_mkl_torch.py;
see benchmarks/RESULTS.md): such programs may prefer `MAD_BLAS=mlx`.

`reuse_large_blocks()` (called by `mad.train` on the CPU) sets glibc's malloc so that large freed blocks
are reused, not handed back to the kernel: see its docstring. `parallel_streams()` gives the CPU streams
that large elementwise work is split over (MLX's CPU runs an elementwise kernel on one core).

This module must not import MLX when it is imported: it runs before `mlx.core` is loaded.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings
from importlib import metadata
from typing import Optional

__all__ = ["BLAS", "ENV", "MALLOC_ENV", "LARGE_BLOCK", "STREAMS", "malloc_opted_out", "parallel_streams",
           "reuse_large_blocks", "select_blas"]

BLAS: Optional[str] = None
ENV = "MAD_BLAS"
MALLOC_ENV = "MAD_MALLOC"
LARGE_BLOCK = 1 << 30  # blocks up to this size come from the heap; as much freed memory stays at its top
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_MALLOC = {"done": False}
STREAMS = min(os.cpu_count() or 1, 4)  # CPU streams that large elementwise work is split over
_EXTRA_STREAMS: list = []


def _mkl_rt() -> Optional[str]:
    """Path of `libmkl_rt.so.*` from the installed `mkl` package, or None."""
    try:
        files = metadata.files("mkl") or []
        dist = metadata.distribution("mkl")
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name.startswith("libmkl_rt.so"):
            path = os.path.abspath(str(dist.locate_file(f)))
            if os.path.exists(path):
                return path
    return None


def select_blas() -> Optional[str]:
    """Load the BLAS named by `MAD_BLAS` (see the module's doc); return its path or None."""
    global BLAS
    if BLAS is not None or not sys.platform.startswith("linux"):
        return BLAS
    choice = os.environ.get(ENV, "auto").strip()
    if choice.lower() == "mlx":
        return None
    path = _mkl_rt() if choice.lower() in ("", "auto") else choice
    if path is None:
        return None
    if "mlx.core" in sys.modules:
        warnings.warn(f"mlx.core was imported before mad, so MLX keeps the BLAS it was linked with and {path} "
                      f"is not used (CPU matrix products much slower on Linux): import mad first, or set "
                      f"{ENV}=mlx to keep MLX's own BLAS without this warning", RuntimeWarning, stacklevel=2)
        return None
    try:
        ctypes.CDLL(path).cblas_sgemm  # noqa: B018  (loaded privately first: AttributeError if it lacks it)
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except (OSError, AttributeError) as e:
        warnings.warn(f"{ENV}={choice!r}: cannot use {path} as MLX's BLAS ({e}); MLX's own BLAS stays in use",
                      RuntimeWarning, stacklevel=2)
        return None
    BLAS = path
    return path


def malloc_opted_out() -> bool:
    """Whether `MAD_MALLOC=default` asks to leave glibc's malloc as it is (unset or empty: reuse large blocks
    while training); any other value is a `MadError` naming the variable."""
    value = os.environ.get(MALLOC_ENV, "").strip().lower()
    if value not in ("", "default"):
        from mad.errors import MadError  # here: this module is imported before the rest of MAD

        raise MadError(f"{MALLOC_ENV} must be 'default' or unset, got {os.environ[MALLOC_ENV]!r}")
    return value == "default"


def reuse_large_blocks() -> bool:
    """Let glibc's malloc reuse large freed blocks (up to `LARGE_BLOCK`) instead of returning them to the
    kernel; True if set (now or before).

    MLX's CPU arrays are `malloc` blocks. glibc serves a block above its mmap threshold (128 KiB, raised
    as such blocks are freed, to 32 MiB at most) with a fresh `mmap` and unmaps it on `free`, so each
    array of that size is faulted in and zeroed page by page by the kernel every time: a CPU training step
    allocates and frees the same large arrays every step (xlstm-125m at batch 2 x 256: 103 MB logits and
    their gradients, 154 MB weight gradients and AdamW outputs), and the kernel's page handling took about
    a fifth of benchmarks/bench_train.py's step (perf). With the mmap threshold and the trim threshold at
    `LARGE_BLOCK`, such blocks come from the heap and are reused there. The cost: the process keeps freed
    memory (up to `LARGE_BLOCK` at the heap's top, and freed blocks inside it) instead of returning it
    (xlstm-125m's step: peak RSS 3.7 GB instead of 3.5), so this is set for training, not at import.
    Nothing is set elsewhere than glibc, when `MAD_MALLOC=default`, or when the environment sets either
    threshold (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, or their `GLIBC_TUNABLES`): the user's
    settings stand."""
    if _MALLOC["done"]:
        return True
    if malloc_opted_out() or not sys.platform.startswith("linux"):
        return False
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(f"MALLOC_{name.upper()}_" in os.environ or f"glibc.malloc.{name}" in tunables
           for name in ("mmap_threshold", "trim_threshold")):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt tuning of this kind)
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _MALLOC["done"] = bool(mallopt(_M_MMAP_THRESHOLD, LARGE_BLOCK)) and bool(mallopt(_M_TRIM_THRESHOLD, LARGE_BLOCK))
    return _MALLOC["done"]


def parallel_streams() -> list:
    """The current CPU stream and `STREAMS - 1` others (made once, as each is a thread of MLX's).

    MLX's CPU runs an elementwise kernel on one core, and the kernels of different streams at once, each
    stream on a thread of its own: large elementwise work that falls into independent parts (the AdamW
    update of each weight) runs on several cores this way.
    Imports MLX: call it once `mlx.core` is loaded."""
    import mlx.core as mx

    while len(_EXTRA_STREAMS) < STREAMS - 1:
        _EXTRA_STREAMS.append(mx.new_stream(mx.cpu))
    return [mx.default_stream(mx.cpu), *_EXTRA_STREAMS[:max(STREAMS - 1, 0)]]
