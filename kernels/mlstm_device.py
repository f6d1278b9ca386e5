"""Device kernels of the mLSTM cell (CUDA and Metal from one body), registered next to their
pure-MLX references in `kernels/mlstm.py`.

mlstm_step: the fused decode step. One launch updates every head of a layer: gate math, the C/n/m
update in float32 and the normalised readout h = q^T C / (max(|q . n|, exp(-m)) + eps).

Work split: a block of TX x TY threads owns one (batch, head) pair and TX columns of C (DV axis);
its TY rows of threads stride over DQK, so each C element is read once and written once, with
consecutive threads on consecutive addresses; each thread loads UNROLL rows before storing any. Every
block recomputes the scalar gates and q . n (DQK products, cheap); the first column tile writes n and m.
With SPLITS > 1 (small batches: too few blocks to keep the GPU's memory system busy) the rows of C are
shared out over SPLITS blocks per tile too; each writes its part of the numerator, and a second launch
sums the parts in order and divides. Bytes moved per step: 8 * B * NH * DQK * DV (C in and out) plus the
small vectors: the kernel is memory-bound.
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx

from .device import DeviceKernel, scalar
from .mlstm import State, _check_layer_shapes, _check_shapes
from .registry import Unsupported, register_device_kernel

TX, TY = 128, 4         # threads per block: TX columns of C, TY row groups (TX * TY a power of two)
UNROLL = 16             # rows of C each thread loads at once
# Blocks per column tile along DQK (the rows of C), for calls of fewer than SPLIT_BELOW (batch, head, tile)
# blocks: at batch 1 the 7B shape has 32 such blocks for 132 multiprocessors. Each split writes its part
# of the numerator q^T C' and a second launch sums the parts (`COMBINE_KERNEL`). Not yet measured.
SPLITS = 1
SPLIT_BELOW = 128
# the layout chosen by benchmarks/probes/sweep_mlstm_step.py at the 7B head shapes, batch 1 and 32 (see
# benchmarks/RESULTS.md): wider column tiles read longer runs of each row of C.
MAX_DQK = 1024          # q and k are staged in shared memory
DTYPES = (mx.float32, mx.bfloat16, mx.float16)

STEP_BODY = """
    const int bh = BLOCK_Y;                     // batch * NH + head
    const int tile = BLOCK_X;                   // which TX columns of C
    const int split = BLOCK_Z;                  // which ROWS rows of C (SPLITS > 1)
    constexpr int ROWS = (DQK + SPLITS - 1) / SPLITS;
    const int d_end = min(DQK, (split + 1) * ROWS);
    const int tx = THREAD_X, ty = THREAD_Y;
    const int lin = ty * TX + tx;
    const int j = tile * TX + tx;               // column of C (DV axis)
    const bool active = j < DV;

    // gates: lf = logsigmoid(f~), m' = max(lf + m, i~), f' = exp(lf + m - m'), i' = exp(i~ - m')
    const float it = static_cast<float>(ig[bh]), ft = static_cast<float>(fg[bh]), m0 = m[bh];
    const float lf = FMIN(ft, 0.0f) - LOG1P(EXP(-FABS(ft)));
    const float m_new = FMAX(lf + m0, it);
    const float fa = EXP(lf + m0 - m_new);
    const float ia = EXP(it - m_new);

    // q and k of this head, scaled, in float32 shared memory
    const float scale = 1.0f / SQRT((float)DQK);
    SHARED float qs[DQK];
    SHARED float ks[DQK];
    SHARED float red[TX * TY];
    for (int d = lin; d < DQK; d += TX * TY) {
        qs[d] = static_cast<float>(q[bh * DQK + d]) * (SCALE_Q ? scale : 1.0f);
        ks[d] = static_cast<float>(k[bh * DQK + d]) * (SCALE_Q ? 1.0f : scale);
    }
    SYNC();

    // n' = f' n + i' k and the denominator's q . n' (block-wide sum)
    float part = 0.0f;
    for (int d = lin; d < DQK; d += TX * TY) {
        const float nn = fa * n[bh * DQK + d] + ia * ks[d];
        if (tile == 0 && split == 0) n_out[bh * DQK + d] = nn;
        part += qs[d] * nn;
    }
    red[lin] = part;
    SYNC();
    for (int s = (TX * TY) / 2; s > 0; s >>= 1) {
        if (lin < s) red[lin] += red[lin + s];
        SYNC();
    }
    const float qn = red[0];
    SYNC();
    if (tile == 0 && split == 0 && lin == 0) {
        m_out[bh] = m_new;
        if (SPLITS > 1) den_out[bh] = FMAX(FABS(qn), EXP(-m_new)) + eps[0];
    }

    // C' = f' C + i' k v^T for column j, and the numerator q^T C'. UNROLL rows are loaded before
    // any is stored, so that the loads are in flight together (C_out may alias C for the compiler).
    float acc = 0.0f;
    if (active) {
        const float vj = ia * static_cast<float>(v[bh * DV + j]);
        const size_t base = (size_t)bh * DQK * DV + j;
        for (int d0 = split * ROWS + ty; d0 < d_end; d0 += TY * UNROLL) {
            float c[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const int d = d0 + u * TY;
                c[u] = d < d_end ? C[base + (size_t)d * DV] : 0.0f;
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const int d = d0 + u * TY;
                if (d < d_end) {
                    const float cn = fa * c[u] + ks[d] * vj;
                    C_out[base + (size_t)d * DV] = cn;
                    acc += qs[d] * cn;
                }
            }
        }
    }
    red[lin] = acc;
    SYNC();
    if (ty == 0 && active) {
        float num = 0.0f;
        for (int r = 0; r < TY; ++r) num += red[r * TX + tx];
        if (SPLITS > 1) {
            parts[((size_t)bh * SPLITS + split) * DV + j] = num;
        } else {
            const float den = FMAX(FABS(qn), EXP(-m_new)) + eps[0];
            h[bh * DV + j] = static_cast<T>(num / den);
        }
    }
