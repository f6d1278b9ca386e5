"""Compile a MAD device kernel offline with nvcc, without a GPU: does it build, how many registers, spills.

Writes the source MLX's `mx.fast.cuda_kernel` would hand NVRTC (the same signature: inputs as `const T*`,
outputs as `T*`, template arguments as `constexpr` constants and `using` aliases, the backend's preamble
and the kernel's header in front), with MLX's own device header replaced by the CUDA headers it pulls in,
and runs `nvcc -cubin -Xptxas -v` on it for one architecture. Catches syntax errors, register use and
spills before a GPU lease is spent on them; it does not run anything. With `--sass`, the compiled
instructions counted by opcode (`cuobjdump -sass`, from a CUDA toolkit or Triton's wheel,
`triton/backends/nvidia/bin`, on PATH): a fully unrolled decode kernel's count over the values a lane
handles is its instructions per value.

    python benchmarks/probes/nvcc_check.py kernels.qlinear_mma:QMMA_KERNEL \
        --inputs x:bfloat16 w:uint32 scales:bfloat16 biases:bfloat16 bias:float32 cap:float32 g:float32 \
                 normp:float32 res:float32 --outputs y:bfloat16 \
        --template T=bfloat16 S=bfloat16 HALF=false M=1 K=4096 N=12288 GROUP_SIZE=64 SPLIT=8 AHEAD=2 \
                   HAS_BIAS=false HAS_CAP=false NORM=false PAIR=false ACT=0 RESIDUAL=false [--arch sm_90] [--keep DIR]
        [--sass]
"""

from __future__ import annotations

import argparse
import collections
import importlib
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mad.kernels.device import DeviceKernel, shape_arguments

ROOT = Path(__file__).resolve().parents[2]
SHAPE_TYPES = {"_shape": "Shape", "_strides": "Strides", "_ndim": "int"}  # as MLX declares them
CUDA_TYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16", "uint32": "uint32_t",
              "int32": "int32_t", "uint8": "uint8_t", "bool": "bool"}
MLX_HEADER = """
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <cooperative_groups.h>
#include <cuda/std/array>
#define inf __int_as_float(0x7f800000)
#define MAX_NDIM 10
using Shape = cuda::std::array<int32_t, MAX_NDIM>;
using Strides = cuda::std::array<int64_t, MAX_NDIM>;
"""


def source(kernel, inputs: list[tuple[str, str]], outputs: list[tuple[str, str]],
           template: list[tuple[str, str]]) -> str:
    """The kernel's full CUDA source as MLX builds it (mlx/backend/cuda/custom_kernel.cpp, build_kernel)."""
    from mad.backends import cuda

    header, body = cuda.kernel_source(kernel.body)
    params = []
    for n, t in inputs:  # an input's shape, strides and rank follow it where the body names them
        params.append(f"    const {CUDA_TYPES[t]}* {n}")
        for suffix in shape_arguments(kernel.body, n):
            params.append(f"    const __grid_constant__ {SHAPE_TYPES[suffix]} {n}{suffix}")
    params += [f"    {CUDA_TYPES[t]}* {n}" for n, t in outputs]
    consts = []
    for name, value in template:
        if value in CUDA_TYPES:
            consts.append(f"  using {name} = {CUDA_TYPES[value]};")
        elif value in ("true", "false"):
            consts.append(f"  constexpr bool {name} = {value};")
        else:
            consts.append(f"  constexpr int {name} = {int(value)};")
    return (MLX_HEADER + header + kernel.header + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
            + f"__global__ void {kernel.name}(\n" + ",\n".join(params) + ") {\n" + "\n".join(consts) + "\n\n"
            + body + "\n}\n\n} // namespace mlx::core::cu\n")


def pairs(values: list[str]) -> list[tuple[str, str]]:
    out = []
    for v in values:
        name, sep, value = v.partition("=") if "=" in v else v.partition(":")
        if not sep or not name or not value:
            raise ValueError(f"{v!r} is not NAME=VALUE or NAME:DTYPE")
        out.append((name, value))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kernel", help="module:NAME of a kernels.device.DeviceKernel, e.g. kernels.qlinear_mma:QMMA_KERNEL")
    ap.add_argument("--inputs", nargs="+", required=True, metavar="NAME:DTYPE")
    ap.add_argument("--outputs", nargs="+", required=True, metavar="NAME:DTYPE")
    ap.add_argument("--template", nargs="*", default=[], metavar="NAME=VALUE")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--keep", help="folder to keep the source and cubin in")
    ap.add_argument("--sass", action="store_true", help="count the compiled instructions by opcode (cuobjdump)")
    ap.add_argument("--parts", type=int, default=1,
                    help="a linear kernel with this many outputs, y0, y1, ... (DeviceKernel.parted; give PART1, ... "
                         "in --template)")
    a = ap.parse_args()
    if not shutil.which("nvcc"):
        ap.exit(2, "nvcc_check: nvcc is not on PATH\n")
    if a.sass and not shutil.which("cuobjdump"):
        ap.exit(2, "nvcc_check: --sass needs cuobjdump on PATH (a CUDA toolkit, or triton/backends/nvidia/bin "
                   "of Triton's wheel)\n")
    module, _, name = a.kernel.partition(":")
    try:
        kernel = getattr(importlib.import_module(module if module.startswith("mad.") else "mad." + module), name)
    except (ImportError, AttributeError, ValueError) as e:
        ap.error(f"kernel {a.kernel!r}: {e}")
    if not isinstance(kernel, DeviceKernel):
        ap.error(f"kernel {a.kernel!r} is not a kernels.device.DeviceKernel")
    if a.parts != 1:
        try:
            kernel = kernel.parted(a.parts)
        except ValueError as e:
            ap.error(f"--parts {a.parts}: {e}")
    try:
        text = source(kernel, pairs(a.inputs), pairs(a.outputs), pairs(a.template))
    except (KeyError, ValueError) as e:
        ap.error(f"--inputs/--outputs NAME:DTYPE ({', '.join(CUDA_TYPES)}), --template NAME=VALUE "
                 f"(a dtype, true, false or an integer): {e}")
    folder = Path(a.keep) if a.keep else Path(tempfile.mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)
    cu = folder / f"{kernel.name}.cu"
    cu.write_text(text)
    cubin = folder / f"{kernel.name}.cubin"
    run = subprocess.run(["nvcc", f"-arch={a.arch}", "-std=c++17", "-cubin", "-Xptxas", "-v", "-o", str(cubin),
                          str(cu)], capture_output=True, text=True)
    print(run.stdout + run.stderr)
    print(f"source: {cu}")
    if run.returncode == 0 and a.sass:
        dump = subprocess.run(["cuobjdump", "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
        print(opcode_counts(dump))
    sys.exit(run.returncode)


def opcode_counts(sass: str) -> str:
    """'N instructions: C1 OP1, C2 OP2, ...' of a `cuobjdump -sass` listing (an opcode without its modifiers)."""
    ops = collections.Counter(m.group(1) for m in re.finditer(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)",
                                                              sass, re.M))
    return f"{sum(ops.values())} instructions: " + ", ".join(f"{n} {op}" for op, n in ops.most_common())


if __name__ == "__main__":
    main()
