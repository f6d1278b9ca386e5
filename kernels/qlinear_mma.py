"""Tensor-core decode kernel for 4-bit linear layers: y = softcap(x W^T + b) with few rows in x (bf16 or f16)
and W affine-quantized to 4 bits as `mx.quantize` packs it.

The per-value kernel (kernels/qlinear_device.py) spends about five instructions on each weight: unpacking a
value into a float, then a float32 FMA per row of x. This one hands the products to the tensor cores
(`mma.sync.m16n8k16`, float32 accumulators), so what is left per weight is its unpacking, one
instruction a value (a rotation and a `lop3` per pair):

- **Two values per instruction pair.** The nibbles s and s + 4 of a packed word sit 16 bits apart; one
  rotation brings both into the mantissa bits worth 2^-1 .. 2^-4 of the two halves of a register, one
  `lop3` masks them and ORs in the exponent of 1.0: the pair (1 + q_s / 16, 1 + q_{s+4} / 16) in bf16 (or
  f16), exact. No conversions, no subtraction.
- **The affine map per group, on the products.** With v = 1 + q / 16 a group's part of the product is
      s sum(q x) + b sum(x) = 16 s sum(v x) + (b - 16 s) sum(x),
  both sums from the tensor cores: sum(v x) from the weights' tile, sum(x) from a tile of ones (one extra
  mma per 16 values, shared by the warp's 32 rows). The 1 + q / 16 form keeps the part cancelled by
  - 16 s sum(x) as small as in the per-value kernel (v in [1, 2), as 16 + q in [16, 32) there).
- **The fragment layout decides the order of k.** In an m16n8k16 product, lane (g, t) of the warp holds
  A's rows g and g + 8 at columns 2t, 2t + 1, 2t + 8, 2t + 9 and B's column g at rows 2t, 2t + 1, 2t + 8,
  2t + 9. A dot product does not care in which order its terms are summed, so the lanes' columns are
  mapped to the physical k of the words each lane loads itself: of a quantization group, lane t holds
  GROUP_SIZE / 32 consecutive words of each of its four rows (the quad's lanes, side by side, read the
  group's run of each row: no byte loaded twice, no exchange between lanes), and product j of the group
  takes nibbles s, s + 4 (columns 2t, 2t + 1) and s + 1, s + 5 (2t + 8, 2t + 9) of the lane's word j / 2,
  s = 2 (j mod 2). B is then x at those k, two `prmt`s from one 16-byte load of x.
- **Groups loaded ahead.** A warp keeps AHEAD more groups' words (a few registers each) loading while it
  computes one, so a warp has several groups' bytes in flight instead of one memory round trip per group.
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

Status: not used by default (`qlinear_device.TENSOR_CORES = "none"`). Measured (benchmarks/NOTES-gpu.md
33, 34): this form (distinct loads, groups ahead) beats the per-value kernel on long rows into few features
(the down projection, 42 against 52 us on an H100) and loses on the other products; xLSTM-7B decode with
it on the down projections only ("long") was 195.5 against 194.3 tokens/s on an H200. The tests emulate its
fragments in numpy on every machine.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import mlx.core as mx

from .device import DeviceKernel
from .linear import check_parts
from .linear_device import fold_inputs, fold_template
from .qlinear import affine_layout
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
    constexpr int WPL = GROUP_SIZE / 32;               // words a lane holds of each row and group (1, 2, 4)
    constexpr int NB = AHEAD + 1;                      // groups in registers: the current one and AHEAD more
    constexpr int P = PAIR ? 2 : 1;
    constexpr int NOUT = N / P;
    const int lane = THREAD_X, warp = THREAD_Y;
    const int gid = lane >> 2, tig = lane & 3;         // the fragment's row group and column pair
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
    // the 8 values x[col][k0 .. k0 + 8) as four packed pairs (x0 x1, x2 x3, x4 x5, x6 x7); with a folded norm
    // x * rsqrt * g rounded once to T
    auto xrun = [&](int k0, unsigned* r) {
        if (!live) {
            r[0] = r[1] = r[2] = r[3] = 0u;
        } else if constexpr (NORM) {
            float xv[8], gv[8];
            load8(x + (size_t)col * K + k0, xv);
            load8(g + k0, gv);
#pragma unroll
            for (int e = 0; e < 4; ++e)
                r[e] = bits16<T>(xv[2 * e] * rs[col] * gv[2 * e]) | (bits16<T>(xv[2 * e + 1] * rs[col] * gv[2 * e + 1]) << 16);
        } else {
            const uint4 u = *reinterpret_cast<const uint4*>(x + (size_t)col * K + k0);
            r[0] = u.x; r[1] = u.y; r[2] = u.z; r[3] = u.w;
        }
    };
    // the lane's words of group grp: WPL consecutive words of each of its four rows, at word tig * WPL of the
    // group, and the rows' scales and biases (kept as loaded: converted where used, so no instruction waits
    // for a load before the group is computed)
    auto load_group = [&](int grp, unsigned (&wd)[2][2][WPL], S (&sb)[2][2][2]) {
#pragma unroll
        for (int tau = 0; tau < 2; ++tau)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const unsigned* src = w + (size_t)rows[tau][h] * WORDS + grp * (GROUP_SIZE / 8) + tig * WPL;
                if constexpr (WPL == 4) {
                    const uint4 u = *reinterpret_cast<const uint4*>(src);
                    wd[tau][h][0] = u.x; wd[tau][h][1] = u.y; wd[tau][h][2] = u.z; wd[tau][h][3] = u.w;
                } else if constexpr (WPL == 2) {
                    const uint2 u = *reinterpret_cast<const uint2*>(src);
                    wd[tau][h][0] = u.x; wd[tau][h][1] = u.y;
                } else {
                    wd[tau][h][0] = src[0];
                }
                const size_t gi = (size_t)rows[tau][h] * GROUPS + grp;
                sb[tau][h][0] = scales[gi];
                sb[tau][h][1] = biases[gi];
            }
    };
    float acc[2][4];
#pragma unroll
    for (int tau = 0; tau < 2; ++tau)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[tau][i] = 0.0f;
    // group grp's products into acc
    auto compute = [&](int grp, const unsigned (&wd)[2][2][WPL], const S (&sb)[2][2][2]) {
        float d[2][4], e[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            e[i] = 0.0f;
            d[0][i] = 0.0f;
            d[1][i] = 0.0f;
        }
        unsigned xr[4];
#pragma unroll
        for (int j = 0; j < 2 * WPL; ++j) {            // 16 values a step: nibbles s, s + 4, s + 1, s + 5 of word j / 2
            const int wi = j >> 1, s = 2 * (j & 1);
            if ((j & 1) == 0) xrun(grp * GROUP_SIZE + 8 * (tig * WPL + wi), xr);
            const unsigned b0 = __byte_perm(xr[j & 1], xr[2 + (j & 1)], 0x5410);   // x[k0 + s], x[k0 + s + 4]
            const unsigned b1 = __byte_perm(xr[j & 1], xr[2 + (j & 1)], 0x7632);   // x[k0 + s + 1], x[k0 + s + 5]
            const int rot0 = (4 * s - QBIT) & 31, rot1 = (4 * s + 4 - QBIT) & 31;
#pragma unroll
            for (int tau = 0; tau < 2; ++tau) {
                const unsigned lo = wd[tau][0][wi], hi = wd[tau][1][wi];
                mma_16816<HALF>(d[tau], MASK_OR<MASKQ, ONE>(__funnelshift_r(lo, lo, rot0)),
                                MASK_OR<MASKQ, ONE>(__funnelshift_r(hi, hi, rot0)),
                                MASK_OR<MASKQ, ONE>(__funnelshift_r(lo, lo, rot1)),
                                MASK_OR<MASKQ, ONE>(__funnelshift_r(hi, hi, rot1)), b0, b1);
            }
            mma_16816<HALF>(e, ONE, ONE, ONE, ONE, b0, b1);
        }
#pragma unroll
        for (int tau = 0; tau < 2; ++tau)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float s16 = 16.0f * static_cast<float>(sb[tau][i >> 1][0]);
                acc[tau][i] += s16 * d[tau][i] + (static_cast<float>(sb[tau][i >> 1][1]) - s16) * e[i];
            }
    };

    // NB register slots in turn: the loop is unrolled by NB, so slot u is a fixed set of registers (no moves
    // between slots, which would wait for the newest loads); slot (u + AHEAD) % NB receives the group AHEAD
    // steps ahead while slot u is computed
    unsigned wd[NB][2][2][WPL];
    S sb[NB][2][2][2];
#pragma unroll
    for (int a = 0; a < AHEAD; ++a)
        if (warp + a * SPLIT < GROUPS) load_group(warp + a * SPLIT, wd[a], sb[a]);
    for (int base = warp; base < GROUPS; base += NB * SPLIT) {
#pragma unroll
        for (int u = 0; u < NB; ++u) {
            const int grp = base + u * SPLIT;
            if (grp < GROUPS) {
                if (grp + AHEAD * SPLIT < GROUPS) load_group(grp + AHEAD * SPLIT, wd[(u + AHEAD) % NB], sb[(u + AHEAD) % NB]);
                compute(grp, wd[u], sb[u]);
            }
        }
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


def groups_ahead(group_size: int) -> int:
    """Groups a warp has loading while it computes one: the registers they take grow with the group."""
    return 2 if group_size <= 64 else 1


def launch_mma(x: mx.array, packed, bias: Optional[mx.array], splits: Sequence[int], caps: Sequence[Optional[float]],
               backend: str, poison: Optional[float], norm: Optional[tuple] = None, pair: Optional[str] = None,
               residual: Optional[mx.array] = None, width: Optional[int] = None, split: Optional[int] = None,
               ahead: Optional[int] = None) -> mx.array:
    """The kernel's (..., width) result; Unsupported for inputs it does not handle. `split` and `ahead`
    override `split_for` and `groups_ahead` (tests and benchmarks)."""
    for name, value, low, top in (("split", split, 1, 1024 // 32), ("ahead", ahead, 0, 4)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= top):
            raise ValueError(f"{name} must be an integer from {low} to {top}, got {value!r}")
    *lead, K = x.shape
    M = math.prod(lead)
    w, scales, biases, group_size = packed.weight, packed.scales, packed.biases, packed.group_size
    N = w.shape[0]
    if (backend != "cuda" or not affine_layout(x, packed, bias, norm) or packed.bits != 4
            or group_size not in GROUP_SIZES or not 1 <= M <= MAX_ROWS or x.dtype not in (mx.bfloat16, mx.float16)
            or biases.dtype != scales.dtype or (pair is not None and N % 2) or not tensor_cores()):
        raise Unsupported(f"quantized_linear (tensor cores): x {x.shape} {x.dtype}, {packed.bits}-bit "
                          f"{packed.mode} weight {w.shape}, group size {group_size}")
    check_parts(splits, caps)
    width = N if width is None else width
    blocks = -(-(N // 2) // 16) if pair is not None else -(-N // ROWS_PER_WARP)
    S = split_for(blocks, K // group_size) if split is None else split
    (y,) = QMMA_KERNEL(
        backend,
        inputs=[x, w, scales, biases, *fold_inputs(N, bias, splits, caps, norm, residual)],
        template=[("T", x.dtype), ("S", scales.dtype), ("HALF", x.dtype == mx.float16), ("M", M), ("K", K), ("N", N),
                  ("GROUP_SIZE", group_size), ("SPLIT", S),
                  ("AHEAD", groups_ahead(group_size) if ahead is None else ahead),
                  *fold_template(bias, caps, norm, pair, residual)],
        grid=(blocks * 32, S, 1), threadgroup=(32, S, 1),
        output_shapes=[(*lead, width)], output_dtypes=[x.dtype], init_value=poison)
    return y
