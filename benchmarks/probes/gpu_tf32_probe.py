"""Does MLX take float32 products in TF32 in this process? One 1024^3 float32 product on the GPU against
the CPU's: relative error ~1e-7 for IEEE float32 products, ~1e-4 for TF32. MLX reads MLX_ENABLE_TF32 once.

    MLX_ENABLE_TF32=0 python benchmarks/probes/gpu_tf32_probe.py
"""

import os

import mlx.core as mx

a, b = mx.random.normal((1024, 1024)), mx.random.normal((1024, 1024))
gpu = a @ b
with mx.stream(mx.cpu):
    cpu = a @ b
err = float(mx.linalg.norm(gpu - cpu) / mx.linalg.norm(cpu))
print(f"MLX_ENABLE_TF32={os.environ.get('MLX_ENABLE_TF32')}: GPU float32 product vs CPU, relative {err:.1e}")
