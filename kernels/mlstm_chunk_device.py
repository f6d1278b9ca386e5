"""The two halves of the chunkwise mLSTM on tensor cores (CUDA): the chunk states (`mlstm_chunk_states`,
reference `kernels.mlstm.chunk_states`) and the intra-chunk outputs (`mlstm_chunk_outputs`, reference
`kernels.mlstm.chunk_outputs`); same arguments as the references.

The chunk states: one launch walks the chunks in order. Block (row tile, column tile, batch * head) keeps
a 64 x 64 tile of C in its mma accumulators (float32) from the first chunk to the last, writes the state
entering every chunk (the outputs kernel reads them; C in bf16 where the caller asks for q's type, which
the outputs round C to anyway: half the bytes written and read) and the final one (float32). Per chunk it scales the tile by
the chunk's decay and adds K^T diag(exp(a - m_c)) V on the tensor cores, with the gated keys kept to
float32 accuracy (bf16 inputs: as two bf16 halves, hi + lo; tested at 1e-5). n is one more column (V
extended by ones); m is a scalar recurrence every thread repeats. It replaces, per chunk, a float32 K^T V
matmul into device memory plus the recurrence kernel that read it back.

The intra-chunk outputs:
for every chunk of L steps with entering state (C, n, m), row j of the chunk gets (see
`kernels.mlstm.chunk_outputs` for the derivation):

    logD_jl = (b_j - b_l) + i~_l (l <= j),  m_j = max(max_l logD_jl, b_j + m),  w_j = exp(b_j + m - m_j)
    S_jl = (q_j . k_l) exp(logD_jl - m_j)
    h_j  = (S_j V + w_j q_j^T C) / (max(|sum_l S_jl + w_j q_j . n|, exp(-m_j)) + eps)

One launch does all chunks: block (chunk, row tile, column tile) holds 64 rows of a chunk and 128
columns of h; its 4 warps own 16 rows each. Three products on the tensor cores (float32 accumulators),
operand tiles staged in shared memory:
    1. S = Q K^T over DQK, gated in registers (float32), kept in shared memory in q's type;
    2. q^T C over DQK, C rounded to q's type as it is staged (the reference rounds it the same way);
    3. S V over the chunk's steps, added to w_j q^T C.
Global loads run a k slice ahead into registers, so the products do not wait for them; launch bounds keep
three blocks on a multiprocessor. Row statistics (m_j, w_j, q . n, the denominator) are float32. What it saves against the reference:
the cast copy of every chunk's C, and the L x L gate, product and sum intermediates of each chunk, in
device memory.

Both kernels read q, k and v through their strides (`mx.fast.cuda_kernel` with `ensure_row_contiguous`
off): the mLSTM layer hands them head-major views of its token-major projections, so no transposed copy
is made, and the outputs kernel writes h token-major, (B, NC, L, NH, DV), returned as a head-major view,
so putting the heads back side by side copies nothing either. Rows that are unit-stride and 16-byte
aligned take 16-byte loads; any other view is read element by element (a second copy of the body).

Both kernels take bf16 or float32 inputs through an operand policy (`Bf16`, `Tf32x3` in the header):
bf16 operands go through mma.sync m16n8k16 as they are; float32 operands are split as they are read into
a TF32 high part and the TF32 rest, and each product is three m16n8k8 products (lo.hi + hi.lo + hi.hi),
which comes close to float32 accuracy (~2^-21 per operand). They run while MLX takes float32 products in
TF32 (its default), where they beat the reference's own accuracy; with MLX_ENABLE_TF32=0 the reference runs
(IEEE float32, see `_float32_operands`). float16 inputs run the references. CUDA only: the matrix instructions are NVIDIA's.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import mlx.core as mx

from mad.backends.cuda import launch_bounds

from .device import DeviceKernel, scalar
from .mlstm import State, chunk_log_weights
from .registry import Unsupported, register_variant

RT, CT, THREADS = 64, 128, 128     # rows and columns of h per block; 4 warps of 16 rows
MAX_L = 128                        # chunk length bound (shared memory: S is RT x L bf16)
MIN_BLOCKS = 3                     # blocks per multiprocessor the compiler must fit (0: its choice)
STATES_RT, STATES_CT = 64, 64      # rows (DQK) and columns (DV) of the state tile a chunk-states block carries

MMA_HEADER = """
__device__ inline unsigned short bf16_bits(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
__device__ inline float bf16_value(unsigned short x) { return __bfloat162float(__ushort_as_bfloat16(x)); }
__device__ inline unsigned pair_at(const unsigned short* p) { return *reinterpret_cast<const unsigned*>(p); }
__device__ inline unsigned shared_at(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }
__device__ inline unsigned tf32_bits(float x) { unsigned r; asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x)); return r; }
// q, k and v are read through their strides (MLX passes `<name>_shape` and `<name>_strides`), so a
// head-major view of a token-major projection needs no copy. `Rows` is one chunk of a (B, NH, NC, L, D)
// array, row r at p + r * row. A body runs in two forms (`Fast<true>` / `Fast<false>`, chosen once per
// block): 16-byte loads where every row is unit-stride and 16-byte aligned (`rows_fast`), else element by
// element; two copies of the code, so the common form keeps its registers.
template <bool V> struct Fast { static constexpr bool value = V; };
template <typename E> struct Rows {
    const E* p;
    long long row;
    // elements k .. k + 16 / sizeof(E) - 1 of row r as 16 bytes (`unit` apart)
    template <bool FAST> __device__ uint4 load16(long long r, int k, long long unit) const {
        if constexpr (FAST) {
            return *reinterpret_cast<const uint4*>(p + r * row + k);
        } else {
            union { uint4 u; E e[16 / sizeof(E)]; } x;
            for (int i = 0; i < 16 / (int)sizeof(E); ++i) x.e[i] = p[r * row + (long long)(k + i) * unit];
            return x.u;
        }
    }
};
template <typename E, typename Sh, typename St> __device__ inline Rows<E> chunk_rows(const void* base, const Sh& shape, const St& st, int ch) {
    const int c = ch % shape[2], bh = ch / shape[2];
    return {reinterpret_cast<const E*>(base) + (bh / shape[1]) * st[0] + (bh % shape[1]) * st[1] + c * st[2], st[3]};
}
template <typename E, typename Sh, typename St> __device__ inline bool rows_fast(const void* base, const Sh& shape, const St& st) {
    bool ok = st[4] == 1 && reinterpret_cast<size_t>(base) % 16 == 0;
    for (int i = 0; i < 4; ++i) ok = ok && (shape[i] == 1 || st[i] % (16 / (long long)sizeof(E)) == 0);
    return ok;
}
template <bool C, typename X, typename Y> struct pick { using type = X; };
template <typename X, typename Y> struct pick<false, X, Y> { using type = Y; };

