"""Causal depthwise conv1d over time (NX-AI's CausalConv1d), recurrent: its state holds the last inputs."""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from mad.block import Block, Cut, Dim, ShapeError, SplitHeads, TensorType, expect_float, register

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
