"""Test-wide settings.

MLX runs float32 matrix products in TF32 on GPUs that have it (CUDA, Apple M5) unless
MLX_ENABLE_TF32=0: the tests check float32 numerics, so they run in full float32 everywhere.
"""

import os

os.environ.setdefault("MLX_ENABLE_TF32", "0")
