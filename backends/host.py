"""The host backend: a kernel body compiled with the machine's C++ compiler and run on the CPU, one thread of
the operating system per GPU thread. For tests on a machine without a GPU: slow (a thread per GPU thread,
a block at a time), but it runs the body's own indexing, barriers and warp sums, so a wrong index, a
missing barrier or a split that drops a row fails on the CPU.

What it emulates: the macros of kernels/device.py (SHARED arrays are the block's, shared by its threads;
SYNC() is a barrier over the block; WARP_SUM is CUDA's butterfly of `__shfl_xor_sync` additions, in the
same order, so its float32 sums are CUDA's bit for bit), bf16 (round to nearest even), the CUDA helpers
the bodies use (`uint4`, `float4`, `make_float4`, `__uint_as_float`, `__float_as_uint`, `MASK_OR`, `load8`)
and MLX's `<name>_shape`, `<name>_strides` and `<name>_ndim` (the inputs are handed over row-contiguous).
Warps are the block's consecutive runs of 32 threads (x fastest), as on CUDA. Math functions are the C
library's: within a few units of the last place of CUDA's. Inline PTX (the tensor-core kernels) is not
emulated: such a body does not compile here. Blocks run one after another, so a body that waits for another
block (the sLSTM kernel's exchange between blocks) never finishes here.

    from mad.kernels import mlstm_device
    h, state = mlstm_device.mlstm_step_device(q, k, v, i, f, state, backend="host")

`available()` says whether a C++20 compiler (`CXX`, else g++ or c++) is on PATH; tests skip without one.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from mad.kernels.device import shape_arguments

__all__ = ["PREAMBLE", "available", "kernel_source", "make_kernel"]

PREAMBLE = r"""
#include <algorithm>
#include <array>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
using std::min;
using std::max;