// Operand policies: how tiles of one element type are stored in shared memory, read into mma fragments
// and multiplied. Fragment layouts (PTX mma.sync, g = lane / 4, t = lane % 4): A regs hold A[g][k..],
// A[g+8][k..], A[g][k+KH..], A[g+8][k+KH..]; B regs hold B[k..][g], B[k+KH..][g]; D holds D[g][2t, 2t+1],
// D[g+8][2t, 2t+1]. Tiles are named by their index order: [m][k] (k contiguous), [k][m], [n][k], [k][n].
// bf16: one m16n8k16 product (k = 2t, 2t+1; KH = 8).
struct Bf16 {
    using E = unsigned short;
    static constexpr int K = 16, PAD_MK = 8, PAD_KN = 8;   // k per product; row padding (elements)
    struct A { unsigned r[4]; };
    struct B { unsigned r[2]; };
    __device__ static E store(float x) { return bf16_bits(x); }
    __device__ static float value(E x) { return bf16_value(x); }
    __device__ static void a_mk(A& a, const E* tile, int stride, int m0, int k0, int lane) {
        const int g = lane / 4, t = lane % 4;
        a.r[0] = pair_at(tile + (m0 + g) * stride + k0 + 2 * t);
        a.r[1] = pair_at(tile + (m0 + g + 8) * stride + k0 + 2 * t);
        a.r[2] = pair_at(tile + (m0 + g) * stride + k0 + 2 * t + 8);
        a.r[3] = pair_at(tile + (m0 + g + 8) * stride + k0 + 2 * t + 8);
    }
    // the four 8 x 8 matrices of a [k][m] slice by ldmatrix.trans: lane l names stored row
    // k0 + l % 8 + (l / 16) * 8 at column m0 + ((l / 8) % 2) * 8
    __device__ static void a_km(A& a, const E* tile, int stride, int m0, int k0, int lane) {
        const E* row = tile + (k0 + lane % 8 + (lane / 16) * 8) * stride + m0 + ((lane / 8) % 2) * 8;
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(a.r[0]), "=r"(a.r[1]), "=r"(a.r[2]), "=r"(a.r[3]) : "r"(shared_at(row)));
    }
    __device__ static void b_nk(B& b, const E* tile, int stride, int n0, int k0, int lane) {
        const int g = lane / 4, t = lane % 4;
        b.r[0] = pair_at(tile + (n0 + g) * stride + k0 + 2 * t);
        b.r[1] = pair_at(tile + (n0 + g) * stride + k0 + 2 * t + 8);
    }
    // ldmatrix.trans of a [k][n] slice: lane l names stored row k0 + l % 16
    __device__ static void b_kn(B& b, const E* tile, int stride, int n0, int k0, int lane) {
        const E* row = tile + (k0 + lane % 16) * stride + n0;
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
                     : "=r"(b.r[0]), "=r"(b.r[1]) : "r"(shared_at(row)));
    }
    // B of a column that is all ones (column 0 of the n-tile)
    __device__ static void b_ones(B& b, int lane) { b.r[0] = b.r[1] = lane / 4 == 0 ? 0x3F803F80u : 0u; }
    __device__ static void mma(float* d, const A& a, const B& b) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
    }
};
// float32: every operand split into a TF32 high part and the TF32 rest as it is read; three m16n8k8 products
// (lo.hi + hi.lo + hi.hi, the lo.lo term dropped) carry the float32 operands to ~2^-21 (k = t; KH = 4).
struct Tf32x3 {
    using E = float;
    static constexpr int K = 8, PAD_MK = 4, PAD_KN = 8;
    struct A { unsigned hi[4], lo[4]; };
    struct B { unsigned hi[2], lo[2]; };
    __device__ static E store(float x) { return x; }
    __device__ static float value(E x) { return x; }
    __device__ static void split(float x, unsigned& hi, unsigned& lo) {
        hi = tf32_bits(x);
        lo = tf32_bits(x - __uint_as_float(hi));
    }
    __device__ static void a_at(A& a, const E* tile, int at0, int at1, int at2, int at3) {
        split(tile[at0], a.hi[0], a.lo[0]); split(tile[at1], a.hi[1], a.lo[1]);
        split(tile[at2], a.hi[2], a.lo[2]); split(tile[at3], a.hi[3], a.lo[3]);
    }
    __device__ static void a_mk(A& a, const E* tile, int stride, int m0, int k0, int lane) {
        const int g = lane / 4, t = lane % 4, r = (m0 + g) * stride + k0 + t;
        a_at(a, tile, r, r + 8 * stride, r + 4, r + 8 * stride + 4);
    }
    __device__ static void a_km(A& a, const E* tile, int stride, int m0, int k0, int lane) {
        const int g = lane / 4, t = lane % 4, r = (k0 + t) * stride + m0 + g;
        a_at(a, tile, r, r + 8, r + 4 * stride, r + 4 * stride + 8);
    }
    __device__ static void b_nk(B& b, const E* tile, int stride, int n0, int k0, int lane) {
        const int at = (n0 + lane / 4) * stride + k0 + lane % 4;
        split(tile[at], b.hi[0], b.lo[0]); split(tile[at + 4], b.hi[1], b.lo[1]);
    }
    __device__ static void b_kn(B& b, const E* tile, int stride, int n0, int k0, int lane) {
        const int at = (k0 + lane % 4) * stride + n0 + lane / 4;
        split(tile[at], b.hi[0], b.lo[0]); split(tile[at + 4 * stride], b.hi[1], b.lo[1]);
    }
    __device__ static void b_ones(B& b, int lane) {
        b.hi[0] = b.hi[1] = lane / 4 == 0 ? __float_as_uint(1.0f) : 0u;
        b.lo[0] = b.lo[1] = 0u;
    }
    __device__ static void mma1(float* d, const unsigned* a, const unsigned* b) {
        asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
    __device__ static void mma(float* d, const A& a, const B& b) {
        mma1(d, a.lo, b.hi);
        mma1(d, a.hi, b.lo);
        mma1(d, a.hi, b.hi);
    }
};
"""

OUTPUTS_BODY = """
    // block (chunk ch, row tile, column tile); warp w owns rows w*16 .. w*16+15 of the tile.
    // Operands of type E (bf16 bits or float32) through the policy Op (see the header).
    using Op = typename pick<F32, Tf32x3, Bf16>::type;
    using E = typename Op::E;
    constexpr int VEC = 16 / sizeof(E);           // elements per 16-byte load
    constexpr int KT = sizeof(E) == 2 ? 32 : (L > 64 ? 8 : 16);   // k slice per stage (float32: shared memory)
    constexpr int KS = KT + Op::PAD_MK;           // stride of the k-contiguous tiles (Q, K)
    constexpr int NS = CT + Op::PAD_KN;           // stride of the n-contiguous tiles (C, V)
    constexpr int SL = (L + 15) / 16 * 16;        // chunk steps padded to whole k16 slices
    constexpr int SS = SL + Op::PAD_MK;           // stride of S
    constexpr int NTS = SL / 8;                   // n-tiles of S
    constexpr int NT = CT / 8;                    // n-tiles of h
    constexpr int CPRE = KT * CT / 4 / THREADS;   // float4 of C a thread stages per slice
    const int ch = BLOCK_X, r0 = BLOCK_Y * RT, c0 = BLOCK_Z * CT;
    const int tid = THREAD_X, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int rw = warp * 16;

