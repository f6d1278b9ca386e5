"""Device kernel for decode-sized quantized linear layers: y = softcap(x W^T + b) with few rows in x and W
affine-quantized as `mx.quantize` packs it (4 or 8 bits).

The design is the float `linear` kernel's (kernels/linear_device.py): a decode step's time is the time to
stream the weights, so the kernel must run at memory bandwidth. One warp per output feature n reads the
packed row W[n] with 16-byte loads (consecutive lanes on consecutive addresses): a lane's load holds
CHUNK = 128 / bits consecutive values (32 at 4 bits, 16 at 8 bits), all in one quantization group, since
every group size (32, 64, 128) is a multiple of CHUNK. The lane dequantizes them in registers,
w = scale * q + bias with its group's scale and bias, multiplies them with each row of x (small, served
from cache) and sums in float32; the warp then sums its lanes. The bias and the soft-cap of the feature's
part are applied to that float32 sum, which is rounded once to x's dtype.

The layout is MLX's: value j of a row is the unsigned integer at bit offset (j * bits) % 32 of word
j * bits / 32 of the row, lowest bits first (`unpack_row` is this arithmetic in numpy, tested against
`mx.dequantize` on the CPU).

Same call as the reference `kernels.qlinear.quantized_linear`. The variant takes x (M, K) with
M <= MAX_ROWS in bfloat16, float16 or float32, and an affine matrix of 4 or 8 bits with group size 32, 64
or 128; anything else (other bits, the floating-point modes) runs the reference. CUDA only: the unpacking
uses a CUDA intrinsic, and no Metal build of it has been run.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import mlx.core as mx

from .device import DeviceKernel
from .linear import check_parts, split_parts
from .linear_device import _UNUSED, DTYPES, _cap_vector
from .qlinear import QuantizedMatrix
from .registry import Unsupported, register_variant

MAX_ROWS = 8
BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
WARPS = 4  # output features per block (one warp each)

QLINEAR_HEADER = """
// q (an unsigned integer below 2^23) as a float without an int-to-float conversion, an instruction of low
// throughput that would bound the kernel: the float 2^23 + q holds q in its low mantissa bits, exactly.
__device__ inline float small_uint_to_float(unsigned int q) {
    return __uint_as_float(0x4B000000u | q) - 8388608.0f;
}
"""

QLINEAR_BODY = """
    constexpr int PER_WORD = 32 / BITS;          // values per uint32 word
    constexpr int CHUNK = 4 * PER_WORD;          // values per lane and 16-byte load (32 or 16)
    constexpr int WORDS = K / PER_WORD;          // words per packed row
    constexpr int GROUPS = K / GROUP_SIZE;       // scales (and biases) per row
    constexpr unsigned int MASK = (1u << BITS) - 1u;
    const int lane = THREAD_X;                   // 0..31
    const int n = BLOCK_X * WARPS + THREAD_Y;    // output feature of this warp
    if (n < N) {
        float acc[M];
#pragma unroll
        for (int r = 0; r < M; ++r) acc[r] = 0.0f;
        const size_t row = (size_t)n * WORDS;
#pragma unroll 4
        for (int k = lane * CHUNK; k < K; k += 32 * CHUNK) {   // values k .. k + CHUNK - 1 (K % CHUNK == 0)
            const uint4 raw = *reinterpret_cast<const uint4*>(w + row + k / PER_WORD);
            const unsigned int words[4] = {raw.x, raw.y, raw.z, raw.w};
            const size_t g = (size_t)n * GROUPS + k / GROUP_SIZE;   // the chunk's group
            const float s = static_cast<float>(scales[g]);
            const float b = static_cast<float>(biases[g]);
#pragma unroll
            for (int h = 0; h < CHUNK / 8; ++h) {       // 8 values at a time: one load8 of each row of x
                float wv[8];
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    const int j = h * 8 + e;            // value j of the chunk
                    const unsigned int q = (words[j / PER_WORD] >> ((j % PER_WORD) * BITS)) & MASK;
                    wv[e] = s * small_uint_to_float(q) + b;
                }
#pragma unroll
                for (int r = 0; r < M; ++r) {
                    float xv[8];
                    load8(x + (size_t)r * K + k + h * 8, xv);
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[r] += wv[e] * xv[e];
                }
            }
        }
        const float bn = HAS_BIAS ? static_cast<float>(bias[n]) : 0.0f;
        const float c = HAS_CAP ? cap[n] : 0.0f;   // 0: this feature's part is not capped
