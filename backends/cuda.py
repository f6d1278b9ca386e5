"""The CUDA backend: the CUDA C++ side of the kernel bodies shared with Metal.

A backend module holds what differs per execution backend (as tinygrad's runtime/ops_*.py). MAD's device
kernels are written once in the common subset of CUDA C++ and the Metal Shading Language
(kernels/device.py lists the macros a body may use); this module defines those macros for CUDA, says where
they go (`kernel_source`) and which MLX call builds the kernel (`make_kernel`). `launch_bounds` is CUDA's
alone: Metal has no register budget to set.
"""

from __future__ import annotations

import mlx.core as mx

__all__ = ["PREAMBLE", "kernel_source", "launch_bounds", "make_kernel"]

PREAMBLE = """
#define BLOCK_X ((int)blockIdx.x)
#define BLOCK_Y ((int)blockIdx.y)
#define BLOCK_Z ((int)blockIdx.z)
#define THREAD_X ((int)threadIdx.x)
#define THREAD_Y ((int)threadIdx.y)
#define THREAD_Z ((int)threadIdx.z)
#define SHARED __shared__
#define SYNC() __syncthreads()
#define EXP(x) expf(x)
#define LOG(x) logf(x)
#define LOG1P(x) log1pf(x)
#define SQRT(x) sqrtf(x)
#define TANH(x) tanhf(x)
#define FABS(x) fabsf(x)
#define FMAX(a, b) fmaxf(a, b)
#define FMIN(a, b) fminf(a, b)

__device__ inline float WARP_SUM(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// (a & MASK) | SET in one instruction (CUDA only). Written in C++, the two constants become an AND and an OR:
// a SASS lop3 takes one immediate operand. From one PTX lop3 the assembler keeps the other in a register.
template <unsigned int MASK, unsigned int SET> __device__ inline unsigned int MASK_OR(unsigned int a) {
    unsigned int out;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(out) : "r"(a), "n"(MASK), "n"(SET));
    return out;
}

template <typename U> __device__ inline void load8(const U* p, float* out) {
    if constexpr (sizeof(U) == 2) {
        const uint4 raw = *reinterpret_cast<const uint4*>(p);
        const U* h = reinterpret_cast<const U*>(&raw);
#pragma unroll
        for (int e = 0; e < 8; ++e) out[e] = static_cast<float>(h[e]);
    } else {
        const float4 a = *reinterpret_cast<const float4*>(p);
        const float4 b = *reinterpret_cast<const float4*>(p + 4);
        out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
        out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
    }
}

// bf16 to float is the 16 bits moved up: one shift for the low half of a word, one AND for the high half
// (the conversion the compiler emits takes a byte permute and a shift for the high half). Exact, the same bits.
template <> __device__ inline void load8<__nv_bfloat16>(const __nv_bfloat16* p, float* out) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const unsigned int u[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        out[2 * e] = __uint_as_float(u[e] << 16);
        out[2 * e + 1] = __uint_as_float(u[e] & 0xFFFF0000u);
    }
}
"""


def kernel_source(body: str) -> tuple[str, str]:
    """(header, source) of a kernel body: the macros go in the header, the body is the source as it is."""
    return PREAMBLE, body


def make_kernel(name: str, input_names: list[str], output_names: list[str], source: str, header: str,
                row_contiguous: bool = True):
    """MLX's CUDA custom kernel (`mx.fast.cuda_kernel`) of `source` behind `header`."""
    return mx.fast.cuda_kernel(name=name, input_names=input_names, output_names=output_names, source=source,
                               header=header, ensure_row_contiguous=row_contiguous)


def launch_bounds(threads: int, min_blocks: int = 1) -> str:
    """CUDA header text that gives the kernel `__launch_bounds__(threads, min_blocks)`.

    MLX writes the kernel's signature itself, starting with `__global__`; the bounds reach it through that
    macro. The compiler then keeps to 65536 / (threads * min_blocks) registers per thread (at most 255).
    """
    return (f"\n#undef __global__\n"
            f"#define __global__ __location__(global) __launch_bounds__({threads}, {min_blocks})\n")
