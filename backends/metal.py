"""The Metal backend: the Metal Shading Language side of the kernel bodies shared with CUDA.

A backend module holds what differs per execution backend (as tinygrad's runtime/ops_*.py). MAD's device
kernels are written once in the common subset of CUDA C++ and the Metal Shading Language
(kernels/device.py lists the macros a body may use); this module defines those macros for Metal, says where
they go (`kernel_source`) and which MLX call builds the kernel (`make_kernel`).
"""

from __future__ import annotations

import mlx.core as mx

__all__ = ["HEADER", "PREAMBLE", "kernel_source", "make_kernel"]

PREAMBLE = """
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

# functions (not macros) go in the header, outside the kernel function MLX writes around the source
HEADER = """
template <typename U> inline void load8(const device U* p, thread float* out) {
    for (int e = 0; e < 8; ++e) out[e] = static_cast<float>(p[e]);
}
"""


def kernel_source(body: str) -> tuple[str, str]:
    """(header, source) of a kernel body: the macros open the source, because MLX adds the thread position
    attributes (threadgroup_position_in_grid, ...) only when the source names them."""
    return HEADER, PREAMBLE + body


def make_kernel(name: str, input_names: list[str], output_names: list[str], source: str, header: str,
                row_contiguous: bool = True):
    """MLX's Metal custom kernel (`mx.fast.metal_kernel`) of `source` behind `header`."""
    return mx.fast.metal_kernel(name=name, input_names=input_names, output_names=output_names, source=source,
                                header=header, ensure_row_contiguous=row_contiguous)
