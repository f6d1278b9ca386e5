"""Device kernel for decode-sized linear layers: y = softcap(x W^T + b) with few rows in x.

At decode, x has B (1..MAX_ROWS) rows and every weight is read once per step, so a step's time is the time
to stream the weights: the kernel must run at memory bandwidth. One warp per output feature n reads
W[n, :] with 16-byte loads (consecutive lanes on consecutive addresses), multiplies it with each row
of x (small, served from cache) and sums across the warp in float32. The bias and the soft-cap of the
feature's part are applied to that float32 sum, which is then rounded once to W's dtype: one launch
per linear (or fused group of linears) where a matmul, a bias add and a soft-cap would be three to
five. (The reference rounds after the matmul and after each op of the soft-cap: in bf16 the two agree
to a few units of the last place, and the kernel's figure is the closer one.)

A fused group's parts are written as outputs of their own (`STORE`, `DeviceKernel.parted`), where the
result is the parts: no split node after the launch, and each part row-contiguous.

With SHARED_X a block first stages its rows of x in shared memory (float32, times a folded norm's weight,
the norm's sum of squares taken there), where otherwise each warp reads x and the norm's weight itself.

Same call as the reference `kernels.linear.linear`. The variant takes x (M, K) and w (N, K) of one dtype
with M <= the row limit (MAX_ROWS) and K a multiple of 8; anything else runs the reference.

Batch invariance: row r of y is computed by the same instructions in the same order whatever M is (its
own float32 accumulator per lane, the same k order, the same warp reduction), so a row gets the same
bits alone and in a batch; MLX's matmul, which runs above the limit, picks its algorithm by M and does
not. A server that must give each client exactly its solo tokens raises the limit to its largest decode
batch (`batch_invariant`); the default keeps MLX's faster matmul for larger batches (`mad bench`). The
limit is read when a program is traced: set it before the first call it should govern. It governs
decode-shaped calls (x (B, 1, K), or a flat (M, K)): a prompt piece (B, T > 1, K) keeps MLX's matmul above
MAX_ROWS, since the server reads each prompt alone and its numbers depend only on its own calls (the
kernel at 32 rows of one prompt would take several times the matmul's time to the first token).
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import mlx.core as mx

from .device import DeviceKernel, scalar, store_macro
from .fold import PAIR_ACTIVATIONS, fold_result, fold_width, per_part
from .linear import check_parts, several_positions
from .registry import Unsupported, gradients, register_device_kernel

MAX_ROWS = 4  # with more rows MLX's own matmul is faster (see benchmarks/RESULTS.md)
MAX_INVARIANT_ROWS = 64  # the most rows `batch_invariant` lets the kernel take (M float32 accumulators per lane)
_row_limit = MAX_ROWS
WARPS = 4  # output features per block (one warp each)
# Whether the float kernel takes a fold's norm: each of its warps (one per output feature) would read the
# norm's weight next to x, and bf16 decode of xLSTM-7B ran 2-6% slower so (benchmarks/NOTES-gpu.md 30).
# Without it the norm runs as MLX's kernel before this one, which still takes a pair or a residual.
# The quantized kernel shares those loads among R features and takes it.
FOLD_NORM = False
# ... except for a unit of at most this many output features: its few warps reading the norm's weight cost
# less than the norm's own launch. At 4 bits an mLSTM layer's input and forget gates (2 x NH features) stay
# in the compute dtype beside the quantized q|k|v|o, which folds the norm itself: without this the norm ran
# as MLX's kernel for the gates alone, a launch a block. 0 turns it off.
NORM_FOLD_WIDTH = 256
# Whether a block stages its rows of x (times a folded norm's weight) in shared memory once, where each warp
# otherwise reads x (and the norm's weight) itself; taken where it fits in SHARED_X_BYTES. The staged norm
# is what FOLD_NORM would need to be cheap. Off until measured.
SHARED_X = False
SHARED_X_BYTES = {"cuda": 48 * 1024, "metal": 32 * 1024, "host": 48 * 1024}   # static shared memory a block
# Whether a residual fold larger than the kernel takes (a prompt, or a decode step of more sequences than
# it takes rows) runs as one `mx.addmm(residual, x, W^T)`, which MLX's CUDA backend hands cuBLASLt with the
# residual as its C input (the add in the product's epilogue, one kernel where there were two), inside
# `inference()` only (training keeps the nodes). Off until measured.
PROMPT_ADDMM = False
DTYPES = (mx.bfloat16, mx.float16, mx.float32)

LINEAR_BODY = """
    constexpr int P = PAIR ? 2 : 1;             // weight rows per output: n, and NOUT + n for a pair
    constexpr int NOUT = N / P;
    constexpr int NCH = K / 8;                  // 8-value pieces of a row of x
    const int lane = THREAD_X;                  // 0..31
    const int n = BLOCK_X * WARPS + THREAD_Y;   // output feature of this warp
    // STAGED: the block's rows of x (times the norm's weight with NORM) in shared memory as float32, once,
    // where each warp read x (and g) itself; value e of the 8 at c * 8 sits at e * NCH + c, so that a warp's
    // lanes (consecutive c) touch consecutive words (no bank conflicts; plain loads, as Metal has them too).
    SHARED float xs[STAGED ? M * K : 1];
    SHARED float xss[STAGED && NORM ? WARPS * M : 1];
    float ss[M];                                // NORM: the sum of squares of each row of x
