"""Basic blocks: embedding, linear (bias, tied weight, soft-cap), rmsnorm, layernorm, add, gate."""

from __future__ import annotations

import math
from typing import Callable, Literal, Optional

import mlx.core as mx
import mlx.nn as nn

from mad.kernels import activations, linear_device  # noqa: F401  (register the kernels and variants)
from mad.kernels.registry import dispatch, kernels
from mad.block import (Block, Dim, FiniteFloat, OptDim, PositiveFloat, ShapeError, TensorType, expect_float, expect_last,
                       register, same_types, with_last)

ACTIVATIONS: dict[str, Callable[[mx.array], mx.array]] = {
    # kernels: the function is picked for the device when the model is traced (kernels/activations.py)
    "sigmoid": lambda x: dispatch("sigmoid")(x),
    "silu": lambda x: dispatch("silu")(x),
    "gelu": nn.gelu,
    "gelu_tanh": nn.gelu_approx,
    "relu": nn.relu,
    "identity": lambda x: x,
}
Activation = Literal["sigmoid", "silu", "gelu", "gelu_tanh", "relu", "identity"]


def gated(act: str) -> Callable[[mx.array, mx.array], mx.array]:
    """(g, x) -> act(g) * x: the kernel "<act>_mul" where one is registered ("sigmoid_mul", "silu_mul": on
    the CPU one division, kernels/activations.py), else the activation then the product."""
    if f"{act}_mul" in kernels():
        return lambda g, x: dispatch(f"{act}_mul")(g, x)
    fn = ACTIVATIONS[act]
    return lambda g, x: fn(g) * x


# --------------------------------------------------------------------------------- embedding
@register("embedding")
class EmbeddingBlock(Block):
    """Token ids (B, T) int32 -> vectors (B, T, dim). Weight `weight` [vocab, dim]."""

    positionwise = True

    vocab: Dim
    dim: Dim

    def infer(self, x: TensorType) -> TensorType:
        if x.dtype != "int32":
            raise ShapeError(f"embedding reads int32 token ids, got {x}")
        return TensorType((*x.shape, self.dim), "float")

    def build(self, x: TensorType) -> nn.Module:
        return nn.Embedding(self.vocab, self.dim)


# --------------------------------------------------------------------------------- linear
class LinearModule(nn.Module):
    """y = x W^T (+ b), optionally soft-capped. A tied linear reads another module's `weight`."""

    def __init__(self, d_in: int, d_out: int, bias: bool, cap: Optional[float], tied: bool):
        super().__init__()
        if not tied:
            scale = math.sqrt(1.0 / d_in)
            self.weight = mx.random.uniform(-scale, scale, (d_out, d_in))
        if bias:
            self.bias = mx.zeros((d_out,))
        self._cap = cap
        self._tied_weight: Optional[Callable[[], mx.array]] = None

    def tie(self, source: nn.Module) -> None:
        self._tied_weight = lambda: source.weight

    def __call__(self, x: mx.array) -> mx.array:
        w = self._tied_weight() if self._tied_weight is not None else self.weight
        # a decode-sized device kernel (bias and soft-cap included) where there is one
        return dispatch("linear")(x, w, self.bias if "bias" in self else None, (), (self._cap,))[0]


@register("linear")
class LinearBlock(Block):
    """(..., D_in) -> (..., out). Weight `weight` [out, D_in], optional `bias` [out]."""

    positionwise = True

    out: Dim
    bias: bool = False
    softcap: Optional[PositiveFloat] = None  # c > 0: c * tanh(y / c)
    tie: Optional[str] = None  # node whose `weight` [out, D_in] this linear uses (e.g. the embedding)

    def infer(self, x: TensorType) -> TensorType:
        expect_float(x)
        return with_last(x, self.out)

    def build(self, x: TensorType) -> nn.Module:
        return LinearModule(int(x.shape[-1]), self.out, self.bias, self.softcap, self.tie is not None)


# --------------------------------------------------------------------------------- norms
class RMSNormModule(nn.Module):
    def __init__(self, dim: int, eps: float, weight: bool):
        super().__init__()
        if weight:
            self.weight = mx.ones((dim,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight if "weight" in self else None, self.eps)


@register("rmsnorm")
class RMSNormBlock(Block):
    """x * rsqrt(mean(x^2) + eps) * weight, over the last dim (accumulated in float32)."""

    positionwise = True

    eps: PositiveFloat = 1e-6
    weight: bool = True
    dim: OptDim = None  # checked against the input when given

    def infer(self, x: TensorType) -> TensorType:
        if self.dim is not None:
            expect_last(x, self.dim)
        expect_float(x)
        return x

    def build(self, x: TensorType) -> nn.Module:
        return RMSNormModule(int(x.shape[-1]), self.eps, self.weight)


class LayerNormModule(nn.Module):
    def __init__(self, dim: int, eps: float, bias: bool, weight_offset: float):
        super().__init__()
        # with weight_offset 1 the stored weight starts at 0 and the effective scale is (1 + weight)
        self.weight = mx.full((dim,), 1.0 - weight_offset)
        if bias:
            self.bias = mx.zeros((dim,))
        self.eps, self.offset = eps, weight_offset

    def __call__(self, x: mx.array) -> mx.array:
        w = self.weight + self.offset if self.offset else self.weight
        return mx.fast.layer_norm(x, w, self.bias if "bias" in self else None, self.eps)


@register("layernorm")
class LayerNormBlock(Block):
    """(x - mean) / sqrt(var + eps) * (weight_offset + weight) (+ bias), over the last dim."""

    positionwise = True

    eps: PositiveFloat = 1e-5
    bias: bool = True
    weight_offset: FiniteFloat = 0.0
    dim: OptDim = None

    def infer(self, x: TensorType) -> TensorType:
        if self.dim is not None:
            expect_last(x, self.dim)
        expect_float(x)
        return x

    def build(self, x: TensorType) -> nn.Module:
        return LayerNormModule(int(x.shape[-1]), self.eps, self.bias, self.weight_offset)


# --------------------------------------------------------------------------------- elementwise
def _add(*xs: mx.array) -> mx.array:
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


@register("add")
class AddBlock(Block):
    """Sum of two or more inputs of the same shape (a residual connection)."""

    positionwise = True

    ports = ("x",)
    variadic = True

    def infer(self, *xs: TensorType) -> TensorType:
        if len(xs) < 2:
            raise ShapeError(f"add needs at least two inputs, got {len(xs)}")
        for x in xs:
            expect_float(x)
        return same_types(xs, "add inputs")

    def build(self, *xs: TensorType) -> Callable:
        return _add


@register("gate")
class GateBlock(Block):
    """act(gate) * x: output gates (sigmoid) and GLU-style feed-forwards (silu, gelu)."""

    positionwise = True

    ports = ("gate", "x")
    act: Activation = "sigmoid"

    def infer(self, gate: TensorType, x: TensorType) -> TensorType:
        expect_float(gate, "gate")
        return same_types((gate, x), "gate and x")

    def build(self, gate: TensorType, x: TensorType) -> Callable:
        return gated(self.act)
