"""Device kernel for decode-sized quantized linear layers: y = softcap(x W^T + b) with few rows in x and W
affine-quantized as `mx.quantize` packs it (4 or 8 bits).

A decode step's time is the time to stream the weights, so the kernel must run at memory bandwidth; with 4
bits a weight is a quarter of the bytes of bf16, so the instructions that turn packed integers into numbers,
not the loads, are what bounds a naive kernel. This one spends about four instructions on a 4-bit value
(counted in the compiled code, `cuobjdump -sass`: 4.9 on the q|k|v|o shape of xLSTM-7B with its RMS norm
folded in, 4.2 on the down projection, one row of bf16):

- **Unpacking without conversions.** Value i of a 32-bit word, q = (word >> i * BITS) & MASK, is moved
  (one shift) into the mantissa bits of a float whose lowest mantissa bit of q is worth 1 and that
  float's exponent OR-ed in (one `lop3`, `MASK_OR`), which gives the float 2^e + q exactly
  (`offset_value`): no int-to-float conversion, an instruction of low throughput. With 16-bit rows of x,
  the two nibbles of a 4-bit word's pair (2p, 2p + 1) share one shift: the even one lands at mantissa
  bit 15 (256 + q), the odd one at bit 19 (16 + q).
- **The affine map applied per chunk, not per value.** A lane's chunk of values lies in one quantization
  group (scale s, bias b), so with v = 2^BITS + q its part of the product is
      sum(s * q * x + b * x) = s * sum(v * x) + (b - 2^BITS * s) * sum(x),
  one FMA per value into `dot` and two per chunk; sum(x) is computed once per chunk and row of x (with
  the two offsets, the even values' extra 240 s sum(x over them) comes off too).
- **Several output features per warp** (R): a warp reads R packed rows at the same columns, so the slice of
  x it converts from bf16 and sums serves R rows of W, and R independent sums keep the FMA pipe busy.
- **The next steps' bytes in flight while a step is computed** (AHEAD): a warp issues the loads of step
  s + AHEAD before it computes step s, into register slots the unrolled loop names statically. Without it a
  warp's loads wait for its previous step's products, so a warp has bytes in flight only between steps.
- **x staged once a block** (SHARED_X, off by default): the block's rows of x, their chunk sums and a folded
  norm's squares computed once into shared memory, where each warp otherwise does that for the same
  columns.
- **Each part an output of its own**: a fused group's parts are written through `STORE` into outputs of
  their own (`DeviceKernel.parted`), so no split node follows the launch.

One warp reads R consecutive packed rows W[n0 .. n0 + R) with 16-byte loads (consecutive lanes on
consecutive addresses): a lane's load holds CHUNK = 128 / bits consecutive values (32 at 4 bits, 16 at 8),
all in one group, since every group size (32, 64, 128) is a multiple of CHUNK. Each row of x is summed in
the same order whatever the number of rows (its own accumulators, the same chunks, the same warp
reduction), so a row's result does not depend on the batch around it. The bias and the soft-cap of the
feature's part are applied to the float32 sum, which is rounded once to x's dtype.

The layout is MLX's: value j of a row is the unsigned integer at bit offset (j * bits) % 32 of word
j * bits / 32 of the row, lowest bits first (`unpack_row` is the kernel's arithmetic in numpy, tested
against `mx.dequantize` on the CPU; `emulate_product` is its float32 arithmetic, held to the float64
product).

Same call as the reference `kernels.qlinear.quantized_linear`. The variant takes x (M, K) with
M <= MAX_ROWS in bfloat16, float16 or float32, and an affine matrix of 4 or 8 bits with group size 32, 64
or 128; anything else (other bits, the floating-point modes) runs the reference. CUDA only: the unpacking
reinterprets bits with a CUDA intrinsic and PTX (`MASK_OR`), and no Metal build of it has been run.
`TENSOR_CORES` says which calls the variant first offers to the tensor-core kernel (kernels/qlinear_mma.py:
4 bits, bf16 or f16 rows).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import mlx.core as mx
import numpy as np

from .device import DeviceKernel, store_macro
from .linear import check_parts, split_parts
from .fold import fold_result, fold_width, per_part
from .linear_device import DTYPES, fold_inputs, fold_template, folded_linear_device, part_outputs
from .qlinear import QuantizedMatrix, affine_layout
from .qlinear_mma import launch_mma
from .registry import Unsupported, register_variant

MAX_ROWS = 8
BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
WARPS = 4  # warps per block
# Whether a block stages its rows of x (and their chunk sums) in shared memory once, where its warps
# otherwise each convert and sum the same columns (SHARED_X in the kernel; taken where it fits in
# SHARED_X_BYTES). Off until measured (benchmarks/NOTES-gpu.md 41).
SHARED_X = False
SHARED_X_BYTES = 48 * 1024
# Warp steps whose loads are in flight while a step is computed (0: each step's loads, then its products).
# 1: not yet measured against 0 (benchmarks/NOTES-gpu.md 40).
AHEAD = 1
# Which 4-bit calls with bf16/f16 rows go to the tensor-core kernel (kernels/qlinear_mma.py) where it takes
# them (this kernel runs the rest): "none", "all", or "long", the products whose rows are at least twice as
# long as they have features (K >= 2 N: the down projection), where its split over k pays. Measured on an
# H100 (benchmarks/NOTES-gpu.md 34): per product, the tensor-core kernel was faster on the down projection
# only (42.1 against 52.2 us); xLSTM-7B decode with it everywhere 179 tokens/s against 193. Benchmarks and
# tests choose the other settings to compare.
TENSOR_CORES = "none"
TENSOR_CORE_SETTINGS = ("none", "all", "long")


def takes_tensor_cores(K: int, N: int) -> bool:
    """Whether `TENSOR_CORES` offers a product of rows of K values into N features to the tensor-core kernel."""
    if TENSOR_CORES not in TENSOR_CORE_SETTINGS:
        raise ValueError(f"qlinear_device.TENSOR_CORES must be one of {TENSOR_CORE_SETTINGS}, got {TENSOR_CORES!r}")
    return TENSOR_CORES == "all" or (TENSOR_CORES == "long" and K >= 2 * N)


def features_per_warp(rows: int) -> int:
    """R, the output features one warp computes, for `rows` rows of x: more features share each slice of x,
    fewer keep the registers (R x rows float32 sums per lane) within budget."""
    return 4 if rows <= 2 else 2


# The end of a block's staging of x (SHARED_X): each warp's sums of squares of the rows (a folded norm's)
# into xss, the barrier, then every thread's ss[r] = the row's sum over the warps in order (the whole row's,
# not summed over the lanes again).
STAGING_HEADER = """
template <int M, int WARPS, bool NORM>
__device__ inline void staged_squares(float (&sq)[M], float* xss, float (&ss)[M]) {
    const int warp = THREAD_Y, lane = THREAD_X;
    if (NORM) {
#pragma unroll
        for (int r = 0; r < M; ++r) {
            const float total = WARP_SUM(sq[r]);
            if (lane == 0) xss[warp * M + r] = total;
        }
    }
    SYNC();
    if (NORM) {
#pragma unroll
        for (int r = 0; r < M; ++r) {
            float total = 0.0f;
            for (int wi = 0; wi < WARPS; ++wi) total += xss[wi * M + r];
            ss[r] = total;
        }
    }
}
"""

QLINEAR_HEADER = """
// Value i of a packed word as the float 2^(23 - AT) + q, q = (word >> i * BITS) & (2^BITS - 1): q is shifted
// to the mantissa bits AT .. AT + BITS - 1 (bit AT is worth 1 in a float of exponent 2^(23 - AT)) and the
// exponent OR-ed in: one shift (none where q is in place already) and one lop3 (MASK_OR). i is a constant
// once unrolled.
template <int BITS, int AT>
__device__ inline float offset_value(unsigned int word, int i) {
    constexpr unsigned int FIELD = ((1u << BITS) - 1u) << AT;
    constexpr unsigned int EXPONENT = (127u + 23u - AT) << 23;
    const int shift = AT - i * BITS;
    const unsigned int moved = shift >= 0 ? word << shift : word >> -shift;
    return __uint_as_float(MASK_OR<FIELD, EXPONENT>(moved));
}

