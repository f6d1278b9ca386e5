"""Device kernel of `add_rms_norm` (reference and meaning: `kernels/norm.py`).

One block of THREADS threads per row: s = a + b is rounded to the dtype, written, and its squares summed
in float32 (warp sums, then across warps in shared memory); then y = T(T(s * rsqrt(mean + eps)) * w):
normalised in float32 and rounded, then scaled by the weight and rounded, the order of MLX's and HF's
RMS norms (normalise in float32, cast, multiply by the weight).
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .device import DeviceKernel
from .norm import add_rms_norm  # noqa: F401  (registers the reference the variant is tested against)
from .registry import Unsupported, register_device_kernel

THREADS = 256
DTYPES = (mx.bfloat16, mx.float16, mx.float32)

ADD_RMS_NORM_BODY = """
    const int t = THREAD_X;
    const size_t base = (size_t)BLOCK_X * D;
    float ss = 0.0f;
    for (int j = t; j < D; j += THREADS) {
        const T sv = static_cast<T>(static_cast<float>(a[base + j]) + static_cast<float>(b[base + j]));
        s[base + j] = sv;
        const float f = static_cast<float>(sv);
        ss += f * f;
    }
    SHARED float part[THREADS / 32];
    ss = WARP_SUM(ss);
    if ((t & 31) == 0) part[t >> 5] = ss;
    SYNC();
    float total = 0.0f;
    for (int k = 0; k < THREADS / 32; ++k) total += part[k];
    const float inv = 1.0f / SQRT(total / D + eps[0]);
    for (int j = t; j < D; j += THREADS) {
        const float nv = static_cast<float>(static_cast<T>(static_cast<float>(s[base + j]) * inv));
        y[base + j] = static_cast<T>(HAS_WEIGHT ? nv * static_cast<float>(w[j]) : nv);
    }
"""

ADD_RMS_NORM_KERNEL = DeviceKernel("mad_add_rms_norm", inputs=["a", "b", "w", "eps"], outputs=["s", "y"],
                                   body=ADD_RMS_NORM_BODY)


def add_rms_norm_device(a: mx.array, b: mx.array, weight: Optional[mx.array], eps: float, *,
                        backend: str = "cuda", poison: Optional[float] = None) -> tuple[mx.array, mx.array]:
    """`kernels.norm.add_rms_norm` in one launch; Unsupported for mixed dtypes or a mis-sized weight."""
    D = a.shape[-1]
    if (a.shape != b.shape or a.dtype != b.dtype or a.dtype not in DTYPES
            or (weight is not None and (weight.shape != (D,) or weight.dtype != a.dtype))):
        raise Unsupported(f"add_rms_norm: a {a.shape} {a.dtype}, b {b.shape} {b.dtype}, "
                          f"weight {None if weight is None else (weight.shape, weight.dtype)}")
    rows = a.size // D
    s, y = ADD_RMS_NORM_KERNEL(
        backend,
        inputs=[a.reshape(rows, D), b.reshape(rows, D), a.reshape(-1)[:1] if weight is None else weight,
                mx.array([eps], mx.float32)],
        template=[("T", a.dtype), ("D", D), ("THREADS", THREADS), ("HAS_WEIGHT", weight is not None)],
        grid=(rows * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[(rows, D), (rows, D)], output_dtypes=[a.dtype, a.dtype], init_value=poison)
    return s.reshape(a.shape), y.reshape(a.shape)


register_device_kernel("add_rms_norm", add_rms_norm_device)
