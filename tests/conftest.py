"""Test-wide settings.

MLX runs float32 matrix products in TF32 on GPUs that have it (CUDA, Apple M5) unless
MLX_ENABLE_TF32=0: the tests check float32 numerics, so they run in full float32 everywhere.

MAD_BLAS=mlx (unless set): on Linux the tests run MLX's own CPU BLAS, not the optimised one `import mad`
loads (backends/cpu.py). The exactness checks hold MAD's definitions to bounds tighter than the spread
between float32 summation orders on their inputs (tests/test_xlstm_hf.py says by how much), and an
optimised BLAS picks its order by matrix shape (a fused and an unfused product differ in the last bit).
The reference BLAS sums every dot product in one order; tests/test_blas.py runs the optimised one.

`on_cpu` / `on_cpu_module`: run a test (a module) on the CPU device on every machine, for checks whose
bound is tighter than the spread between float32 evaluation orders on their inputs (each user says why);
the GPU paths are held to the CPU on well-conditioned inputs in tests/test_kernels.py.
`reference_kernels_module`: run a module with the kernels' pure-MLX references, for the same reason (the
CPU variants, kernels/activations.py, are held to them in tests/test_kernels.py).
"""

import os

os.environ.setdefault("MLX_ENABLE_TF32", "0")
os.environ.setdefault("MAD_BLAS", "mlx")

import mad  # noqa: E402,F401  (before mlx.core: selects the CPU BLAS, see backends/cpu.py)
import mlx.core as mx  # noqa: E402  (after the environment it reads)
import pytest  # noqa: E402


def _cpu_default_device():
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        yield
    finally:
        mx.set_default_device(previous)


on_cpu = pytest.fixture(_cpu_default_device, name="on_cpu")
on_cpu_module = pytest.fixture(_cpu_default_device, scope="module", name="on_cpu_module")


@pytest.fixture(scope="module")
def reference_kernels_module():
    """Run a module with every kernel's pure-MLX reference (the definition), not a device's variant."""
    from mad.kernels.registry import use_reference

    with use_reference():
        yield
