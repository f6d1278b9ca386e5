"""How close the GPU's float32 chunkwise mLSTM comes to the CPU's (IEEE float32) on ill-conditioned inputs.

The inputs of `tests/test_kernels.py::test_chunkwise_on_gpu_matches_cpu_reference` (spread input gates, so h is
a ratio of sums that nearly cancel at some positions): for each (T, chunk), ||a - b|| / ||b|| of h between
    kernel     the GPU path the registry dispatches (float32 operands: the split-TF32 tensor-core kernels
               while MLX takes float32 products in TF32; the pure-MLX reference with MLX_ENABLE_TF32=0)
    reference  the pure-MLX chunkwise form on the GPU (float32 products as MLX runs them)
and the CPU's chunkwise form; the CPU's own step form against its chunkwise form shows how far two
summation orders in float32 already differ on these inputs. Also the final state of the GPU path.

    MLX_ENABLE_TF32=1 python benchmarks/probes/gpu_mlstm_float32.py      # MLX's default on CUDA
    MLX_ENABLE_TF32=0 python benchmarks/probes/gpu_mlstm_float32.py
"""

from __future__ import annotations

import json
import os

import mlx.core as mx
import numpy as np

from mad.kernels.mlstm import mlstm_sequence
from mad.kernels.registry import use_reference


def rel(a: mx.array, b: mx.array) -> float:
    a, b = np.array(a, np.float64), np.array(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main() -> None:
    print(f"MLX_ENABLE_TF32={os.environ.get('MLX_ENABLE_TF32', 'unset (on)')}")
    for T, chunk in ((200, 64), (77, 16), (128, 128)):
        rng = np.random.default_rng(T + chunk)
        B, NH, DQK, DV = 2, 4, 64, 96
        q, k, v = (mx.array(rng.normal(0, s, (B, NH, T, d)).astype(np.float32))
                   for s, d in ((1.0, DQK), (0.7, DQK), (0.5, DV)))
        i = mx.array(rng.normal(0, 3.0, (B, NH, T)).astype(np.float32))
        f = mx.array(rng.normal(2, 2, (B, NH, T)).astype(np.float32))
        state = tuple(mx.array(rng.normal(0, s, shape).astype(np.float32))
                      for s, shape in ((1, (B, NH, DQK, DV)), (1, (B, NH, DQK)), (1, (B, NH))))
        with mx.stream(mx.cpu):
            h_cpu, s_cpu = mlstm_sequence(q, k, v, i, f, state, chunk_size=chunk)
            h_step, _ = mlstm_sequence(q, k, v, i, f, state, chunk_size=chunk, mode="step")
            mx.eval(h_cpu, s_cpu, h_step)
        h_gpu, s_gpu = mlstm_sequence(q, k, v, i, f, state, chunk_size=chunk)
        with use_reference():
            h_ref, _ = mlstm_sequence(q, k, v, i, f, state, chunk_size=chunk)
        print(json.dumps({"T": T, "chunk": chunk, "kernel_vs_cpu": rel(h_gpu, h_cpu), "reference_vs_cpu": rel(h_ref, h_cpu),
                          "cpu_step_vs_cpu_chunkwise": rel(h_step, h_cpu),
                          "kernel_state_vs_cpu": [rel(a, b) for a, b in zip(s_gpu, s_cpu)]}), flush=True)


if __name__ == "__main__":
    main()