    SHARED float sb[SL], sic[SL];                 // the chunk's b and i~
    SHARED float sm[RT], sw[RT], sqn[RT], sden[RT];
    SHARED __align__(16) E S[RT * SS];                                   // gated S, row-major
    SHARED __align__(16) E tq[RT * KS];                                  // Q tile: RT rows x KT k
    SHARED __align__(16) E tb[(SL * KS > KT * NS ? SL * KS : KT * NS)];  // K, C or V tile
    const Rows<E> qg = chunk_rows<E>(qc, qc_shape, qc_strides, ch), kg = chunk_rows<E>(kc, kc_shape, kc_strides, ch),
                  vg = chunk_rows<E>(vc, vc_shape, vc_strides, ch);
    auto run = [&](auto fast) {
    constexpr bool FAST = decltype(fast)::value;
    const char* Cg = reinterpret_cast<const char*>(C) + (size_t)ch * DQK * DV * (C_BF16 ? 2 : 4);  // float32 or bf16
    const float* ng = n + (size_t)ch * DQK;

    for (int l = tid; l < SL; l += THREADS) {
        sb[l] = l < L ? b[(size_t)ch * L + l] : 0.0f;
        sic[l] = l < L ? ic[(size_t)ch * L + l] : 0.0f;
    }
    SYNC();
    // row statistics: m_j = max(max_{l <= j} (b_j - b_l) + i~_l, b_j + m), w_j = exp(b_j + m - m_j)
    if (tid < RT) {
        const int j = r0 + tid;
        float mj = 0.0f, wj = 0.0f;
        if (j < L) {
            float mi = __int_as_float(0xff800000);   // -inf
            for (int l = 0; l <= j; ++l) mi = FMAX(mi, (sb[j] - sb[l]) + sic[l]);
            const float minter = sb[j] + m[ch];
            mj = FMAX(mi, minter);
            wj = EXP(minter - mj);
        }
        sm[tid] = mj; sw[tid] = wj; sqn[tid] = 0.0f;
    }

    // rows x KT k of a [row][DQK] matrix, through registers (loaded a slice ahead) into a
    // k-contiguous tile (zero past `rows` and DQK)
    constexpr int QPER = (RT * (KT / VEC) + THREADS - 1) / THREADS, KPER = (SL * (KT / VEC) + THREADS - 1) / THREADS;
    auto load_rows = [&](uint4* dst, int per, const Rows<E>& src, long long unit, int r_begin, int rows, int count, int k0) {
#pragma unroll
        for (int p = 0; p < per; ++p) {
            const int e = tid + p * THREADS, row = e / (KT / VEC), k = k0 + (e % (KT / VEC)) * VEC;
            dst[p] = make_uint4(0, 0, 0, 0);
            if (e < count * (KT / VEC) && r_begin + row < rows && k < DQK)
                dst[p] = src.load16<FAST>(r_begin + row, k, unit);
        }
    };
    auto store_rows = [&](E* tile, const uint4* from, int per, int count) {
#pragma unroll
        for (int p = 0; p < per; ++p) {
            const int e = tid + p * THREADS, row = e / (KT / VEC), part = e % (KT / VEC);
            if (e < count * (KT / VEC)) {
                *reinterpret_cast<uint2*>(tile + row * KS + part * VEC) = make_uint2(from[p].x, from[p].y);
                *reinterpret_cast<uint2*>(tile + row * KS + part * VEC + VEC / 2) = make_uint2(from[p].z, from[p].w);
            }
        }
    };
    typename Op::A af;
    typename Op::B bf;

    // 1. S = Q K^T (and q . n on the side), over DQK in slices of KT
    float s[NTS][4];
#pragma unroll
    for (int i = 0; i < NTS; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
    uint4 pq[QPER], pk[KPER];
    load_rows(pq, QPER, qg, qc_strides[4], r0, L, RT, 0);
    load_rows(pk, KPER, kg, kc_strides[4], 0, L, SL, 0);
    for (int k0 = 0; k0 < DQK; k0 += KT) {
        SYNC();
        store_rows(tq, pq, QPER, RT);
        store_rows(tb, pk, KPER, SL);
        SYNC();
        if (k0 + KT < DQK) {
            load_rows(pq, QPER, qg, qc_strides[4], r0, L, RT, k0 + KT);
            load_rows(pk, KPER, kg, kc_strides[4], 0, L, SL, k0 + KT);
        }
        if (tid < RT) {
            float acc = sqn[tid];
            for (int kk = 0; kk < KT && k0 + kk < DQK; ++kk)
                acc = fmaf(Op::value(tq[tid * KS + kk]), ng[k0 + kk], acc);
            sqn[tid] = acc;
        }
#pragma unroll
        for (int kk = 0; kk < KT; kk += Op::K) {
            Op::a_mk(af, tq, KS, rw, kk, lane);
#pragma unroll
            for (int i = 0; i < NTS; ++i) {
                Op::b_nk(bf, tb, KS, i * 8, kk, lane);
                Op::mma(s[i], af, bf);
            }
        }
    }
    SYNC();
    // gate S in float32, keep it as E; the row sums of the gated S (float32) go to the denominator
    float dsum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int i = 0; i < NTS; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int row = rw + g + (e / 2) * 8, l = i * 8 + 2 * t + e % 2, j = r0 + row;
            float v = 0.0f;
            if (j < L && l <= j) v = s[i][e] * EXP(((sb[j] - sb[l]) + sic[l]) - sm[row]);
            dsum[e / 2] += v;
            S[row * SS + l] = Op::store(v);
        }
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
        dsum[h2] += __shfl_xor_sync(0xffffffffu, dsum[h2], 1);
        dsum[h2] += __shfl_xor_sync(0xffffffffu, dsum[h2], 2);
    }
    if (t == 0) { sden[rw + g] = dsum[0]; sden[rw + g + 8] = dsum[1]; }

