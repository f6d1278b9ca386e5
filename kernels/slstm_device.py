"""The sLSTM sequence kernel: every time step of a layer in one launch (CUDA), registered next to the
pure-MLX reference `kernels.slstm.slstm_sequence` (same arguments, same results).

Why one launch: the sLSTM is sequential in time (the gates read y_{t-1} through the recurrent weights), so
a graph of small operations per step is bound by launches, not by the GPU. Here the recurrent weights are
loaded into registers once, and the time loop runs inside the kernel.

Work split. Head h's recurrent matrix R[h] has 4*DH rows (gate g, unit o) and DH columns. G blocks share a
head; block k owns the units o in [k*U, (k+1)*U) (U = DH / G), that is the 4*U rows of its units in all
four gates, so it can finish the gate math of its units alone. Inside the block, each row is split over CG
threads ("column groups"); a thread holds CPT = DH / CG weights of its row in registers, in float4 chunks
cg, cg + CG, cg + 2*CG, ... (consecutive threads read consecutive chunks of y: no shared-memory bank
conflicts). Per step and batch row the block computes R y for its rows (each thread CPT products, then a
sum over the CG threads of the row by warp shuffles), then the gate math of its units, one thread per
(batch row, unit), with that unit's float32 state c, n, m kept in the thread's registers for the whole
sequence.

The exchange. Every block of head h needs all DH values of y_{t-1}. Each block writes its units' y to a
float32 exchange buffer (two slots, alternating by step), then the G blocks of the head meet at a barrier
(a counter per head in global memory: atomicAdd, then spin until G * steps blocks have arrived), then each
block reads the whole y of its head (`__ldcg`, from L2) into shared memory. A barrier across blocks needs
all of them resident at once: the plan keeps NH * G at most the number of streaming multiprocessors
(one block per multiprocessor), and batch rows beyond one tile run one after another inside the same
launch (two launches of this kernel never overlap on one stream).

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

from .device import DeviceKernel
from .registry import Unsupported, register_variant
from .slstm import State, _check, zero_state

MAX_THREADS = 512          # threads per block; at most 128 registers each (64K per multiprocessor)
MAX_CPT = 64               # weights per thread held in registers
MAX_YS = 8192              # floats of y staged in shared memory per block (32 KB): the batch tile
DTYPES = (mx.float32, mx.bfloat16, mx.float16)

SEQUENCE_BODY = """
    // block (k, h): units [k*U, k*U + U) of head h; thread = (row of the block's 4U gate rows, column group)
    const int k = BLOCK_X, h = BLOCK_Y, tid = THREAD_X;
    const int B = xi_shape[0], L = xi_shape[1];
    const int row = tid / CG, cg = tid % CG;
    const bool has_row = row < 4 * U;
    SHARED float ys[BT * DH];          // y_{t-1} of head h for the batch rows of the tile
    SHARED float ry[BT * 4 * U];       // R y of the block's rows

    // the thread's weights: gate row (row / U) of unit k*U + row % U, columns 4 * (cg + CG * s) + e
    float w[CPT];
    {
        const size_t base = ((size_t)h * 4 * DH + (size_t)(row / U) * DH + k * U + row % U) * DH;
#pragma unroll
        for (int s = 0; s < CPT / 4; ++s)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                w[4 * s + e] = has_row ? static_cast<float>(R[base + 4 * (cg + CG * s) + e]) : 0.0f;
    }

    // gate math: thread p < BT * U owns batch row p / U of the tile and unit k*U + p % U
    const bool owner = tid < BT * U;
    const int pb = tid / U, po = k * U + tid % U;
    float bias_g[4];
