"""The sLSTM sequence kernel: every time step of a layer in one launch (CUDA), registered next to the
pure-MLX reference `kernels.slstm.slstm_sequence` (same arguments, same results).

Why one launch: the sLSTM is sequential in time (the gates read y_{t-1} through the recurrent weights), so
a graph of small operations per step is bound by launches, not by the GPU. Here the recurrent weights are
loaded into registers once, and the time loop runs inside the kernel.

Work split. Head h's recurrent matrix R[h] has 4*DH rows (gate g, unit o) and DH columns. G blocks share a
head; block k owns the units o in [k*U, (k+1)*U) (U = DH / G), that is the 4*U rows of its units in all
four gates, so it can finish the gate math of its units alone. Inside the block, the rows (padded to RP)
are dealt to RS row slots of RPT rows each (two where the registers allow: every read of y then feeds
two rows' products), and the columns to CG column groups: a thread holds RPT x CPT weights (CPT = DH / CG
consecutive columns) in registers, and a warp covers 32 row slots of one column group, so every read of
y from shared memory is a broadcast. Per step and batch row (BG rows at a time, RPT x BG independent
fused multiply-add chains) each thread writes its sums to shared memory, one partial per column group;
the gate math then runs one thread per (batch row, unit), sums the CG partials of its four gate rows,
and keeps that unit's float32 state c, n, m in its registers for the whole sequence. With more than one
batch group in a tile, the tile's rows run as two halves taking turns: one half's y crosses L2 while
the other half computes.

The exchange. Every block of head h needs all DH values of y_{t-1}. Each block writes its units' y with
the step number as a tag, one 8-byte store of the pair (y bits, tag), to an exchange buffer of two slots
alternating by step; each block then reads its head's whole y back (8-byte volatile loads, from L2),
re-reading the pairs whose tag is not yet the step's, into shared memory. A tagged value is its own
"ready" flag (NCCL's low-latency protocol): one trip through L2 per step, no counters, no fences. A
block writes a slot again two steps later, when every block of the head has read it (it needed their
next y first). Spinning on other blocks needs all of them resident at once: the plan keeps NH * G at
most the number of streaming multiprocessors (one block per multiprocessor), and batch rows beyond
one tile run one after another inside the same launch. The exchange is an output of the launch, filled
before it (zeros, or NaN bits in tests), so no launch sees another's tags.

CUDA only: Metal gives no forward-progress guarantee between threadgroups, so a spin barrier across them
could hang; on Apple GPUs the reference runs.

Numerics: float32 weights in registers, float32 R y, gate math and state; the order of operations of the
gate math is the reference's. Bytes moved per step: the inputs W x (4 gates) and the output h, plus the
exchange of y through L2; the weights are read once per launch.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from mad.backends.cuda import launch_bounds

from .device import DeviceKernel
from .registry import Unsupported, register_variant
from .slstm import State, _check, zero_state

MAX_THREADS = 1024         # threads per block
REGISTERS = 65536          # 32-bit registers per multiprocessor (one block per multiprocessor)
RESERVED = 64              # registers per thread for all but the weights (indices, state, loads in flight)
MAX_CPT = 64               # consecutive columns a thread holds (per row)
MAX_SHARED = 11264         # floats of shared memory per block (44 KB, under the 48 KB of static shared memory)
BATCH_GROUP = 4            # batch rows per pass over the weights (independent sums in flight)
MAX_STAGED = 16            # y values a thread stages per step (their loads are in flight together)
SPLIT = True               # a tile's rows in two halves that take turns (one exchanges while the other computes)
ROWS_PER_THREAD = (2, 1)   # the rows a thread may hold, in the order the plan tries them
DTYPES = (mx.float32, mx.bfloat16, mx.float16)

SEQUENCE_BODY = """
    // block (k, h): units [k*U, k*U + U) of head h. Thread = (row slot, column group): it holds RPT gate rows
    // (slot, slot + RS, ...) of the 4U (padded to RP) over CPT columns; a warp holds 32 row slots of one
    // column group, so its reads of y are broadcasts.
    const int k = BLOCK_X, h = BLOCK_Y, tid = THREAD_X;
    const int B = xi_shape[0], L = xi_shape[1];
    constexpr int RS = RP / RPT;                               // row slots
    constexpr int BTP = (BT + BG - 1) / BG * BG;               // the tile padded to whole batch groups
    const int slot_r = tid % RS, cg = tid / RS;
    SHARED float ys[BTP * DH];         // y_{t-1} of head h, batch rows of the tile
    SHARED float part[CG * BTP * RP];  // R y of the block's rows, one partial sum per column group

    // the exchange: (y bits, tag) pairs written and read as one 8-byte access, so a reader that sees
    // the step's tag sees the step's y. It is an output, filled before the launch with 0 (or with NaN bits
    // in tests): no tag (1, 2, ...) is there before a block writes it.
    int* xchg = exchange;
    auto put = [](int* p, float v, int tag) {
        asm volatile("st.volatile.global.v2.s32 [%0], {%1, %2};" :: "l"(p), "r"(__float_as_int(v)), "r"(tag) : "memory");
    };
    auto get = [](const int* p, int& v, int& tag) {
        asm volatile("ld.volatile.global.v2.s32 {%0, %1}, [%2];" : "=r"(v), "=r"(tag) : "l"(p) : "memory");
    };
    constexpr int PER = (BT * DH + THREADS - 1) / THREADS;     // y values a thread stages per step, at most

    // the thread's weights: gate row (row / U) of unit k*U + row % U, columns cg*CPT .. cg*CPT + CPT - 1
    float w[RPT][CPT];