#pragma unroll
    for (int r = 0; r < M; ++r) ss[r] = 0.0f;
    if (STAGED) {
        const int t = THREAD_Y * 32 + lane;
#pragma unroll
        for (int r = 0; r < M; ++r) {
            float sq = 0.0f;
            for (int c = t; c < NCH; c += WARPS * 32) {
                float xv[8], gv[8];
                load8(x + (size_t)r * K + c * 8, xv);
                if (NORM) {
                    load8(g + c * 8, gv);
#pragma unroll
                    for (int e = 0; e < 8; ++e) { sq += xv[e] * xv[e]; xv[e] *= gv[e]; }
                }
#pragma unroll
                for (int e = 0; e < 8; ++e) xs[r * K + e * NCH + c] = xv[e];
            }
            if (NORM) {
                sq = WARP_SUM(sq);              // this warp's part of the row's squares
                if (lane == 0) xss[THREAD_Y * M + r] = sq;
            }
        }
        SYNC();
#pragma unroll
        for (int r = 0; r < M; ++r) {
            for (int wi = 0; NORM && wi < WARPS; ++wi) ss[r] += xss[wi * M + r];   // the warps' parts in order
        }
    }
    if (n < NOUT) {
        float acc[M][P];
#pragma unroll
        for (int r = 0; r < M; ++r)
#pragma unroll
            for (int p = 0; p < P; ++p) acc[r][p] = 0.0f;
#pragma unroll 4
        for (int k = lane * 8; k < K; k += 256) {
            float wv[P][8];
#pragma unroll
            for (int p = 0; p < P; ++p) load8(w + (size_t)(n + p * NOUT) * K + k, wv[p]);
            float gv[8];
            if (NORM && !STAGED) load8(g + k, gv);
#pragma unroll
            for (int r = 0; r < M; ++r) {
                float xv[8];
                if (STAGED) {
#pragma unroll
                    for (int e = 0; e < 8; ++e) xv[e] = xs[r * K + e * NCH + k / 8];
                } else {
                    load8(x + (size_t)r * K + k, xv);
                    if (NORM) {
#pragma unroll
                        for (int e = 0; e < 8; ++e) { ss[r] += xv[e] * xv[e]; xv[e] *= gv[e]; }
                    }
                }
#pragma unroll
                for (int p = 0; p < P; ++p)
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[r][p] += wv[p][e] * xv[e];
            }
        }
#pragma unroll
        for (int r = 0; r < M; ++r) {
            // rms_norm(x) W^T = rsqrt(mean(x^2) + eps) (x g) W^T: the row's scale applied to the sums
            const float scale = NORM ? 1.0f / SQRT((STAGED ? ss[r] : WARP_SUM(ss[r])) / K + normp[0]) : 1.0f;
            float part[P];
#pragma unroll
            for (int p = 0; p < P; ++p) {
                const int row = n + p * NOUT;
                float total = WARP_SUM(acc[r][p]) * scale + (HAS_BIAS ? static_cast<float>(bias[row]) : 0.0f);
                const float c = HAS_CAP ? cap[row] : 0.0f;   // 0: this feature's part is not capped
                if (c > 0.0f) total = c * TANH(total / c);
                part[p] = total;
            }
            float out = part[0];
            if (PAIR) out = (ACT == 1 ? 1.0f : part[0]) / (1.0f + EXP(-part[0])) * part[P - 1];   // 1 sigmoid, 2 silu
            if (RESIDUAL) out += static_cast<float>(res[(size_t)r * NOUT + n]);
            if (lane == 0) STORE(r, n, static_cast<T>(out));
        }
    }
