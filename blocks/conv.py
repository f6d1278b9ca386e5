"""Causal depthwise conv1d over time (NX-AI's CausalConv1d), recurrent: its state holds the last inputs."""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from mad.block import Block, Cut, Dim, ShapeError, SplitHeads, TensorType, expect_float, register


def _taps(xp: mx.array, wt: mx.array, length: int) -> mx.array:
    """sum_j xp[:, j:j+length] * wt[j]: xp (B, L, F), wt (K, F), taps in order (the j-th tap reads the
    j-th oldest input of the window); each tap's weight row is contiguous."""
    y = xp[:, 0:length] * wt[0]
    for j in range(1, wt.shape[0]):
        y = y + xp[:, j:j + length] * wt[j]
    return y


@mx.custom_function
def _conv(xp: mx.array, wt: mx.array) -> mx.array:
    """The taps of a causal depthwise conv: xp (B, T+K-1, F) (K-1 past inputs, then the T new ones),
    wt (K, F) -> (B, T, F), no bias."""
    return _taps(xp, wt, xp.shape[1] - wt.shape[0] + 1)


def _conv_vjp(primals: list, cotangent: mx.array, output: mx.array) -> tuple[mx.array, mx.array]:
    """The gradient as a few fused multiply-adds and one column sum per tap. The cotangent of an input is
    the same taps run backwards over the cotangent padded with K-1 zeros on each side:
    d xp[s] = sum_j wt[j] g[s - j]. A tap's weight gradient is sum over (batch, time) of g * its input
    window, contiguous. (Autodiff of the forward pads a full copy of xp per tap and sums over a strided
    window: several times slower on the CPU.)"""
    xp, wt = primals
    g = cotangent
    B, L, F = xp.shape
    K = wt.shape[0]
    T = L - K + 1
    zeros = mx.zeros((B, K - 1, F), dtype=g.dtype)
    gp = mx.concatenate([zeros, g, zeros], axis=1)              # (B, T + 2K - 2, F)
    d_xp = _taps(gp, wt[::-1], L)                               # tap j of the window reads g[s - (K-1-j)]
    d_wt = mx.stack([(g * xp[:, j:j + T]).sum(axis=(0, 1)) for j in range(K)])
    return d_xp, d_wt


_conv.vjp(_conv_vjp)


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
    next product, so the K-1 newest carry the same information. `valid`: the positions from it on are
    padding; the state keeps the K-1 inputs up to position valid - 1."""

    inert_padding = True

    def __init__(self, dim: int, kernel: int, bias: bool):
        super().__init__()
        self.conv = _ConvWeights(dim, kernel, bias)  # weight names as NX-AI: conv.weight, conv.bias
        self._k = kernel

    def __call__(self, x: mx.array, state: Optional[dict] = None, mode: str = "auto", valid: Optional[mx.array] = None):
        B, T, F = x.shape
        k = self._k
        prev = state["x"].astype(x.dtype) if state is not None else mx.zeros((B, k - 1, F), dtype=x.dtype)
        xp = mx.concatenate([prev, x], axis=1)                         # (B, K-1+T, F)
        w = self.conv.weight[:, 0, :].astype(x.dtype)                    # (F, K)
        # one step (decoding): plain taps; a sequence: through `_conv`, for its gradient
        y = _taps(xp, w.T, T) if T == 1 else _conv(xp, mx.contiguous(w.T))
        if "bias" in self.conv:
            y = y + self.conv.bias
        last = xp[:, T:] if valid is None else mx.take(xp, valid + mx.arange(k - 1), axis=1)
        return y, {"x": last.astype(mx.float32)}


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

    def shard_rule(self, x: TensorType) -> SplitHeads:
        # depthwise: each channel has its own filter and its own past inputs
        weights = {"conv.weight": Cut(0), **({"conv.bias": Cut(0)} if self.bias else {})}
        return SplitHeads.channels(int(x.shape[-1]), weights, {"x": Cut(2)} if self.kernel_size > 1 else {})