"""

COMBINE_BODY = """
    // h = (the splits' parts of q^T C', in order) / den, one thread per element of h
    const int e = BLOCK_X * THREADS + THREAD_X;
    if (e < ROWS_H * DV) {
        const int bh = e / DV, j = e % DV;
        float num = 0.0f;
        for (int s = 0; s < SPLITS; ++s) num += parts[((size_t)bh * SPLITS + s) * DV + j];
        h[e] = static_cast<T>(num / den[bh]);
    }
"""

STEP_KERNEL = DeviceKernel(
    "mad_mlstm_step",
    inputs=["q", "k", "v", "ig", "fg", "C", "n", "m", "eps"],
    outputs=["h", "C_out", "n_out", "m_out", "parts", "den_out"],
    body=STEP_BODY,
)
COMBINE_KERNEL = DeviceKernel("mad_mlstm_step_combine", inputs=["parts", "den"], outputs=["h"], body=COMBINE_BODY)
COMBINE_THREADS = 256


def step_splits(B: int, NH: int, DV: int) -> int:
    """Row splits for a step of B x NH heads of DV columns: `SPLITS` where the call has fewer than
    `SPLIT_BELOW` blocks without them, else 1."""
    return SPLITS if B * NH * math.ceil(DV / TX) < SPLIT_BELOW else 1


def mlstm_step_device(
    q: mx.array, k: mx.array, v: mx.array, i: mx.array, f: mx.array,
    state: Optional[State] = None, eps: float = 1e-6, scale: str = "q", heads: Optional[int] = None, *,
    backend: str = "cuda", poison: Optional[float] = None, splits: Optional[int] = None,
) -> tuple[mx.array, State]:
    """The fused step on `backend`; same arguments and results as `kernels.mlstm.mlstm_step` (both layouts:
    the kernel indexes flat memory, whose order they share).

    Raises Unsupported for inputs it does not handle (the dispatcher then runs the reference).
    `poison` fills the outputs before the launch (tests check that every element is written).
    `splits` asks for that many row splits (`step_splits` otherwise; tests and benchmarks compare them).
    """
    if heads is None:
        _check_shapes(q, k, v, i, f)
        B, NH, T, DQK = q.shape
        DV = v.shape[-1]
        h_shape: tuple = (B, NH, 1, DV)
    else:
        _check_layer_shapes(q, k, v, i, f, heads)
        B, T, NH = q.shape[0], q.shape[1], heads
        DQK, DV = q.shape[-1] // heads, v.shape[-1] // heads
        h_shape = (B, 1, NH * DV)
    if T != 1:
        raise ValueError(f"mlstm_step needs T == 1, got T = {T}")
    if (scale not in ("q", "k") or DQK > MAX_DQK or q.dtype not in DTYPES or not (q.dtype == k.dtype == v.dtype)
            or i.dtype not in DTYPES or f.dtype not in DTYPES):
        raise Unsupported(f"mlstm_step: scale={scale}, DQK={DQK}, dtypes {q.dtype}, {k.dtype}, {v.dtype}, "
                          f"gates {i.dtype}, {f.dtype}")
    if state is None:
        state = (mx.zeros((B, NH, DQK, DV), mx.float32), mx.zeros((B, NH, DQK), mx.float32),
                 mx.zeros((B, NH), mx.float32))
    C, n, m = (s if s.dtype == mx.float32 else s.astype(mx.float32) for s in state)
    # the kernel indexes flat, row-contiguous arrays: inputs and outputs keep their shapes (no reshape
    # nodes, which cost a decode step host time per layer)
    S = step_splits(B, NH, DV) if splits is None else splits
    if S < 1:
        raise ValueError(f"mlstm_step: splits must be 1 or more, got {S}")
    split = S > 1
    h, C_new, n_new, m_new, parts, den = STEP_KERNEL(
        backend,
        inputs=[q, k, v, i, f, C, n, m, scalar(eps)],
        template=[("T", v.dtype), ("DQK", DQK), ("DV", DV), ("TX", TX), ("TY", TY), ("UNROLL", UNROLL),
                  ("SCALE_Q", scale == "q"), ("SPLITS", S)],
        grid=(math.ceil(DV / TX) * TX, B * NH * TY, S),
        threadgroup=(TX, TY, 1),
        output_shapes=[h_shape if not split else (1,), (B, NH, DQK, DV), (B, NH, DQK), (B, NH),
                       (B * NH * S * DV,) if split else (1,), (B * NH,) if split else (1,)],
        output_dtypes=[v.dtype, mx.float32, mx.float32, mx.float32, mx.float32, mx.float32],
        init_value=poison,
    )
    if split:
        (h,) = COMBINE_KERNEL(
            backend, inputs=[parts, den],
            template=[("T", v.dtype), ("ROWS_H", B * NH), ("DV", DV), ("SPLITS", S), ("THREADS", COMBINE_THREADS)],
            grid=(math.ceil(B * NH * DV / COMBINE_THREADS) * COMBINE_THREADS, 1, 1),
            threadgroup=(COMBINE_THREADS, 1, 1),
            output_shapes=[h_shape], output_dtypes=[v.dtype], init_value=poison)
    return h, (C_new, n_new, m_new)


RECURRENCE_BODY = """
    // one thread per element of the (DQK, W) state of one (batch, head); loops over the chunks
    const int bh = BLOCK_Y;
    const int e = BLOCK_X * THREADS + THREAD_X;     // element of the state
    float m = m0[bh];
    float s = e < SIZE ? s0[(size_t)bh * SIZE + e] : 0.0f;
    for (int c = 0; c < NC; ++c) {
        const size_t at = ((size_t)bh * NC + c) * SIZE + e;
        if (e < SIZE) s_in[at] = s;
        if (e == 0 && WRITE_M) m_in[bh * NC + c] = m;
        const float gc = g[bh * NC + c], ac = a_max[bh * NC + c];
        const float m_new = FMAX(gc + m, ac);
        if (e < SIZE) s = EXP(gc + m - m_new) * s + EXP(ac - m_new) * s_loc[at];
        m = m_new;
    }
    if (e < SIZE) s_out[(size_t)bh * SIZE + e] = s;
    if (e == 0 && WRITE_M) m_out[bh] = m;
