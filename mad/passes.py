"""Graph-level passes over a checked `Graph`: rewrites of how nodes run that leave the model unchanged.

Sibling-linear fusion
---------------------
Several `linear` nodes that read the same value, like q, k, v, the output gate and the i/f gates of an
mLSTM layer, or the up and gate projections of a feed-forward, are one matrix multiply in disguise:

    [y_1 | y_2 | ... | y_n] = x @ [W_1; W_2; ...; W_n]^T

`find_sibling_linears` finds such groups in any graph (it knows no block or model names);
`FusedLinear` runs one group as a single matmul whose output is split back into the members' outputs,
each with its own bias and soft-cap. Fewer, larger matmuls mean fewer kernel launches, which is what
decode (batch 1, one token, launch-bound on a GPU) needs; each output element is still the same dot
product of one row of x with one row of W, so results agree with the unfused graph to rounding.

Checkpoints do not change: a `FusedLinear` owns the concatenated weight (one copy in memory), and
`named_parameters()` gives the members' weights back under their own names as row slices of it
(views, no copies), while `load()` rebuilds the concatenated weight from pieces named per member.
`mad.program.Program(fuse=...)` decides whether the pass is applied.

A node joins a group when
  - its module is exactly `LinearModule` (the `linear` block: y = x W^T (+ b), optionally soft-capped;
    a subclass might compute something else, so it is left alone),
  - it is not tied (`tie:` reads another node's weight) and no node ties to it (its weight is someone
    else's too), and
  - it runs in the same stage as the others (a compiled stage can only produce its own nodes).
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


@dataclass(frozen=True)
class FusionGroup:
    """Sibling `linear` nodes computed as one matmul. Members are in execution order."""

    source: str                          # the value every member reads (a node or a graph input)
    stage: str
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
        return {"input": self.source, "stage": self.stage, "nodes": list(self.members),
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


def find_sibling_linears(graph: Graph) -> list[FusionGroup]:
    """Groups of >= 2 fusable linear nodes that read the same value in the same stage.

    Groups are listed in the order of their first member; members in execution order.
    """
    g = graph.g
    by_source: dict[tuple[str, str], list[str]] = {}
    for n in fusable_linears(graph):  # graph.blocks() order = execution order
        by_source.setdefault((g.nodes[n]["inputs"][0], g.nodes[n]["stage"]), []).append(n)
    groups = []
    for (source, stage), members in by_source.items():
        if len(members) < 2:
            continue
        modules = [g.nodes[m]["module"] for m in members]
        groups.append(FusionGroup(
            source=source, stage=stage, members=tuple(members),
            widths=tuple(int(m.weight.shape[0]) for m in modules), d_in=int(modules[0].weight.shape[1]),
            bias=tuple("bias" in m for m in modules), softcap=tuple(m._cap or None for m in modules)))
    return groups


class FusedLinear(nn.Module):
    """One `FusionGroup` as one matmul: `x -> [y_1, ..., y_n]`, the members' outputs in order.

    Parameters: `weight` [sum of widths, d_in], the members' weights stacked by rows, and `bias`
    {member index: [width]} for the members that have one. Biases and soft-caps are applied per slice,
    so members with and without them fuse together.
    """

    def __init__(self, group: FusionGroup, weights: list[mx.array], biases: dict[int, mx.array]):
        super().__init__()
        self.weight = mx.concatenate(weights, axis=0)
        self.bias = {str(i): b for i, b in biases.items()}
        self.group = group  # a frozen dataclass: kept as a plain attribute, not a parameter

    @classmethod
    def from_modules(cls, group: FusionGroup, modules: list[nn.Module]) -> "FusedLinear":
        """Take over the weights of the members' (`LinearModule`) modules."""
        return cls(group, [m.weight for m in modules], {i: m.bias for i, m in enumerate(modules) if "bias" in m})

    def __call__(self, x: mx.array) -> list[mx.array]:
        softcap = _basic().softcap
        y = x @ self.weight.T
        parts = mx.split(y, [stop for _, stop in self.group.bounds[:-1]], axis=-1)
        outs = []
        for i, part in enumerate(parts):
            if self.group.bias[i]:
                part = part + self.bias[str(i)]
            cap = self.group.softcap[i]
            outs.append(softcap(part, cap) if cap else part)
        return outs

    # ------------------------------------------------------------------ the members' names
    def named_parameters(self) -> dict[str, mx.array]:
        """{member.weight: row slice of `weight` (a view), member.bias: bias} in member order."""
        out = {}
        for i, (member, (start, stop)) in enumerate(zip(self.group.members, self.group.bounds)):
            out[f"{member}.weight"] = self.weight[start:stop]
            if self.group.bias[i]:
                out[f"{member}.bias"] = self.bias[str(i)]
        return out

    def load(self, pieces: dict[str, mx.array]) -> None:
        """Replace members' weights/biases by `{member.weight | member.bias: array}` (shapes checked by
        the caller). Members not in `pieces` keep their current values."""
        current = self.named_parameters()
        if any(f"{m}.weight" in pieces for m in self.group.members):
            self.weight = mx.concatenate([pieces.get(f"{m}.weight", current[f"{m}.weight"])
                                          for m in self.group.members], axis=0)
        for i, member in enumerate(self.group.members):
            if f"{member}.bias" in pieces:
                self.bias[str(i)] = pieces[f"{member}.bias"]
