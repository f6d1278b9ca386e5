"""Gated feed-forward blocks in one node: swiglu and gated-gelu.

Weights (mlx-lm / Llama names): `gate_proj` [F, D], `up_proj` [F, D], `down_proj` [D, F].
The hidden size F is `hidden`, or `round_up(int(D * factor), round_to)`.
Topologies that must mirror other checkpoint names wire the same thing from `linear` and `gate` nodes.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import mlx.core as mx
import mlx.nn as nn

from mad.block import (Block, Cut, OptDim, PositiveFloat, PositiveInt, ShapeError, SplitHidden, TensorType,
                       expect_float, register)
from mad.dims import round_up

from .wiring import gated


class GatedFFN(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self._gated = gated(act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self._gated(self.gate_proj(x), self.up_proj(x)))


class _GatedFFNBlock(Block):
    positionwise = True

    hidden: OptDim = None
    factor: Optional[PositiveFloat] = None
    round_to: PositiveInt = 1
    bias: bool = False
    act: ClassVar[str] = "silu"

    def hidden_size(self, dim: int) -> int:
        if (self.hidden is None) == (self.factor is None):
            raise ShapeError("give exactly one of 'hidden' or 'factor'")
        return int(self.hidden) if self.hidden is not None else round_up(int(dim * self.factor), self.round_to)

    def infer(self, x: TensorType) -> TensorType:
        expect_float(x)
        self.hidden_size(int(x.shape[-1]))
        return x

    def build(self, x: TensorType) -> nn.Module:
        dim = int(x.shape[-1])
        return GatedFFN(dim, self.hidden_size(dim), self.bias, self.act)

    def shard_rule(self, x: TensorType) -> Optional[SplitHidden]:
        if self.bias:
            return None  # every member would add down_proj's bias to its partial sum
        hidden = self.hidden_size(int(x.shape[-1]))
        return SplitHidden(hidden, {"gate_proj.weight": Cut(0), "up_proj.weight": Cut(0), "down_proj.weight": Cut(1)},
                           local=lambda n: {"hidden": hidden // n, "factor": None})


@register("swiglu")
class SwiGLUBlock(_GatedFFNBlock):
    """down(silu(gate(x)) * up(x)): (..., D) -> (..., D)."""

    act: ClassVar[str] = "silu"


@register("gated_gelu")
class GatedGeluBlock(_GatedFFNBlock):
    """down(gelu(gate(x)) * up(x)): (..., D) -> (..., D)."""

    act: ClassVar[str] = "gelu"