    // 2. q^T C over DQK (C rounded to q's type as the reference does), columns c0 .. c0 + CT - 1. The next
    // slice of C is loaded into registers while the tensor cores work on this one.
    float acc[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
    float4 pre[CPRE];
    auto load_c = [&](int k0) {
#pragma unroll
        for (int p = 0; p < CPRE; ++p) {
            const int e = tid + p * THREADS, kk = e / (CT / 4), nq = (e % (CT / 4)) * 4;
            pre[p] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (k0 + kk < DQK && c0 + nq < DV) {
                const size_t at = (size_t)(k0 + kk) * DV + c0 + nq;
                if constexpr (C_BF16) {   // exact in float32; rounded back to the same bf16 as it is staged
                    const uint2 u = *reinterpret_cast<const uint2*>(Cg + at * 2);
                    pre[p] = make_float4(bf16_value(u.x & 0xffffu), bf16_value(u.x >> 16),
                                         bf16_value(u.y & 0xffffu), bf16_value(u.y >> 16));
                } else {
                    pre[p] = *reinterpret_cast<const float4*>(Cg + at * 4);
                }
            }
        }
    };
    load_c(0);
    load_rows(pq, QPER, qg, qc_strides[4], r0, L, RT, 0);
    for (int k0 = 0; k0 < DQK; k0 += KT) {
        SYNC();
        store_rows(tq, pq, QPER, RT);
#pragma unroll
        for (int p = 0; p < CPRE; ++p) {
            const int e = tid + p * THREADS, kk = e / (CT / 4), nq = (e % (CT / 4)) * 4;
            if constexpr (sizeof(E) == 2) {
                const unsigned lo = bf16_bits(pre[p].x) | ((unsigned)bf16_bits(pre[p].y) << 16);
                const unsigned hi = bf16_bits(pre[p].z) | ((unsigned)bf16_bits(pre[p].w) << 16);
                *reinterpret_cast<uint2*>(tb + kk * NS + nq) = make_uint2(lo, hi);
            } else {
                *reinterpret_cast<float4*>(tb + kk * NS + nq) = pre[p];
            }
        }
        SYNC();
        if (k0 + KT < DQK) {
            load_c(k0 + KT);
            load_rows(pq, QPER, qg, qc_strides[4], r0, L, RT, k0 + KT);
        }
#pragma unroll
        for (int kk = 0; kk < KT; kk += Op::K) {
            Op::a_mk(af, tq, KS, rw, kk, lane);
#pragma unroll
            for (int i = 0; i < NT; ++i) {
                Op::b_kn(bf, tb, NS, i * 8, kk, lane);
                Op::mma(acc[i], af, bf);
            }
        }
    }
    const float w0 = sw[rw + g], w1 = sw[rw + g + 8];
#pragma unroll
    for (int i = 0; i < NT; ++i) { acc[i][0] *= w0; acc[i][1] *= w0; acc[i][2] *= w1; acc[i][3] *= w1; }

    // 3. + S V over the chunk's steps (only those a row of this tile can see), KT steps per stage
    const int lmax = min(L, r0 + RT);
    for (int l0 = 0; l0 < lmax; l0 += KT) {
        SYNC();
        for (int e = tid; e < KT * CT / VEC; e += THREADS) {     // V[l0 + ll][c0 + nq ..] -> tb[ll][n]
            const int ll = e / (CT / VEC), nq = (e % (CT / VEC)) * VEC;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (l0 + ll < L && c0 + nq < DV) v = vg.load16<FAST>(l0 + ll, c0 + nq, vc_strides[4]);
            *reinterpret_cast<uint4*>(tb + ll * NS + nq) = v;
        }
        SYNC();
#pragma unroll
        for (int kk = 0; kk < KT; kk += Op::K) {
            if (l0 + kk >= SL) break;
            Op::a_mk(af, S, SS, rw, l0 + kk, lane);
#pragma unroll
            for (int i = 0; i < NT; ++i) {
                Op::b_kn(bf, tb, NS, i * 8, kk, lane);
                Op::mma(acc[i], af, bf);
            }
        }
    }

    // h = num / (max(|den|, exp(-m)) + eps), den = sum_l S + w q . n; written token-major, (B, NC, L, NH, DV):
    // the layout the heads' output projection reads, so putting the heads back side by side copies nothing
    const int nc = qc_shape[2], nh = qc_shape[1], bh = ch / nc;
    const size_t out_row0 = ((size_t)(bh / nh) * nc + ch % nc) * L * nh + bh % nh;   // row j: out_row0 + j * nh
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int row = rw + g + hh * 8, j = r0 + row;
        if (j >= L) continue;
        const float den = FMAX(FABS(sden[row] + sw[row] * sqn[row]), EXP(-sm[row])) + eps[0];
        char* out = reinterpret_cast<char*>(hout);  // float32, or bf16 rounded once (OUT_BF16)
#pragma unroll
        for (int i = 0; i < NT; ++i) {
            const int col = i * 8 + 2 * t;
            const size_t at = (out_row0 + (size_t)j * nh) * DV + c0 + col;
            const float x0 = acc[i][2 * hh] / den, x1 = acc[i][2 * hh + 1] / den;
            if (c0 + col < DV) {
                if constexpr (OUT_BF16) *reinterpret_cast<unsigned*>(out + at * 2) = bf16_bits(x0) | ((unsigned)bf16_bits(x1) << 16);
                else *reinterpret_cast<float2*>(out + at * 4) = make_float2(x0, x1);
            }
        }
    }
    };
    if (rows_fast<E>(qc, qc_shape, qc_strides) && rows_fast<E>(kc, kc_shape, kc_strides) && rows_fast<E>(vc, vc_shape, vc_strides))
        run(Fast<true>{});
    else
        run(Fast<false>{});
