"""The CPU BLAS under MLX (backends/cpu.py): each `MAD_BLAS` choice, run in a fresh interpreter (the
choice is made once per process, at `import mad`)."""

import ctypes.util
import os
import subprocess
import sys

import pytest

from mad.backends import cpu

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MAD swaps the BLAS on Linux only")
needs_mkl = pytest.mark.skipif(cpu._mkl_rt() is None, reason="the mkl package is not installed")

PRODUCT = """
import mlx.core as mx
a = mx.arange(12, dtype=mx.float32).reshape(3, 4)
b = mx.arange(8, dtype=mx.float32).reshape(4, 2) - 3
print("product", (a @ b).tolist())
"""
EXPECTED = "product [[10.0, 16.0], [10.0, 32.0], [10.0, 48.0]]"  # by hand: row i of a is 4i + (0, 1, 2, 3)


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("MAD_BLAS", "MKL_VERBOSE")}
    environ.update(env)
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True,
                          env=environ, timeout=120)


@linux
@needs_mkl
def test_auto_takes_mkl_and_mlx_matmuls_go_to_it():
    # MKL_VERBOSE makes MKL print every call it serves: the product must be one of them
    r = python("import mad, mad.backends.cpu; print('loaded', mad.backends.cpu.BLAS)" + PRODUCT, MKL_VERBOSE="1")
    assert r.returncode == 0, r.stderr
    assert "libmkl_rt" in r.stdout.split("loaded ")[1].splitlines()[0]
    assert "SGEMM(" in r.stdout
    assert EXPECTED in r.stdout
    assert "RuntimeWarning" not in r.stderr


@linux
def test_mlx_keeps_mlx_blas():
    r = python("import mad, mad.backends.cpu; print('loaded', mad.backends.cpu.BLAS)" + PRODUCT, MAD_BLAS="mlx", MKL_VERBOSE="1")
    assert r.returncode == 0, r.stderr
    assert "loaded None" in r.stdout and "SGEMM(" not in r.stdout
    assert EXPECTED in r.stdout


@linux
def test_a_path_without_cblas_is_refused_with_a_warning():
    libm = ctypes.util.find_library("m")
    r = python("import mad, mad.backends.cpu; print('loaded', mad.backends.cpu.BLAS)" + PRODUCT, MAD_BLAS=libm)
    assert r.returncode == 0, r.stderr
    assert "loaded None" in r.stdout and EXPECTED in r.stdout
    assert "cblas_sgemm" in r.stderr and f"MAD_BLAS='{libm}'" in r.stderr


@linux
def test_a_missing_file_is_refused_with_a_warning():
    r = python("import mad, mad.backends.cpu; print('loaded', mad.backends.cpu.BLAS)", MAD_BLAS="/nonexistent/libblas.so")
    assert r.returncode == 0, r.stderr
    assert "loaded None" in r.stdout
    assert "/nonexistent/libblas.so" in r.stderr and "MLX's own BLAS stays in use" in r.stderr


@linux
@needs_mkl
def test_a_path_to_a_cblas_library_is_used():
    r = python("import mad, mad.backends.cpu; print('loaded', mad.backends.cpu.BLAS)" + PRODUCT, MAD_BLAS=cpu._mkl_rt(),
               MKL_VERBOSE="1")
    assert r.returncode == 0, r.stderr
    assert f"loaded {cpu._mkl_rt()}" in r.stdout and "SGEMM(" in r.stdout and EXPECTED in r.stdout


@linux
@needs_mkl
def test_mlx_imported_first_warns_and_loads_nothing():
    r = python("import mlx.core, mad, mad.backends.cpu; print('loaded', mad.backends.cpu.BLAS)" + PRODUCT, MKL_VERBOSE="1")
    assert r.returncode == 0, r.stderr
    assert "loaded None" in r.stdout and "SGEMM(" not in r.stdout and EXPECTED in r.stdout
    assert "mlx.core was imported before mad" in r.stderr


PARITY = """
import mad, mad.backends.cpu, numpy as np, mlx.core as mx
from safetensors.numpy import load_file
golden = load_file("{fixture}/golden.safetensors")
model, _ = mad.load("{fixture}")
logits, _ = model(mx.array(golden["tokens"]))
err = np.abs(np.array(logits).astype(np.float64) - golden["logits64"])
print("loaded", mad.backends.cpu.BLAS)
print("max", err.max())
print("mean", err.mean())
"""


@linux
@needs_mkl
def test_default_cpu_path_on_the_hf_fixture():
    """The path a user gets on a Linux CPU (MKL, the CPU kernel variants) on the HF fixture, against HF's
    float64 logits, within the fixture's float32 spread over summation orders.

    On this fixture the largest error is decided by summation order, not by the path: a BLAS on any CPU
    sums every contraction in one of many float32 orders, and the bounds cover the spread of the errors
    over random orders (benchmarks/probes/probe_float32_orders.py, with MKL and with MLX's BLAS; see
    benchmarks/RESULTS.md), so they hold whichever order the BLAS picks for the product shapes it is
    handed."""
    from pathlib import Path
    fixture = Path(__file__).parent / "fixtures" / "hf-tiny"
    r = python(PARITY.format(fixture=fixture), MAD_KERNELS="auto")
    assert r.returncode == 0, r.stderr
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert "libmkl_rt" in out["loaded"]
    assert float(out["max"]) <= 3e-3 and float(out["mean"]) <= 2e-5, out