// The element type of a kernel argument's pointer (the scales and biases keep their own dtype).
template <typename P> struct pointee;
template <typename U> struct pointee<const U*> { using type = U; };
template <typename U> struct pointee<U*> { using type = U; };
"""

QLINEAR_BODY = """
    constexpr int PER_WORD = 32 / BITS;          // values per uint32 word
    constexpr int CHUNK = 4 * PER_WORD;          // values per lane and 16-byte load (32 or 16)
    constexpr int STEPS = (K + 32 * CHUNK - 1) / (32 * CHUNK);   // warp steps over a row
    constexpr int WORDS = K / PER_WORD;          // words per packed row
    constexpr int GROUPS = K / GROUP_SIZE;       // scales (and biases) per row
    constexpr float OFFSET = (float)(1 << BITS);
    // SPLIT: 4-bit values with 16-bit rows of x are unpacked two per shift, the even values of a word as
    // 256 + q (q at mantissa bits 15..18), the odd ones as 16 + q (bits 19..22), the pair's shift shared;
    // the even values' extra offset, 240 sum(x over them), comes off with the chunk's sums. (Rows of float32
    // keep one offset, 16: the larger even offset costs float32 sums about 5x their rounding error.)
    constexpr bool SPLIT = BITS == 4 && sizeof(T) == 2;
    constexpr int AT = 23 - BITS;                // the mantissa bit of q's lowest bit (value 2^BITS + q)
    constexpr int P = PAIR ? 2 : 1;              // weight rows per output: o, and NOUT + o for a pair
    constexpr int NOUT = N / P;
    constexpr int OUTS = R / P;                  // outputs per warp
    const int lane = THREAD_X;                   // 0..31
    const int o0 = (BLOCK_X * WARPS + THREAD_Y) * OUTS;   // this warp's first output
    // SHARED_X: the block's rows of x staged once in shared memory as float32 (times the norm's weight with
    // NORM), with each lane chunk's sums, where every warp converted and summed the same columns itself.
    // Chunk c's 16-byte piece p sits at (p * NCH + c) * 4, so that the lanes of a warp (consecutive chunks)
    // read consecutive 16 bytes. Every warp of the block then runs (the staging has a barrier); a warp past
    // the last output stores nothing.
    constexpr int NCH = K / CHUNK;               // lane chunks a row
    SHARED __align__(16) float xs[SHARED_X ? M * K : 1];
    SHARED float xsum[SHARED_X ? M * NCH : 1], xsum_even[SHARED_X && SPLIT ? M * NCH : 1];
    SHARED float xss[SHARED_X && NORM ? WARPS * M : 1];
    if (SHARED_X || o0 < NOUT) {
        int rows[R];                             // the weight row of each of the warp's R sums
#pragma unroll
        for (int f = 0; f < R; ++f) {
            const int o = min(o0 + f % OUTS, NOUT - 1);   // past the last output: a repeat, never stored
            rows[f] = o + (f / OUTS) * NOUT;
        }
        float acc[M][R];
        float ss[M];                             // NORM: the sum of squares of each row of x
#pragma unroll
        for (int r = 0; r < M; ++r) {
            ss[r] = 0.0f;
#pragma unroll
            for (int f = 0; f < R; ++f) acc[r][f] = 0.0f;
        }
        // A warp step's loads into a register slot: the lane's 16 bytes of each of its R rows and their
        // chunk's scale and bias, kept as loaded (converted where used, so that no instruction after the
        // loads waits for them before the step is computed).
        constexpr int NB = AHEAD + 1;            // slots: the step computed and AHEAD steps loading
        unsigned int words[NB][R][4];
        using ST = typename pointee<decltype(scales)>::type;
        using BT = typename pointee<decltype(biases)>::type;
        ST sraw[NB][R];
        BT braw[NB][R];
        auto load_step = [&](int step, unsigned int (&wd)[R][4], ST (&sr)[R], BT (&br)[R]) {
            const int k = (step * 32 + lane) * CHUNK;   // the lane's chunk's values (K % CHUNK == 0)
            if (k < K) {
#pragma unroll
                for (int f = 0; f < R; ++f) {
                    const int n = rows[f];
                    const uint4 raw = *reinterpret_cast<const uint4*>(w + (size_t)n * WORDS + k / PER_WORD);
                    wd[f][0] = raw.x; wd[f][1] = raw.y; wd[f][2] = raw.z; wd[f][3] = raw.w;
                    const size_t gi = (size_t)n * GROUPS + k / GROUP_SIZE;   // the chunk's group
                    sr[f] = scales[gi];
                    br[f] = biases[gi];
                }
            }
        };
        // Values k0 .. k0 + 8 of row r of x as float32 into xv (times the norm's weight gv with NORM, their
        // squares into sq first), added to sum and, the even ones (SPLIT), to sum_even: what a lane does to
        // x without staging and the staging does once a block (the same order: the same bits).
        auto read_x8 = [&](int r, int k0, const float (&gv)[8], float (&xv)[8], float& sq, float& sum,
                           float& sum_even) {
            load8(x + (size_t)r * K + k0, xv);
            if (NORM) {
#pragma unroll
                for (int e = 0; e < 8; ++e) { sq += xv[e] * xv[e]; xv[e] *= gv[e]; }
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) sum += xv[e];
            if (SPLIT) {
#pragma unroll
                for (int e = 0; e < 8; e += 2) sum_even += xv[e];
            }
        };
        // A step's products into acc.
        auto compute_step = [&](int step, const unsigned int (&wd)[R][4], const ST (&sr)[R], const BT (&br)[R]) {
            const int c = step * 32 + lane;          // the lane's chunk: values k .. k + CHUNK - 1
            const int k = c * CHUNK;
            if (k < K) {
                float dot[M][R], sx[M], sxe[M];   // sxe: the sum of x over the even values (SPLIT)
#pragma unroll
                for (int r = 0; r < M; ++r) {
                    sx[r] = SHARED_X ? xsum[r * NCH + c] : 0.0f;
                    sxe[r] = SHARED_X && SPLIT ? xsum_even[r * NCH + c] : 0.0f;
#pragma unroll
                    for (int f = 0; f < R; ++f) dot[r][f] = 0.0f;
                }
#pragma unroll
                for (int h = 0; h < CHUNK / 8; ++h) {       // 8 values at a time
                    float v[R][8];
#pragma unroll
                    for (int f = 0; f < R; ++f)
#pragma unroll
                        for (int e = 0; e < 8; ++e) {
                            const int j = h * 8 + e;            // value j of the chunk
                            const unsigned int word = wd[f][j / PER_WORD];
                            v[f][e] = SPLIT && e % 2 == 0 ? offset_value<BITS, 15>(word, j % PER_WORD)
                                                          : offset_value<BITS, AT>(word, j % PER_WORD);
                        }
                    float gv[8];
                    if (NORM && !SHARED_X) load8(g + k + h * 8, gv);
#pragma unroll
                    for (int r = 0; r < M; ++r) {
                        float xv[8];
                        if (SHARED_X) {
                            const float4 a = *reinterpret_cast<const float4*>(&xs[r * K + ((2 * h) * NCH + c) * 4]);
                            const float4 b = *reinterpret_cast<const float4*>(&xs[r * K + ((2 * h + 1) * NCH + c) * 4]);
                            xv[0] = a.x; xv[1] = a.y; xv[2] = a.z; xv[3] = a.w;
                            xv[4] = b.x; xv[5] = b.y; xv[6] = b.z; xv[7] = b.w;
                        } else {
                            read_x8(r, k + h * 8, gv, xv, ss[r], sx[r], sxe[r]);
                        }
#pragma unroll
                        for (int f = 0; f < R; ++f)
#pragma unroll
                            for (int e = 0; e < 8; ++e) dot[r][f] += v[f][e] * xv[e];
                    }
                }
#pragma unroll
                for (int f = 0; f < R; ++f) {
                    const float sf = static_cast<float>(sr[f]);
                    const float cf = static_cast<float>(br[f]) - OFFSET * sf;
#pragma unroll
                    for (int r = 0; r < M; ++r) {
                        acc[r][f] += sf * dot[r][f] + cf * sx[r];
                        if (SPLIT) acc[r][f] -= 240.0f * sf * sxe[r];
                    }
                }
            }
        };
        // Step s + AHEAD's loads are issued before step s is computed, into the slot step s - 1 freed
        // (the loop is unrolled: every slot index is a constant, no register moves between slots).
#pragma unroll
        for (int a = 0; a < AHEAD; ++a)
            if (a < STEPS) load_step(a, words[a], sraw[a], braw[a]);
        if (SHARED_X) {
            // the chunk's sums in the order a lane sums them without staging (the same bits), the squares
            // (NORM) summed per thread, per warp, then over the warps in order
            const int t = THREAD_Y * 32 + lane;
            float sq[M];
#pragma unroll
            for (int r = 0; r < M; ++r) {
                sq[r] = 0.0f;
                for (int cc = t; cc < NCH; cc += WARPS * 32) {
                    float sum = 0.0f, sum_even = 0.0f;
#pragma unroll
                    for (int h = 0; h < CHUNK / 8; ++h) {
                        float xv[8], gv[8];
                        if (NORM) load8(g + cc * CHUNK + h * 8, gv);
                        read_x8(r, cc * CHUNK + h * 8, gv, xv, sq[r], sum, sum_even);
                        float4* piece = reinterpret_cast<float4*>(&xs[r * K + (2 * h * NCH + cc) * 4]);
                        piece[0] = make_float4(xv[0], xv[1], xv[2], xv[3]);              // piece 2h
                        piece[NCH] = make_float4(xv[4], xv[5], xv[6], xv[7]);            // piece 2h + 1
                    }
                    xsum[r * NCH + cc] = sum;
                    if (SPLIT) xsum_even[r * NCH + cc] = sum_even;
                }
            }
            staged_squares<M, WARPS, NORM>(sq, xss, ss);
        }
#pragma unroll
        for (int step = 0; step < STEPS; ++step) {
            if (step + AHEAD < STEPS)
                load_step(step + AHEAD, words[(step + AHEAD) % NB], sraw[(step + AHEAD) % NB], braw[(step + AHEAD) % NB]);
            compute_step(step, words[step % NB], sraw[step % NB], braw[step % NB]);
        }
#pragma unroll
        for (int r = 0; r < M; ++r) {
            // rms_norm(x) W^T = rsqrt(mean(x^2) + eps) (x g) W^T: the row's scale applied to the sums
            const float scale = NORM ? 1.0f / SQRT((SHARED_X ? ss[r] : WARP_SUM(ss[r])) / K + normp[0]) : 1.0f;
            float part[R];
#pragma unroll
            for (int f = 0; f < R; ++f) {
                const int n = rows[f];
                float total = WARP_SUM(acc[r][f]) * scale + (HAS_BIAS ? static_cast<float>(bias[n]) : 0.0f);
                const float cn = HAS_CAP ? cap[n] : 0.0f;   // 0: this feature's part is not capped
                if (cn > 0.0f) total = cn * TANH(total / cn);
                part[f] = total;
            }
#pragma unroll
            for (int f = 0; f < OUTS; ++f) {
                const int o = o0 + f;
                float out = part[f];
                if (PAIR) out = (ACT == 1 ? 1.0f : part[f]) / (1.0f + EXP(-part[f])) * part[f + OUTS];   // 1 sigmoid, 2 silu
                if (RESIDUAL && o < NOUT) out += static_cast<float>(res[(size_t)r * NOUT + o]);
                if (lane == 0 && o < NOUT) STORE(r, o, static_cast<T>(out));
            }
        }
    }
