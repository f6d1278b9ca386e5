"""Blocks of the original xLSTM stack (NX-AI `xLSTMLMModel`): sLSTM cell, causal conv1d, headwise linear,
and the small wiring blocks its layers need (slice, concat, activation, channel_scale).

The mLSTM v1 and sLSTM layers are wired from these in `topologies/xlstm-v1-125m.yaml`, with node names
that mirror NX-AI's module names, so its checkpoints load by name:

    mLSTM v1:  x_mlstm, z = split(proj_up(h));  x_c = silu(conv1d(x_mlstm))
               q, k = q_proj(x_c), k_proj(x_c);  v = v_proj(x_mlstm)           (headwise_linear)
               i, f = igate([q k v]), fgate([q k v])                             (concat, linear)
               h_cell = outnorm(mLSTM cell(q, k, v, i, f)), 1/sqrt(DH) on k      (mlstm_cell scale: k)
               y = proj_down((h_cell + learnable_skip * x_c) * silu(z))         (channel_scale, add, gate)
    sLSTM:     x_c = silu(conv1d(x));  i, f = fgate(x_c), igate(x_c);  z, o = zgate(x), ogate(x)
               y = group_norm(sLSTM cell(i, f, z, o))                            (slstm_cell)

The sLSTM recurrence lives in `mad.kernels.slstm` (pure MLX; device kernels are tested against it).
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from mad.block import (Block, Dim, NonNegDim, OptDim, ShapeError, TensorType, expect_float, register, same_types,
                       with_last)
from mad.dims import shape_str
from mad.kernels import slstm_device  # noqa: F401  (registers the device variant)
from mad.kernels.registry import dispatch

from .basic import ACTIVATIONS, Activation


# --------------------------------------------------------------------------------- wiring
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


# --------------------------------------------------------------------------------- headwise linear
class HeadwiseLinear(nn.Module):
    """Block-diagonal linear: the last dim is split into `heads` blocks, each with its own matrix.

    weight (heads, out/heads, in/heads) (NX-AI's LinearHeadwiseExpand), optional bias (out,).
    """

    def __init__(self, heads: int, d_in: int, d_out: int, bias: bool):
        super().__init__()
        din, dout = d_in // heads, d_out // heads
        self.weight = mx.random.normal((heads, dout, din)) * math.sqrt(2 / 5 / din)
        if bias:
            self.bias = mx.zeros((d_out,))
        self._heads = heads
        self._small = din * dout <= 64  # tiny blocks: multiply and sum beats a batch of tiny matmuls

    def __call__(self, x: mx.array) -> mx.array:
        lead, d = x.shape[:-1], x.shape[-1]
        h = self._heads
        xh = x.reshape(-1, h, d // h)                                   # (N, H, din)
        if self._small:
            y = (xh[:, :, None, :] * self.weight).sum(-1)               # (N, H, dout)
        else:
            y = (xh.transpose(1, 0, 2) @ self.weight.transpose(0, 2, 1)).transpose(1, 0, 2)
        y = y.reshape(*lead, -1)
        return y + self.bias if "bias" in self else y


@register("headwise_linear")
class HeadwiseLinearBlock(Block):
    """(..., D_in) -> (..., out) with a block-diagonal weight: `heads` independent (out/heads, D_in/heads)
    matrices on consecutive slices of the last dim. Weight `weight` [heads, out/heads, D_in/heads],
    optional `bias` [out]. `out` defaults to D_in."""

    positionwise = True

    heads: Dim
    out: OptDim = None
    bias: bool = False

    def _sizes(self, x: TensorType) -> tuple[int, int]:
        expect_float(x)
        d_in = int(x.shape[-1])
        d_out = int(self.out) if self.out is not None else d_in
        if self.heads < 1 or d_in % self.heads or d_out % self.heads:
            raise ShapeError(f"in ({d_in}) and out ({d_out}) must be multiples of heads={int(self.heads)}")
        return d_in, d_out

    def infer(self, x: TensorType) -> TensorType:
        return with_last(x, self._sizes(x)[1])

    def build(self, x: TensorType) -> nn.Module:
        return HeadwiseLinear(int(self.heads), *self._sizes(x), self.bias)


# --------------------------------------------------------------------------------- causal conv1d
class _ConvWeights(nn.Module):
    def __init__(self, dim: int, kernel: int, bias: bool):
        super().__init__()
        bound = 1.0 / math.sqrt(kernel)  # torch's default for a depthwise conv (fan_in = kernel)
        self.weight = mx.random.uniform(-bound, bound, (dim, 1, kernel))
        if bias:
            self.bias = mx.random.uniform(-bound, bound, (dim,))


class CausalConv1d(nn.Module):
    """Depthwise causal conv over time: y_t = b + sum_j w[:, 0, j] * x_{t-K+1+j} (x_s = 0 before the start,
    or the state's inputs). State `x`: the last K-1 inputs (B, K-1, F), float32 (exact for any input dtype).
    NX-AI's step state holds the last K inputs in the weights' dtype; the oldest is rolled out before the
    next product, so the K-1 newest carry the same information."""

    def __init__(self, dim: int, kernel: int, bias: bool):
        super().__init__()
        self.conv = _ConvWeights(dim, kernel, bias)  # weight names as NX-AI: conv.weight, conv.bias
        self._k = kernel

    def __call__(self, x: mx.array, state: Optional[dict] = None, mode: str = "auto"):
        B, T, F = x.shape
        k = self._k
        prev = state["x"].astype(x.dtype) if state is not None else mx.zeros((B, k - 1, F), dtype=x.dtype)
        xp = mx.concatenate([prev, x], axis=1)                         # (B, K-1+T, F)
        w = self.conv.weight[:, 0, :].astype(x.dtype)                    # (F, K)
        y = xp[:, 0:T] * w[:, 0]
        for j in range(1, k):
            y = y + xp[:, j:j + T] * w[:, j]
        if "bias" in self.conv:
            y = y + self.conv.bias
        return y, {"x": xp[:, T:].astype(mx.float32)}


class _PointwiseConv(CausalConv1d):
    """Kernel size 1: no state."""

    def __call__(self, x: mx.array) -> mx.array:  # type: ignore[override]
        y = x * self.conv.weight[:, 0, 0]
        return y + self.conv.bias if "bias" in self.conv else y


@register("causal_conv1d")
class CausalConv1dBlock(Block):
    """Causal depthwise conv1d over time (B, T, F) -> (B, T, F); weights `conv.weight` [F, 1, K] and
    `conv.bias` [F] (NX-AI's CausalConv1d). Recurrent: state `x` (B, K-1, F) float32 holds the last
    K-1 inputs, so a prefill followed by single steps equals one pass."""

    modes = ("step", "parallel")
    kernel_size: Dim = 4
    bias: bool = True

    def infer(self, x: TensorType) -> TensorType:
        expect_float(x)
        if len(x.shape) != 3:
            raise ShapeError(f"causal_conv1d reads (B, T, F), got {x}")
        if self.kernel_size < 1:
            raise ShapeError(f"kernel_size must be >= 1, got {int(self.kernel_size)}")
        return x

    def state(self, x: TensorType) -> dict[str, TensorType]:
        if self.kernel_size == 1:
            return {}
        return {"x": TensorType((x.shape[0], int(self.kernel_size) - 1, x.shape[-1]), "float32")}

    def build(self, x: TensorType) -> nn.Module:
        cls = _PointwiseConv if self.kernel_size == 1 else CausalConv1d
        return cls(int(x.shape[-1]), int(self.kernel_size), self.bias)


# --------------------------------------------------------------------------------- sLSTM cell
class SLSTMCell(nn.Module):
    """Gate pre-activations i, f, z, o (B, T, NH*DH) -> h (B, T, NH*DH), state (y, c, n, m) float32.

    Weights: `recurrent_kernel` (NH, 4*DH, DH) and `bias` (4*NH*DH,), NX-AI's vanilla layouts of
    `_recurrent_kernel_` and `_bias_` (see `mad.kernels.slstm`).
    """

    def __init__(self, heads: int, dim: int):
        super().__init__()
        dh = dim // heads
        self.recurrent_kernel = mx.zeros((heads, 4 * dh, dh))
        # forget-gate bias spread over (3, 6) so fresh models remember; other gates 0
        f_bias = mx.broadcast_to(mx.linspace(3.0, 6.0, dh), (heads, dh)).reshape(-1)
        self.bias = mx.concatenate([mx.zeros((dim,)), f_bias, mx.zeros((2 * dim,))])
        self._heads = heads

    def _heads_first(self, x: mx.array) -> mx.array:
        b, t, _ = x.shape
        return x.reshape(b, t, self._heads, -1).transpose(0, 2, 1, 3)

    def __call__(self, i, f, z, o, state: Optional[dict] = None, mode: str = "auto"):
        cell_state = None if state is None else (state["y"], state["c"], state["n"], state["m"])
        h, (y, c, n, m) = dispatch("slstm_sequence")(*(self._heads_first(g) for g in (i, f, z, o)),
                                         self.recurrent_kernel, self.bias, cell_state)
        b, _, t, _ = h.shape
        return h.transpose(0, 2, 1, 3).reshape(b, t, -1), {"y": y, "c": c, "n": n, "m": m}


@register("slstm_cell")
class SLSTMCellBlock(Block):
    """The sLSTM scalar-memory cell over NH heads with block-diagonal recurrent weights and stabilised
    exponential gating (NX-AI's vanilla backend). Inputs: the gate pre-activations W x of the input gate
    i, forget gate f, cell input z and output gate o, each (B, T, NH*DH), head-interleaved. Weights
    `recurrent_kernel` [NH, 4*DH, DH] (gate-major rows i, f, z, o) and `bias` [4*NH*DH] (gate-major).
    State per sequence: y, c, n, m (NH, DH) float32. Mind NX-AI's wiring: its module `fgate` feeds i."""

    ports = ("i", "f", "z", "o")
    modes = ("step",)
    heads: Dim

    def infer(self, i, f, z, o) -> TensorType:
        for name, g in (("i", i), ("f", f), ("z", z), ("o", o)):
            expect_float(g, name)
        same_types((i, f, z, o), "gate inputs i, f, z, o")
        if len(i.shape) != 3 or int(i.shape[-1]) % self.heads:
            raise ShapeError(f"gates: expected (B, T, heads*dim) with heads={int(self.heads)}, got {i}")
        return i

    def state(self, i, f, z, o) -> dict[str, TensorType]:
        shape = (i.shape[0], int(self.heads), int(i.shape[-1]) // int(self.heads))
        return {name: TensorType(shape, "float32") for name in ("y", "c", "n", "m")}

    def build(self, *inputs: TensorType) -> nn.Module:
        return SLSTMCell(int(self.heads), int(inputs[0].shape[-1]))


__all__ = ["SliceBlock", "ConcatBlock", "ActivationBlock", "ScaleBlock", "HeadwiseLinearBlock",
           "CausalConv1dBlock", "SLSTMCellBlock"]
