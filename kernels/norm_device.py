"""Device kernel of `head_norm_gate` (kernels/fold.py): act(gate) * head_norm(x) in one launch.

An mLSTM layer's multi-head norm and output gate ran at decode as MLX's layer norm, then one fused
elementwise kernel (the norm's weight and the gate's product): two launches of a few microseconds each
for a few kilobytes. Here a block of THREADS threads owns one head of one row: each thread holds
ceil(DH / THREADS) of the head's values in registers, the block sums them for the mean and then the
squared deviations for the (biased) variance, in float32, and each thread writes
act(gate) * ((x - mean) * rsqrt(var + eps) * (weight + offset) + bias), rounded once to x's dtype (the
unfused operations round after the norm, after the weight and after the product: in bf16 the two agree to
a few units of the last place, and the kernel's figure is the closer one). Every row is computed by the
same instructions whatever the number of rows, so a row's result does not depend on its batch. The inputs
are read through their strides (a slice of a fused projection needs no copy).

Takes x and gate of one float dtype and shape (..., NH * DH) with DH <= THREADS * MAX_PER_THREAD, a
weight (and bias) of DH * NH values in any float dtype, act "sigmoid" or "silu"; anything else runs the
reference. CUDA only, as the other folds: no Metal build of it has been run.
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx

from .device import DeviceKernel, scalar
from .fold import PAIR_ACTIVATIONS
from .linear_device import DTYPES
from .registry import Unsupported, register_variant

THREADS = 128            # threads per block (one head of one row)
MAX_PER_THREAD = 8       # values of the head per thread (registers): heads of up to 1024 values

NORM_GATE_BODY = """
    constexpr int PER = (DH + THREADS - 1) / THREADS;   // values per thread
    constexpr int WARPS_ = THREADS / 32;
    const int head = BLOCK_X % NH, row = BLOCK_X / NH, t = THREAD_X;   // (rows * NH blocks: no grid-y limit)
    const size_t base = (size_t)row * NH * DH + (size_t)head * DH;       // in the output (row-contiguous)
    // x, gate, weight and bias are read through their strides: the gate is a slice of a fused projection's
    // columns, which MLX would otherwise copy before the launch when a call has several rows
    auto row_at = [&](const auto& shape, const auto& strides, int ndim, long long r) {
        long long off = 0;
        for (int i = ndim - 2; i >= 0; --i) { off += (r % shape[i]) * strides[i]; r /= shape[i]; }
        return off;
    };
    const long long xo = row_at(x_shape, x_strides, x_ndim, row) + (long long)head * DH * x_strides[x_ndim - 1];
    const long long go = row_at(gate_shape, gate_strides, gate_ndim, row)
                         + (long long)head * DH * gate_strides[gate_ndim - 1];
    const long long xu = x_strides[x_ndim - 1], gu = gate_strides[gate_ndim - 1];
    SHARED float red[WARPS_];
    // a block-wide sum, the same order in every block: lanes, then the warps in order
    auto block_sum = [&](float v) {
        v = WARP_SUM(v);
        if (t % 32 == 0) red[t / 32] = v;
        SYNC();
        float total = 0.0f;
        for (int w = 0; w < WARPS_; ++w) total += red[w];
        SYNC();
        return total;
    };
    float xv[PER];
    float sum = 0.0f;
#pragma unroll
    for (int p = 0; p < PER; ++p) {
        const int d = p * THREADS + t;
        xv[p] = d < DH ? static_cast<float>(x[xo + d * xu]) : 0.0f;
        sum += xv[p];
    }
    const float mean = block_sum(sum) / DH;
    float dev = 0.0f;
#pragma unroll
    for (int p = 0; p < PER; ++p) {
        const int d = p * THREADS + t;
        const float c = d < DH ? xv[p] - mean : 0.0f;
        dev += c * c;
    }
    const float inv = 1.0f / SQRT(block_sum(dev) / DH + eps[0]);
#pragma unroll
    for (int p = 0; p < PER; ++p) {
        const int d = p * THREADS + t;
        if (d < DH) {
            const int j = head * DH + d;              // the feature: weight and bias index
            float y = (xv[p] - mean) * inv * (static_cast<float>(weight[j * weight_strides[0]]) + offset[0]);
            if (HAS_BIAS) y += static_cast<float>(bias[j * bias_strides[0]]);
            const float gv = static_cast<float>(gate[go + d * gu]);
            const float a = ACT == 1 ? 1.0f / (1.0f + EXP(-gv)) : gv / (1.0f + EXP(-gv));   // 1 sigmoid, 2 silu
            out[base + d] = static_cast<T>(a * y);
        }
    }
"""

NORM_GATE_KERNEL = DeviceKernel("mad_head_norm_gate", inputs=["gate", "x", "weight", "bias", "eps", "offset"],
                                outputs=["out"], body=NORM_GATE_BODY, row_contiguous=False)


def head_norm_gate_device(gate: mx.array, x: mx.array, weight: mx.array, bias: Optional[mx.array] = None,
                          eps: float = 1e-6, heads: int = 1, offset: float = 0.0, act: str = "sigmoid", *,
                          backend: str = "cuda", poison: Optional[float] = None) -> mx.array:
    """`kernels.fold.head_norm_gate` in one launch; Unsupported for inputs it does not handle."""
    D = x.shape[-1]
    DH = D // heads if heads > 0 and D % heads == 0 else 0
    if (not DH or DH > THREADS * MAX_PER_THREAD or act not in PAIR_ACTIVATIONS or x.dtype not in DTYPES
            or gate.dtype != x.dtype or gate.shape != x.shape or weight.shape != (D,)
            or (bias is not None and bias.shape != (D,))):
        raise Unsupported(f"head_norm_gate: x {x.shape} {x.dtype}, gate {gate.shape} {gate.dtype}, heads {heads}, "
                          f"act {act}")
    rows = math.prod(x.shape[:-1])
    (out,) = NORM_GATE_KERNEL(
        backend,
        inputs=[gate, x, weight, weight if bias is None else bias, scalar(eps), scalar(offset)],
        template=[("T", x.dtype), ("NH", heads), ("DH", DH), ("THREADS", THREADS), ("HAS_BIAS", bias is not None),
                  ("ACT", PAIR_ACTIVATIONS.index(act) + 1)],
        grid=(rows * heads * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[x.shape], output_dtypes=[x.dtype], init_value=poison)
    return out


register_variant("head_norm_gate", "cuda", head_norm_gate_device)