#pragma unroll
    for (int g = 0; g < 4; ++g) bias_g[g] = owner ? bias[(g * NH + h) * DH + po] : 0.0f;
    int* counter = const_cast<int*>(sync_counter);
    int generation = 0;                // barriers passed (thread 0)

    for (int b0 = 0; b0 < B; b0 += BT) {
        const int nb = min(BT, B - b0);
        const bool own = owner && pb < nb;
        const size_t sat = ((size_t)(b0 + pb) * NH + h) * DH + po;
        float y = 0.0f, c = 0.0f, n = 0.0f, m = 0.0f;
        if (own) { y = y0[sat]; c = c0[sat]; n = n0[sat]; m = m0[sat]; }
        for (int e = tid; e < nb * DH; e += THREADS)
            ys[e] = y0[((size_t)(b0 + e / DH) * NH + h) * DH + e % DH];
        SYNC();

        for (int t = 0; t < L; ++t) {
            // this step's inputs W x (they do not depend on y: loaded first)
            const size_t xat = (((size_t)(b0 + pb) * L + t) * NH + h) * DH + po;
            float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (own) {
                x[0] = static_cast<float>(xi[xat]); x[1] = static_cast<float>(xf[xat]);
                x[2] = static_cast<float>(xz[xat]); x[3] = static_cast<float>(xo[xat]);
            }

            // R y for every batch row of the tile
            for (int b = 0; b < nb; ++b) {
                const float4* yb = reinterpret_cast<const float4*>(ys + b * DH);
                float acc = 0.0f;
#pragma unroll
                for (int s = 0; s < CPT / 4; ++s) {
                    const float4 v = yb[cg + CG * s];
                    acc += w[4 * s] * v.x + w[4 * s + 1] * v.y + w[4 * s + 2] * v.z + w[4 * s + 3] * v.w;
                }
#pragma unroll
                for (int off = CG / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
                if (cg == 0 && has_row) ry[b * 4 * U + row] = acc;
            }
            SYNC();

            // gate math (the reference's order: (W x + R y) + b)
            if (own) {
                float r[4];
#pragma unroll
                for (int g = 0; g < 4; ++g) r[g] = (x[g] + ry[pb * 4 * U + g * U + tid % U]) + bias_g[g];
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
                yx[((size_t)(t & 1) * B + b0 + pb) * NH * DH + h * DH + po] = y;
            }

            // barrier over the G blocks of head h, then every block reads the head's whole y
            __threadfence();
            SYNC();
            if (G > 1 && tid == 0) {
                generation += 1;
                atomicAdd(counter + h, 1);
                const volatile int* seen = counter + h;
                while (*seen < G * generation) { }
                __threadfence();
            }
            SYNC();
            for (int e = tid; e < nb * DH; e += THREADS)
                ys[e] = __ldcg(yx + ((size_t)(t & 1) * B + b0 + e / DH) * NH * DH + h * DH + e % DH);
            SYNC();
        }
        if (own) { y1[sat] = y; c1[sat] = c; n1[sat] = n; m1[sat] = m; }
    }
"""

SEQUENCE_KERNEL = DeviceKernel(
    "mad_slstm_sequence",
    inputs=["xi", "xf", "xz", "xo", "R", "bias", "y0", "c0", "n0", "m0", "sync_counter"],
    outputs=["hout", "yx", "y1", "c1", "n1", "m1"],
    body=SEQUENCE_BODY,
)


@dataclass(frozen=True)
class Plan:
    """How one launch splits a layer: G blocks per head of THREADS threads, CG threads per gate row."""
    G: int
    U: int
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


def plan(heads: int, head_dim: int, sms: int) -> Plan:
    """The fewest blocks per head whose weights fit in registers, with all NH * G blocks resident.

    Raises Unsupported when no split fits (the reference runs instead).
    """
    if head_dim % 4:
        raise Unsupported(f"slstm_sequence: head dim {head_dim} is not a multiple of 4")
    for G in (g for g in range(1, head_dim + 1) if head_dim % g == 0):
        if heads * G > sms:
            break
        U = head_dim // G
        for CG in (1, 2, 4, 8, 16, 32):
            CPT = head_dim // CG
            if head_dim % (4 * CG) or CPT > MAX_CPT:
                continue
            threads = 32 * math.ceil(4 * U * CG / 32)
            if threads <= MAX_THREADS:
                BT = max(1, min(threads // U, MAX_YS // head_dim))
                return Plan(G, U, CG, CPT, threads, BT)
            break
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
    p = plan(NH, DH, multiprocessors())
    y, c, n, m = (s.astype(mx.float32) for s in (state if state is not None else zero_state(B, NH, DH)))
    gates = [g.transpose(0, 2, 1, 3) for g in (i, f, z, o)]            # (B, T, NH, DH): the block's layout
    h, _, y1, c1, n1, m1 = SEQUENCE_KERNEL(
        backend,
        inputs=[*gates, R, b.astype(mx.float32), y, c, n, m, mx.zeros((NH,), mx.int32)],
        template=[("TI", i.dtype), ("NH", NH), ("DH", DH), ("U", p.U), ("G", p.G), ("CG", p.CG),
                  ("CPT", p.CPT), ("THREADS", p.THREADS), ("BT", p.BT)],
        grid=(p.G * p.THREADS, NH, 1), threadgroup=(p.THREADS, 1, 1),
        output_shapes=[(B, L, NH, DH), (2, B, NH, DH)] + [(B, NH, DH)] * 4,
        output_dtypes=[i.dtype] + [mx.float32] * 5,
        init_value=poison,
    )
    return h.transpose(0, 2, 1, 3), (y1, c1, n1, m1)


register_variant("slstm_sequence", "cuda", slstm_sequence_device)
