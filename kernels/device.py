"""One kernel body for CUDA and Metal.

A device kernel of this project is written once, as the body of a function in the common subset of
CUDA C++ and the Metal Shading Language, using the macros listed below for what differs (thread indices,
shared memory, barriers, math functions). `DeviceKernel` asks the backend's module (backends/cuda.py,
backends/metal.py) for its preamble and its kernel builder (`mx.fast.cuda_kernel`,
`mx.fast.metal_kernel`), so the logic verified on CUDA is the logic that runs on Apple GPUs.

Macros a body may use:
    BLOCK_X, BLOCK_Y, BLOCK_Z     index of the thread block (threadgroup) in the grid
    THREAD_X, THREAD_Y, THREAD_Z  index of the thread in its block
    SHARED                        storage class of block-shared arrays: `SHARED float buf[256];`
    SYNC()                        barrier over the block, shared memory visible after it
    EXP LOG LOG1P SQRT TANH FABS FMAX FMIN   float math
    WARP_SUM(v)                   sum of v over the 32 lanes of a warp (SIMD-group), in every lane
    load8(ptr, out)               out[0..7] = float(ptr[0..7]) (16-byte loads for 2-byte types on CUDA;
                                  ptr 16-byte aligned)
Inputs and outputs are flat, row-contiguous arrays named as given (a kernel built with
`row_contiguous=False` gets its inputs as they lie and reads them through `<name>_shape` and
`<name>_strides`, CUDA only); template arguments become
compile-time constants (ints, bools) or type aliases (dtypes), as in MLX's custom kernels. The grid
is counted in threads, as in MLX.
"""

from __future__ import annotations

import functools
import importlib
from typing import Optional, Sequence

import mlx.core as mx


def backend_module(backend: str):
    """The module of `backend` ("cuda", "metal", or "host": the body run on the CPU for tests,
    backends/host.py): its preamble, where it goes, and the kernel builder."""
    if backend not in ("cuda", "metal", "host"):
        raise ValueError(f"unknown backend {backend!r}")
    # imported when a kernel is first built, so that importing the kernels needs neither backend's module
    return importlib.import_module(f"mad.backends.{backend}")


def kernel_source(backend: str, body: str) -> tuple[str, str]:
    """(header, source) for `backend` ("cuda" or "metal"): the same body behind its preamble."""
    return backend_module(backend).kernel_source(body)


def store_macro(parts: int) -> str:
    """`STORE(r, o, v)`, how the linear kernels write output feature o (of NOUT) of row r: into y, or with
    several parts into the part's own output y<j>, part j starting at feature PART<j> (a template
    constant), so that a fused projection's parts need no split of one output afterwards (a node fewer in
    every decode step's graph, and each part row-contiguous)."""
    if parts == 1:
        return "#define STORE(r, o, v) (y[(size_t)(r) * NOUT + (o)] = (v))\n"
    bounds = [f"PART{j}" for j in range(1, parts)]
    lines = []
    for j in range(parts):
        start = bounds[j - 1] if j else "0"
        stop = bounds[j] if j < parts - 1 else "NOUT"
        test = f"if (o_ < {stop}) " if j < parts - 1 else ""
        lines.append(f"{'else ' if j else ''}{test}y{j}[r_ * ({stop} - {start}) + o_ - {start}] = (v);")
    return ("#define STORE(r, o, v) do { const int o_ = (o); const size_t r_ = (size_t)(r); "
            + " ".join(lines) + " } while (0)\n")


SHAPE_ARGUMENTS = ("_shape", "_strides", "_ndim")  # what MLX adds after an input, in this order


def shape_arguments(body: str, name: str) -> list[str]:
    """The suffixes of the arguments MLX passes after input `name` (its shape, strides and rank), those
    `body` names, in MLX's order: MLX adds each where the source contains `<name><suffix>`."""
    return [s for s in SHAPE_ARGUMENTS if name + s in body]


@functools.lru_cache(maxsize=None)
def scalar(value: float) -> mx.array:
    """A float32 number a kernel reads as an input (an epsilon), made once per value: a new array per call
    would be another constant in every traced graph."""
    return mx.array([value], mx.float32)


class DeviceKernel:
    """A kernel body built lazily for the backend it first runs on."""

    def __init__(self, name: str, inputs: Sequence[str], outputs: Sequence[str], body: str, header: str = "",
                 row_contiguous: bool = True):
        """`header` is added after the backend's preamble (helpers, compiler attributes). `row_contiguous`:
        whether MLX copies inputs that are not row-contiguous before the launch (else the body reads
        every input through its strides, or its caller makes the others contiguous)."""
        self.name, self.inputs, self.outputs, self.body = name, list(inputs), list(outputs), body
        self.header, self.row_contiguous = header, row_contiguous
        self._built: dict[str, object] = {}

    @functools.lru_cache(maxsize=None, typed=True)  # typed: True is no 1 here
    def parted(self, parts: int) -> "DeviceKernel":
        """This kernel (one output y, written through `STORE`, its header starting with `store_macro(1)`)
        with `parts` outputs y0, y1, ...; the call passes each part's first feature as PART1, PART2, ..."""
        one = store_macro(1)
        if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
            raise ValueError(f"parts must be an integer of 1 or more, got {parts!r}")
        if parts == 1:
            return self
        if self.outputs != ["y"] or not self.header.startswith(one):
            raise ValueError(f"kernel {self.name} does not write its output through STORE")
        return DeviceKernel(f"{self.name}_{parts}", self.inputs, [f"y{j}" for j in range(parts)], self.body,
                            store_macro(parts) + self.header[len(one):], self.row_contiguous)

    def _kernel(self, backend: str):
        if backend not in self._built:
            module = backend_module(backend)
            header, source = module.kernel_source(self.body)
            header += self.header
            self._built[backend] = module.make_kernel(name=self.name, input_names=self.inputs,
                                                      output_names=self.outputs, source=source, header=header,
                                                      row_contiguous=self.row_contiguous)
        return self._built[backend]

    def __call__(self, backend: str, inputs: Sequence[mx.array], template: Sequence[tuple],
                 grid: tuple[int, int, int], threadgroup: tuple[int, int, int],
                 output_shapes: Sequence[tuple], output_dtypes: Sequence[mx.Dtype],
                 init_value: Optional[float] = None) -> list[mx.array]:
        """Launch on `backend`. `init_value` fills the outputs first (tests poison them with NaN)."""
        return self._kernel(backend)(inputs=list(inputs), template=list(template), grid=grid,
                                     threadgroup=threadgroup, output_shapes=list(output_shapes),
                                     output_dtypes=list(output_dtypes), init_value=init_value)
