"""Device kernel for decode-sized linear layers: y = softcap(x W^T + b) with few rows in x.

At decode, x has B (1..MAX_ROWS) rows and every weight is read once per step, so a step's time is the time
to stream the weights: the kernel must run at memory bandwidth. One warp per output feature n reads
W[n, :] with 16-byte loads (consecutive lanes on consecutive addresses), multiplies it with each row
of x (small, served from cache) and sums across the warp in float32. The bias and the soft-cap of the
feature's part are applied to that float32 sum, which is then rounded once to W's dtype: one launch
per linear (or fused group of linears) where a matmul, a bias add and a soft-cap would be three to
five. (The reference rounds after the matmul and after each op of the soft-cap: in bf16 the two agree
to a few units of the last place, and the kernel's figure is the closer one.)

Same call as the reference `kernels.linear.linear`. The variant takes x (M, K) and w (N, K) of one dtype
with M <= the row limit (MAX_ROWS) and K a multiple of 8; anything else runs the reference.

Batch invariance: row r of y is computed by the same instructions in the same order whatever M is (its
own float32 accumulator per lane, the same k order, the same warp reduction), so a row gets the same
bits alone and in a batch; MLX's matmul, which runs above the limit, picks its algorithm by M and does
not. A server that must give each client exactly its solo tokens raises the limit to its largest decode
batch (`batch_invariant`); the default keeps MLX's faster matmul for larger batches (`mad bench`). The
limit is read when a program is traced: set it before the first call it should govern.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import mlx.core as mx

from .device import DeviceKernel
from .linear import check_parts, split_parts
from .registry import Unsupported, register_device_kernel

MAX_ROWS = 4  # with more rows MLX's own matmul is faster (see benchmarks/RESULTS.md)
MAX_INVARIANT_ROWS = 64  # the most rows `batch_invariant` lets the kernel take (M float32 accumulators per lane)
_row_limit = MAX_ROWS
WARPS = 4  # output features per block (one warp each)
DTYPES = (mx.bfloat16, mx.float16, mx.float32)

LINEAR_BODY = """
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
        const float b = HAS_BIAS ? static_cast<float>(bias[n]) : 0.0f;
        const float c = HAS_CAP ? cap[n] : 0.0f;   // 0: this feature's part is not capped
#pragma unroll
        for (int r = 0; r < M; ++r) {
            float total = WARP_SUM(acc[r]) + b;
            if (c > 0.0f) total = c * TANH(total / c);
            if (lane == 0) y[(size_t)r * N + n] = static_cast<T>(total);
        }
    }
"""

LINEAR_KERNEL = DeviceKernel("mad_linear", inputs=["x", "w", "bias", "cap"], outputs=["y"], body=LINEAR_BODY)


@functools.lru_cache(maxsize=None)
def _cap_vector(n: int, splits: tuple[int, ...], caps: tuple[Optional[float], ...]) -> mx.array:
    """Each output feature's soft-cap (float32, 0 where its part has none)."""
    bounds = [0, *splits, n]
    values = []
    for j, c in enumerate(caps):
        values += [float(c or 0.0)] * (bounds[j + 1] - bounds[j])
    return mx.array(values, mx.float32)


# stands in for a missing bias or cap vector (never read); an array with data (a broadcast zero would be
# materialised by a copy kernel at every call)
_UNUSED = mx.array([0.0], mx.float32)


def batch_invariant(rows: Optional[int]) -> None:
    """Run every linear of up to `rows` rows (at most `MAX_INVARIANT_ROWS`) with this kernel, so that
    a row's result does not depend on how many rows share the call; None restores the default (`MAX_ROWS`).
    Process-wide, read at trace time (programs traced before keep their choice)."""
    global _row_limit
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int)
                             or not 1 <= rows <= MAX_INVARIANT_ROWS):
        raise ValueError(f"batch_invariant: rows must be an integer in 1..{MAX_INVARIANT_ROWS} or None, got {rows!r}")
    _row_limit = MAX_ROWS if rows is None else max(rows, MAX_ROWS)


def row_limit() -> int:
    """The most rows the kernel takes now (see `batch_invariant`)."""
    return _row_limit


def linear_device(x: mx.array, w: mx.array, bias: Optional[mx.array] = None, splits: Sequence[int] = (),
                  caps: Sequence[Optional[float]] = (None,), *, backend: str = "cuda",
                  poison: Optional[float] = None) -> list[mx.array]:
    """`kernels.linear.linear` with the decode kernel; Unsupported for shapes it does not handle."""
    *lead, K = x.shape
    N = w.shape[0]
    M = 1
    for d in lead:
        M *= d
    if M > _row_limit or K % 8 or w.ndim != 2 or w.shape[1] != K or x.dtype != w.dtype or x.dtype not in DTYPES:
        raise Unsupported(f"linear: x {x.shape} {x.dtype}, w {w.shape} {w.dtype}")
    check_parts(splits, caps)
    has_cap = any(caps)
    (y,) = LINEAR_KERNEL(
        backend,
        inputs=[x.reshape(M, K), w, _UNUSED if bias is None else bias,
                _cap_vector(N, tuple(splits), tuple(caps)) if has_cap else _UNUSED],
        template=[("T", w.dtype), ("M", M), ("K", K), ("N", N), ("WARPS", WARPS),
                  ("HAS_BIAS", bias is not None), ("HAS_CAP", has_cap)],
        grid=(-(-N // WARPS) * 32, WARPS, 1), threadgroup=(32, WARPS, 1),
        output_shapes=[(M, N)], output_dtypes=[w.dtype], init_value=poison)
    return split_parts(y.reshape(*lead, N), splits)


register_device_kernel("linear", linear_device)
