"""One kernel body for CUDA and Metal.

A device kernel of this project is written once, as the body of a function in the common subset of
CUDA C++ and the Metal Shading Language, using the macros below for what differs (thread indices,
shared memory, barriers, math functions). `DeviceKernel` prepends the backend's preamble and hands
the body to `mx.fast.cuda_kernel` or `mx.fast.metal_kernel`, so the logic verified on CUDA is the logic
that runs on Apple GPUs.

Macros a body may use:
    BLOCK_X, BLOCK_Y, BLOCK_Z     index of the thread block (threadgroup) in the grid
    THREAD_X, THREAD_Y, THREAD_Z  index of the thread in its block
    SHARED                        storage class of block-shared arrays: `SHARED float buf[256];`
    SYNC()                        barrier over the block, shared memory visible after it
    EXP LOG LOG1P SQRT TANH FABS FMAX FMIN   float math
    WARP_SUM(v)                   sum of v over the 32 lanes of a warp (SIMD-group), in every lane
    load8(ptr, out)               out[0..7] = float(ptr[0..7]) (16-byte loads for 2-byte types on CUDA;
                                  ptr 16-byte aligned)
Inputs and outputs are flat, row-contiguous arrays named as given; template arguments become
compile-time constants (ints, bools) or type aliases (dtypes), as in MLX's custom kernels. The grid
is counted in threads, as in MLX.
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx

CUDA_PREAMBLE = """
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
"""

METAL_PREAMBLE = """
#define BLOCK_X ((int)threadgroup_position_in_grid.x)
#define BLOCK_Y ((int)threadgroup_position_in_grid.y)
#define BLOCK_Z ((int)threadgroup_position_in_grid.z)
#define THREAD_X ((int)thread_position_in_threadgroup.x)
#define THREAD_Y ((int)thread_position_in_threadgroup.y)
#define THREAD_Z ((int)thread_position_in_threadgroup.z)
#define SHARED threadgroup
#define SYNC() threadgroup_barrier(metal::mem_flags::mem_threadgroup)
#define EXP(x) metal::precise::exp(x)
#define LOG(x) metal::precise::log(x)
#define LOG1P(x) metal::precise::log(1.0f + (x))
#define SQRT(x) metal::precise::sqrt(x)
#define TANH(x) metal::precise::tanh(x)
#define FABS(x) metal::fabs(x)
#define FMAX(a, b) metal::fmax(a, b)
#define FMIN(a, b) metal::fmin(a, b)
#define WARP_SUM(v) metal::simd_sum(v)
"""

METAL_HEADER = """
template <typename U> inline void load8(const device U* p, thread float* out) {
    for (int e = 0; e < 8; ++e) out[e] = static_cast<float>(p[e]);
}
"""


def launch_bounds(threads: int, min_blocks: int = 1) -> str:
    """CUDA header text that gives the kernel `__launch_bounds__(threads, min_blocks)`.

    MLX writes the kernel's signature itself, starting with `__global__`; the bounds reach it through that
    macro. The compiler then keeps to 65536 / (threads * min_blocks) registers per thread (at most 255).
    """
    return (f"\n#undef __global__\n"
            f"#define __global__ __location__(global) __launch_bounds__({threads}, {min_blocks})\n")


def kernel_source(backend: str, body: str) -> tuple[str, str]:
    """(header, source) for `backend` ("cuda" or "metal"): the same body behind its preamble.

    On CUDA the macros go in the header; on Metal they open the source, because MLX adds the thread
    position attributes (threadgroup_position_in_grid, ...) only when the source names them.
    """
    if backend == "cuda":
        return CUDA_PREAMBLE, body
    if backend == "metal":
        return METAL_HEADER, METAL_PREAMBLE + body
    raise ValueError(f"unknown backend {backend!r}")


class DeviceKernel:
    """A kernel body built lazily for the backend it first runs on."""

    def __init__(self, name: str, inputs: Sequence[str], outputs: Sequence[str], body: str, header: str = ""):
        """`header` is added after the backend's preamble (helpers, compiler attributes)."""
        self.name, self.inputs, self.outputs, self.body = name, list(inputs), list(outputs), body
        self.header = header
        self._built: dict[str, object] = {}

    def _kernel(self, backend: str):
        if backend not in self._built:
            header, source = kernel_source(backend, self.body)
            header += self.header
            make = mx.fast.cuda_kernel if backend == "cuda" else mx.fast.metal_kernel
            self._built[backend] = make(name=self.name, input_names=self.inputs, output_names=self.outputs,
                                        source=source, header=header)
        return self._built[backend]

    def __call__(self, backend: str, inputs: Sequence[mx.array], template: Sequence[tuple],
                 grid: tuple[int, int, int], threadgroup: tuple[int, int, int],
                 output_shapes: Sequence[tuple], output_dtypes: Sequence[mx.Dtype],
                 init_value: Optional[float] = None) -> list[mx.array]:
        """Launch on `backend`. `init_value` fills the outputs first (tests poison them with NaN)."""
        return self._kernel(backend)(inputs=list(inputs), template=list(template), grid=grid,
                                     threadgroup=threadgroup, output_shapes=list(output_shapes),
                                     output_dtypes=list(output_dtypes), init_value=init_value)
