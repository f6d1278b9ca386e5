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
SiLU gate) runs slower on them (see benchmarks/RESULTS.md, `python benchmarks/cpu_parts.py`). A single
row (decode) keeps the one product.

The CPU variant carries its own gradient (`linear_vjp`), the reference's math laid out for training on the
CPU: the parts' cotangents joined into one dY, then dX = dY W and dW = dY^T X as one product each (dW
comes out contiguous, where autodiff of x @ w.T gives a transposed view that AdamW's fused update reads
with run-time strides, or a copy), db = the column sums of dY, and a soft-capped part's derivative
1 - t^2 with t = y / cap from its output y (MLX's tanh VJP computes cosh, a second transcendental over
every element: all-position logits in training).

A bfloat16 or float16 call of several positions (a prompt, training) on the CPU is computed in float32 (x
and W converted, the bias and the cap on the float32 sums, one rounding at the end; its gradient's
products too): MLX's CPU has no BLAS for 16-bit types and multiplies 256 rows 30x slower than it converts
and multiplies in float32, with no better accuracy (it accumulates in float32 as well). A decode step (one
position per sequence) keeps the 16-bit product: converting every weight at every step cost more than it
saved (xlstm-125m, bf16: 8.5-9.0 against 9.2-10.2 tokens/s).
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx

from .registry import gradients, listed, register_kernel, register_variant


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


def capped_parts(y: mx.array, splits: Sequence[int], caps: Sequence[Optional[float]]) -> list[mx.array]:
    """y's columns split at `splits`, each part soft-capped by its cap. Neighbouring parts of one cap (an mLSTM
    layer's input and forget gates at the end of a fused q|k|v|o|i|f) are capped as one slice and then
    split: one elementwise kernel where each part took its own, the same values."""
    bounds = [0, *splits, y.shape[-1]]
    runs: list[list] = []                                       # [first part, last part + 1, cap]
    for j, c in enumerate(caps):
        if c and runs and runs[-1][2] == c:
            runs[-1][1] = j + 1
        else:
            runs.append([j, j + 1, c])
    out = []
    for (a, b, c), piece in zip(runs, split_parts(y, [bounds[r[0]] for r in runs[1:]])):
        piece = softcap(piece, c) if c else piece
        out.extend(split_parts(piece, [bounds[j] - bounds[a] for j in range(a + 1, b)]))
    return out


def linear(x: mx.array, w: mx.array, bias: Optional[mx.array] = None, splits: Sequence[int] = (),
           caps: Sequence[Optional[float]] = (None,)) -> list[mx.array]:
    """The parts of softcap(x @ w.T + bias); see the module docstring."""
    check_parts(splits, caps)
    y = x @ w.T if bias is None else mx.addmm(bias, x, w.T)
    return capped_parts(y, splits, caps)


def _products(x: mx.array, w: mx.array, bias: Optional[mx.array], splits: Sequence[int]) -> list[mx.array]:
    """The parts of x @ w.T + bias before their caps: one product per part when x has more than one row."""
    if not splits or x.size == x.shape[-1]:
        return split_parts(x @ w.T if bias is None else mx.addmm(bias, x, w.T), splits)
    bounds = list(zip((0, *splits), (*splits, w.shape[0])))
    return [x @ w[a:b].T if bias is None else mx.addmm(bias[a:b], x, w[a:b].T) for a, b in bounds]


def _uncapped(g: mx.array, y: mx.array, cap: Optional[float]) -> mx.array:
    """The cotangent of a part before its soft-cap, from the cotangent g of its output y: g (1 - t^2) with
    tanh's value t = y / cap."""
    if not cap:
        return g
    t = y / cap
    return g * (1.0 - t * t)


HALF = (mx.bfloat16, mx.float16)


def several_positions(x: mx.array) -> bool:
    """Whether x (..., T, K) holds a sequence of several positions (a prompt, training), not a decode step's
    one position per sequence (nor a flat matrix of rows)."""
    return x.ndim >= 3 and x.shape[-2] > 1


def _in_float32(x: mx.array) -> bool:
    """Whether the CPU variant takes this call's products in float32: 16-bit, several positions (module
    docstring); the forward and its VJP ask alike."""
    return x.dtype in HALF and several_positions(x)


def _float32(*arrays: Optional[mx.array]) -> list[Optional[mx.array]]:
    return [None if a is None else a.astype(mx.float32) for a in arrays]


def linear_vjp(primals: Sequence[mx.array], cotangents: Sequence[mx.array], outputs: Sequence[mx.array],
               caps: Sequence[Optional[float]]) -> list[mx.array]:
    """(dX, dW[, db]) of the parts of softcap(x @ w.T + b) at the parts' cotangents: see the module docstring."""
    x, w = primals[0], primals[1]
    dz = [_uncapped(g, y, c) for g, y, c in zip(cotangents, outputs, caps)]
    dy = mx.concatenate(dz, axis=-1) if len(dz) > 1 else dz[0]
    if _in_float32(x):
        x, w, dy = _float32(x, w, dy)
    rows = dy.reshape(-1, dy.shape[-1])
    grads = [dy @ w, rows.T @ x.reshape(-1, x.shape[-1])]
    if len(primals) > 2:
        grads.append(rows.sum(axis=0))
    return [g.astype(p.dtype) for g, p in zip(grads, primals)]


def _capped_products(x: mx.array, w: mx.array, bias: Optional[mx.array], splits: Sequence[int],
                     caps: Sequence[Optional[float]]) -> list[mx.array]:
    """The capped parts; a 16-bit call of several positions computed in float32 and rounded once (module
    docstring)."""
    dtype = x.dtype
    wide = _in_float32(x)
    if wide:
        x, w, bias = _float32(x, w, bias)
    parts = [softcap(p, c) if c else p for p, c in zip(_products(x, w, bias, splits), caps)]
    return [p.astype(dtype) for p in parts] if wide else parts


def linear_cpu(x: mx.array, w: mx.array, bias: Optional[mx.array] = None, splits: Sequence[int] = (),
               caps: Sequence[Optional[float]] = (None,)) -> list[mx.array]:
    """`linear`, one product per part when x has more than one row, differentiable by `linear_vjp` (see the
    module docstring)."""
    check_parts(splits, caps)
    if not gradients():  # `inference()`: the same operations without the custom function's node
        return _capped_products(x, w, bias, splits, caps)

    @mx.custom_function
    def parts(*arrays: mx.array) -> list[mx.array]:
        x, w, *b = arrays
        return _capped_products(x, w, b[0] if b else None, splits, caps)

    @parts.vjp
    def _(primals, cotangents, outputs):
        return linear_vjp(listed(primals), listed(cotangents), listed(outputs), caps)

    return listed(parts(x, w) if bias is None else parts(x, w, bias))


register_kernel("linear", linear)
register_variant("linear", "cpu", linear_cpu, own_gradient=True)