struct bf16 {
    uint16_t bits;
    bf16() = default;
    bf16(float f) { uint32_t u; std::memcpy(&u, &f, 4); u += 0x7FFFu + ((u >> 16) & 1u); bits = (uint16_t)(u >> 16); }
    operator float() const { uint32_t u = (uint32_t)bits << 16; float f; std::memcpy(&f, &u, 4); return f; }
};
using __nv_bfloat16 = bf16;
struct uint4 { unsigned int x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
#define __device__
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__

struct HostThread { int tx, ty, tz, bx, by, bz, warp, lane; };
thread_local HostThread host_thread;
struct HostBlock { std::barrier<>* block; std::vector<std::barrier<>*> warps; float* exchange; };
HostBlock* host_block;

#define BLOCK_X (host_thread.bx)
#define BLOCK_Y (host_thread.by)
#define BLOCK_Z (host_thread.bz)
#define THREAD_X (host_thread.tx)
#define THREAD_Y (host_thread.ty)
#define THREAD_Z (host_thread.tz)
#define SHARED static
#define SYNC() host_block->block->arrive_and_wait()
#define EXP(x) std::exp((float)(x))
#define LOG(x) std::log((float)(x))
#define LOG1P(x) std::log1p((float)(x))
#define SQRT(x) std::sqrt((float)(x))
#define TANH(x) std::tanh((float)(x))
#define FABS(x) std::fabs((float)(x))
#define FMAX(a, b) std::fmax((float)(a), (float)(b))
#define FMIN(a, b) std::fmin((float)(a), (float)(b))

// CUDA's WARP_SUM: v += __shfl_xor_sync(v, o) for o = 16, 8, 4, 2, 1, every lane
inline float WARP_SUM(float v) {
    const int w = host_thread.warp, l = host_thread.lane;
    float* slots = host_block->exchange + w * 32;
    for (int o = 16; o > 0; o >>= 1) {
        slots[l] = v;
        host_block->warps[w]->arrive_and_wait();
        const float other = slots[l ^ o];
        host_block->warps[w]->arrive_and_wait();
        v += other;
    }
    return v;
}

template <unsigned int MASK, unsigned int SET> inline unsigned int MASK_OR(unsigned int a) { return (a & MASK) | SET; }

template <typename U> inline void load8(const U* p, float* out) {
    for (int e = 0; e < 8; ++e) out[e] = static_cast<float>(p[e]);
}
"""

_C_TYPES = {mx.float32: "float", mx.bfloat16: "bf16", mx.int32: "int32_t", mx.uint32: "uint32_t"}
# an input's shape, strides and rank as the body takes them (what MLX's `Shape`, `Strides` and int hold)
_SHAPE_ARG_TYPES = {"_shape": "std::array<int32_t, 10>", "_strides": "std::array<int64_t, 10>", "_ndim": "int"}
_NP_STORAGE = {mx.float32: np.float32, mx.bfloat16: np.uint16, mx.int32: np.int32, mx.uint32: np.uint32}
_CACHE = Path(tempfile.gettempdir()) / "mad-host-kernels"


def compiler() -> Optional[str]:
    """The C++ compiler to use: `CXX`, else g++ or c++ on PATH; None without one."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def available() -> bool:
    """Whether kernel bodies can be built here (a C++20 compiler with <barrier>)."""
    cxx = compiler()
    if cxx is None:
        return False
    try:
        _build("#include <barrier>\nint host_probe() { std::barrier<> b(1); b.arrive_and_wait(); return 0; }", "probe")
    except (OSError, RuntimeError):
        return False
    return True


def kernel_source(body: str) -> tuple[str, str]:
    """(header, source) of a kernel body: the emulation's definitions in the header, the body as it is."""
    return PREAMBLE, body


def _build(source: str, name: str) -> ctypes.CDLL:
    """The shared library of `source` (cached by its text)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    _CACHE.mkdir(parents=True, exist_ok=True)
    lib = _CACHE / f"{name}-{digest}.so"
    if not lib.exists():
        src = _CACHE / f"{name}-{digest}.cpp"
        src.write_text(source)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        done = subprocess.run([compiler() or "c++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread",
                               "-w", str(src), "-o", str(tmp)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"host kernel {name} does not compile:\n{done.stderr[-4000:]}")
        tmp.replace(lib)  # whole or not at all: another process may be building the same library
    return ctypes.CDLL(str(lib))


class HostKernel:
    """What `make_kernel` returns: called as MLX's custom kernels are, it builds the body for the template
    (once per template) and runs every block of the grid, one after another."""

    def __init__(self, name: str, input_names: list[str], output_names: list[str], source: str, header: str):
        self.name, self.inputs, self.outputs, self.source, self.header = name, input_names, output_names, source, header
        self.shape_args = {n: shape_arguments(source, n) for n in input_names}   # as MLX passes them
        self._libraries: dict[tuple, ctypes.CDLL] = {}

    def _library(self, dtypes: Sequence[mx.Dtype], out_dtypes: Sequence[mx.Dtype], template: Sequence[tuple]):
        key = (tuple(dtypes), tuple(out_dtypes), tuple(template))
        if key not in self._libraries:
            self._libraries[key] = self._compile(dtypes, out_dtypes, template)
        return self._libraries[key]

    def _compile(self, dtypes: Sequence[mx.Dtype], out_dtypes: Sequence[mx.Dtype], template: Sequence[tuple]):
        params, unpack = [], []
        slot = 0
        for n, dt in zip(self.inputs, dtypes):
            params.append(f"const {_c_type(dt)}* {n}")
            unpack.append(f"(const {_c_type(dt)}*)a[{slot}]")
            slot += 1
            for suffix in self.shape_args[n]:
                kind = _SHAPE_ARG_TYPES[suffix]
                params.append(f"const {kind}& {n}{suffix}")
                unpack.append(f"*(const {kind}*)a[{slot}]")
                slot += 1
        for n, dt in zip(self.outputs, out_dtypes):
            params.append(f"{_c_type(dt)}* {n}")
            unpack.append(f"({_c_type(dt)}*)a[{slot}]")
            slot += 1
        consts = []
        for name, value in template:
            if isinstance(value, mx.Dtype):
                consts.append(f"using {name} = {_c_type(value)};")
            elif isinstance(value, bool):
                consts.append(f"constexpr bool {name} = {'true' if value else 'false'};")
            else:
                consts.append(f"constexpr int {name} = {int(value)};")
        code = (self.header + "\nnamespace host_kernel {\n" + "\n".join(consts)
                + f"\nvoid body({', '.join(params)}) {{\n" + self.source + "\n}\n}\n"
                + _LAUNCHER.replace("ARGS", ", ".join(unpack)))
        return _build(code, self.name)

    def __call__(self, inputs: list, template: list, grid: tuple, threadgroup: tuple, output_shapes: list,
                 output_dtypes: list, init_value: Optional[float] = None) -> list[mx.array]:
        dtypes = [x.dtype for x in inputs]
        lib = self._library(dtypes, output_dtypes, template)
        keep, pointers = [], []
        for n, x in zip(self.inputs, inputs):
            data = _host(x)
            keep.append(data)
            pointers.append(data.ctypes.data)
            pad = [0] * (10 - data.ndim)
            given = {"_shape": np.array(list(data.shape) + pad, np.int32),
                     "_strides": np.array([s // data.itemsize for s in data.strides] + pad, np.int64),
                     "_ndim": np.array([data.ndim], np.int32)}
            extra = [given[suffix] for suffix in self.shape_args[n]]
            keep += extra
            pointers += [e.ctypes.data for e in extra]
        outs = []
        for shape, dt in zip(output_shapes, output_dtypes):
            out = np.empty(shape, _NP_STORAGE[dt])
            if init_value is not None:
                out[...] = _host(mx.full(shape, init_value, dt))
            outs.append(out)
            pointers.append(out.ctypes.data)
        dims = np.array([*(-(-g // t) for g, t in zip(grid, threadgroup)), *threadgroup], np.int32)
        args = (ctypes.c_void_p * len(pointers))(*pointers)
        lib.host_launch(args, dims.ctypes.data_as(ctypes.c_void_p))
        return [_device(o, dt) for o, dt in zip(outs, output_dtypes)]


_LAUNCHER = r"""
extern "C" void host_launch(void** a, const int* dims) {
    const int gx = dims[0], gy = dims[1], gz = dims[2], tx = dims[3], ty = dims[4], tz = dims[5];
    const int threads = tx * ty * tz, warps = (threads + 31) / 32;
    std::vector<float> exchange(warps * 32);
    for (int bz = 0; bz < gz; ++bz)
        for (int by = 0; by < gy; ++by)
            for (int bx = 0; bx < gx; ++bx) {
                std::barrier<> block(threads);
                std::vector<std::barrier<>*> warp_barriers;
                for (int w = 0; w < warps; ++w)
                    warp_barriers.push_back(new std::barrier<>(std::min(32, threads - 32 * w)));
                HostBlock hb{&block, warp_barriers, exchange.data()};
                host_block = &hb;
                std::vector<std::thread> pool;
                for (int t = 0; t < threads; ++t)
                    pool.emplace_back([=] {
                        host_thread = {t % tx, (t / tx) % ty, t / (tx * ty), bx, by, bz, t / 32, t % 32};
                        host_kernel::body(ARGS);
                    });
                for (auto& th : pool) th.join();
                for (auto* w : warp_barriers) delete w;
            }
}
"""


def _c_type(dtype: mx.Dtype) -> str:
    c = _C_TYPES.get(dtype)
    if c is None:
        raise ValueError(f"the host backend has no {dtype}")
    return c


def _host(x: mx.array) -> np.ndarray:
    """x as a row-contiguous numpy array of its storage (bf16 as its 16 bits)."""
    if x.dtype == mx.bfloat16:
        return np.ascontiguousarray(np.array(x.view(mx.uint16)))
    return np.ascontiguousarray(np.array(x))


def _device(a: np.ndarray, dtype: mx.Dtype) -> mx.array:
    out = mx.array(a)
    return out.view(mx.bfloat16) if dtype == mx.bfloat16 else out


def make_kernel(name: str, input_names: list[str], output_names: list[str], source: str, header: str,
                row_contiguous: bool = True) -> HostKernel:
    """A `HostKernel` of `source` behind `header` (inputs are handed over row-contiguous either way)."""
    return HostKernel(name, input_names, output_names, source, header)
