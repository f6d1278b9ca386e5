"""Test-wide settings.

MLX runs float32 matrix products in TF32 on GPUs that have it (CUDA, Apple M5) unless
MLX_ENABLE_TF32=0: the tests check float32 numerics, so they run in full float32 everywhere.

`on_cpu` / `on_cpu_module`: run a test (a module) on the CPU device on every machine, for checks whose
bound is tighter than the spread between float32 evaluation orders on their inputs (each user says why);
the GPU paths are held to the CPU on well-conditioned inputs in tests/test_kernels.py.
"""

import os

os.environ.setdefault("MLX_ENABLE_TF32", "0")

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
