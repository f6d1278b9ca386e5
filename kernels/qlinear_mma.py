"""Tensor-core decode kernel for 4-bit linear layers: y = softcap(x W^T + b) with few rows in x (bf16 or f16)
and W affine-quantized to 4 bits as `mx.quantize` packs it.

The per-value kernel (kernels/qlinear_device.py) spends about five instructions on each weight: unpacking a
value into a float, then a float32 FMA per row of x. This one hands the products to the tensor cores
(`mma.sync.m16n8k16`, float32 accumulators), so what is left per weight is its unpacking, half an
instruction a value:

- **Two values per instruction pair.** The nibbles t and t + 4 of a packed word sit 16 bits apart; one
  rotation brings both into the mantissa bits worth 2^-1 .. 2^-4 of the two halves of a register, one
  `lop3` masks them and ORs in the exponent of 1.0: the pair (1 + q_t / 16, 1 + q_{t+4} / 16) in bf16 (or
  f16), exact. No conversions, no subtraction.
- **The affine map per group, on the products.** With v = 1 + q / 16 a group's part of the product is
      s sum(q x) + b sum(x) = 16 s sum(v x) + (b - 16 s) sum(x),
  both sums from the tensor cores: sum(v x) from the weights' tile, sum(x) from a tile of ones (one extra
  mma per 16 values, shared by the warp's 32 rows). The 1 + q / 16 form keeps the part cancelled by
  - 16 s sum(x) as small as in the per-value kernel (v in [1, 2), as 16 + q in [16, 32) there).
- **The fragment layout decides the order of k.** In an m16n8k16 product, lane (g, t) of the warp holds
  A's rows g and g + 8 at columns 2t, 2t + 1, 2t + 8, 2t + 9 and B's column g at rows 2t, 2t + 1, 2t + 8,
  2t + 9. A dot product does not care in which order its terms are summed, so those logical columns are
  mapped to the physical k whose nibbles one rotation brings into place: for 16 values starting at k0,
  column 2t <- k0 + t, 2t + 1 <- k0 + t + 4, 2t + 8 <- k0 + 8 + t, 2t + 9 <- k0 + 12 + t, and x is read
  in that order for B. Each lane loads whole 16-byte runs of its rows (the four lanes of a row read the
  same run: one request) and keeps the two nibbles it owns of each word.
- **Split over k.** A warp computes 32 weight rows (two tiles; for a gated pair, 16 gate rows and the 16
  up rows of the same outputs) over every SPLIT-th quantization group; the SPLIT warps of a block sum their
  partial results through shared memory in a fixed order, and warp 0 adds the bias, soft-cap, pair
  activation and residual and stores the rows. SPLIT is chosen from the matrix's shape alone (enough warps
  to keep the memory system busy), never from the number of rows of x.

Rows of x are B's columns (up to 8). Row m's result is computed by the same instructions whatever the
number of rows (its own column of the tensor-core product, the same k order and the same reduction), so a
row gets the same bits alone and in a batch. A folded RMS norm (`norm`) is applied as x is read: each
row's rsqrt(mean(x^2) + eps) is summed by the block first, and B holds x * rsqrt * g rounded once to x's
dtype (what `mx.fast.rms_norm` hands the reference product).

CUDA only (inline PTX), compute capability 8.0 or newer; `Unsupported` for everything else (8 bits, float32
x, more than 8 rows), which the per-value kernel or the reference then runs.

Status: off by default (`qlinear_device.TENSOR_CORES`). On an H200 it is slower than the per-value kernel
(xLSTM-7B decode 139 against 189 tokens/s; benchmarks/NOTES-gpu.md 33): the four lanes of a fragment row
load the same 16 bytes and a warp walks its groups one memory round trip at a time, so too few bytes are
in flight. What it establishes is the fragment mapping and the unpacking (emulated in numpy by the tests).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import mlx.core as mx

from .device import DeviceKernel, scalar
from .fold import PAIR_ACTIVATIONS
from .linear import check_parts
from .registry import Unsupported

MAX_ROWS = 8  # B's 8 columns
GROUP_SIZES = (32, 64, 128)
ROWS_PER_WARP = 32  # two 16-row tiles
TARGET_WARPS = 4096  # SPLIT is raised until the grid has about this many warps (at most MAX_SPLIT)
MAX_SPLIT = 8

QMMA_HEADER = r"""
// d += a b on the tensor cores: a 16 x 16 (row-major), b 16 x 8 (column-major), float32 d.
template <bool HALF>
__device__ inline void mma_16816(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                 unsigned b1) {
    if constexpr (HALF) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
}

