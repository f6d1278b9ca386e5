"""Graph-level passes over a checked `Graph`: rewrites of how nodes run that leave the model unchanged.

Sibling-linear fusion
---------------------
Several `linear` nodes that read the same value, like q, k, v, the output gate and the i/f gates of an
mLSTM layer, or the up and gate projections of a feed-forward, are one matrix multiply in disguise:

    [y_1 | y_2 | ... | y_n] = x @ [W_1; W_2; ...; W_n]^T

`find_sibling_linears` finds such groups in any graph (it knows no block or model names);
`FusedLinear` runs one group as a single matmul (the `linear` block's own module, over the
concatenation) whose output is split back into the members' outputs, each with its own bias and
soft-cap. Fewer, larger matmuls mean fewer kernel launches and fewer compiled-function inputs, which
is what decode (batch 1, one token, launch-bound on a GPU) needs; each output element is still the
same dot product of one row of x with one row of W, so results agree with the unfused graph to
rounding (equal, on the CPU). On the CPU a multi-token call computes each member's part as a product of
its own (the `linear` kernel's CPU variant, kernels/linear.py): the members' outputs are then
contiguous arrays, which MLX's CPU elementwise kernels read much faster than split columns.

Checkpoints do not change: a `FusedLinear` owns the concatenated weight and bias (one copy in
memory), `named_parameters()` gives the members' weights and biases back under their own names and
shapes as slices of them (views, no copies), and `load()` rebuilds the concatenations from pieces
named per member. `mad.program.Program(fuse=...)` decides whether the pass is applied; the Program
runs a group at its first member and puts every member's output under the member's name.

A node joins a group when
  - its module is exactly `LinearModule` (the `linear` block: y = x W^T (+ b), optionally soft-capped;
    a subclass might compute something else, so it is left alone),
  - it is not tied (`tie:` reads another node's weight) and no node ties to it (its weight is someone
    else's too), and
  - with `by_stage` (a Program compiled stage by stage), it runs in the same stage as the others: a
    compiled stage can only produce its own nodes. A whole-program compile fuses across stages.
Reading exactly the same value implies the same input width. Other block types that read the same
value (a norm, a `swiglu` with its own projections inside) are not touched: their weights are internal
to their module, not separate nodes of the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .graph import Graph
from .kernels.registry import dispatch


@dataclass(frozen=True)
class FusionGroup:
    """Sibling `linear` nodes computed as one matmul. Members are in execution order."""

    source: str                          # the value every member reads (a node or a graph input)
    members: tuple[str, ...]
    widths: tuple[int, ...]              # each member's output size (rows of its weight)
    d_in: int
    bias: tuple[bool, ...]               # which members have a bias
    softcap: tuple[Optional[float], ...]  # each member's soft-cap (None: none)

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """Each member's rows [start, stop) of the concatenated weight (= columns of the fused output)."""
        out, start = [], 0
        for w in self.widths:
            out.append((start, start + w))
            start += w
        return out

    def describe(self) -> dict:
        """The group as data (for `plan.json`)."""
        return {"input": self.source, "nodes": list(self.members),
                "out": list(self.widths), "in": self.d_in}


def _basic():
    import mad.blocks.basic  # the block library imports the core: import it when the pass runs

    return mad.blocks.basic


def fusable_linears(graph: Graph) -> list[str]:
    """Nodes the fusion pass may merge: untied `LinearModule`s that no other node ties to."""
    g = graph.g
    linear = _basic().LinearModule
    tie_sources = {getattr(g.nodes[n]["spec"], "tie", None) for n in graph.blocks()}
    out = []
    for n in graph.blocks():
        module = g.nodes[n].get("module")
        if (type(module) is linear and "weight" in module and module._tied_weight is None
                and getattr(g.nodes[n]["spec"], "tie", None) is None and n not in tie_sources
                and len(g.nodes[n]["inputs"]) == 1):
            out.append(n)
    return out


