"""The collectives of a tensor-parallel graph: the nodes `mad.shard` inserts where a member's values meet.

A value split over the n members of a group is held as parts: its last dim is `segments` consecutive
segments, each cut into n equal pieces, and member r holds piece r of every segment, concatenated (one
segment when a projection is simply split by columns; two when the split value is later sliced in two,
as a fused up-projection's [x | z]).

    all_sum      partial sums (each member's product with its rows of a weight; sibling linears' together)
                 -> the whole values on every member, then the soft-caps the row-split linears declare
    all_gather   a split value -> the whole value on every member
    shard        a whole value -> this member's parts (no communication)

These types are not registered: a topology cannot name them (they need a group); only the pass writes
them into a member's graph. The group is a field of the spec, kept out of its dumps.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import mlx.core as mx
from pydantic import Field

from mad.block import Block, PositiveFloat, ShapeError, TensorType, expect_float, with_last
from mad.kernels.linear import softcap


def _pieces(segments: tuple[int, ...], n: int) -> list[tuple[int, int]]:
    """(global start, size of a member's piece) of each segment."""
    out, start = [], 0
    for seg in segments:
        out.append((start, seg // n))
        start += seg
    return out


class _Collective(Block):
    """A node of a member's graph that reads one value of every member's graph (or its own parts)."""

    positionwise = True

    group: Any = Field(None, exclude=True)  # the mx.distributed.Group
    members: int = 1                        # the group's size
    segments: tuple[int, ...] = ()          # global sizes of the value's segments (all_gather, shard)


class AllSumBlock(_Collective):
    """Sum over the group of one or more partial sums (of sibling linears: one collective for all), as their
    concatenation, each part then soft-capped (c * tanh(y / c)) by its entry of `softcaps`, when given."""

    type: str = "all_sum"
    variadic = True
    softcaps: tuple[Optional[PositiveFloat], ...] = ()

    def infer(self, *xs: TensorType) -> TensorType:
        for x in xs:
            expect_float(x)
            if x.shape[:-1] != xs[0].shape[:-1]:
                raise ShapeError(f"all_sum inputs differ before the last dim: {xs[0]} vs {x}")
        return with_last(xs[0], sum(int(x.shape[-1]) for x in xs))

    def build(self, *xs: TensorType) -> Callable:
        group = self.group
        caps = list(self.softcaps) or [None] * len(xs)
        bounds = [0]
        for x in xs:
            bounds.append(bounds[-1] + int(x.shape[-1]))

        def all_sum(*vs: mx.array) -> mx.array:
            y = mx.distributed.all_sum(vs[0] if len(vs) == 1 else mx.concatenate(vs, axis=-1), group=group)
            if not any(caps):
                return y
            parts = [y[..., a:b] for a, b in zip(bounds, bounds[1:])]
            parts = [softcap(p, c) if c else p for p, c in zip(parts, caps)]
            return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)

        return all_sum


class AllGatherBlock(_Collective):
    """This member's parts of a split value (B, ..., W / n) -> the whole value (B, ..., W) on every member."""

    type: str = "all_gather"

    def infer(self, x: TensorType) -> TensorType:
        expect_float(x)
        n = self.members
        if int(x.shape[-1]) * n != sum(self.segments):
            raise ShapeError(f"all_gather: parts of width {int(x.shape[-1])} over {n} members do not make "
                             f"segments {self.segments}")
        return with_last(x, sum(self.segments))

    def build(self, x: TensorType) -> Callable:
        group, n = self.group, self.members
        sizes = [size for _, size in _pieces(self.segments, n)]

        def all_gather(v: mx.array) -> mx.array:
            lead = v.shape[:-1]
            g = mx.distributed.all_gather(v, group=group).reshape(n, *lead, v.shape[-1])  # members first
            parts, start = [], 0
            for size in sizes:  # segment by segment: the members' pieces side by side
                piece = mx.moveaxis(g[..., start:start + size], 0, -2)
                parts.append(piece.reshape(*lead, n * size))
                start += size
            return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)

        return all_gather


class ShardBlock(_Collective):
    """A whole value (B, ..., W) -> member `rank`'s parts (B, ..., W / n): a local slice, no communication."""

    type: str = "shard"
    rank: int = 0

    def infer(self, x: TensorType) -> TensorType:
        expect_float(x)
        if int(x.shape[-1]) != sum(self.segments):
            raise ShapeError(f"shard: the value has width {int(x.shape[-1])}, the segments {self.segments}")
        return with_last(x, sum(self.segments) // self.members)

    def build(self, x: TensorType) -> Callable:
        ranges = [(start + self.rank * size, start + (self.rank + 1) * size)
                  for start, size in _pieces(self.segments, self.members)]

        def shard(v: mx.array) -> mx.array:
            parts = [v[..., a:b] for a, b in ranges]
            return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)

        return shard
