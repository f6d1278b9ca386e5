"""Device kernel for decode-sized matrix products: y = x W^T with few rows in x.

At decode, x has B (1..MAX_ROWS) rows and every weight is read once per step, so a step's time is the time
to stream the weights: the kernel must run at memory bandwidth. One warp per output feature n reads
W[n, :] with 16-byte loads (consecutive lanes on consecutive addresses), multiplies it with each row
of x (small, served from cache) and sums across the warp. float32 accumulation; y in W's dtype.

Reference: `x @ w.T` (MLX). The variant takes x (M, K) and w (N, K) of one dtype with M <= MAX_ROWS
and K a multiple of 8; anything else runs the reference.
"""

from __future__ import annotations

import mlx.core as mx

from .device import DeviceKernel
from .registry import Unsupported, register_device_kernel, register_kernel

MAX_ROWS = 4  # on an H200: faster or within 5% of MLX up to 4 rows, slower at 8 (benchmarks/RESULTS.md)
WARPS = 4  # output features per block (one warp each)
DTYPES = (mx.bfloat16, mx.float16, mx.float32)

GEMV_BODY = """
    const int lane = THREAD_X;                  // 0..31
    const int n = BLOCK_X * WARPS + THREAD_Y;   // output feature of this warp
    if (n < N) {
        float acc[M];
#pragma unroll
        for (int r = 0; r < M; ++r) acc[r] = 0.0f;
        const size_t row = (size_t)n * K;
#pragma unroll 4
        for (int k = lane * 8; k < K; k += 256) {
            float wv[8];
            load8(w + row + k, wv);
#pragma unroll
            for (int r = 0; r < M; ++r) {
                float xv[8];
                load8(x + (size_t)r * K + k, xv);
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[r] += wv[e] * xv[e];
            }
        }
#pragma unroll
        for (int r = 0; r < M; ++r) {
            const float total = WARP_SUM(acc[r]);
            if (lane == 0) y[(size_t)r * N + n] = static_cast<T>(total);
        }
    }
"""

GEMV_KERNEL = DeviceKernel("mad_gemv", inputs=["x", "w"], outputs=["y"], body=GEMV_BODY)


def matmul_wt(x: mx.array, w: mx.array) -> mx.array:
    """x @ w.T (the reference)."""
    return x @ w.T


def matmul_wt_device(x: mx.array, w: mx.array, *, backend: str = "cuda", poison=None) -> mx.array:
    """x (..., K) @ w (N, K)^T with the decode kernel; Unsupported for shapes it does not handle."""
    *lead, K = x.shape
    N = w.shape[0]
    M = 1
    for d in lead:
        M *= d
    if M > MAX_ROWS or K % 8 or w.ndim != 2 or w.shape[1] != K or x.dtype != w.dtype or x.dtype not in DTYPES:
        raise Unsupported(f"matmul_wt: x {x.shape} {x.dtype}, w {w.shape} {w.dtype}")
    (y,) = GEMV_KERNEL(backend, inputs=[x.reshape(M, K), w],
                       template=[("T", w.dtype), ("M", M), ("K", K), ("N", N), ("WARPS", WARPS)],
                       grid=(-(-N // WARPS) * 32, WARPS, 1), threadgroup=(32, WARPS, 1),
                       output_shapes=[(M, N)], output_dtypes=[w.dtype], init_value=poison)
    return y.reshape(*lead, N)


register_kernel("matmul_wt", matmul_wt)
register_device_kernel("matmul_wt", matmul_wt_device)
