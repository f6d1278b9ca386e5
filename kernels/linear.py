"""Linear layers, as one kernel: parts of y = softcap(x W^T + b), split by columns (pure MLX reference).

    linear(x, w, bias=None, splits=(), caps=(None,)) -> [part_0, ..., part_n]

y = x W^T, plus the bias inside the matmul (`addmm`: each element rounded once), split at the column
indices `splits` into len(splits) + 1 parts (one part when `splits` is empty); part j is soft-capped
by caps[j] (None: left as it is): cap * tanh(part / cap). A `linear` node is one part; a group of
sibling linears fused into one matmul (`mad.passes.FusedLinear`) is one call with a part per member.
Device variants (`kernels/linear_device.py`) take the same arguments.

The CPU variant computes each part of a multi-token call as a product of its own (the weight's rows
for that part, a view): the same products as the unfused layers, and contiguous outputs. Split
columns of one product are strided arrays, for which MLX's CPU kernels run a loop with run-time
strides that the compiler does not vectorise, so the elementwise work that follows (a feed-forward's
SiLU gate) runs slower on them (see benchmarks/RESULTS.md, `python benchmarks/cpu_parts.py`). A single row (decode) keeps the one product.
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx

from .registry import register_kernel, register_variant


def softcap(x: mx.array, cap: float) -> mx.array:
    """cap * tanh(x / cap): bounds values to (-cap, cap) smoothly."""
    return cap * mx.tanh(x / cap)


def check_parts(splits: Sequence[int], caps: Sequence[Optional[float]]) -> None:
    """A cap (or None) for each of the len(splits) + 1 parts."""
    if len(caps) != len(splits) + 1:
        raise ValueError(f"linear: {len(splits)} splits give {len(splits) + 1} parts, got {len(caps)} caps")


def split_parts(y: mx.array, splits: Sequence[int]) -> list[mx.array]:
    """y's columns split at `splits` (views)."""
    return mx.split(y, list(splits), axis=-1) if splits else [y]


def linear(x: mx.array, w: mx.array, bias: Optional[mx.array] = None, splits: Sequence[int] = (),
           caps: Sequence[Optional[float]] = (None,)) -> list[mx.array]:
    """The parts of softcap(x @ w.T + bias); see the module docstring."""
    check_parts(splits, caps)
    y = x @ w.T if bias is None else mx.addmm(bias, x, w.T)
    return [softcap(p, c) if c else p for p, c in zip(split_parts(y, splits), caps)]


def linear_cpu(x: mx.array, w: mx.array, bias: Optional[mx.array] = None, splits: Sequence[int] = (),
               caps: Sequence[Optional[float]] = (None,)) -> list[mx.array]:
    """`linear`, one product per part when x has more than one row (see the module docstring)."""
    if not splits or x.size == x.shape[-1]:
        return linear(x, w, bias, splits, caps)
    check_parts(splits, caps)
    bounds = list(zip((0, *splits), (*splits, w.shape[0])))
    parts = [x @ w[a:b].T if bias is None else mx.addmm(bias[a:b], x, w[a:b].T) for a, b in bounds]
    return [softcap(p, c) if c else p for p, c in zip(parts, caps)]


register_kernel("linear", linear)
register_variant("linear", "cpu", linear_cpu)
