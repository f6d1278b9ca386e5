"""Wiring blocks: the weightless glue between layers (add, gate, slice, concat, activation) and a learnable
per-channel scale (channel_scale). `ACTIVATIONS` and `gated` are shared with the feed-forward blocks."""

from __future__ import annotations

from typing import Callable, Literal, Optional

import mlx.core as mx
import mlx.nn as nn

from mad.kernels.registry import dispatch, kernels
from mad.block import (Block, Cut, Dim, FoldForm, NonNegDim, ShapeError, SplitConcat, SplitHeads, SplitSlice,
                       TensorType, expect_float, register, same_types, with_last)
from mad.dims import shape_str

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

    def fold_form(self, *xs: TensorType) -> Optional[FoldForm]:
        return FoldForm("add") if len(xs) == 2 else None

    def shard_rule(self, *xs: TensorType) -> SplitHeads:
        return SplitHeads.channels(int(xs[0].shape[-1]))


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

    def fold_form(self, gate: TensorType, x: TensorType) -> Optional[FoldForm]:
        return FoldForm("gate", act=self.act)

    def shard_rule(self, gate: TensorType, x: TensorType) -> SplitHeads:
        return SplitHeads.channels(int(x.shape[-1]))


# --------------------------------------------------------------------------------- slicing and activations
@register("slice")
class SliceBlock(Block):
    """x[..., start:start+size]: one part of a fused projection (e.g. NX-AI's proj_up -> x_mlstm, z)."""

    positionwise = True

    start: NonNegDim = 0
    size: Dim

    def infer(self, x: TensorType) -> TensorType:
        expect_float(x)
        if self.start < 0 or self.size < 1 or self.start + self.size > int(x.shape[-1]):
            raise ShapeError(f"slice [{int(self.start)}:{int(self.start) + int(self.size)}] is outside the last "
                             f"dim of {shape_str(x.shape)}")
        return with_last(x, self.size)

    def build(self, x: TensorType):
        start, stop = int(self.start), int(self.start) + int(self.size)
        return lambda v: v[..., start:stop]

    def shard_rule(self, x: TensorType) -> SplitSlice:
        return SplitSlice(int(self.start), int(self.size), local=lambda start, size: {"start": start, "size": size})


@register("concat")
class ConcatBlock(Block):
    """Concatenation of two or more inputs along the last dim (other dims equal)."""

    positionwise = True

    variadic = True

    def infer(self, *xs: TensorType) -> TensorType:
        if len(xs) < 2:
            raise ShapeError(f"concat needs at least two inputs, got {len(xs)}")
        for x in xs:
            expect_float(x)
            if x.shape[:-1] != xs[0].shape[:-1] or x.dtype != xs[0].dtype:
                raise ShapeError(f"concat inputs differ before the last dim: {xs[0]} vs {x}")
        return with_last(xs[0], sum(int(x.shape[-1]) for x in xs))

    def build(self, *xs: TensorType):
        return lambda *vs: mx.concatenate(vs, axis=-1)

    def shard_rule(self, *xs: TensorType) -> SplitConcat:
        return SplitConcat()


@register("activation")
class ActivationBlock(Block):
    """act(x) elementwise: sigmoid, silu, gelu (exact, as torch's default), gelu_tanh, relu, identity."""

    positionwise = True

    act: Activation = "silu"

    def infer(self, x: TensorType) -> TensorType:
        expect_float(x)
        return x

    def build(self, x: TensorType):
        return ACTIVATIONS[self.act]

    def shard_rule(self, x: TensorType) -> SplitHeads:
        return SplitHeads.channels(int(x.shape[-1]))


class ScaleModule(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        return x * self.weight


@register("channel_scale")
class ScaleBlock(Block):
    """x * weight over the last dim (a learnable elementwise scale, e.g. NX-AI's learnable_skip)."""

    positionwise = True

    def infer(self, x: TensorType) -> TensorType:
        expect_float(x)
        return x

    def build(self, x: TensorType) -> nn.Module:
        return ScaleModule(int(x.shape[-1]))

    def shard_rule(self, x: TensorType) -> SplitHeads:
        return SplitHeads.channels(int(x.shape[-1]), {"weight": Cut(0)})