"""

QLINEAR_KERNEL = DeviceKernel("mad_quantized_linear",
                              inputs=["x", "w", "scales", "biases", "bias", "cap", "g", "normp", "res"],
                              outputs=["y"], body=QLINEAR_BODY,
                              header=store_macro(1) + STAGING_HEADER + QLINEAR_HEADER)


def unpack_row(words: np.ndarray, bits: int, K: int, split: bool = False) -> np.ndarray:
    """The K unsigned integers of one packed row (uint32 words), unpacked as the kernel does: lane chunks of
    128 / bits values, each from one 16-byte load (4 words), value j of a chunk taken by `offset_value`'s
    bit arithmetic (shift into the mantissa, OR the exponent, read as a float, minus its offset); with
    `split` (4 bits, 16-bit rows of x) the even values of a word at mantissa bit 15 (256 + q), the odd ones
    at bit 19 (16 + q). A numpy emulation of QLINEAR_BODY's indices and unpacking, for the tests: it checks
    both on a machine without a GPU."""
    out = np.zeros(K, np.uint32)
    for k, j, word, e in _lane_values(words, bits, K):
        at = _mantissa_at(bits, split, e)
        shift = at - e * bits
        moved = (word << shift if shift >= 0 else word >> -shift) & 0xFFFFFFFF
        v = np.array([((127 + 23 - at) << 23) | (moved & (((1 << bits) - 1) << at))], np.uint32).view(np.float32)[0]
        out[k + j] = int(v - np.float32(2 ** (23 - at)))
    return out


def _mantissa_at(bits: int, split: bool, e: int) -> int:
    """The mantissa bit where value e of a word puts q's lowest bit (the kernel's AT): 15 for the even values
    of a 4-bit word with `split` (the float 256 + q), else 23 - bits (2^bits + q)."""
    return 15 if split and bits == 4 and e % 2 == 0 else 23 - bits


def _lane_values(words: np.ndarray, bits: int, K: int):
    """(chunk start k, value j of the chunk, its word, its index in the word) in the order the lanes take
    them: lane l's chunks start at l * CHUNK and every 32 * CHUNK values after."""
    per_word, chunk = 32 // bits, 128 // bits
    for lane in range(32):
        for k in range(lane * chunk, K, 32 * chunk):
            loaded = words[k // per_word: k // per_word + 4]
            for j in range(chunk):
                yield k, j, int(loaded[j // per_word]), j % per_word


def emulate_product(x: np.ndarray, words: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int,
                    group_size: int, split: bool = False) -> float:
    """One output of the kernel for one row of x (float32 values), its float32 arithmetic in numpy: per
    lane chunk the sums dot = sum(v x) over the offset values v, sx = sum(x) and (`split`) sxe = sum(x)
    over the even values, then s dot + (b - 2^bits s) sx (- 240 s sxe), the lanes' parts summed last. What
    the tests hold the kernel's affine arithmetic to without a GPU."""
    q = unpack_row(words, bits, len(x), split)
    chunk = 128 // bits
    f32 = np.float32
    lanes = []
    for lane in range(32):
        acc = f32(0)
        for k in range(lane * chunk, len(x), 32 * chunk):
            dot = sx = sxe = f32(0)
            for j in range(chunk):
                at = _mantissa_at(bits, split, j % (32 // bits))     # value j's index in its word
                v = f32(q[k + j] + 2 ** (23 - at))
                dot = f32(float(dot) + float(v) * float(x[k + j]))   # an FMA: one rounding
                sx = f32(sx + x[k + j])
                if at != 23 - bits:
                    sxe = f32(sxe + x[k + j])
            s, b = f32(scales[k // group_size]), f32(biases[k // group_size])
            acc = f32(acc + f32(s * dot) + f32((b - f32(2 ** bits) * s) * sx))
            if split and bits == 4:
                acc = f32(acc - f32(f32(240.0) * s) * sxe)
        lanes.append(acc)
    return float(np.sum(np.array(lanes, np.float32)))


def staged_bytes(M: int, K: int, bits: int, warps: int) -> int:
    """Shared memory the kernel's staged x takes: M rows of K floats, two sums a lane chunk, a norm's sums."""
    return 4 * (M * K + 2 * M * (K // (128 // bits)) + warps * M)


def _launch(x: mx.array, packed: QuantizedMatrix, bias: Optional[mx.array], splits: Sequence[int],
            caps: Sequence[Optional[float]], backend: str, poison: Optional[float], features: Optional[int] = None,
            steps_ahead: Optional[int] = None, warps: int = WARPS, norm: Optional[tuple] = None,
            pair: Optional[str] = None, residual: Optional[mx.array] = None, width: Optional[int] = None,
            split: Optional[int] = None, ahead: Optional[int] = None, shared_x: Optional[bool] = None
            ) -> list[mx.array]:
    """The kernel's outputs: the parts at `splits`, each an output of its own (split afterwards where the
    tensor-core kernel runs), or without them or with a pair or a residual (`fold.per_part`) the one
    (..., width) result; Unsupported for inputs it does not handle. The tensor-core kernel takes the call
    where it can when `TENSOR_CORES` offers it or `split` is given, unless this kernel's own settings are
    asked for."""
    offered = split is not None or takes_tensor_cores(x.shape[-1], packed.weight.shape[0])
    if offered and features is None and steps_ahead is None and warps == WARPS and shared_x is None:
        try:
            y = launch_mma(x, packed, bias, splits, caps, backend, poison, norm, pair, residual, width, split, ahead)
            return split_parts(y, splits) if per_part(pair, residual) else [y]
        except Unsupported:
            if split is not None:
                raise
    *lead, K = x.shape
    M = math.prod(lead)
    w, scales, biases, group_size, bits = packed.weight, packed.scales, packed.biases, packed.group_size, packed.bits
    N = w.shape[0]
    R = features_per_warp(M) if features is None else features
    if (not affine_layout(x, packed, bias, norm) or bits not in BITS or group_size not in GROUP_SIZES
            or not 1 <= M <= MAX_ROWS or x.dtype not in DTYPES or (pair is not None and R % 2)):
        raise Unsupported(f"quantized_linear: x {x.shape} {x.dtype}, {bits}-bit {packed.mode} weight {w.shape}, "
                          f"group size {group_size}")
    check_parts(splits, caps)
    width = N if width is None else width
    A = AHEAD if steps_ahead is None else steps_ahead
    if A < 0:
        raise ValueError(f"quantized_linear: steps_ahead must be 0 or more, got {A}")
    staged = (SHARED_X if shared_x is None else shared_x) and staged_bytes(M, K, bits, warps) <= SHARED_X_BYTES
    outs = R // 2 if pair is not None else R
    bounds, parts = part_outputs(width, splits if per_part(pair, residual) else ())
    return QLINEAR_KERNEL.parted(len(parts))(
        backend,
        inputs=[x, w, scales, biases, *fold_inputs(N, bias, splits, caps, norm, residual)],
        template=[("T", x.dtype), ("M", M), ("K", K), ("N", N), ("BITS", bits), ("GROUP_SIZE", group_size),
                  ("R", R), ("AHEAD", A), ("WARPS", warps), ("SHARED_X", staged),
                  *fold_template(bias, caps, norm, pair, residual), *bounds],
        grid=(-(-width // (warps * outs)) * 32, warps, 1), threadgroup=(32, warps, 1),
        output_shapes=[(*lead, p) for p in parts], output_dtypes=[x.dtype] * len(parts), init_value=poison)


def quantized_linear_device(x: mx.array, packed: QuantizedMatrix, bias: Optional[mx.array] = None,
                            splits: Sequence[int] = (), caps: Sequence[Optional[float]] = (None,), *,
                            backend: str = "cuda", poison: Optional[float] = None,
                            features: Optional[int] = None, steps_ahead: Optional[int] = None,
                            warps: int = WARPS, split: Optional[int] = None,
                            ahead: Optional[int] = None, shared_x: Optional[bool] = None) -> list[mx.array]:
    """`kernels.qlinear.quantized_linear` with the decode kernels; Unsupported for inputs they do not handle.
    `features`, `steps_ahead`, `warps` and `shared_x` ask for this module's kernel with those settings
    (`features_per_warp`, AHEAD, WARPS, SHARED_X otherwise), `split` (and `ahead`) for the tensor-core kernel with that
    many warps per block (and groups loaded ahead); tests and benchmarks compare the choices."""
    return _launch(x, packed, bias, splits, caps, backend, poison, features, steps_ahead, warps, split=split,
                   ahead=ahead, shared_x=shared_x)


def folded_quantized_linear_device(x: mx.array, weight: Any, bias: Optional[mx.array] = None,
                                   splits: Sequence[int] = (), caps: Sequence[Optional[float]] = (None,), *,
                                   norm: Optional[tuple] = None, pair: Optional[str] = None,
                                   residual: Optional[mx.array] = None, backend: str = "cuda",
                                   poison: Optional[float] = None) -> Any:
    """`kernels.fold.folded_linear` with the decode kernel for a quantized weight, the float kernel
    (kernels/linear_device.py) for a float one."""
    if not isinstance(weight, QuantizedMatrix):
        return folded_linear_device(x, weight, bias, splits, caps, norm=norm, pair=pair, residual=residual,
                                    backend=backend, poison=poison)
    width = fold_width(x, weight.weight.shape[0], splits, pair, residual)
    outputs = _launch(x, weight, bias, splits, caps, backend, poison, norm=norm, pair=pair, residual=residual,
                      width=width)
    return fold_result(outputs, pair, residual)


register_variant("quantized_linear", "cuda", quantized_linear_device)
register_variant("folded_linear", "cuda", folded_quantized_linear_device)