"""


STATES_BODY = """
    // block (row tile of DQK, column tile of DV, batch * head) walks the chunks in order with its RT x CT
    // tile of C in the mma accumulators (float32); warp w owns rows w*16 .. w*16+15. Per chunk c:
    //   m_c = max(g_c + m, a_max_c);  C = exp(g_c + m - m_c) C + (K^T diag(exp(a - m_c)) V)
    // The gated keys keep float32 accuracy: with bf16 k/v they are staged as two bf16 tiles (hi + lo
    // carries the float32 product to ~2^-17) and multiplied twice; with float32 k/v the Tf32x3 policy
    // splits every operand as it is read. n rides along as one more column of V, all ones (column tile 0).
    using Op = typename pick<F32, Tf32x3, Bf16>::type;
    using E = typename Op::E;
    constexpr bool SPLIT_K = sizeof(E) == 2;        // the gated keys as hi and lo bf16 tiles
    constexpr int VEC = 16 / sizeof(E);             // elements per 16-byte load
    constexpr int KT = 32;                          // chunk steps per stage
    constexpr int RS = RT + Op::PAD_KN;             // stride of the K tiles, [step][row]
    constexpr int NS = CT + Op::PAD_KN;             // stride of the V tile, [step][column]
    constexpr int NT = CT / 8;                      // n-tiles of the C tile
    constexpr int SPC = (L + KT - 1) / KT;          // stages per chunk
    constexpr int KPER = KT * RT / VEC / THREADS;   // 16-byte groups of K a thread stages per stage
    constexpr int VPER = KT * CT / VEC / THREADS;   // and of V
    static_assert(KPER * THREADS * VEC == KT * RT && VPER * THREADS * VEC == KT * CT, "tile / thread mismatch");
    const int r0 = BLOCK_X * RT, c0 = BLOCK_Y * CT, bh = BLOCK_Z;
    const int tid = THREAD_X, warp = tid / 32, lane = tid % 32, g4 = lane / 4, t = lane % 4, rw = warp * 16;
    const bool with_n = BLOCK_Y == 0;

    SHARED __align__(16) E khi[KT * RS], klo[SPLIT_K ? KT * RS : 1], tv[KT * NS];
    auto run = [&](auto fast) {
    constexpr bool FAST = decltype(fast)::value;
    const Rows<E> k_first = chunk_rows<E>(kc, kc_shape, kc_strides, bh * NC), v_first = chunk_rows<E>(vc, vc_shape, vc_strides, bh * NC);

    // the entering state into the accumulators (D fragment: rows rw + g4 (+8), columns i*8 + 2t (+1))
    float acc[NT][4], nacc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int row = r0 + rw + g4 + (e / 2) * 8, col = c0 + i * 8 + 2 * t + e % 2;
            acc[i][e] = row < DQK && col < DV ? C0[((size_t)bh * DQK + row) * DV + col] : 0.0f;
        }
    if (with_n && t == 0) {
        const int row = r0 + rw + g4;
        nacc[0] = row < DQK ? n0[(size_t)bh * DQK + row] : 0.0f;
        nacc[2] = row + 8 < DQK ? n0[(size_t)bh * DQK + row + 8] : 0.0f;
    }
    float m = m0[bh];

    // one stage (KT steps of chunk c) of K, its log gates a and V, loaded into registers a stage ahead
    uint4 pk[KPER], pv[VPER];
    float pa[KPER];
    auto load_stage = [&](int c, int s) {
        const Rows<E> kg = {k_first.p + c * kc_strides[2], k_first.row}, vg = {v_first.p + c * vc_strides[2], v_first.row};
#pragma unroll
        for (int p = 0; p < KPER; ++p) {
            const int e = tid + p * THREADS, j = s * KT + e / (RT / VEC), row = r0 + (e % (RT / VEC)) * VEC;
            pk[p] = make_uint4(0, 0, 0, 0);
            pa[p] = 0.0f;
            if (j < L && row < DQK) {
                pk[p] = kg.load16<FAST>(j, row, kc_strides[4]);
                pa[p] = a[((size_t)bh * NC + c) * L + j];
            }
        }
#pragma unroll
        for (int p = 0; p < VPER; ++p) {
            const int e = tid + p * THREADS, j = s * KT + e / (CT / VEC), col = c0 + (e % (CT / VEC)) * VEC;
            pv[p] = make_uint4(0, 0, 0, 0);
            if (j < L && col < DV) pv[p] = vg.load16<FAST>(j, col, vc_strides[4]);
        }
    };
    // the accumulators out to a [DQK][DV] state (and n, m); C in float32, or rounded to bf16 (`half`)
    auto write_state = [&](char* Cd, bool half, float* nd, float* md) {
#pragma unroll
        for (int i = 0; i < NT; ++i)
#pragma unroll
            for (int h2 = 0; h2 < 2; ++h2) {
                const int row = r0 + rw + g4 + h2 * 8, col = c0 + i * 8 + 2 * t;
                const size_t at = (size_t)row * DV + col;
                if (row < DQK && col < DV) {
                    if (half) *reinterpret_cast<unsigned*>(Cd + at * 2) = bf16_bits(acc[i][2 * h2]) | ((unsigned)bf16_bits(acc[i][2 * h2 + 1]) << 16);
                    else *reinterpret_cast<float2*>(Cd + at * 4) = make_float2(acc[i][2 * h2], acc[i][2 * h2 + 1]);
                }
            }
        if (with_n && t == 0) {
            const int row = r0 + rw + g4;
            if (row < DQK) nd[row] = nacc[0];
            if (row + 8 < DQK) nd[row + 8] = nacc[2];
        }
        if (with_n && BLOCK_X == 0 && tid == 0) md[0] = m;
    };
    typename Op::A ah, al;
    typename Op::B bv, ones;
    Op::b_ones(ones, lane);

    load_stage(0, 0);
    for (int c = 0; c < NC; ++c) {
        const size_t chunk = (size_t)bh * NC + c;
        write_state(reinterpret_cast<char*>(C_in) + chunk * DQK * DV * (CIN_BF16 ? 2 : 4), CIN_BF16, n_in + chunk * DQK, m_in + chunk);
        const float gc = g[chunk], am = a_max[chunk];
        const float m_new = FMAX(gc + m, am), decay = EXP(gc + m - m_new);
        m = m_new;
#pragma unroll
        for (int i = 0; i < NT; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][e] *= decay;
#pragma unroll
        for (int e = 0; e < 4; ++e) nacc[e] *= decay;
        for (int s = 0; s < SPC; ++s) {
            SYNC();
#pragma unroll
            for (int p = 0; p < KPER; ++p) {            // K gated by exp(a_j - m_c)
                const int e = tid + p * THREADS, jj = e / (RT / VEC), rr = (e % (RT / VEC)) * VEC;
                const float gate = EXP(pa[p] - m);
                const E* kv = reinterpret_cast<const E*>(&pk[p]);
                if constexpr (SPLIT_K) {
                    unsigned hi[4], lo[4];
#pragma unroll
                    for (int q2 = 0; q2 < 4; ++q2) {
                        const float x0 = bf16_value(kv[2 * q2]) * gate, x1 = bf16_value(kv[2 * q2 + 1]) * gate;
                        const unsigned short h0 = bf16_bits(x0), h1 = bf16_bits(x1);
                        hi[q2] = h0 | ((unsigned)h1 << 16);
                        lo[q2] = bf16_bits(x0 - bf16_value(h0)) | ((unsigned)bf16_bits(x1 - bf16_value(h1)) << 16);
                    }
                    *reinterpret_cast<uint4*>(khi + jj * RS + rr) = make_uint4(hi[0], hi[1], hi[2], hi[3]);
                    *reinterpret_cast<uint4*>(klo + jj * RS + rr) = make_uint4(lo[0], lo[1], lo[2], lo[3]);
                } else {
                    *reinterpret_cast<float4*>(khi + jj * RS + rr) =
                        make_float4(Op::value(kv[0]) * gate, Op::value(kv[1]) * gate, Op::value(kv[2]) * gate, Op::value(kv[3]) * gate);
                }
            }
#pragma unroll
            for (int p = 0; p < VPER; ++p) {
                const int e = tid + p * THREADS;
                *reinterpret_cast<uint4*>(tv + (e / (CT / VEC)) * NS + (e % (CT / VEC)) * VEC) = pv[p];
            }
            SYNC();
            if (s + 1 < SPC) load_stage(c, s + 1);
            else if (c + 1 < NC) load_stage(c + 1, 0);
#pragma unroll
            for (int kk = 0; kk < KT; kk += Op::K) {
                if (s * KT + kk >= L) break;
                Op::a_km(ah, khi, RS, rw, kk, lane);
                if constexpr (SPLIT_K) Op::a_km(al, klo, RS, rw, kk, lane);
#pragma unroll
                for (int i = 0; i < NT; ++i) {
                    Op::b_kn(bv, tv, NS, i * 8, kk, lane);
                    Op::mma(acc[i], ah, bv);
                    if constexpr (SPLIT_K) Op::mma(acc[i], al, bv);
                }
                if (with_n) {
                    Op::mma(nacc, ah, ones);
                    if constexpr (SPLIT_K) Op::mma(nacc, al, ones);
                }
            }
        }
    }
    write_state(reinterpret_cast<char*>(C_out) + (size_t)bh * DQK * DV * 4, false, n_out + (size_t)bh * DQK, m_out + bh);
    };
    if (rows_fast<E>(kc, kc_shape, kc_strides) && rows_fast<E>(vc, vc_shape, vc_strides))
        run(Fast<true>{});
    else
        run(Fast<false>{});
