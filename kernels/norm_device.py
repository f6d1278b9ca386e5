"""Device kernel of `add_rms_norm` (reference and meaning: `kernels/norm.py`).

One block per row, each thread holding up to PER_THREAD of its elements in registers (loads issued
together): s = a + b is rounded to the dtype, written, and its squares summed in float32 (warp sums, then
across warps in shared memory); then y = T(T(s * rsqrt(mean + eps)) * w):
normalised in float32 and rounded, then scaled by the weight and rounded, the order of MLX's and HF's
RMS norms (normalise in float32, cast, multiply by the weight).
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .device import DeviceKernel
from .norm import add_rms_norm  # noqa: F401  (registers the reference the variant is tested against)
from .registry import Unsupported, register_device_kernel

PER_THREAD = 16   # elements of a row per thread, in registers (more threads for wider rows, up to 1024)
MAX_D = 1024 * 32
DTYPES = (mx.bfloat16, mx.float16, mx.float32)

ADD_RMS_NORM_BODY = """
    const int t = THREAD_X;
    const size_t base = (size_t)BLOCK_X * D;
    constexpr int PER = (D + THREADS - 1) / THREADS;   // elements per thread, kept in registers
    float sv[PER];
    float ss = 0.0f;
#pragma unroll
    for (int i = 0; i < PER; ++i) {                    // every load issued before any result is used
        const int j = t + i * THREADS;
        sv[i] = j < D ? static_cast<float>(static_cast<T>(static_cast<float>(a[base + j]) + static_cast<float>(b[base + j])))
                      : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        const int j = t + i * THREADS;
        if (j < D) s[base + j] = static_cast<T>(sv[i]);
        ss += sv[i] * sv[i];
    }
    SHARED float part[THREADS / 32];
    ss = WARP_SUM(ss);
    if ((t & 31) == 0) part[t >> 5] = ss;
    SYNC();
    float total = 0.0f;
    for (int k = 0; k < THREADS / 32; ++k) total += part[k];
    const float inv = 1.0f / SQRT(total / D + eps[0]);
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        const int j = t + i * THREADS;
        if (j < D) {
            const float nv = static_cast<float>(static_cast<T>(sv[i] * inv));
            y[base + j] = static_cast<T>(HAS_WEIGHT ? nv * static_cast<float>(w[j]) : nv);
        }
    }
"""
ADD_RMS_NORM_KERNEL = DeviceKernel("mad_add_rms_norm", inputs=["a", "b", "w", "eps"], outputs=["s", "y"],
                                   body=ADD_RMS_NORM_BODY)


def add_rms_norm_device(a: mx.array, b: mx.array, weight: Optional[mx.array], eps: float, *,
                        backend: str = "cuda", poison: Optional[float] = None) -> tuple[mx.array, mx.array]:
    """`kernels.norm.add_rms_norm` in one launch; Unsupported for mixed dtypes or a mis-sized weight."""
    D = a.shape[-1]
    if (a.shape != b.shape or a.dtype != b.dtype or a.dtype not in DTYPES or D > MAX_D
            or (weight is not None and (weight.shape != (D,) or weight.dtype != a.dtype))):
        raise Unsupported(f"add_rms_norm: a {a.shape} {a.dtype}, b {b.shape} {b.dtype}, "
                          f"weight {None if weight is None else (weight.shape, weight.dtype)}")
    rows = a.size // D
    threads = min(1024, max(32, 1 << (-(-D // PER_THREAD) - 1).bit_length()))  # a power of two
    s, y = ADD_RMS_NORM_KERNEL(
        backend,
        inputs=[a.reshape(rows, D), b.reshape(rows, D), a.reshape(-1)[:1] if weight is None else weight,
                mx.array([eps], mx.float32)],
        template=[("T", a.dtype), ("D", D), ("THREADS", threads), ("HAS_WEIGHT", weight is not None)],
        grid=(rows * threads, 1, 1), threadgroup=(threads, 1, 1),
        output_shapes=[(rows, D), (rows, D)], output_dtypes=[a.dtype, a.dtype], init_value=poison)
    return s.reshape(a.shape), y.reshape(a.shape)


register_device_kernel("add_rms_norm", add_rms_norm_device)