#pragma unroll
    for (int j = 0; j < RPT; ++j) {
        const int row = slot_r + j * RS;
        const size_t base = ((size_t)h * 4 * DH + (size_t)(row / U) * DH + k * U + row % U) * DH + cg * CPT;
#pragma unroll
        for (int e = 0; e < CPT; ++e) w[j][e] = row < 4 * U ? static_cast<float>(R[base + e]) : 0.0f;
    }

    // gate math: thread p < BT * U owns batch row p / U of the tile and unit k*U + p % U
    const bool owner = tid < BT * U;
    const int pb = tid / U, po = k * U + tid % U;
    float bias_g[4];
#pragma unroll
    for (int g = 0; g < 4; ++g) bias_g[g] = owner ? bias[(g * NH + h) * DH + po] : 0.0f;
    int tag = 0;                       // steps run so far, over all batch tiles

    for (int b0 = 0; b0 < B; b0 += BT) {
        const int nb = min(BT, B - b0);
        // SPLIT: the tile's rows in two halves (whole batch groups) that take turns, so that one half's
        // exchange is in flight while the other half computes
        const int NS = (SPLIT && nb > BG) ? 2 : 1;
        const int SH = NS == 1 ? nb : (nb + 2 * BG - 1) / (2 * BG) * BG;
        const bool own = owner && pb < nb;
        const size_t sat = ((size_t)(b0 + pb) * NH + h) * DH + po;
        float y = 0.0f, c = 0.0f, n = 0.0f, m = 0.0f;
        if (own) { y = y0[sat]; c = c0[sat]; n = n0[sat]; m = m0[sat]; }
        for (int e = tid; e < nb * DH; e += THREADS)
            ys[e] = y0[((size_t)(b0 + e / DH) * NH + h) * DH + e % DH];
        SYNC();

        // the inputs W x do not depend on y: each step loads the next step's, so the loads are in flight
        // during the step (their latency is not on the step's critical path)
        const size_t xrow = (size_t)(b0 + pb) * L * NH * DH + h * DH + po;     // + t * NH * DH
        float xn[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (own) {
            xn[0] = static_cast<float>(xi[xrow]); xn[1] = static_cast<float>(xf[xrow]);
            xn[2] = static_cast<float>(xz[xrow]); xn[3] = static_cast<float>(xo[xrow]);
        }

        for (int t = 0; t < L; ++t) {
            tag += 1;
            const size_t xat = xrow + (size_t)t * NH * DH;
            float x[4] = {xn[0], xn[1], xn[2], xn[3]};
            if (own && t + 1 < L) {
                const size_t nxt = xat + NH * DH;
                xn[0] = static_cast<float>(xi[nxt]); xn[1] = static_cast<float>(xf[nxt]);
                xn[2] = static_cast<float>(xz[nxt]); xn[3] = static_cast<float>(xo[nxt]);
            }
            for (int s = 0; s < NS; ++s) {
                const int lo = s * SH, hi = min(nb, lo + SH);

                // R y of rows [lo, hi), BG at a time: RPT x BG independent sums per thread
                for (int b = lo; b < hi; b += BG) {
                    float acc[RPT][BG];
#pragma unroll
                    for (int j = 0; j < RPT; ++j)
#pragma unroll
                        for (int q = 0; q < BG; ++q) acc[j][q] = 0.0f;
#pragma unroll
                    for (int e = 0; e < CPT / 4; ++e) {
                        float4 v[BG];
#pragma unroll
                        for (int q = 0; q < BG; ++q) v[q] = reinterpret_cast<const float4*>(ys + (b + q) * DH + cg * CPT)[e];
#pragma unroll
                        for (int j = 0; j < RPT; ++j)
#pragma unroll
                            for (int q = 0; q < BG; ++q) {
                                acc[j][q] = fmaf(w[j][4 * e], v[q].x, acc[j][q]);
                                acc[j][q] = fmaf(w[j][4 * e + 1], v[q].y, acc[j][q]);
                                acc[j][q] = fmaf(w[j][4 * e + 2], v[q].z, acc[j][q]);
                                acc[j][q] = fmaf(w[j][4 * e + 3], v[q].w, acc[j][q]);
                            }
                    }
#pragma unroll
                    for (int j = 0; j < RPT; ++j)
#pragma unroll
                        for (int q = 0; q < BG; ++q) part[(cg * BTP + b + q) * RP + slot_r + j * RS] = acc[j][q];
                }
                SYNC();

                // gate math of rows [lo, hi) (the reference's order: (W x + R y) + b); y goes out to the
                // head's other blocks
                if (own && pb >= lo && pb < hi) {
                    float r[4];
#pragma unroll
                    for (int g = 0; g < 4; ++g) {
                        float ry = 0.0f;                       // R y: the sum over the column groups
#pragma unroll
                        for (int c = 0; c < CG; ++c) ry += part[(c * BTP + pb) * RP + g * U + tid % U];
                        r[g] = (x[g] + ry) + bias_g[g];
                    }
                    const float log_f = FMIN(r[1], 0.0f) - LOG1P(EXP(-FABS(r[1])));     // logsigmoid
                    const float lfm = m + log_f;
                    const float m_new = n == 0.0f ? r[0] : FMAX(r[0], lfm);
                    const float ia = FMIN(EXP(r[0] - m_new), 1.0f);
                    const float fa = FMIN(EXP(lfm - m_new), 1.0f);
                    c = fa * c + ia * tanhf(r[2]);
                    n = fa * n + ia;
                    m = m_new;
                    y = (1.0f / (1.0f + EXP(-r[3]))) * c / n;
                    hout[xat] = static_cast<TI>(y);
                    put(xchg + 2 * (((size_t)(tag & 1) * NH + h) * B + b0 + pb) * DH + 2 * po, y, tag);
                }

                // stage the y the next turn needs: the other half's y of the step before (two halves), or
                // this step's (one). Not needed for the step 0 half (ys holds y0) nor after the last step.
                const int ns = (s + 1) % NS, ptag = NS == 2 && s == 0 ? tag - 1 : tag;
                const int pstep = t - (tag - ptag);
                if (pstep >= 0 && pstep < L - 1) {
                    // all loads in flight, then re-poll those not yet tagged. Two slots by step parity:
                    // a block writes a slot again two steps later, after every block of the head has
                    // staged this step (it needs their next y first).
                    const int plo = ns * SH, pcount = (min(nb, plo + SH) - plo) * DH;
                    const int* tile = xchg + 2 * (((size_t)(ptag & 1) * NH + h) * B + b0 + plo) * DH;
                    float* dst = ys + plo * DH;
                    unsigned int done = 0;
                    int pending;
                    do {
                        pending = 0;
                        int v[PER], seen[PER];
#pragma unroll
                        for (int q = 0; q < PER; ++q) {      // issue every read first: one L2 round trip per round
                            const int e = tid + q * THREADS;
                            if (e < pcount && !(done & (1u << q))) get(tile + 2 * e, v[q], seen[q]);
                        }
#pragma unroll
                        for (int q = 0; q < PER; ++q) {
                            const int e = tid + q * THREADS;
                            if (e < pcount && !(done & (1u << q))) {
                                if (seen[q] == ptag) { dst[e] = __int_as_float(v[q]); done |= 1u << q; } else { ++pending; }
                            }
                        }
                    } while (pending);
                }
                SYNC();
            }
        }
        if (own) { y1[sat] = y; c1[sat] = c; n1[sat] = n; m1[sat] = m; }
    }
"""


@functools.lru_cache(maxsize=None)
def sequence_kernel(threads: int) -> DeviceKernel:
    return DeviceKernel(
        f"mad_slstm_sequence_{threads}",
        inputs=["xi", "xf", "xz", "xo", "R", "bias", "y0", "c0", "n0", "m0"],
        outputs=["hout", "y1", "c1", "n1", "m1", "exchange"],
        body=SEQUENCE_BODY,
        header=launch_bounds(threads),      # registers: 65536 / threads, so the weights stay in them
    )


@dataclass(frozen=True)
class Plan:
    """How one launch splits a layer: G blocks per head of THREADS = RS * CG threads, where RS row slots
    of RPT gate rows each cover the block's 4U rows (padded to RP = RS * RPT, RS whole warps) and CG
    column groups of CPT columns cover the head dim; BT batch rows per tile."""
    G: int
    U: int
    RP: int
    RPT: int
    CG: int
    CPT: int
    THREADS: int
    BT: int


@functools.lru_cache(maxsize=None)
def multiprocessors() -> int:
    """Streaming multiprocessors of the default CUDA device (MAD_GPU_SMS overrides)."""
    if os.environ.get("MAD_GPU_SMS"):
        return int(os.environ["MAD_GPU_SMS"])
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    for key in ("multi_processor_count", "num_sms", "sm_count"):
        if key in info:
            return int(info[key])
    try:                                   # the CUDA driver: cuDeviceGetAttribute(MULTIPROCESSOR_COUNT = 16)
        import ctypes

        cuda = ctypes.CDLL("libcuda.so.1")
        count, device = ctypes.c_int(0), ctypes.c_int(0)
        if (cuda.cuInit(0) == 0 and cuda.cuDeviceGet(ctypes.byref(device), 0) == 0
                and cuda.cuDeviceGetAttribute(ctypes.byref(count), 16, device) == 0 and count.value > 0):
            return count.value
    except OSError:
        pass
    raise Unsupported("slstm_sequence: the number of multiprocessors is unknown (set MAD_GPU_SMS)")


def plan(heads: int, head_dim: int, sms: int, batch_group: int = 0) -> Plan:
    """The fewest blocks per head whose weights fit in registers, with all NH * G blocks resident.

    A thread holds RPT = 2 rows (each read of y feeds two rows' products) where the registers allow, else
    one. The batch tile BT is bounded by one gate-math thread per (batch row, unit), by MAX_STAGED staged
    y values per thread and by the shared memory (y and the partial sums, MAX_SHARED floats). Raises
    Unsupported when no split fits (the reference runs instead).
    """
    bg = batch_group or BATCH_GROUP
    if head_dim % 4:
        raise Unsupported(f"slstm_sequence: head dim {head_dim} is not a multiple of 4")
    CG = next(cg for cg in range(1, head_dim + 1) if head_dim % (4 * cg) == 0 and head_dim // cg <= MAX_CPT)
    CPT = head_dim // CG
    for G in (g for g in range(1, head_dim + 1) if head_dim % g == 0):
        if heads * G > sms:
            break
        U = head_dim // G
        for RPT in ROWS_PER_THREAD:
            RS = 32 * math.ceil(4 * U / (32 * RPT))
            threads = RS * CG
            if threads > MAX_THREADS or threads * (RPT * CPT + RESERVED) > REGISTERS:
                continue
            BT = min(threads // U, MAX_STAGED * threads // head_dim)
            while BT > 1 and (head_dim + CG * RS * RPT) * math.ceil(BT / bg) * bg > MAX_SHARED:
                BT -= 1
            if BT >= 1 and (head_dim + CG * RS * RPT) * bg <= MAX_SHARED:
                return Plan(G, U, RS * RPT, RPT, CG, CPT, threads, BT)
    raise Unsupported(f"slstm_sequence: no split of {heads} heads of {head_dim} over {sms} multiprocessors "
                      f"keeps the recurrent weights in registers")


def slstm_sequence_device(
    i: mx.array, f: mx.array, z: mx.array, o: mx.array, R: mx.array, b: mx.array,
    state: Optional[State] = None, *, backend: str = "cuda", poison: Optional[float] = None,
) -> tuple[mx.array, State]:
    """The whole recurrence in one launch; same arguments and results as `kernels.slstm.slstm_sequence`.

    `poison` fills the outputs before the launch (tests check that every element is written).
    """
    if backend != "cuda":
        raise Unsupported("slstm_sequence: the in-kernel barrier needs CUDA")
    _check(i, f, z, o, R, b)
    B, NH, L, DH = i.shape
    if L < 1:
        raise ValueError("slstm_sequence needs T >= 1")
    if not (i.dtype == f.dtype == z.dtype == o.dtype) or i.dtype not in DTYPES or R.dtype not in DTYPES:
        raise Unsupported(f"slstm_sequence: dtypes {i.dtype}, {f.dtype}, {z.dtype}, {o.dtype}, R {R.dtype}")
    bg = min(BATCH_GROUP, B)           # a decode step of one sequence computes one batch row, not four
    p = plan(NH, DH, multiprocessors(), bg)
    y, c, n, m = (s.astype(mx.float32) for s in (state if state is not None else zero_state(B, NH, DH)))
    gates = [g.transpose(0, 2, 1, 3) for g in (i, f, z, o)]            # (B, T, NH, DH): the block's layout
    h, y1, c1, n1, m1, _ = sequence_kernel(p.THREADS)(
        backend,
        inputs=[*gates, R, b.astype(mx.float32), y, c, n, m],
        template=[("TI", i.dtype), ("NH", NH), ("DH", DH), ("U", p.U), ("G", p.G), ("RP", p.RP), ("RPT", p.RPT),
                  ("CG", p.CG), ("CPT", p.CPT), ("THREADS", p.THREADS), ("BT", p.BT), ("BG", bg),
                  ("SPLIT", SPLIT)],
        grid=(p.G * p.THREADS, NH, 1), threadgroup=(p.THREADS, 1, 1),
        output_shapes=[(B, L, NH, DH)] + [(B, NH, DH)] * 4 + [(2, B, NH, DH, 2)],
        output_dtypes=[i.dtype] + [mx.float32] * 4 + [mx.int32],
        init_value=0.0 if poison is None else poison,        # the exchange must start without tags
    )
    return h.transpose(0, 2, 1, 3), (y1, c1, n1, m1)


register_variant("slstm_sequence", "cuda", slstm_sequence_device)