// The 16-bit pattern of a float rounded to U (bf16 or f16).
template <typename U>
__device__ inline unsigned bits16(float v) {
    const U h = static_cast<U>(v);
    unsigned short u;
    memcpy(&u, &h, 2);
    return u;
}
"""

QMMA_BODY = r"""
    constexpr int QBIT = HALF ? 6 : 3;                 // the mantissa bit worth 2^-4 (f16: 10 bits, bf16: 7)
    constexpr unsigned MASKQ = (0xFu << QBIT) | (0xFu << (QBIT + 16));
    constexpr unsigned ONE = HALF ? 0x3C003C00u : 0x3F803F80u;   // 1.0 in both halves
    constexpr int WORDS = K / 8;                       // uint32 words per packed row
    constexpr int GROUPS = K / GROUP_SIZE;
    constexpr int ITERS = GROUP_SIZE / 32;             // 16-byte runs per row and group
    constexpr int P = PAIR ? 2 : 1;
    constexpr int NOUT = N / P;
    const int lane = THREAD_X, warp = THREAD_Y;
    const int gid = lane >> 2, tig = lane & 3;         // the fragment's row group and column pair
    const int rot = (4 * tig - QBIT) & 31;             // rotation bringing nibbles tig, tig + 4 into place
    SHARED float red[SPLIT][2][4][32];
    SHARED float rs[8];

    int rows[2][2];                                    // [tile][half]: weight rows gid, gid + 8 of each tile
#pragma unroll
    for (int tau = 0; tau < 2; ++tau)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            if (PAIR) rows[tau][h] = min(BLOCK_X * 16 + gid + 8 * h, NOUT - 1) + tau * NOUT;
            else rows[tau][h] = min(BLOCK_X * 32 + tau * 16 + gid + 8 * h, N - 1);   // past N: never stored
        }

    if (NORM) {                                        // each row's rsqrt(mean(x^2) + eps), by the whole block
        for (int m = 0; m < M; ++m) {
            float s = 0.0f;
            for (int k = warp * 32 + lane; k < K; k += SPLIT * 32) {
                const float v = static_cast<float>(x[(size_t)m * K + k]);
                s += v * v;
            }
            s = WARP_SUM(s);
            if (lane == 0) red[warp][0][0][m] = s;
        }
        SYNC();
        if (warp == 0 && lane < M) {
            float s = 0.0f;
            for (int v = 0; v < SPLIT; ++v) s += red[v][0][0][lane];
            rs[lane] = 1.0f / SQRT(s / K + normp[0]);
        }
        SYNC();
    }

    const int col = gid < M ? gid : M - 1;             // B's column gid: row gid of x (lanes past M give 0)
    const bool live = gid < M;
    const unsigned short* xb = reinterpret_cast<const unsigned short*>(x) + (size_t)col * K;
    auto xbits = [&](int k) -> unsigned {
        if constexpr (NORM) {
            return bits16<T>(static_cast<float>(x[(size_t)col * K + k]) * rs[col] * static_cast<float>(g[k]));
        } else {
            return xb[k];
        }
    };
    auto bpair = [&](int k) -> unsigned { return live ? (xbits(k) | (xbits(k + 4) << 16)) : 0u; };
    auto nib = [&](unsigned word) -> unsigned { return (__funnelshift_r(word, word, rot) & MASKQ) | ONE; };

    float acc[2][4];