"""

RECURRENCE_KERNEL = DeviceKernel(
    "mad_mlstm_chunk_recurrence",
    inputs=["s_loc", "g", "a_max", "s0", "m0"],
    outputs=["s_in", "s_out", "m_in", "m_out"],
    body=RECURRENCE_BODY,
)
THREADS = 256


def _recurrence(s_loc: mx.array, g: mx.array, a_max: mx.array, s0: mx.array, m0: mx.array, write_m: bool,
                backend: str, poison: Optional[float]) -> list[mx.array]:
    """One launch over a stacked state s_loc (B, NH, NC, *shape) -> s_in, s_out (and m_in, m_out)."""
    B, NH, NC = g.shape
    shape = s_loc.shape[3:]
    size = math.prod(shape)
    rows = B * NH
    outs = RECURRENCE_KERNEL(
        backend,
        inputs=[s_loc.reshape(rows, NC, size), g.reshape(rows, NC), a_max.reshape(rows, NC),
                s0.reshape(rows, size), m0.reshape(rows)],
        template=[("NC", NC), ("SIZE", size), ("THREADS", THREADS), ("WRITE_M", write_m)],
        grid=(math.ceil(size / THREADS) * THREADS, rows, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[(rows, NC, size), (rows, size), (rows, NC), (rows,)],
        output_dtypes=[mx.float32] * 4, init_value=poison,
    )
    return [outs[0].reshape(B, NH, NC, *shape), outs[1].reshape(B, NH, *shape),
            outs[2].reshape(B, NH, NC), outs[3].reshape(B, NH)]


def chunk_recurrence_device(C_loc: mx.array, n_loc: mx.array, g: mx.array, a_max: mx.array, state: State, *,
                            backend: str = "cuda", poison: Optional[float] = None) -> tuple[State, State]:
    """The inter-chunk state recurrence in one launch for C and one for n (same results as
    `kernels.mlstm.chunk_recurrence`)."""
    C, n, m = (x.astype(mx.float32) for x in state)
    if C_loc.dtype != mx.float32 or n_loc.dtype != mx.float32:
        raise Unsupported("chunk sums must be float32")
    C_in, C_out, m_in, m_out = _recurrence(C_loc, g, a_max, C, m, True, backend, poison)
    n_in, n_out, _, _ = _recurrence(n_loc, g, a_max, n, m, False, backend, poison)
    return (C_in, n_in, m_in), (C_out, n_out, m_out)


register_device_kernel("mlstm_step", mlstm_step_device)
register_device_kernel("mlstm_chunk_recurrence", chunk_recurrence_device)