"""

LINEAR_KERNEL = DeviceKernel("mad_linear", inputs=["x", "w", "bias", "cap", "g", "normp", "res"], outputs=["y"],
                             body=LINEAR_BODY, header=store_macro(1))


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


def fold_inputs(n: int, bias: Optional[mx.array], splits: Sequence[int], caps: Sequence[Optional[float]],
                norm: Optional[tuple], residual: Optional[mx.array]) -> list[mx.array]:
    """The decode kernels' inputs after their weights, in their order: bias, cap, g, normp, res (the
    stand-in `_UNUSED` for each one the call has not)."""
    has_cap = any(caps)
    return [_UNUSED if bias is None else bias, _cap_vector(n, tuple(splits), tuple(caps)) if has_cap else _UNUSED,
            _UNUSED if norm is None else norm[0], _UNUSED if norm is None else scalar(norm[1]),
            _UNUSED if residual is None else residual]


def fold_template(bias: Optional[mx.array], caps: Sequence[Optional[float]], norm: Optional[tuple],
                  pair: Optional[str], residual: Optional[mx.array]) -> list[tuple]:
    """The decode kernels' template arguments for the bias, the caps and the folds."""
    return [("HAS_BIAS", bias is not None), ("HAS_CAP", any(caps)), ("NORM", norm is not None),
            ("PAIR", pair is not None), ("ACT", PAIR_ACTIVATIONS.index(pair) + 1 if pair else 0),
            ("RESIDUAL", residual is not None)]


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


