"""A linear layer with its neighbours' elementwise work folded in: one kernel where decode ran two or three.

    folded_linear(x, weight, bias, splits, caps, norm=None, pair=None, residual=None)

At decode every weight is read once per token, and the small operations around each product (the RMS norm
before it, the residual add or the gated activation after it) cost a launch each, about as long as a
product of a few million weights. `mad.passes.find_folds` finds where such an operation sits next to a
`linear` node (or a fused group of them), and the Program hands the ingredients to `apply`:

  x          the linear's input, or the norm's input when `norm` is given
  weight     W [N, K], float, or a `kernels.qlinear.QuantizedMatrix`; `bias`, `splits`, `caps` as for
             the `linear` kernel (kernels/linear.py)
  norm       (g, eps): the linear reads rms_norm(x, g, eps) = x * rsqrt(mean(x^2) + eps) * g
  pair       an activation name: W holds two parts of equal width (splits == [N / 2]) and the result is
             act(part 0) * part 1 (a gated feed-forward's gate and up projections, fused)
  residual   r: the result is r + (the single part, or the pair's product)

Without `pair` and `residual` the result is the list of parts (as `linear` returns it), otherwise one
array. `folded_linear` is the reference: the unfused operations, in MLX. The device variants
(kernels/linear_device.py, kernels/qlinear_device.py) do it in one kernel, in float32, rounded once.

A second fold takes a per-head layer norm into the gate that reads it (`mad.passes.find_norm_gates`; an
mLSTM layer's multi-head norm and output gate):

    head_norm_gate(gate, x, weight, bias, eps, heads, offset, act) = act(gate) * head_norm(x)

where head_norm(x) normalises each of `heads` slices of x's last dim (mean and biased variance in
float32) and scales by (weight + offset), plus bias: MLX's kernels compute it as a layer norm, a multiply
(and an add) and the gate's product, the device variant (kernels/norm_device.py) in one launch.

`apply(value, ...)` is what a Program calls, with `value`, what its unfused nodes computed: where a device
variant takes the call it returns the variant's result (differentiable, by the reference's gradient), and
`value` is then what no output reads (a compiled program drops it); anywhere else (the CPU, the reference
policy, calls larger than decode) it returns `value` itself, so nothing changes there.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import mlx.core as mx

from .linear import linear
from .qlinear import QuantizedMatrix, quantized_linear
from .registry import Unsupported, chosen_variant, dispatch, register_kernel, run_variant

PAIR_ACTIVATIONS = ("sigmoid", "silu")  # what the device kernels apply to a pair's first part


def folded_linear(x: mx.array, weight: Any, bias: Optional[mx.array] = None, splits: Sequence[int] = (),
                  caps: Sequence[Optional[float]] = (None,), *, norm: Optional[tuple] = None,
                  pair: Optional[str] = None, residual: Optional[mx.array] = None) -> Any:
    """The unfused operations (see the module docstring)."""
    if norm is not None:
        x = mx.fast.rms_norm(x, norm[0], norm[1])
    if isinstance(weight, QuantizedMatrix):
        parts = quantized_linear(x, weight, bias, splits, caps)
    else:
        parts = linear(x, weight, bias, splits, caps)
    if pair is None and residual is None:
        return parts
    y = parts[0]
    if pair is not None:
        a, b = parts
        y = (mx.sigmoid(a) if pair == "sigmoid" else a * mx.sigmoid(a)) * b
    return y if residual is None else residual + y


def fold_width(x: mx.array, n: int, splits: Sequence[int], pair: Optional[str],
               residual: Optional[mx.array]) -> int:
    """The result's width for a device variant; `Unsupported` where the call is not one the kernels take: a
    pair needs two parts of equal width and a known activation, a residual one part (or a pair) of r's
    shape and x's dtype."""
    width = n // 2 if pair is not None else n
    if ((pair is not None and (pair not in PAIR_ACTIVATIONS or len(splits) != 1 or 2 * splits[0] != n))
            or (pair is None and residual is not None and splits)
            or (residual is not None and (residual.shape != (*x.shape[:-1], width) or residual.dtype != x.dtype))):
        raise Unsupported(f"folded_linear: parts {list(splits)}, pair {pair}")
    return width


def fold_result(outputs: list[mx.array], pair: Optional[str], residual: Optional[mx.array]) -> Any:
    """A variant's result from its kernel's outputs (one per part without a pair or a residual, see
    `per_part`): one array with a pair or a residual, else the parts."""
    return outputs if per_part(pair, residual) else outputs[0]


def per_part(pair: Optional[str], residual: Optional[mx.array]) -> bool:
    """Whether a device variant's kernel writes a fold's parts as outputs of their own: where the result is
    the parts, not one array (a pair's activation or a residual sum)."""
    return pair is None and residual is None


def apply(value: Any, x: mx.array, weight: Any, bias: Optional[mx.array] = None, splits: Sequence[int] = (),
          caps: Sequence[Optional[float]] = (None,), **fold: Any) -> Any:
    """The device variant's result where one takes the call, else `value` (see the module docstring)."""
    return _variant_or(value, "folded_linear", (x, weight, bias, splits, caps), fold)


def _variant_or(value: Any, name: str, args: tuple, kwargs: dict) -> Any:
    """Kernel `name`'s device variant on (args, kwargs) where one is chosen and takes the call, else `value`."""
    kernel, chosen, variant = chosen_variant(name)
    if variant is None:
        return value
    try:
        return run_variant(kernel, chosen, variant, args, kwargs)
    except Unsupported:
        return value


def head_norm(x: mx.array, weight: mx.array, bias: Optional[mx.array] = None, eps: float = 1e-6, heads: int = 1,
              offset: float = 0.0) -> mx.array:
    """The `multihead_layernorm` node (blocks/mlstm.py `MultiHeadNorm`): a layer norm of each of `heads` slices
    of x's last dim, statistics and normalisation in float32 inside MLX's kernel, rounded once to x's dtype
    (the same numbers as normalising x cast to float32, then casting back: tests/test_kernels.py), then
    times (weight + offset), plus bias."""
    *lead, d = x.shape
    y = mx.fast.layer_norm(x.reshape(*lead, heads, d // heads), None, None, eps).reshape(x.shape)
    y = y * (weight + offset if offset else weight)
    return y + bias if bias is not None else y


def head_norm_gate(gate: mx.array, x: mx.array, weight: mx.array, bias: Optional[mx.array] = None,
                   eps: float = 1e-6, heads: int = 1, offset: float = 0.0, act: str = "sigmoid") -> mx.array:
    """The unfused operations: the `multihead_layernorm` node's (`head_norm`), then the gate's ("<act>_mul",
    kernels/activations.py, as the gate node runs it)."""
    if act not in PAIR_ACTIVATIONS:
        raise ValueError(f"head_norm_gate: act must be one of {PAIR_ACTIVATIONS}, got {act!r}")
    return dispatch(f"{act}_mul")(gate, head_norm(x, weight, bias, eps, heads, offset))


def apply_head_norm_gate(value: mx.array, gate: mx.array, x: mx.array, weight: mx.array,
                         bias: Optional[mx.array] = None, **settings: Any) -> mx.array:
    """The device variant's `head_norm_gate` where one takes the call, else `value`."""
    return _variant_or(value, "head_norm_gate", (gate, x, weight, bias), settings)


register_kernel("folded_linear", folded_linear)
register_kernel("head_norm_gate", head_norm_gate)
