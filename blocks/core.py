"""Core blocks: embedding, linear (bias, tied weight, soft-cap), headwise (block-diagonal) linear, rmsnorm,
layernorm."""

from __future__ import annotations

import math
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from mad.kernels.registry import dispatch
from mad.block import (Block, Cut, Dim, FiniteFloat, FoldForm, LinearForm, OptDim, PositiveFloat, ShapeError,
                       SplitDense, SplitHeads, TensorType, expect_float, expect_last, register, with_last)


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
        # a decode-sized device kernel (bias and soft-cap included) where there is one
        return dispatch("linear")(x, *self.linear_args())[0]

    def linear_args(self) -> tuple:
        """(weight, bias, splits, caps): the `linear` kernel's arguments after x."""
        w = self._tied_weight() if self._tied_weight is not None else self.weight
        return w, self.bias if "bias" in self else None, (), (self._cap,)


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

    def linear_form(self, x: TensorType) -> Optional[LinearForm]:
        if self.tie is not None:
            return None  # its weight is another node's
        return LinearForm("weight", "bias" if self.bias else None, self.softcap)

    def shard_rule(self, x: TensorType) -> Optional[SplitDense]:
        if self.tie is not None:
            return None  # its weight is another node's, whole
        out, bias = int(self.out), self.bias
        return SplitDense("weight", "bias" if bias else None, self.softcap,
                          columns=lambda n: {"out": out // n},
                          rows=lambda with_bias: {"bias": bias and with_bias, "softcap": None})


# --------------------------------------------------------------------------------- norms
def _norm_infer(self, x: TensorType) -> TensorType:
    """A norm over the last dim: float in, the same type out (its `dim`, when given, checked)."""
    if self.dim is not None:
        expect_last(x, self.dim)
    expect_float(x)
    return x


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

    infer = _norm_infer

    def build(self, x: TensorType) -> nn.Module:
        return RMSNormModule(int(x.shape[-1]), self.eps, self.weight)

    def fold_form(self, x: TensorType) -> Optional[FoldForm]:
        return FoldForm("rms_norm", eps=float(self.eps), weight="weight") if self.weight else None


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

    infer = _norm_infer

    def build(self, x: TensorType) -> nn.Module:
        return LayerNormModule(int(x.shape[-1]), self.eps, self.bias, self.weight_offset)


# --------------------------------------------------------------------------------- headwise linear
class HeadwiseLinear(nn.Module):
    """Block-diagonal linear: the last dim is split into `heads` blocks, each with its own matrix.

    weight (heads, out/heads, in/heads) (NX-AI's LinearHeadwiseExpand), optional bias (out,).

    Tiny blocks (the mLSTM's 4 x 4 q, k, v projections) take one of two forms, by the number of rows
    (a shape, fixed when the model is traced): a few rows (decoding) multiply and sum; many rows (a
    prompt, training) one batched matmul over groups of `_group` heads, each group's weight the
    block-diagonal matrix of its heads (zeros elsewhere: for finite x, x * 0 adds nothing), so BLAS does
    the work that a multiply-and-sum over (rows, heads, out, in) would do elementwise. Large blocks
    are a batch of per-head matmuls.
    """

    GROUP_WIDTH = 32  # inputs per group's product: 8 heads of 4 (wider groups multiply more zeros, narrower
    #                   ones make more BLAS calls; 16 to 256 measured, 16 and 32 the fastest)
    MIN_ROWS = 64     # fewer rows: multiply and sum

    def __init__(self, heads: int, d_in: int, d_out: int, bias: bool):
        super().__init__()
        din, dout = d_in // heads, d_out // heads
        self.weight = mx.random.normal((heads, dout, din)) * math.sqrt(2 / 5 / din)
        if bias:
            self.bias = mx.zeros((d_out,))
        self._heads = heads
        self._small = din * dout <= 64  # tiny blocks: multiply and sum beats a batch of tiny matmuls
        # heads per group of the batched form: the most that divide `heads` within GROUP_WIDTH inputs
        self._group = max(g for g in range(1, max(1, self.GROUP_WIDTH // din) + 1) if heads % g == 0)

    def _grouped(self, xh: mx.array) -> mx.array:
        """(N, H, din) -> (N, H, dout) as (H / g) block-diagonal (g din, g dout) products."""
        n, h, din = xh.shape
        g = self._group
        dout = self.weight.shape[1]
        w = self.weight.reshape(h // g, g, dout, din).transpose(0, 1, 3, 2)             # (G, g, din, dout)
        eye = mx.eye(g, dtype=w.dtype)
        wb = (w[:, :, :, None, :] * eye[:, None, :, None]).reshape(h // g, g * din, g * dout)
        y = xh.reshape(n, h // g, g * din).transpose(1, 0, 2) @ wb                     # (G, N, g dout)
        return y.transpose(1, 0, 2).reshape(n, h, dout)

    def __call__(self, x: mx.array) -> mx.array:
        lead, d = x.shape[:-1], x.shape[-1]
        h = self._heads
        xh = x.reshape(-1, h, d // h)                                   # (N, H, din)
        if self._small and xh.shape[0] < self.MIN_ROWS:
            y = (xh[:, :, None, :] * self.weight).sum(-1)               # (N, H, dout)
        elif self._small:
            y = self._grouped(xh)
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

    def shard_rule(self, x: TensorType) -> SplitHeads:
        heads, d_out = int(self.heads), self._sizes(x)[1]
        weights = {"weight": Cut(0), **({"bias": Cut(0)} if self.bias else {})}
        return SplitHeads(heads, weights, local=lambda n: {"heads": heads // n, "out": d_out // n})