#pragma unroll
    for (int tau = 0; tau < 2; ++tau)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[tau][i] = 0.0f;

    for (int grp = warp; grp < GROUPS; grp += SPLIT) {
        uint4 wv[ITERS][2][2];
#pragma unroll
        for (int it = 0; it < ITERS; ++it)
#pragma unroll
            for (int tau = 0; tau < 2; ++tau)
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    wv[it][tau][h] = *reinterpret_cast<const uint4*>(
                        w + (size_t)rows[tau][h] * WORDS + (grp * GROUP_SIZE + it * 32) / 8);
        float s16[2][2], c[2][2];
#pragma unroll
        for (int tau = 0; tau < 2; ++tau)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const size_t gi = (size_t)rows[tau][h] * GROUPS + grp;
                s16[tau][h] = 16.0f * static_cast<float>(scales[gi]);
                c[tau][h] = static_cast<float>(biases[gi]) - s16[tau][h];
            }
        float d[2][4], e[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            e[i] = 0.0f;
            d[0][i] = 0.0f;
            d[1][i] = 0.0f;
        }
#pragma unroll
        for (int it = 0; it < ITERS; ++it)
#pragma unroll
            for (int p = 0; p < 2; ++p) {                  // 16 values: words 2p, 2p + 1 of each run
                const int k = grp * GROUP_SIZE + it * 32 + 16 * p;
                const unsigned b0 = bpair(k + tig), b1 = bpair(k + 8 + tig);
#pragma unroll
                for (int tau = 0; tau < 2; ++tau) {
                    const uint4 lo = wv[it][tau][0], hi = wv[it][tau][1];
                    const unsigned lw0 = p ? lo.z : lo.x, lw1 = p ? lo.w : lo.y;
                    const unsigned hw0 = p ? hi.z : hi.x, hw1 = p ? hi.w : hi.y;
                    mma_16816<HALF>(d[tau], nib(lw0), nib(hw0), nib(lw1), nib(hw1), b0, b1);
                }
                mma_16816<HALF>(e, ONE, ONE, ONE, ONE, b0, b1);
            }
#pragma unroll
        for (int tau = 0; tau < 2; ++tau)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[tau][i] += s16[tau][i >> 1] * d[tau][i] + c[tau][i >> 1] * e[i];
    }

#pragma unroll
    for (int tau = 0; tau < 2; ++tau)
#pragma unroll
        for (int i = 0; i < 4; ++i) red[warp][tau][i][lane] = acc[tau][i];
    SYNC();
    if (warp == 0) {
        float tot[2][4];
#pragma unroll
        for (int tau = 0; tau < 2; ++tau)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                float v = red[0][tau][i][lane];
                for (int s = 1; s < SPLIT; ++s) v += red[s][tau][i][lane];
                tot[tau][i] = v;
            }
        auto part = [&](float total, int n) -> float {
            total += HAS_BIAS ? static_cast<float>(bias[n]) : 0.0f;
            const float cn = HAS_CAP ? cap[n] : 0.0f;      // 0: this feature's part is not capped
            return cn > 0.0f ? cn * TANH(total / cn) : total;
        };
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int m = 2 * tig + (i & 1);               // the row of x (B's column) this value belongs to
            if (m >= M) continue;
            if (PAIR) {
                const int o = BLOCK_X * 16 + gid + 8 * (i >> 1);
                if (o < NOUT) {
                    const float a = part(tot[0][i], o), b = part(tot[1][i], NOUT + o);
                    float out = (ACT == 1 ? 1.0f : a) / (1.0f + EXP(-a)) * b;   // 1 sigmoid, 2 silu
                    if (RESIDUAL) out += static_cast<float>(res[(size_t)m * NOUT + o]);
                    y[(size_t)m * NOUT + o] = static_cast<T>(out);
                }
            } else {
#pragma unroll
                for (int tau = 0; tau < 2; ++tau) {
                    const int n = BLOCK_X * 32 + tau * 16 + gid + 8 * (i >> 1);
                    if (n < N) {
                        float out = part(tot[tau][i], n);
                        if (RESIDUAL) out += static_cast<float>(res[(size_t)m * N + n]);
                        y[(size_t)m * N + n] = static_cast<T>(out);
                    }
                }
            }
        }
    }
