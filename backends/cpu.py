"""The CPU backend: which BLAS MLX's CPU matrix products call.

A backend module holds what differs per execution backend (as tinygrad's runtime/ops_*.py); this one
holds the CPU's only difference, the BLAS. The Linux `mlx[cpu]` wheel carries the reference
(unoptimised) BLAS, many times slower than an optimised one (see benchmarks/RESULTS.md). MLX's CPU
matmul is a call to `cblas_sgemm` (its linear algebra calls LAPACK's `sgetrf_` and the like), which the
dynamic linker resolves when `mlx.core` is imported (Python loads extension modules with `RTLD_NOW`). A
library loaded with `RTLD_GLOBAL` before that sits in the process's global symbol scope, which the linker
searches before `libmlx.so`'s own dependencies, so MLX's calls go to it; MLX itself is unchanged, and the
products stay float32 BLAS products.

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

This module must not import MLX: it runs before `mlx.core` is loaded.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings
from importlib import metadata
from typing import Optional

__all__ = ["BLAS", "ENV", "select_blas"]

BLAS: Optional[str] = None
ENV = "MAD_BLAS"


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