#pragma unroll
        for (int r = 0; r < M; ++r) {
            float total = WARP_SUM(acc[r]) + bn;
            if (c > 0.0f) total = c * TANH(total / c);
            if (lane == 0) y[(size_t)r * N + n] = static_cast<T>(total);
        }
    }
"""

QLINEAR_KERNEL = DeviceKernel("mad_quantized_linear", inputs=["x", "w", "scales", "biases", "bias", "cap"],
                              outputs=["y"], body=QLINEAR_BODY, header=QLINEAR_HEADER)


def unpack_row(words: np.ndarray, bits: int, K: int) -> np.ndarray:
    """The K unsigned integers of one packed row (uint32 words), unpacked as the kernel does: lane chunks of
    128 / bits values, each from one 16-byte load (4 words), value j of a chunk at bit offset
    (j % per_word) * bits of the chunk's word j / per_word. (A numpy emulation of QLINEAR_BODY's indices,
    for the tests: it checks the layout on a machine without a GPU.)"""
    import numpy as np

    per_word, chunk = 32 // bits, 128 // bits
    out = np.zeros(K, np.uint32)
    for lane in range(32):
        for k in range(lane * chunk, K, 32 * chunk):
            loaded = words[k // per_word: k // per_word + 4]
            for j in range(chunk):
                out[k + j] = (int(loaded[j // per_word]) >> ((j % per_word) * bits)) & ((1 << bits) - 1)
    return out


def quantized_linear_device(x: mx.array, packed: QuantizedMatrix, bias: Optional[mx.array] = None,
                            splits: Sequence[int] = (), caps: Sequence[Optional[float]] = (None,), *,
                            backend: str = "cuda", poison: Optional[float] = None) -> list[mx.array]:
    """`kernels.qlinear.quantized_linear` with the decode kernel; Unsupported for inputs it does not handle."""
    *lead, K = x.shape
    M = math.prod(lead)
    w, scales, biases, group_size, bits = packed.weight, packed.scales, packed.biases, packed.group_size, packed.bits
    N = w.shape[0]
    groups = (N, K // group_size)
    if (packed.mode != "affine" or bits not in BITS or group_size not in GROUP_SIZES or biases is None
            or not 1 <= M <= MAX_ROWS or x.dtype not in DTYPES or K % group_size
            or w.dtype != mx.uint32 or w.shape != (N, K * bits // 32) or scales.shape != groups
            or biases.shape != groups or not mx.issubdtype(scales.dtype, mx.floating)
            or not mx.issubdtype(biases.dtype, mx.floating) or (bias is not None and bias.shape != (N,))):
        raise Unsupported(f"quantized_linear: x {x.shape} {x.dtype}, {bits}-bit {packed.mode} weight {w.shape}, "
                          f"group size {group_size}")
    check_parts(splits, caps)
    has_cap = any(caps)
    (y,) = QLINEAR_KERNEL(
        backend,
        inputs=[x.reshape(M, K), w, scales, biases, _UNUSED if bias is None else bias,
                _cap_vector(N, tuple(splits), tuple(caps)) if has_cap else _UNUSED],
        template=[("T", x.dtype), ("M", M), ("K", K), ("N", N), ("BITS", bits), ("GROUP_SIZE", group_size),
                  ("WARPS", WARPS), ("HAS_BIAS", bias is not None), ("HAS_CAP", has_cap)],
        grid=(-(-N // WARPS) * 32, WARPS, 1), threadgroup=(32, WARPS, 1),
        output_shapes=[(M, N)], output_dtypes=[x.dtype], init_value=poison)
    return split_parts(y.reshape(*lead, N), splits)


register_variant("quantized_linear", "cuda", quantized_linear_device)