"""

QMMA_KERNEL = DeviceKernel("mad_quantized_mma", inputs=["x", "w", "scales", "biases", "bias", "cap", "g", "normp", "res"],
                           outputs=["y"], body=QMMA_BODY, header=QMMA_HEADER)


@functools.lru_cache(maxsize=None)
def tensor_cores() -> bool:
    """Whether the GPU has the bf16/f16 m16n8k16 products (compute capability 8.0 or newer)."""
    info = mx.device_info()
    return int(info.get("compute_capability_major", 0)) >= 8


def split_for(blocks: int, groups: int) -> int:
    """Warps per block, each summing every SPLIT-th group: from the matrix's shape alone."""
    return max(1, min(MAX_SPLIT, groups, TARGET_WARPS // max(blocks, 1)))


def launch_mma(x: mx.array, packed, bias: Optional[mx.array], splits: Sequence[int], caps: Sequence[Optional[float]],
               backend: str, poison: Optional[float], norm: Optional[tuple] = None, pair: Optional[str] = None,
               residual: Optional[mx.array] = None, width: Optional[int] = None, split: Optional[int] = None,
               unused: Optional[mx.array] = None, cap_vector=None) -> mx.array:
    """The kernel's (..., width) result; Unsupported for inputs it does not handle. `split` overrides
    `split_for` (tests and benchmarks); `unused` and `cap_vector` are the caller's stand-in array and
    per-feature cap vector (kernels/linear_device.py)."""
    *lead, K = x.shape
    M = math.prod(lead)
    w, scales, biases, group_size = packed.weight, packed.scales, packed.biases, packed.group_size
    N = w.shape[0]
    if (backend != "cuda" or packed.mode != "affine" or packed.bits != 4 or group_size not in GROUP_SIZES
            or biases is None or not 1 <= M <= MAX_ROWS or x.dtype not in (mx.bfloat16, mx.float16)
            or K % group_size or w.dtype != mx.uint32 or w.shape != (N, K // 8)
            or scales.shape != (N, K // group_size) or biases.shape != scales.shape
            or not mx.issubdtype(scales.dtype, mx.floating) or not mx.issubdtype(biases.dtype, mx.floating)
            or (bias is not None and bias.shape != (N,)) or (pair is not None and N % 2)
            or (norm is not None and (norm[0] is None or norm[0].shape != (K,))) or not tensor_cores()):
        raise Unsupported(f"quantized_linear (tensor cores): x {x.shape} {x.dtype}, {packed.bits}-bit "
                          f"{packed.mode} weight {w.shape}, group size {group_size}")
    check_parts(splits, caps)
    has_cap = any(caps)
    width = N if width is None else width
    blocks = -(-(N // 2) // 16) if pair is not None else -(-N // ROWS_PER_WARP)
    S = split_for(blocks, K // group_size) if split is None else split
    (y,) = QMMA_KERNEL(
        backend,
        inputs=[x, w, scales, biases, unused if bias is None else bias,
                cap_vector(N, tuple(splits), tuple(caps)) if has_cap else unused,
                unused if norm is None else norm[0], unused if norm is None else scalar(norm[1]),
                unused if residual is None else residual],
        template=[("T", x.dtype), ("HALF", x.dtype == mx.float16), ("M", M), ("K", K), ("N", N),
                  ("GROUP_SIZE", group_size), ("SPLIT", S), ("HAS_BIAS", bias is not None), ("HAS_CAP", has_cap),
                  ("NORM", norm is not None), ("PAIR", pair is not None),
                  ("ACT", PAIR_ACTIVATIONS.index(pair) + 1 if pair else 0), ("RESIDUAL", residual is not None)],
        grid=(blocks * 32, S, 1), threadgroup=(32, S, 1),
        output_shapes=[(*lead, width)], output_dtypes=[x.dtype], init_value=poison)
    return y