def _launch(x: mx.array, w: mx.array, bias: Optional[mx.array], splits: Sequence[int],
            caps: Sequence[Optional[float]], backend: str, poison: Optional[float], norm: Optional[tuple] = None,
            pair: Optional[str] = None, residual: Optional[mx.array] = None, width: Optional[int] = None,
            shared_x: Optional[bool] = None) -> list[mx.array]:
    """The kernel's outputs for x (..., K): the parts at `splits`, each an output of its own, or without them
    or with a pair or a residual (`fold.per_part`) the one (..., width) result; Unsupported for shapes it does
    not handle. `shared_x` asks for x staged or not (`SHARED_X` otherwise)."""
    *lead, K = x.shape
    N = w.shape[0]
    M = 1
    for d in lead:
        M *= d
    limit = MAX_ROWS if several_positions(x) else _row_limit  # the switch governs decode shapes
    if M > limit or K % 8 or w.ndim != 2 or w.shape[1] != K or x.dtype != w.dtype or x.dtype not in DTYPES:
        raise Unsupported(f"linear: x {x.shape} {x.dtype}, w {w.shape} {w.dtype}")
    if norm is not None and (norm[0] is None or norm[0].shape != (K,)):
        raise Unsupported("linear: a norm without a weight of the input's width")
    check_parts(splits, caps)
    width = N if width is None else width
    staged = (SHARED_X if shared_x is None else shared_x) and 4 * (M * K + WARPS * M) <= SHARED_X_BYTES[backend]
    bounds, parts = part_outputs(width, splits if per_part(pair, residual) else ())
    return LINEAR_KERNEL.parted(len(parts))(
        backend,
        inputs=[x, w, *fold_inputs(N, bias, splits, caps, norm, residual)],
        template=[("T", w.dtype), ("M", M), ("K", K), ("N", N), ("WARPS", WARPS), ("STAGED", staged),
                  *fold_template(bias, caps, norm, pair, residual), *bounds],
        grid=(-(-width // WARPS) * 32, WARPS, 1), threadgroup=(32, WARPS, 1),
        output_shapes=[(*lead, p) for p in parts], output_dtypes=[w.dtype] * len(parts), init_value=poison)


def part_outputs(width: int, splits: Sequence[int]) -> tuple[list[tuple[str, int]], list[int]]:
    """The template constants PART1, PART2, ... of a kernel written through `STORE` with one output per part
    (`DeviceKernel.parted`), and the parts' widths; one part (no constants) without splits."""
    edges = [0, *splits, width]
    return [(f"PART{j}", s) for j, s in enumerate(splits, 1)], [b - a for a, b in zip(edges, edges[1:])]


def linear_device(x: mx.array, w: mx.array, bias: Optional[mx.array] = None, splits: Sequence[int] = (),
                  caps: Sequence[Optional[float]] = (None,), *, backend: str = "cuda",
                  poison: Optional[float] = None, shared_x: Optional[bool] = None) -> list[mx.array]:
    """`kernels.linear.linear` with the decode kernel; Unsupported for shapes it does not handle."""
    return _launch(x, w, bias, splits, caps, backend, poison, shared_x=shared_x)


def folded_linear_device(x: mx.array, weight: Any, bias: Optional[mx.array] = None,
                         splits: Sequence[int] = (), caps: Sequence[Optional[float]] = (None,), *,
                         norm: Optional[tuple] = None, pair: Optional[str] = None,
                         residual: Optional[mx.array] = None, backend: str = "cuda",
                         poison: Optional[float] = None) -> Any:
    """`kernels.fold.folded_linear` with the decode kernel (float weights); Unsupported otherwise."""
    if not isinstance(weight, mx.array):
        raise Unsupported("folded_linear: a quantized weight (kernels/qlinear_device.py)")
    if norm is not None and not (FOLD_NORM or weight.shape[0] <= NORM_FOLD_WIDTH):
        if pair is None and residual is None:
            raise Unsupported("folded_linear: the float kernel leaves a wide unit's norm to its own kernel "
                              "(FOLD_NORM, NORM_FOLD_WIDTH)")
        # the norm runs as its own kernel (MLX's, as unfolded); the pair or the residual is still folded
        x, norm = mx.fast.rms_norm(x, norm[0], norm[1]), None
    width = fold_width(x, weight.shape[0], splits, pair, residual)
    try:
        outputs = _launch(x, weight, bias, splits, caps, backend, poison, norm, pair, residual, width)
    except Unsupported:
        if not (PROMPT_ADDMM and residual is not None and pair is None and norm is None and bias is None
                and not any(caps) and not gradients() and x.dtype == weight.dtype == residual.dtype):
            raise
        *lead, K = x.shape
        return mx.addmm(residual.reshape(-1, width), x.reshape(-1, K), weight.T).reshape(*lead, width)
    return fold_result(outputs, pair, residual)


register_device_kernel("linear", linear_device)
# folds run on CUDA only (kernels/qlinear_device.py registers the variant): no Metal build of them has been run