"""


@functools.lru_cache(maxsize=None)
def outputs_kernel(min_blocks: int) -> DeviceKernel:
    return DeviceKernel(
        f"mad_mlstm_chunk_outputs_{min_blocks}",
        inputs=["qc", "kc", "vc", "b", "ic", "C", "n", "m", "eps"],
        outputs=["hout"],
        body=OUTPUTS_BODY,
        header=MMA_HEADER + (launch_bounds(THREADS, min_blocks) if min_blocks else ""),
        row_contiguous=False,   # q, k, v through their strides; the rest made contiguous by the caller
    )


def _contiguous(*xs: mx.array) -> list[mx.array]:
    """The inputs a chunk kernel reads as flat arrays, row-contiguous (a no-op where they already are)."""
    return [mx.contiguous(x) for x in xs]


def mlx_uses_tf32() -> bool:
    """Whether MLX runs float32 matrix products in TF32 on this GPU (its default; MLX_ENABLE_TF32=0 turns it off)."""
    return os.environ.get("MLX_ENABLE_TF32", "1").strip() != "0"


def _float32_operands(name: str, backend: str, *arrays: mx.array) -> bool:
    """Whether the operands are float32 (Tf32x3) rather than bf16; Unsupported for anything else.

    float32 operands run here only while MLX itself would take their products in TF32 (~2^-11): the kernel's
    split products (~2^-21) are then the more accurate choice. With MLX_ENABLE_TF32=0 the user asked for
    IEEE float32 products, which the reference gives and the tensor cores do not quite (their float32
    accumulation does not round to nearest), so the reference runs."""
    if backend != "cuda":
        raise Unsupported(f"{name}: tensor-core kernel, CUDA only")
    dtypes = {x.dtype for x in arrays}
    if len(dtypes) != 1 or not dtypes <= {mx.bfloat16, mx.float32}:
        raise Unsupported(f"{name}: bf16 or float32 operands of one dtype, got {[x.dtype for x in arrays]}")
    if dtypes == {mx.float32} and not mlx_uses_tf32():
        raise Unsupported(f"{name}: float32 operands with MLX_ENABLE_TF32=0 run the reference in full float32")
    return dtypes == {mx.float32}


def _half_or_float(name: str, what: str, dtype: Optional[mx.Dtype]) -> bool:
    """Whether an output the caller asks in `dtype` is written as bf16 (else float32; others: Unsupported)."""
    if dtype is None:
        return False
    if dtype not in (mx.float32, mx.bfloat16):
        raise Unsupported(f"{name}: {what} in float32 or bf16, got {dtype}")
    return dtype == mx.bfloat16


def chunk_outputs_device(qc: mx.array, kc: mx.array, vc: mx.array, b: mx.array, ic: mx.array,
                         state_in: Optional[State], eps: float, out_dtype: Optional[mx.Dtype] = None, *,
                         backend: str = "cuda", poison: Optional[float] = None) -> mx.array:
    """Same arguments and result as `kernels.mlstm.chunk_outputs`; bf16 or float32 q/k/v (any strides: a
    head-major view of token-major projections is read as it lies), states given (C in float32 or bf16),
    h in float32 or bf16, returned as a head-major view of a token-major array."""
    f32 = _float32_operands("mlstm_chunk_outputs", backend, qc, kc, vc)
    out_bf16 = _half_or_float("mlstm_chunk_outputs", "h", out_dtype)
    if state_in is None:
        raise Unsupported("mlstm_chunk_outputs: the parallel form (no entering state) runs the reference")
    B, NH, NC, L, DQK = qc.shape
    DV = vc.shape[-1]
    if DQK % 16 or DV % 8 or L > MAX_L:
        raise Unsupported(f"mlstm_chunk_outputs: DQK {DQK} (multiple of 16), DV {DV} (multiple of 8), "
                          f"chunk {L} (at most {MAX_L})")
    C, n, m = state_in
    C = C if C.dtype == mx.bfloat16 else C.astype(mx.float32)
    rest = _contiguous(b.astype(mx.float32), ic.astype(mx.float32), C, n.astype(mx.float32), m.astype(mx.float32))
    chunks = B * NH * NC
    (h,) = outputs_kernel(MIN_BLOCKS)(
        backend,
        inputs=[qc, kc, vc, *rest, scalar(eps)],
        template=[("F32", f32), ("C_BF16", C.dtype == mx.bfloat16), ("OUT_BF16", out_bf16), ("L", L), ("DQK", DQK),
                  ("DV", DV), ("RT", RT), ("CT", CT), ("THREADS", THREADS)],
        grid=(chunks * THREADS, -(-L // RT), -(-DV // CT)), threadgroup=(THREADS, 1, 1),
        output_shapes=[(B, NC, L, NH, DV)], output_dtypes=[mx.bfloat16 if out_bf16 else mx.float32],
        init_value=poison,
    )
    return h.transpose(0, 3, 1, 2, 4)   # written token-major (see the body), returned as the reference's shape


register_variant("mlstm_chunk_outputs", "cuda", chunk_outputs_device)


STATES_KERNEL = DeviceKernel(
    "mad_mlstm_chunk_states",
    inputs=["kc", "vc", "a", "g", "a_max", "C0", "n0", "m0"],
    outputs=["C_in", "n_in", "m_in", "C_out", "n_out", "m_out"],
    body=STATES_BODY,
    header=MMA_HEADER,
    row_contiguous=False,   # k, v through their strides; the rest made contiguous by the caller
)


def chunk_states_device(kc: mx.array, vc: mx.array, b: mx.array, ic: mx.array, state: State,
                        entering_dtype: Optional[mx.Dtype] = None, *, backend: str = "cuda",
                        poison: Optional[float] = None) -> tuple[State, State]:
    """Same arguments and results as `kernels.mlstm.chunk_states`; bf16 or float32 k/v (any strides), the
    entering C's in float32 or bf16."""
    f32 = _float32_operands("mlstm_chunk_states", backend, kc, vc)
    cin_bf16 = _half_or_float("mlstm_chunk_states", "the entering C's", entering_dtype)
    B, NH, NC, L, DQK = kc.shape
    DV = vc.shape[-1]
    if DQK % 16 or DV % 8:
        raise Unsupported(f"mlstm_chunk_states: DQK {DQK} (multiple of 16), DV {DV} (multiple of 8)")
    g, a, a_max = chunk_log_weights(b.astype(mx.float32), ic.astype(mx.float32))
    outs = STATES_KERNEL(
        backend,
        inputs=[kc, vc, *_contiguous(a, g, a_max, *(x.astype(mx.float32) for x in state))],
        template=[("F32", f32), ("CIN_BF16", cin_bf16), ("L", L), ("NC", NC), ("DQK", DQK), ("DV", DV),
                  ("RT", STATES_RT), ("CT", STATES_CT), ("THREADS", THREADS)],
        grid=(-(-DQK // STATES_RT) * THREADS, -(-DV // STATES_CT), B * NH), threadgroup=(THREADS, 1, 1),
        output_shapes=[(B, NH, NC, DQK, DV), (B, NH, NC, DQK), (B, NH, NC), (B, NH, DQK, DV), (B, NH, DQK), (B, NH)],
        output_dtypes=[mx.bfloat16 if cin_bf16 else mx.float32] + [mx.float32] * 5, init_value=poison,
    )
    return tuple(outs[:3]), tuple(outs[3:])


register_variant("mlstm_chunk_states", "cuda", chunk_states_device)