def find_sibling_linears(graph: Graph, by_stage: bool = False) -> list[FusionGroup]:
    """Groups of >= 2 fusable linear nodes that read the same value (and, with `by_stage`, run in
    the same stage).

    Groups are listed in the order of their first member; members in execution order. A group runs
    where its first member would: every member only needs the shared input, computed before that.
    """
    g = graph.g
    by_source: dict[tuple[str, str | None], list[str]] = {}
    for n in fusable_linears(graph):  # graph.blocks() order = execution order
        by_source.setdefault((g.nodes[n]["inputs"][0], g.nodes[n]["stage"] if by_stage else None), []).append(n)
    groups = []
    for (source, _), members in by_source.items():
        if len(members) < 2:
            continue
        modules = [g.nodes[m]["module"] for m in members]
        groups.append(FusionGroup(
            source=source, members=tuple(members),
            widths=tuple(int(m.weight.shape[0]) for m in modules), d_in=int(modules[0].weight.shape[1]),
            bias=tuple("bias" in m for m in modules), softcap=tuple(m._cap or None for m in modules)))
    return groups


class FusedLinear(nn.Module):
    """One `FusionGroup` as one matmul: `x -> [y_1, ..., y_n]`, the members' outputs in order.

    It runs the `linear` kernel that each member's own `linear` node runs (`kernels.linear`: matmul, bias,
    soft-cap), once for all members: the output is split back at the members' bounds and each part gets
    its member's soft-cap, so every output element is computed as unfused. Its parameters live in a
    `LinearModule` (`self.linear`, no soft-cap): `linear.weight` [sum of widths, d_in], the members'
    weights stacked by rows, and, when any member has a bias, `linear.bias` [sum of widths], the
    members' biases end to end with zeros for the members without one. The bias is added inside the
    matmul (`addmm`, or the device kernel's float32 sum), so each output is rounded once, as unfused
    (an add after a bfloat16 matmul would round twice), and adding zero changes nothing for the
    members without a bias.
    """

    def __init__(self, group: FusionGroup, weights: list[mx.array], biases: dict[int, mx.array]):
        super().__init__()
        self.linear = _basic().LinearModule(group.d_in, sum(group.widths), bool(biases), None, False)
        self.linear.weight = mx.concatenate(weights, axis=0)  # replaces the (lazy, never evaluated) init
        if biases:
            self.linear.bias = mx.concatenate([biases[i] if i in biases else mx.zeros((w,), weights[0].dtype)
                                               for i, w in enumerate(group.widths)])
        self.group = group  # a frozen dataclass: kept as a plain attribute, not a parameter

    @classmethod
    def from_modules(cls, group: FusionGroup, modules: list[nn.Module]) -> "FusedLinear":
        """Take over the weights of the members' (`LinearModule`) modules."""
        return cls(group, [m.weight for m in modules], {i: m.bias for i, m in enumerate(modules) if "bias" in m})

    def __call__(self, x: mx.array) -> list[mx.array]:
        lin = self.linear
        return dispatch("linear")(x, lin.weight, lin.bias if "bias" in lin else None,
                                  [stop for _, stop in self.group.bounds[:-1]], self.group.softcap)

    # ------------------------------------------------------------------ the members' names
    def named_parameters(self) -> dict[str, mx.array]:
        """{member.weight, member.bias (if it has one): slices (views) of the concatenations}, in
        member order: the members' own names and shapes."""
        out = {}
        for member, (start, stop), has_bias in zip(self.group.members, self.group.bounds, self.group.bias):
            out[f"{member}.weight"] = self.linear.weight[start:stop]
            if has_bias:
                out[f"{member}.bias"] = self.linear.bias[start:stop]
        return out

    def load(self, pieces: dict[str, mx.array]) -> None:
        """Take the members' weights/biases from `{member.weight | member.bias: array}` (names and
        shapes checked by the caller): the concatenations are rebuilt from them. Members not in
        `pieces` keep their current values (and members without a bias their zeros)."""
        for name in ("weight", "bias"):
            if any(f"{m}.{name}" in pieces for m in self.group.members):
                current = self.linear[name]
                self.linear[name] = mx.concatenate([pieces.get(f"{m}.{name}", current[start:stop])
                                                    for m, (start, stop) in zip(self.group.members, self.group.bounds)])
