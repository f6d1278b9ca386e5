"""Tensor parallelism: one model split over the n members of an `mx.distributed` group, by heads.

The pass (`plan_shards`) reads a checked graph and the declarations of its blocks (`Block.shard_rule`,
`mad.block.SplitHeads` and friends), never a block's class, and decides for every node how it runs:

    replicated  every member runs it whole on whole inputs (embeddings, norms over the whole width, the head)
    heads       each member runs its heads (or channels): the recurrent cells with their state, per-head
                norms and linears, the sLSTM recurrent weights, depthwise convs, elementwise wiring
    columns     a linear reading a whole value: each member computes its output columns (q, k, v, gates,
                up-projections)
    rows        a linear reading a split value: each member multiplies its part and one `all_sum` adds the
                partial products (out_proj, proj_down, NX-AI's i/f gates over [q k v])
    hidden      a feed-forward node: each member its part of the hidden units, then one `all_sum`
    slice, concat  of split values, on each member's parts

It propagates the layout of every value along the graph: whole, or split over the last dim as segments
each cut into n pieces (`Split`), and inserts the nodes of `blocks/parallel.py` where layouts meet: an
`all_sum` after a partial product, an `all_gather` where a split value must become whole (after an sLSTM
layer's group norm, whose output joins the residual stream), a `shard` (a local slice) where a whole value
is read split. Which values are split is decided backwards from the readers: a value is split when every
reader takes it split, and a reader takes it when it computes a partial sum from it (a linear), or is split
itself and either its own output is taken split or it has weights or state of its own to split. Where a
layout cannot be split exactly (a size that n does not divide, a slice across parts), the node falls back
to replication and the plan says so; recurrent heads that n does not divide are an error.

`ShardPlan.local_graph(rank, group)` is the member's graph: the same node names, per-member sizes, the
inserted nodes; a `Program` compiles it unchanged (modes, state, prefill, generation). Every weight of a
member keeps its checkpoint name and is a slice of it (`shard_weights`), read lazily from the checkpoint;
a member's state holds its heads (`gather_state` / `shard_state` convert, so state files are the single
process's). `load_sharded` and `build_sharded` are `mad.load` and `mad.build` over a group; a quantized checkpoint
(`mad convert -q`) splits as its float model does, each packed matrix cut where its float matrix is
(`ShardPlan.array_parts`). The commands (`cli_io`) watch every step: a member that hangs ends the group
(`Watchdog`). See docs/sharding.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

import mlx.core as mx
import networkx as nx
from mlx.utils import tree_flatten

from .block import (Block, Cut, ShardRule, SplitConcat, SplitDense, SplitHeads, SplitHidden, SplitSlice,
                    TensorType, is_builtin)
from .errors import Diagnostic, MadError, Source
from .graph import Graph, build_graph
from .program import Program

DEFAULT_TIMEOUT = 120.0
"""Seconds a member waits for the others (to join the group, to agree on the model, to finish a step of a
command) before giving up; `MAD_TP_TIMEOUT` (seconds) sets it for the commands."""
TIMEOUT_ENV = "MAD_TP_TIMEOUT"


# ----------------------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Split:
    """A value split over the n members along its last dim: `segments` are the global sizes of consecutive
    segments, each cut into n equal pieces; member r holds piece r of every segment, concatenated."""

    segments: tuple[int, ...]

    @property
    def width(self) -> int:
        return sum(self.segments)


FULL = "full"        # every member holds the whole value
PARTIAL = "partial"  # every member holds a partial sum of it (summed by the all_sum after it)
Layout = Any         # FULL, PARTIAL or a Split


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports on localhost (the ring backend listens on one per member):
    for launching a local group, as the tests and benchmarks do."""
    import random
    import socket

    for _ in range(200):
        base = random.randrange(20000, 60000 - count)
        sockets = []
        try:
            for port in range(base, base + count):
                sockets.append(socket.socket())
                sockets[-1].bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise MadError("no free ports on localhost for the group's members")


def segments_at(cuts: set[int], width: int) -> tuple[int, ...]:
    """The segments of [0, width) that `cuts` delimit."""
    points = sorted({0, width} | {c for c in cuts if 0 < c < width})
    return tuple(b - a for a, b in zip(points, points[1:]))


def pieces(length: int, cut: Cut, units: int, segments: tuple[int, ...], n: int) -> list[tuple[int, int]]:
    """(global start, member's size) of each piece along an axis of `length` that holds `cut.groups` blocks
    of `units` units (heads, channels, columns), split by `segments` (in units). Member r holds
    [start + r * size, start + (r + 1) * size) of each piece, in this order."""
    width = length // (cut.groups * units)
    out = []
    for g in range(cut.groups):
        start = g * units * width
        for seg in segments:
            out.append((start, seg // n * width))
            start += seg * width
    return out


def take(x: mx.array, axis: int, parts: list[tuple[int, int]], rank: int) -> mx.array:
    """Member `rank`'s pieces of `x` along `axis` (a copy: a view would keep the whole array alive)."""
    axis = axis % x.ndim
    index = (slice(None),) * axis
    chunks = [x[index + (slice(start + rank * size, start + (rank + 1) * size),)] for start, size in parts]
    return mx.contiguous(chunks[0] if len(chunks) == 1 else mx.concatenate(chunks, axis=axis))


def assemble(gathered: mx.array, axis: int, parts: list[tuple[int, int]], n: int) -> mx.array:
    """The whole array from every member's pieces, `gathered` holding them stacked on a new first axis."""
    axis = axis % (gathered.ndim - 1)
    out, local = [], 0
    for _, size in parts:
        piece = gathered[(slice(None),) * (axis + 1) + (slice(local, local + size),)]  # (n, ..., size, ...)
        piece = mx.moveaxis(piece, 0, axis)                                            # (..., n, size, ...)
        shape = piece.shape
        out.append(piece.reshape(*shape[:axis], n * size, *shape[axis + 2:]))
        local += size
    return out[0] if len(out) == 1 else mx.concatenate(out, axis=axis)


# ----------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Cutting:
    """How a weight or state tensor of a split node is cut: `cut` over `units` units split by `segments`."""

    cut: Cut
    units: int
    segments: tuple[int, ...]

    def parts(self, length: int, n: int) -> list[tuple[int, int]]:
        return pieces(length, self.cut, self.units, self.segments, n)


@dataclass
class NodeShard:
    """One node's decision: how it runs, the layouts it reads and writes, its member's fields, cuts."""

    node: str
    how: str                                   # replicated, heads, channels, columns, rows, hidden, slice, concat
    out: Layout = FULL
    reads: list[Layout] = field(default_factory=list)
    fields: dict = field(default_factory=dict)
    fields_rank0: Optional[dict] = None        # rows with a bias: member 0 adds it
    weights: dict[str, Cutting] = field(default_factory=dict)
    state: dict[str, Cutting] = field(default_factory=dict)
    softcap: Optional[float] = None            # applied by the all_sum after a row split
    why: str = ""                              # why a node that declares a split is replicated


@dataclass(frozen=True)
class Conversion:
    """A node the pass inserts into every member's graph, reading the nodes `reads`: `all_sum` of the partial
    sums of the values `sources` (one collective for sibling linears, each part soft-capped by `softcaps`),
    `part` (`segments` = start, size) of a joint all_sum, `all_gather` or `shard` of a value split in
    `segments`; placed after node `after` or before node `before`."""

    name: str
    kind: str
    sources: tuple[str, ...]
    reads: tuple[str, ...]
    segments: tuple[int, ...] = ()
    softcaps: tuple[Optional[float], ...] = ()
    after: Optional[str] = None
    before: Optional[str] = None


class _Fallback(Exception):
    """Node `node` cannot run split as planned: replicate it and plan again."""

    def __init__(self, node: str, why: str):
        super().__init__(why)
        self.node, self.why = node, why


def _last(t: TensorType) -> int:
    return int(t.shape[-1])


@dataclass
class ShardPlan:
    """The pass's decisions for a graph over n members: `nodes[name]` (a `NodeShard`), `conversions` (the
    inserted all_sum / all_gather / shard nodes, by name) and `fallbacks` (node -> why it is replicated)."""

    graph: Graph
    n: int
    nodes: dict[str, NodeShard]
    conversions: dict[str, Conversion]
    fallbacks: dict[str, str]

    # ------------------------------------------------------------------ the member's graph
    def local_graph(self, rank: int, group: Any = None) -> Graph:
        """Member `rank`'s graph: each node with its member's fields, types, weights and state, the
        inserted collectives (over `group`) in execution order. A `Program` compiles it as it is."""
        from .blocks.parallel import AllGatherBlock, AllSumBlock, ShardBlock
        from .blocks.wiring import SliceBlock

        if not 0 <= rank < self.n:
            raise MadError(f"rank {rank} is outside the group of {self.n} members")
        full = self.graph.g
        h = nx.DiGraph()
        for name in self.graph.inputs:
            h.add_node(name, **full.nodes[name])
        order: list[str] = []
        before: dict[str, list[Conversion]] = {}
        after: dict[str, list[Conversion]] = {}
        for c in self.conversions.values():
            (before.setdefault(c.before, []) if c.before else after.setdefault(c.after, [])).append(c)
        reads = self._reads()

        def add(name: str, spec: Block, block_type: str, sources: list[str], stage: str, source: Source) -> None:
            in_types = [h.nodes[s]["type"] for s in sources]
            module = spec.build(*in_types)
            params = {k: tuple(v.shape) for k, v in tree_flatten(getattr(module, "parameters", dict)())}
            h.add_node(name, kind="block", spec=spec, source=source, stage=stage, block_type=block_type,
                       inputs=list(sources), type=spec.infer(*in_types), state=spec.state(*in_types), params=params)
            ports = [f"{spec.ports[0]}{i}" for i in range(len(sources))] if spec.variadic else list(spec.ports)
            for port, s, t in zip(ports, sources, in_types):
                if h.has_edge(s, name):
                    h.edges[s, name]["ports"].append(port)
                else:
                    h.add_edge(s, name, ports=[port], type=t)
            order.append(name)

        def add_conversion(c: Conversion, stage: str, source: Source) -> None:
            if c.kind == "all_sum":
                spec = AllSumBlock(softcaps=c.softcaps, group=group, members=self.n)
            elif c.kind == "all_gather":
                spec = AllGatherBlock(segments=c.segments, group=group, members=self.n)
            elif c.kind == "shard":
                spec = ShardBlock(segments=c.segments, rank=rank, group=group, members=self.n)
            else:
                spec = SliceBlock(type="slice", start=c.segments[0], size=c.segments[1])
            add(c.name, spec, "slice" if c.kind == "part" else c.kind, list(c.reads), stage, source)

        for n in self.graph.blocks():
            d = full.nodes[n]
            for c in before.get(n, []):
                add_conversion(c, d["stage"], d["source"])
            plan = self.nodes[n]
            fields = plan.fields_rank0 if rank == 0 and plan.fields_rank0 is not None else plan.fields
            spec = d["spec"].model_copy(update=fields) if fields else d["spec"]
            add(n, spec, d["block_type"], reads[n], d["stage"], d["source"])
            want = plan.out.width // self.n if isinstance(plan.out, Split) else _last(d["type"])
            if _last(h.nodes[n]["type"]) != want:
                raise MadError(f"sharding node '{n}' ({d['block_type']}): its member's output has width "
                               f"{_last(h.nodes[n]['type'])}, the plan expects {want} (the block's shard_rule "
                               "does not match its infer)", d["source"])
            for c in after.get(n, []):
                add_conversion(c, d["stage"], d["source"])
        outputs = {k: self.whole_name(v) for k, v in self.graph.outputs.items()}
        return LocalGraph(h, self.graph.resolved, self.graph.dims, dict(self.graph.inputs), outputs, order)

    def whole_name(self, value: str) -> str:
        """The node that holds `value` whole in a member's graph."""
        plan = self.nodes.get(value)
        if plan is None or plan.out == FULL:
            return value
        return f"{value}@all_sum" if plan.out == PARTIAL else f"{value}@all_gather"

    def _reads(self) -> dict[str, list[str]]:
        """Each node's sources in a member's graph (an inserted node where a layout changes)."""
        g = self.graph.g
        out = {}
        for n in self.graph.blocks():
            plan = self.nodes[n]
            srcs = []
            for s, layout in zip(g.nodes[n]["inputs"], plan.reads):
                src = self.nodes.get(s)
                if layout == FULL:
                    srcs.append(self.whole_name(s))
                elif src is not None and src.out == layout:
                    srcs.append(s)
                else:
                    srcs.append(_shard_name(self.whole_name(s), layout))
            out[n] = srcs
        return out

    # ------------------------------------------------------------------ weights and state
    def array_parts(self, node: str, rel: str, shape: tuple) -> Optional[tuple[int, list[tuple[int, int]]]]:
        """(axis, pieces) of the weight array `rel` of `node` whose whole shape is `shape`: member r holds
        [start + r * size, start + (r + 1) * size) of each (start, size) along the axis; None when every
        member holds it whole.

        A quantized matrix (`mad.quantize`) is cut as its float matrix is: its packed weight, scales and
        affine biases (`w.weight`, `w.scales`, `w.biases` of a float `w.weight`) hold the same rows, and
        along the inputs a packed word holds 32 / bits values and a scale a group of values, so a cut
        there is the float matrix's, in those units. It must fall on a group boundary (`quantized_cut_problem`
        says where it does not)."""
        cut = self._array_cut(node, rel, shape)
        if cut is None:
            return None
        axis, parts, exact = cut
        if not exact:
            raise MadError(f"sharding weight '{node}.{rel}' {tuple(shape)}: a member's part of it along axis {axis} "
                           "is not a whole number of quantization groups")
        return axis, parts

    def is_cut(self, node: str, rel: str) -> bool:
        """Whether each member holds a part of the weight array `rel` of `node` (not the whole array)."""
        return _float_weight(self.graph.g.nodes[node]["params"], rel) in self.nodes[node].weights

    def _array_cut(self, node: str, rel: str, shape: tuple) -> Optional[tuple[int, list[tuple[int, int]], bool]]:
        """`array_parts`, and whether the cut falls on whole units of the array (False: a quantized matrix
        cut inside a group; the pieces are then meaningless)."""
        plan = self.nodes[node]
        floats = self.graph.g.nodes[node]["params"]
        logical = _float_weight(floats, rel)
        cutting = plan.weights.get(logical)
        if cutting is None:
            return None
        axis = cutting.cut.axis % len(shape)
        length = int(floats[logical][axis])
        parts = cutting.parts(length, self.n)
        if shape[axis] == length:
            return axis, parts, True
        exact = all((start * shape[axis]) % length == 0 and (size * shape[axis]) % length == 0 for start, size in parts)
        return axis, [(start * shape[axis] // length, size * shape[axis] // length) for start, size in parts], exact

    def shard_weights(self, weights: dict[str, mx.array], local: dict[str, tuple], rank: int) -> dict[str, mx.array]:
        """Member `rank`'s weights: for each name of its graph's weights (`local`: name -> shape), the slice
        of the whole weight of that name in `weights` (lazy arrays: nothing is read before evaluation)."""
        g = self.graph.g
        out = {}
        for name, shape in local.items():
            node, rel = _owner(g, name)
            w = weights[name]
            cut = self.array_parts(node, rel, tuple(w.shape))
            piece = take(w, cut[0], cut[1], rank) if cut else w
            if tuple(piece.shape) != tuple(shape):
                raise MadError(f"sharding weight '{name}' {tuple(w.shape)}: member {rank}'s slice has shape "
                               f"{tuple(piece.shape)}, its graph expects {tuple(shape)}")
            out[name] = piece
        return out

    def gather_weights(self, weights: dict[str, mx.array], rank: int, group: Any) -> dict[str, mx.array]:
        """The whole weights, by checkpoint name, from every member's (a collective: every member calls it
        and gets them all). A bias only member 0 holds (a row-split linear's) comes from member 0."""
        out = {}
        for node in self.graph.blocks():
            for rel, shape in self.graph.g.nodes[node]["params"].items():
                head = rel[:-len("weight")] if rel.endswith("weight") else None
                # a quantized matrix: its packed weight, scales and biases (the same names on every member)
                for rel in [rel] + ([head + "scales", head + "biases"] if head is not None else []):
                    name = f"{node}.{rel}"
                    cut = None
                    if name in weights and self.is_cut(node, rel):
                        cutting = self.nodes[node].weights[_float_weight(self.graph.g.nodes[node]["params"], rel)]
                        w = weights[name]
                        axis = cutting.cut.axis % w.ndim
                        whole = tuple(d * self.n if i == axis else d for i, d in enumerate(w.shape))
                        cut = self.array_parts(node, rel, whole)
                    if cut is not None:
                        gathered = mx.distributed.all_gather(w[None], group=group)
                        out[name] = assemble(gathered, cut[0], cut[1], self.n)
                    elif name in weights and self.nodes[node].fields_rank0 is None:
                        out[name] = weights[name]  # whole on every member
                    elif rel in self.graph.g.nodes[node]["params"]:  # member 0's alone: the others add zeros
                        mine = weights[name] if rank == 0 else mx.zeros(shape, dtype=next(iter(weights.values())).dtype)
                        out[name] = mx.distributed.all_sum(mine, group=group)
        return out

    def shard_state(self, state: dict, rank: int) -> dict:
        """Member `rank`'s part of a whole state {node: {name: array}} (its heads)."""
        out = {}
        for node, entries in state.items():
            cuts = self.nodes[node].state if node in self.nodes else {}
            out[node] = {k: take(a, cuts[k].cut.axis, cuts[k].parts(a.shape[cuts[k].cut.axis], self.n), rank)
                         if k in cuts else a for k, a in entries.items()}
        return out

    def gather_state(self, state: dict, group: Any) -> dict:
        """The whole state from every member's part (a collective: every member calls it)."""
        out = {}
        for node, entries in state.items():
            cuts = self.nodes[node].state if node in self.nodes else {}
            whole = {}
            for k, a in entries.items():
                if k not in cuts:
                    whole[k] = a  # a replicated node's state: the same on every member
                    continue
                c = cuts[k]
                gathered = mx.distributed.all_gather(a[None], group=group)  # (n, B, ...)
                whole[k] = assemble(gathered, c.cut.axis, c.parts(a.shape[c.cut.axis] * self.n, self.n), self.n)
            out[node] = whole
        return out

    # ------------------------------------------------------------------ reports
    def collectives(self, dtype_bytes: int = 4) -> list[dict]:
        """Per token (one position of one sequence): each collective with its payload (the value it
        makes whole, in bytes) and what one member sends over a ring (all_sum 2(n-1)/n, all_gather (n-1)/n
        of the payload)."""
        out = []
        g = self.graph.g
        n = self.n
        for c in self.conversions.values():
            if c.kind not in ("all_sum", "all_gather"):
                continue
            width = sum(_last(g.nodes[s]["type"]) for s in c.sources)
            payload = width * dtype_bytes
            sent = payload * (2 * (n - 1) if c.kind == "all_sum" else (n - 1)) // n
            out.append({"node": c.name, "kind": c.kind, "width": width, "payload_bytes": payload,
                        "sent_bytes": sent})
        return out

    def member_params(self) -> int:
        """Parameters one member holds (member 0, which also holds the biases of row-split linears)."""
        return sum(_numel(shape) // (self.n if name in self.nodes[m].weights else 1)
                   for m in self.graph.blocks() for name, shape in self.graph.g.nodes[m]["params"].items())

    def member_state_bytes(self) -> int:
        """Recurrent state bytes per sequence one member holds."""
        total = 0
        for n in self.graph.state_nodes():
            split = bool(self.nodes[n].state)
            total += self.graph.state_bytes(n) // (self.n if split else 1)
        return total

    def quantized_group_sizes(self) -> list[int]:
        """The quantization group sizes (`mad.quantize.MODES`) that split with this plan: every matrix cut
        along its inputs leaves each member whole groups, so a checkpoint quantized in groups of that size
        (`mad convert -q --q-group-size`) loads over these members."""
        from .quantize import MODES

        pieces = []
        for node, plan in self.nodes.items():
            for rel, cutting in plan.weights.items():
                shape = self.graph.g.nodes[node]["params"].get(rel)
                if shape is not None and len(shape) == 2 and cutting.cut.axis % 2 == 1:
                    pieces += [v for part in cutting.parts(int(shape[1]), self.n) for v in part]
        return [g for g in sorted({g for spec in MODES.values() for g in spec.group_sizes})
                if all(p % g == 0 for p in pieces)]

    def summary(self, dtype_bytes: int = 4) -> dict:
        """The plan as data: per node its split, and the totals (`mad build --shard`, `mad bench --json`)."""
        coll = self.collectives(dtype_bytes)
        return {
            "members": self.n,
            "params": self.graph.param_count(), "member_params": self.member_params(),
            "state_bytes": self.graph.state_bytes(), "member_state_bytes": self.member_state_bytes(),
            "collectives_per_token": len(coll),
            "payload_bytes_per_token": sum(c["payload_bytes"] for c in coll),
            "sent_bytes_per_token": sum(c["sent_bytes"] for c in coll),
            "nodes": {n: {"split": p.how, **({"why": p.why} if p.why else {})} for n, p in self.nodes.items()},
            "collectives": coll,
            "fallbacks": dict(self.fallbacks),
            "quantized_group_sizes": self.quantized_group_sizes(),
        }

    def table(self, dtype_bytes: int = 4) -> Any:
        """The plan as a rich table: node, type, split, its member's output shape, member params."""
        from rich.table import Table

        from .report import human_bytes

        g = self.graph.g
        t = Table(title=f"{self.graph.name} over {self.n} members (tensor parallel)")
        for col, just in (("node", "left"), ("type", "left"), ("split", "left"), ("member output", "left"),
                          ("member params", "right")):
            t.add_column(col, justify=just)
        for n in self.graph.blocks():
            plan, d = self.nodes[n], g.nodes[n]
            width = plan.out.width // self.n if isinstance(plan.out, Split) else _last(d["type"])
            shape = "(" + ", ".join([str(s) for s in d["type"].shape[:-1]] + [str(width)]) + ")"
            params = sum(_numel(shape) // (self.n if k in plan.weights else 1) for k, shape in d["params"].items())
            how = plan.how + (" + all_sum" if plan.out == PARTIAL else "") + \
                (" + all_gather" if f"{n}@all_gather" in self.conversions else "")
            t.add_row(n, d["block_type"], how + (f" ({plan.why})" if plan.why else ""), shape,
                      f"{params:,}" if params else "")
        s = self.summary(dtype_bytes)
        sizes = [str(g) for g in s["quantized_group_sizes"]]
        sizes = (", ".join(sizes[:-1]) + " or " + sizes[-1] if len(sizes) > 1 else "".join(sizes)) or \
            "no size MLX offers"
        kinds = {}
        for c in s["collectives"]:
            kinds[c["kind"]] = kinds.get(c["kind"], 0) + 1
        t.caption = (f"per member: {s['member_params']:,} of {s['params']:,} parameters "
                     f"({human_bytes(s['member_params'] * dtype_bytes)}), state "
                     f"{human_bytes(s['member_state_bytes'])} of {human_bytes(s['state_bytes'])} per sequence; "
                     f"per token: {', '.join(f'{k} x{v}' for k, v in kinds.items()) or 'no collectives'}, "
                     f"{human_bytes(s['payload_bytes_per_token'])} made whole, "
                     f"{human_bytes(s['sent_bytes_per_token'])} sent by each member (ring); quantized "
                     f"(mad convert -q), it splits in groups of {sizes} inputs")
        return t


def _numel(shape) -> int:
    size = 1
    for d in shape:
        size *= int(d)
    return size


def _shard_name(source: str, layout: Split) -> str:
    return f"{source}@shard" + ("" if len(layout.segments) == 1 else "." + "_".join(map(str, layout.segments)))


def _owner(g: nx.DiGraph, name: str) -> tuple[str, str]:
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        node = ".".join(parts[:i])
        if node in g and g.nodes[node].get("kind") == "block":
            return node, ".".join(parts[i:])
    raise MadError(f"weight '{name}' belongs to no node of the graph")


class LocalGraph(Graph):
    """A member's graph: a `Graph` whose execution order is the pass's (inserted nodes next to the nodes
    they serve), not the topology's declaration order."""

    def __init__(self, g, resolved, dims, inputs, outputs, order: list[str]):
        super().__init__(g, resolved, dims, inputs, outputs)
        self._order = order

    def blocks(self) -> list[str]:
        return list(self._order)


# ----------------------------------------------------------------------------------------- the pass
def plan_shards(graph: Graph, n: int) -> ShardPlan:
    """Decide how every node of `graph` runs over `n` members (see the module docstring).

    A node whose split does not fit (a size `n` does not divide, a slice across parts) is replicated and
    listed in `fallbacks`; the plan is made again until it holds. Recurrent heads that `n` does not divide
    are a MadError naming the node and both numbers.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise MadError(f"the group size must be a positive integer, got {n!r}")
    forced: dict[str, str] = {}
    while True:
        try:
            return _Planner(graph, n, forced).plan()
        except _Fallback as f:
            if f.node in forced:  # cannot happen: a replicated node has nothing left to fail
                raise MadError(f"sharding node '{f.node}': {f.why}") from None
            forced[f.node] = f.why


class _Planner:
    def __init__(self, graph: Graph, n: int, forced: dict[str, str]):
        self.graph, self.g, self.n, self.forced = graph, graph.g, n, forced
        self.order = graph.blocks()
        self.rules: dict[str, Optional[ShardRule]] = {}
        tie_sources = {getattr(self.g.nodes[m]["spec"], "tie", None) for m in self.order}
        for m in self.order:
            d = self.g.nodes[m]
            rule = None if m in forced else self._rule(m)
            if rule is not None and m in tie_sources:  # its weight is read whole by another node
                rule, forced[m] = None, "another node ties to its weight"
            self.rules[m] = rule
            if rule is not None:
                self._check_rule(m, rule)

    def _rule(self, node: str) -> Optional[ShardRule]:
        d = self.g.nodes[node]
        try:
            rule = d["spec"].shard_rule(*self._in_types(node))
        except Exception as e:  # noqa: BLE001 - a plugin's block may fail in any way; MAD's are bugs
            if is_builtin(type(d["spec"])):
                raise
            raise MadError(f"node '{node}' ({d['block_type']}): its shard_rule failed: {type(e).__name__}: {e}",
                           d["source"]) from None
        if rule is not None and not isinstance(rule, (SplitHeads, SplitDense, SplitHidden, SplitSlice, SplitConcat)):
            raise MadError(f"node '{node}' ({d['block_type']}): shard_rule returned {type(rule).__name__}, not a "
                           "mad.block shard rule (SplitHeads, SplitDense, SplitHidden, SplitSlice, SplitConcat) or None",
                           d["source"])
        return rule

    def _in_types(self, node: str) -> list[TensorType]:
        return [self.g.nodes[s]["type"] for s in self.g.nodes[node]["inputs"]]

    def _check_rule(self, node: str, rule: ShardRule) -> None:
        """A declaration must fit the node's weights and state (a block's bug otherwise, named here)."""
        d = self.g.nodes[node]
        problems = []
        if isinstance(rule, (SplitHeads, SplitHidden)):
            units = rule.heads if isinstance(rule, SplitHeads) else rule.hidden
            tables = [("weight", rule.weights, d["params"])]
            if isinstance(rule, SplitHeads):
                tables.append(("state", rule.state, {k: t.shape for k, t in d["state"].items()}))
            for what, cuts, shapes in tables:
                for name, cut in cuts.items():
                    shape = shapes.get(name)
                    if shape is None:
                        problems.append(f"{what} '{name}' is not one of its {what}s ({', '.join(shapes) or 'none'})")
                    elif not -len(shape) <= cut.axis < len(shape) or not isinstance(shape[cut.axis], int) \
                            or shape[cut.axis] % (cut.groups * units):
                        problems.append(f"{what} '{name}' {tuple(shape)}: axis {cut.axis} does not hold "
                                        f"{cut.groups} x {units} units")
            if isinstance(rule, SplitHeads):
                widths = [_last(t) for t in self._in_types(node)] + [_last(d["type"])]
                if rule.heads < 1 or any(w % rule.heads for w in widths):
                    problems.append(f"{rule.heads} heads do not divide its widths {widths}")
        elif isinstance(rule, SplitDense):
            shape = d["params"].get(rule.weight)
            x = self._in_types(node)
            if len(x) != 1 or shape is None or tuple(shape) != (_last(d["type"]), _last(x[0])) or (
                    rule.bias is not None and d["params"].get(rule.bias) != (_last(d["type"]),)):
                problems.append(f"weight '{rule.weight}' {shape}, bias '{rule.bias}' do not make a dense map")
        if problems:
            raise MadError([Diagnostic(f"node '{node}' ({d['block_type']}) declares a shard rule that does not fit "
                                       f"it: {p}", d["source"]) for p in problems])

    # ------------------------------------------------------------------ backwards: who takes split values
    def _backward(self) -> None:
        g = self.g
        outputs = set(self.graph.outputs.values())
        self.accepts: dict[str, bool] = {}
        self.takes: dict[str, bool] = {}
        self.cuts: dict[str, set[int]] = {}
        for m in reversed(self.order):
            readers = list(g.successors(m))
            self.accepts[m] = m not in outputs and bool(readers) and all(self.takes[r] for r in readers)
            cuts: set[int] = set()
            if self.accepts[m]:
                for r in readers:
                    cuts |= self._demand(r, m)
            self.cuts[m] = cuts
            rule = self.rules[m]
            benefits = isinstance(rule, SplitHeads) and bool(rule.weights or rule.state)
            # a linear sums a split input's partial products, except the model's head: its all_sum would
            # carry every logit (V values a token), where running it whole costs nothing to communicate
            self.takes[m] = (isinstance(rule, SplitDense) and m not in outputs) or (
                isinstance(rule, (SplitHeads, SplitSlice, SplitConcat)) and (self.accepts[m] or benefits))

    def _demand(self, reader: str, value: str) -> set[int]:
        """The segment boundaries `reader` needs on `value` (global positions), from its own."""
        rule, d = self.rules[reader], self.g.nodes[reader]
        out_cuts = self.cuts[reader]
        width = _last(self.g.nodes[value]["type"]) if value in self.g else 0
        need: set[int] = set()
        offset = 0
        for s, t in zip(d["inputs"], self._in_types(reader)):
            if s == value:
                if isinstance(rule, SplitHeads):
                    d_in, d_out = _last(t) // rule.heads, _last(d["type"]) // rule.heads
                    need |= {c // d_out * d_in for c in out_cuts if c % d_out == 0}
                elif isinstance(rule, SplitSlice):
                    need |= {rule.start, rule.start + rule.size} | {c + rule.start for c in out_cuts}
                elif isinstance(rule, SplitConcat):
                    need |= {c - offset for c in out_cuts if offset < c < offset + _last(t)}
            offset += _last(t)
        return {c for c in need if 0 < c < width}

    # ------------------------------------------------------------------ forwards: what each node does
    def plan(self) -> ShardPlan:
        self._backward()
        self.out: dict[str, Layout] = {name: FULL for name in self.graph.inputs}
        self.nodes: dict[str, NodeShard] = {}
        for m in self.order:
            self.nodes[m] = self._decide(m)
            self.out[m] = self.nodes[m].out
        plan = ShardPlan(self.graph, self.n, self.nodes, {}, dict(self.forced))
        for run in self._sum_runs():  # the inserted nodes
            caps = tuple(self.nodes[m].softcap for m in run)
            caps = caps if any(caps) else ()
            if len(run) == 1:
                self._add(plan, Conversion(f"{run[0]}@all_sum", "all_sum", run, run, softcaps=caps, after=run[0]))
                continue
            joint, start = f"{run[0]}@joint_all_sum", 0  # sibling linears: one collective, then each its part
            self._add(plan, Conversion(joint, "all_sum", run, run, softcaps=caps, after=run[-1]))
            for m in run:
                width = _last(self.g.nodes[m]["type"])
                self._add(plan, Conversion(f"{m}@all_sum", "part", (m,), (joint,), (start, width), after=run[-1]))
                start += width
        for m in self.order:
            for s, layout in zip(self.g.nodes[m]["inputs"], self.nodes[m].reads):
                src = self.out.get(s, FULL)
                if layout == FULL and isinstance(src, Split):
                    self._add(plan, Conversion(f"{s}@all_gather", "all_gather", (s,), (s,), src.segments, after=s))
                elif isinstance(layout, Split) and src != layout:
                    whole = plan.whole_name(s)
                    self._add(plan, Conversion(_shard_name(whole, layout), "shard", (s,), (whole,), layout.segments,
                                               before=m))
        return plan

    def _sum_runs(self) -> list[tuple[str, ...]]:
        """The partial sums to add, as runs of nodes that share one all_sum: row-split linears that read the
        same value and run one after the other (NX-AI's i and f gates); every other partial sum alone."""
        runs: list[list[str]] = []
        for i, m in enumerate(self.order):
            if self.nodes[m].out != PARTIAL:
                continue
            prev = runs[-1][-1] if runs else None
            if prev is not None and self.order[i - 1] == prev and self.nodes[m].how == self.nodes[prev].how == "rows" \
                    and self.g.nodes[m]["inputs"] == self.g.nodes[prev]["inputs"]:
                runs[-1].append(m)
            else:
                runs.append([m])
        return [tuple(r) for r in runs]

    @staticmethod
    def _add(plan: ShardPlan, c: Conversion) -> None:
        plan.conversions.setdefault(c.name, c)

    def _available(self, node: str) -> list[Layout]:
        """The layout in which `node` can read each input: a split value is read whole (gathered) by a
        node that does not take it split; a partial sum is always read whole (after its all_sum)."""
        out = []
        for s in self.g.nodes[node]["inputs"]:
            layout = self.out.get(s, FULL)
            if layout == PARTIAL or (isinstance(layout, Split) and not self.takes[node]):
                layout = FULL
            out.append(layout)
        return out

    def _decide(self, m: str) -> NodeShard:
        rule, d = self.rules[m], self.g.nodes[m]
        avail = self._available(m)
        replicated = NodeShard(m, "replicated", FULL, [FULL] * len(avail), why=self.forced.get(m, ""))
        if rule is None:
            return replicated
        n = self.n
        width = _last(d["type"])
        if isinstance(rule, SplitDense):
            if isinstance(avail[0], Split):
                fields = rule.rows(False)
                weights = {rule.weight: Cutting(Cut(1), avail[0].width, avail[0].segments)}
                return NodeShard(m, "rows", PARTIAL, avail, fields, rule.rows(True) if rule.bias else None,
                                 weights, softcap=rule.softcap)
            if not self.accepts[m]:
                return replicated
            layout = Split(segments_at(self.cuts[m], width))
            self._divisible(m, layout.segments, f"its {width} output columns")
            cutting = Cutting(Cut(0), width, layout.segments)
            weights = {rule.weight: cutting, **({rule.bias: cutting} if rule.bias else {})}
            return NodeShard(m, "columns", layout, avail, rule.columns(n), weights=weights)
        if isinstance(rule, SplitHidden):
            self._divisible(m, (rule.hidden,), f"its {rule.hidden} hidden units")
            weights = {k: Cutting(c, rule.hidden, (rule.hidden,)) for k, c in rule.weights.items()}
            return NodeShard(m, "hidden", PARTIAL, avail, rule.local(n), weights=weights)
        if isinstance(rule, SplitHeads):
            return self._heads(m, rule, avail) or replicated
        if isinstance(rule, SplitSlice):
            if not isinstance(avail[0], Split):
                return replicated
            return self._slice(m, rule, avail[0])
        if isinstance(rule, SplitConcat):  # the rule's type was checked (`_rule`): the last kind
            if not any(isinstance(a, Split) for a in avail):
                return replicated
            reads, segments, offset = [], [], 0
            for a, t in zip(avail, self._in_types(m)):
                w = _last(t)
                if not isinstance(a, Split):
                    a = Split(segments_at({c - offset for c in self.cuts[m]}, w))
                    self._divisible(m, a.segments, f"its input of width {w}")
                reads.append(a)
                segments += list(a.segments)
                offset += w
            return NodeShard(m, "concat", Split(tuple(segments)), reads)

    def _heads(self, m: str, rule: SplitHeads, avail: list[Layout]) -> Optional[NodeShard]:
        d, n, H = self.g.nodes[m], self.n, rule.heads
        in_types = self._in_types(m)
        per_head = [_last(t) // H for t in in_types]
        d_out = _last(d["type"]) // H
        heads: Optional[tuple[int, ...]] = None
        for a, w in zip(avail, per_head):
            if isinstance(a, Split):
                if any(s % w for s in a.segments):
                    raise _Fallback(m, f"an input's parts {a.segments} cut through its heads of width {w}")
                mine = tuple(s // w for s in a.segments)
                if heads is not None and mine != heads:
                    raise _Fallback(m, f"its inputs are split over different heads ({heads} vs {mine})")
                heads = mine
        if heads is None:
            if not self.accepts[m]:
                return None
            if any(c % d_out for c in self.cuts[m]):
                raise _Fallback(m, "its readers need its output cut inside a head")
            heads = segments_at({c // d_out for c in self.cuts[m]}, H)
        if H % n and d["state"] and H != _last(d["type"]):  # recurrent heads (not channels): an error
            sizes = ", ".join(str(k) for k in range(1, H + 1) if H % k == 0)
            raise MadError([Diagnostic(
                f"node '{m}' ({d['block_type']}) has {H} heads, which {n} members cannot share: each member owns "
                f"whole heads with their recurrent state", d["source"], [f"group sizes that divide {H}: {sizes}"])])
        self._divisible(m, heads, f"its {H} heads" if H != _last(d["type"]) else f"its {H} channels")
        reads = [Split(tuple(h * w for h in heads)) for w in per_head]
        weights = {k: Cutting(c, H, heads) for k, c in rule.weights.items()}
        state = {k: Cutting(c, H, heads) for k, c in rule.state.items()}
        how = "channels" if H == _last(d["type"]) else "heads"
        return NodeShard(m, how, Split(tuple(h * d_out for h in heads)), reads, rule.local(n), None, weights, state)

    def _slice(self, m: str, rule: SplitSlice, x: Split) -> NodeShard:
        stop = rule.start + rule.size
        bounds, pos = [0], 0
        for s in x.segments:
            pos += s
            bounds.append(pos)
        if rule.start not in bounds or stop not in bounds:
            raise _Fallback(m, f"[{rule.start}:{stop}] cuts through its input's parts {x.segments}")
        i, j = bounds.index(rule.start), bounds.index(stop)
        local_start = sum(s // self.n for s in x.segments[:i])
        local_size = sum(s // self.n for s in x.segments[i:j])
        return NodeShard(m, "slice", Split(x.segments[i:j]), [x], rule.local(local_start, local_size))

    def _divisible(self, m: str, segments: tuple[int, ...], what: str) -> None:
        if any(s % self.n for s in segments):
            parts = f" (in parts {', '.join(map(str, segments))})" if len(segments) > 1 else ""
            raise _Fallback(m, f"{self.n} members cannot share {what}{parts}")


# ----------------------------------------------------------------------------------------- groups
def init_group(backend: str = "any", timeout: float = DEFAULT_TIMEOUT) -> Any:
    """`mx.distributed.init` for this process's launch (`mlx.launch` sets the environment), waiting at most
    `timeout` seconds for the other members. MLX's init holds the interpreter while it waits, so a watchdog
    process ends this one (SIGKILL, after printing why) when a member never joins: an error, not a hang."""
    why = (f"error: tensor parallel: joining the group took more than {timeout:g} s: a member of the group did "
           "not start or did not answer; this member stops")
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(float(timeout)), why, str(os.getpid())])
    try:
        return mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as e:  # no configuration for any backend (not launched by mlx.launch)
        raise MadError(f"tensor parallel: cannot join a group: {e} (launch every member with mlx.launch, e.g. "
                       "`mlx.launch -n 2 --backend ring -- mad run ... --tensor-parallel`)") from None
    finally:
        watchdog.kill()
        watchdog.wait()


# ends its parent after a delay, if the parent (the member that started it) is still there
_WATCHDOG = ("import os, signal, sys, time\n"
             "time.sleep(float(sys.argv[1]))\n"
             "if os.getppid() == int(sys.argv[3]):\n"
             "    print(sys.argv[2], file=sys.stderr, flush=True)\n"
             "    os.kill(int(sys.argv[3]), signal.SIGKILL)\n")


def _within(fn: Callable[[], None], timeout: float, what: str) -> None:
    """Run `fn` (a collective) in a thread and wait at most `timeout` seconds for it. A member that died or
    hangs would block it forever; the thread cannot be stopped, so after a timeout this process can only
    report and exit."""
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise MadError(f"tensor parallel: {what} took more than {timeout:g} s: a member of the group did not "
                       "answer (it failed to start, died or hangs)")


def group_timeout() -> float:
    """The seconds a command waits for the other members: `MAD_TP_TIMEOUT`, else DEFAULT_TIMEOUT."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise MadError(f"{TIMEOUT_ENV} must be a positive number of seconds, got '{raw}'")
    return value


class Watchdog:
    """Ends this member (one message on stderr, exit code 2) when it makes no progress for `timeout`
    seconds: a member that is alive but never joins a collective (stuck, or waiting on something else)
    would otherwise block the others in their collectives forever, a backend's collectives having no
    timeout of their own (the ring backend's spin, holding a core).

    Progress is counted, not measured: `tick()` (a member program's call, a message of the server's
    engine) stores the time; a thread checks it every second or so. Nothing is added to the hot path but
    that store, no host sync. A step of the model that takes longer than `timeout` by itself (a long prompt
    segment on a slow machine) is taken for a hang too: raise `MAD_TP_TIMEOUT` for such runs."""

    def __init__(self, rank: int, members: int, timeout: float):
        self.rank, self.members, self.timeout = rank, members, timeout
        self.what = "a step of the model"
        self.who = self.default_who = (f"member {1 - rank}" if members == 2 else "a member of the group")
        self._last = time.monotonic()
        self._on, self._paused = True, False
        threading.Thread(target=self._watch, name="mad-tp-watchdog", daemon=True).start()

    def tick(self) -> None:
        self._last = time.monotonic()

    def waiting(self, what: str, who: Optional[str] = None) -> None:
        """What this member waits for from now on (and from whom), for the message; counts as progress."""
        self.what, self.who = what, who or self.default_who
        self.tick()

    def stop(self) -> None:
        self._on = False

    def pause(self, paused: bool) -> None:
        """Stop (True) or restart (False) the clock: a phase without progress to count."""
        self._paused = paused
        self.tick()

    def _watch(self) -> None:
        while self._on:
            time.sleep(min(1.0, self.timeout / 8))
            if self._on and not self._paused and time.monotonic() - self._last > self.timeout:
                print(f"error: tensor parallel: member {self.rank} of {self.members}: {self.what} took more than "
                      f"{self.timeout:g} s: {self.who} did not take part (it hangs, or is stuck outside the "
                      f"group's collectives); this member stops (set {TIMEOUT_ENV} to wait longer)",
                      file=sys.stderr, flush=True)
                os._exit(2)


_COMMAND_WATCHDOG: list[Watchdog] = []  # the watchdog of this process's command, once its model is loaded


def watchdog() -> Optional[Watchdog]:
    """The running command's watchdog (None outside a `--tensor-parallel` command)."""
    return _COMMAND_WATCHDOG[0] if _COMMAND_WATCHDOG else None


def progress() -> None:
    """Report progress to the command's watchdog, if there is one."""
    if _COMMAND_WATCHDOG:
        _COMMAND_WATCHDOG[0].tick()


@contextmanager
def _unwatched():
    """The command's watchdog paused (a phase whose progress it cannot count: a stage-by-stage profile)."""
    watch = watchdog()
    if watch is not None:
        watch.pause(True)
    try:
        yield
    finally:
        if watch is not None:
            watch.pause(False)


def _check_group(group: Any) -> tuple[int, int]:
    if not isinstance(group, mx.distributed.Group):
        raise MadError(f"group must be an mx.distributed.Group (mx.distributed.init()), got {type(group).__name__}")
    return group.rank(), group.size()


def _digest(*parts: Any) -> list[int]:
    h = hashlib.sha256(repr(parts).encode())
    return [int.from_bytes(h.digest()[i:i + 4], "little") for i in range(0, 16, 4)]


def _agree(group: Any, status: list[int], timeout: float) -> mx.array:
    """Every member's status row (failed flag, structure digest, content digest), gathered."""
    box: dict = {}

    def gather() -> None:
        try:
            rows = mx.distributed.all_gather(mx.array([status], dtype=mx.uint32), group=group)
            mx.eval(rows)
            box["rows"] = rows
        except Exception as e:  # noqa: BLE001 - a lost peer is a RuntimeError of the backend
            box["error"] = e

    _within(gather, timeout, "checking that every member loaded the same model")
    if "error" in box:
        raise MadError(f"tensor parallel: a member of the group was lost while loading: {box['error']}")
    return box["rows"]


def _fail_together(group: Any, timeout: float) -> None:
    """Take part in the load-time exchange as a member that failed, so that no member waits for this one."""
    _agree(group, [1] + [0] * 8, timeout)


# ----------------------------------------------------------------------------------------- loading
@dataclass
class Sharding:
    """What a sharded program knows of its group: the plan, this member, and the memory its weights take."""

    plan: ShardPlan
    rank: int
    group: Any
    weight_bytes: int = 0
    peak_load_bytes: int = 0

    @property
    def n(self) -> int:
        return self.plan.n


class MemberProgram(Program):
    """A member's `Program`: a `Program` that reports each call to the group's watchdog (`Watchdog`), the
    progress by which a command tells a slow step from a member that hangs."""

    def __call__(self, *args: Any, **kwargs: Any):
        progress()
        return super().__call__(*args, **kwargs)

    def profile(self, *args: Any, **kwargs: Any) -> list[dict]:
        # a diagnostic that runs each stage alone, repeatedly, without calls to count: not watched
        with _unwatched():
            return super().profile(*args, **kwargs)

    def profile_block_types(self, *args: Any, **kwargs: Any) -> dict[str, dict]:
        with _unwatched():
            return super().profile_block_types(*args, **kwargs)


def sharding_of(model: Any) -> Optional[Sharding]:
    """The `Sharding` of a model or program from `load_sharded` / `build_sharded`, or None."""
    program = getattr(model, "program", model)
    return getattr(program, "shard", None)


def _read_source(path: Path, dtype: Optional[str], overrides: list[str], trust_plugins: bool, tokenizer: Any):
    """(full graph, {name: lazy weight}, dtype, tokenizer, where, fresh, quantization) of what `mad.load`
    reads at `path`: a topology file or build folder (fresh weights, drawn from the random state as
    `mad.load` draws them), a MAD checkpoint folder (`quantization`: the config of a quantized one, as
    `mad convert -q` writes it, else None) or a family's checkpoint folder (weights memory-mapped, renamed
    by its format). Nothing is evaluated: each member then reads only its slices."""
    from .loading import (_load_topology, mad_checkpoint_tokenizer, read_family_checkpoint, read_mad_meta,
                          read_safetensors)
    from .save import is_mad_checkpoint
    from .tokenizers import tokenizer_of

    tok = tokenizer_of(tokenizer)
    build_folder = path.is_dir() and (path / "resolved.yaml").is_file() and not (path / "config.json").exists() \
        and not is_mad_checkpoint(path)
    if path.is_file() or build_folder:
        file = path if path.is_file() else path / "resolved.yaml"
        graph = build_graph(_load_topology(file, overrides, trust_plugins))
        weights = Program(graph, compile="none", fuse=False).parameters()
        return graph, weights, dtype or "float32", tok, str(file), True, None
    if is_mad_checkpoint(path):
        meta = read_mad_meta(path)
        graph = build_graph(_load_topology(path / "resolved.yaml", overrides, trust_plugins))
        weights, file_dtype = read_safetensors(path)
        return graph, weights, dtype or file_dtype, tok or mad_checkpoint_tokenizer(path, meta), str(path), False, \
            meta.get("quantization")
    if not path.exists():
        raise MadError(f"no such file or folder: {path}")
    if not path.is_dir():
        raise MadError(f"{path} is not a topology file or a model folder", Source(str(path)))
    ck = read_family_checkpoint(path, overrides, trust_plugins, tok)
    return ck.graph, ck.weights, dtype or ck.dtype, ck.tokenizer, str(path), False, None


def _sharded_program(graph: Graph, weights: dict, group: Any, where: str, dtype: str, compile: str, fuse: Any,
                     memory_check: bool, timeout: float, fresh: bool, quantization: Optional[dict] = None):
    """The member's Program holding its slices of `weights`, after every member agreed that they all read
    the same model (a member's own error is raised on every member, so none waits for the others).
    `quantization`: the config of a quantized checkpoint (`mad.quantize`): the member's program is
    quantized the same way before its slices of the packed weights are loaded."""
    from .loading import check_memory, check_weights
    from .program import dtype_of

    rank, n = _check_group(group)
    error: Optional[MadError] = None
    structure, content = [0] * 4, [0] * 4
    program = None
    try:
        dtype_of(dtype)
        plan = plan_shards(graph, n)
        if quantization is not None:
            _check_quantized(plan, weights, quantization, where)
        elif not fresh:
            check_weights(graph, weights, where)
        local = plan.local_graph(rank, group)
        if memory_check and quantization is None:
            check_memory(local, dtype, where)
        mx.reset_peak_memory()
        program = MemberProgram(local, dtype=dtype, compile=compile, fuse=fuse)
        if quantization is not None:
            program.quantize(quantization)
            if memory_check:
                check_memory(local, dtype, where, weight_bytes=sum(a.nbytes for a in program.parameters().values()))
        shapes = {k: tuple(v.shape) for k, v in program.parameters().items()}
        mine, replicated = {}, []
        for name, shape in shapes.items():
            # one weight at a time, taken out of `weights`: the whole array, evaluated to be sliced, is
            # freed once its slice is copied out (the dict would keep it alive)
            piece = plan.shard_weights({name: weights.pop(name)}, {name: shape}, rank)[name]
            if mx.issubdtype(piece.dtype, mx.floating):
                piece = piece.astype(program.dtype)
            mx.eval(piece)
            mine[name] = piece
            node, rel = _owner(graph.g, name)
            if plan.nodes[node].how != "rows" and not plan.is_cut(node, rel):  # whole on every member
                replicated.append(mx.sum(piece.astype(mx.float32)))
        weights.clear()  # what this member does not hold (another member's bias)
        program.load_weights(mine, where=where)
        del mine
        for _, w in tree_flatten(program.root.parameters()):
            mx.eval(w)
        sums = mx.stack(replicated).tolist() if replicated else []
        structure = _digest(n, sorted((k, tuple(v)) for k, v in ((m, graph.g.nodes[m]["params"])
                                                                    for m in graph.blocks())), str(dtype),
                            json.dumps(quantization, sort_keys=True))
        content = _digest(sums)
        program.shard = Sharding(plan, rank, group, sum(w.nbytes for _, w in tree_flatten(program.root.parameters())),
                                 mx.get_peak_memory())
    except MadError as e:
        error = e
    rows = _agree(group, [int(error is not None)] + structure + content, timeout).tolist()
    if error is not None:
        raise error
    failed = [r for r, row in enumerate(rows) if row[0]]
    if failed:
        raise MadError(f"tensor parallel: member(s) {', '.join(map(str, failed))} of {n} could not load {where} "
                       "(their own error says why)")
    weights_differ = "fresh weights: seed every member alike (mx.random.seed) before loading" if fresh else \
        "the checkpoints differ"
    for what, cols in (("model (sizes, weights' names and shapes, dtype)", slice(1, 5)),
                       (f"weights ({weights_differ})", slice(5, 9))):
        differ = [r for r, row in enumerate(rows) if row[cols] != rows[0][cols]]
        if differ:
            raise MadError(f"tensor parallel: member(s) {', '.join(map(str, differ))} loaded other {what} than "
                           f"member 0 from {where}: every member must read the same model")
    return program


def _check_quantized(plan: ShardPlan, weights: dict, quantization: dict, where: str) -> None:
    """A quantized checkpoint against the whole quantized model (names, shapes and dtypes of its packed
    weights, scales and biases, as `mad.load` checks them), then its split: a member must hold whole
    quantization groups of every matrix split along its inputs (K / members a multiple of the group size),
    else one error naming the node, and the member counts that split this checkpoint."""
    from .loading import _located, check_weights
    from .quantize import MODES, describe_quantization

    graph = plan.graph
    whole = Program(graph, compile="none", fuse=False)  # lazy: its arrays give the shapes, nothing is computed
    with _located(Path(where)):
        whole.quantize(quantization)
    expected = whole.parameters()
    try:
        check_weights(graph, weights, where, expected)
    except MadError as e:
        note = (f"the weights are quantized as mad.json says ({describe_quantization(whole.quantization)}): a "
                "packed weight is uint32 [out, in * bits / 32], its scales (and affine biases) [out, in / group_size]")
        raise MadError([Diagnostic(d.message, d.source, d.notes + [note]) for d in e.diagnostics]) from None
    shapes = {k: tuple(v.shape) for k, v in expected.items()}
    bad = _quantized_cuts_inside_groups(plan, shapes)
    if not bad:
        return
    node, logical = bad[0]
    head = logical.rpartition(".")[0]
    own = whole.quantization.get(f"{node}.{head}" if head else node)  # the module's own settings, if any
    settings = own if isinstance(own, dict) else whole.quantization
    group_size, mode = settings["group_size"], settings.get("mode", "affine")
    cutting = plan.nodes[node].weights[logical]
    inputs = int(graph.g.nodes[node]["params"][logical][cutting.cut.axis])
    per_member = cutting.parts(inputs, plan.n)[0][1]
    works = []
    for m in range(1, plan.n):
        try:
            if not _quantized_cuts_inside_groups(plan_shards(graph, m), shapes):
                works.append(str(m))
        except MadError:
            continue
    sizes = [str(g) for g in MODES[mode].group_sizes if per_member % g == 0]
    more = f" ({len(bad) - 1} more quantized {'matrix' if len(bad) == 2 else 'matrices'} likewise)" if len(bad) > 1 \
        else ""
    raise MadError([Diagnostic(
        f"tensor parallel: node '{node}' ({graph.g.nodes[node]['block_type']}) is quantized in groups of "
        f"{group_size} inputs, and {plan.n} members would each multiply {per_member} of its {inputs} inputs, not "
        f"whole groups{more}: each member must hold whole quantization groups",
        Source(where), [f"member counts that split this checkpoint: {', '.join(works)}"] +
        ([f"or quantize the model in groups that divide {per_member} (mad convert -q --q-group-size "
          f"{' or '.join(sizes)})"] if sizes else []))])


def _quantized_cuts_inside_groups(plan: ShardPlan, shapes: dict[str, tuple]) -> list[tuple[str, str]]:
    """(node, weight) of every quantized array of a whole model (`shapes`: name -> shape) that the plan
    cuts inside a quantization group."""
    bad = []
    for name, shape in shapes.items():
        node, rel = _owner(plan.graph.g, name)
        cut = plan._array_cut(node, rel, shape)
        matrix = (node, _float_weight(plan.graph.g.nodes[node]["params"], rel))
        if cut is not None and not cut[2] and matrix not in bad:
            bad.append(matrix)
    return bad


def _float_weight(floats: dict, rel: str) -> str:
    """The float parameter that the array `rel` of a node is, or is part of: a quantized matrix's packed
    `weight`, `scales` and affine `biases` (`w.weight`, `w.scales`, `w.biases`) replace its float `w.weight`."""
    if rel in floats:
        return rel
    head, _, last = rel.rpartition(".")
    return (head + "." if head else "") + "weight" if last in ("scales", "biases") else rel


def build_sharded(path: str | Path, group: Any, overrides: list[str] = (), dtype: str = "float32",
                  compile: str = "program", fuse: Any = "auto", trust_plugins: bool = False,
                  timeout: float = DEFAULT_TIMEOUT):
    """`mad.build` over `group`: this member's Program of the topology at `path`, its weights the slices of
    the weights `mad.build` would draw from the same random state (so a sharded and a single-process build
    after the same `mx.random.seed` compute the same model). A collective: every member calls it."""
    from .loading import _load_topology

    _check_group(group)
    try:
        graph = build_graph(_load_topology(Path(path), list(overrides), trust_plugins))
        weights = Program(graph, compile="none", fuse=False).parameters()
    except MadError:
        _fail_together(group, timeout)
        raise
    return _sharded_program(graph, weights, group, str(path), dtype, compile, fuse, False, timeout, True)


def load_sharded(path: str | Path, group: Any, dtype: Optional[str] = None, overrides: list[str] = (),
                 compile: str = "program", fuse: Any = "auto", *, tokenizer: Any = None, trust_plugins: bool = False,
                 memory_check: bool = True, timeout: float = DEFAULT_TIMEOUT):
    """`mad.load` over `group`: (model, tokenizer), the model this member's part of the model at `path`
    (a topology file, build folder, MAD or family checkpoint folder), with the same interface: `model(tokens,
    state)` returns the whole logits on every member; its state holds this member's heads. Each member
    reads only its slices of the checkpoint's weights. Every member calls it (a collective); a member that
    fails to load, loads another model or does not answer within `timeout` seconds makes every member
    raise a MadError."""
    from .loading import _check_load_args
    from .model import LanguageModel

    _check_load_args(path, dtype, overrides, compile, fuse, tokenizer)
    _check_group(group)
    try:
        graph, weights, dtype, tok, where, fresh, quantization = _read_source(Path(path), dtype, list(overrides),
                                                                              trust_plugins, tokenizer)
    except MadError:
        _fail_together(group, timeout)
        raise
    program = _sharded_program(graph, weights, group, where, dtype, compile, fuse, memory_check, timeout, fresh,
                               quantization)
    return LanguageModel(program, tok), tok


# ----------------------------------------------------------------------------------------- state
def _plan_of(model: Any) -> Sharding:
    s = sharding_of(model)
    if s is None:
        raise MadError("this model is not sharded (load it with mad.shard.load_sharded)")
    return s


def gather_state(model: Any, state: dict) -> dict:
    """The whole state (as a single process holds it) from every member's heads: every member calls it."""
    s = _plan_of(model)
    return s.plan.gather_state(state, s.group)


def gather_weights(model: Any) -> dict[str, mx.array]:
    """The whole model's weights by checkpoint name (as `program.parameters()` of a single process), from
    every member's slices: what saving a sharded model needs. Every member calls it."""
    s = _plan_of(model)
    return s.plan.gather_weights(getattr(model, "program", model).parameters(), s.rank, s.group)


def shard_state(model: Any, state: dict) -> dict:
    """This member's part (its heads) of a whole state."""
    s = _plan_of(model)
    return s.plan.shard_state(state, s.rank)


def save_state_file(path: str | Path, state: dict, model: Any, flag: str = "state file") -> None:
    """Save a sharded model's state as one whole state file (`mad.loading.save_state_file`'s format: a single
    process reads it): gathered from every member, written by member 0. Every member calls it."""
    from .loading import save_state_file as save

    s = _plan_of(model)
    whole = gather_state(model, state)
    mx.eval(whole)
    error = None
    if s.rank == 0:
        try:
            save(path, whole, flag)
        except MadError as e:
            error = e
    # every member returns once the file is written (or raises when it could not be)
    failed = mx.distributed.all_sum(mx.array(int(error is not None)), group=s.group).item()
    if error is not None:
        raise error
    if failed:
        raise MadError(f"{flag} {path}: member 0 could not write the state file (its error says why)")


def load_state_file(path: str | Path, model: Any) -> dict:
    """Read a whole state file (saved by a single process or a sharded run), checked against the whole
    model, and keep this member's heads."""
    from .loading import load_state_file as load

    s = _plan_of(model)
    whole = load(path, SimpleNamespace(graph=s.plan.graph))  # checked against the single-process graph
    return shard_state(model, whole)


# ----------------------------------------------------------------------------------------- the CLI
def member_memory(model: Any) -> list[tuple[int, int]]:
    """(weight bytes, peak bytes while loading) of every member, gathered (a collective)."""
    s = _plan_of(model)
    rows = mx.distributed.all_gather(mx.array([[s.weight_bytes, s.peak_load_bytes]], dtype=mx.uint64), group=s.group)
    return [tuple(r) for r in rows.tolist()]


def tensor_parallel_report(model: Any, echo: Callable[[str], None] = print) -> dict:
    """Every member's memory and the collectives a token costs (a collective: every member calls it)."""
    sh = _plan_of(model)
    dtype_bytes = model.program.dtype.size
    memory = member_memory(model)
    plan = sh.plan.summary(dtype_bytes)
    report = {"members": sh.n, "weight_bytes": [w for w, _ in memory], "peak_load_bytes": [p for _, p in memory],
              **{k: plan[k] for k in ("member_params", "params", "collectives_per_token", "payload_bytes_per_token",
                                      "sent_bytes_per_token")}}
    echo(f"Tensor parallel: {sh.n} members; per token {plan['collectives_per_token']} collectives, "
         f"{plan['payload_bytes_per_token']:,} bytes made whole, {plan['sent_bytes_per_token']:,} bytes sent by "
         "each member over a ring")
    return report


def cli_io(tensor_parallel: bool, timeout: Optional[float] = None):
    """(load, load_state_file, save_state_file) for a command: `mad.loading`'s, or with `--tensor-parallel`
    the sharded ones over the group this process was launched in (`mlx.launch`). Members other than 0
    print nothing on stdout; member 0 reports every member's memory after loading, on stderr. A member lost
    while running (the backend's "connection to a peer was lost") ends the command with a MAD error message
    and exit code 2; once the model is loaded, a `Watchdog` ends it the same way when the command makes no
    progress for `timeout` seconds (`group_timeout()`: `MAD_TP_TIMEOUT` or DEFAULT_TIMEOUT), a member
    that hangs while alive."""
    from .loading import load as load_whole, load_state_file as load_whole_state, save_state_file as save_whole

    if not tensor_parallel:
        return load_whole, load_whole_state, save_whole
    timeout = group_timeout() if timeout is None else timeout
    group = init_group(timeout=timeout)
    if group.rank() != 0:
        sys.stdout = open(os.devnull, "w")
    _report_lost_members()
    loaded: dict = {}

    def load(path, revision=None, **kwargs):
        if revision is not None or not Path(path).exists():
            raise MadError(f"--tensor-parallel reads a local file or folder: {path} is not one (download a "
                           "repository first, e.g. with `mad run` without --tensor-parallel)")
        model, tok = load_sharded(path, group, timeout=timeout, **kwargs)
        loaded["model"] = model
        memory = member_memory(model)
        if group.rank() == 0:  # on stderr: the output (text, --json) stays the single process's
            print(f"Tensor parallel: {group.size()} members; weights per member: "
                  + ", ".join(f"{w / 1e9:.3f} GB" for w, _ in memory) + "; peak memory while loading: "
                  + ", ".join(f"{p / 1e9:.3f} GB" for _, p in memory), file=sys.stderr, flush=True)
        if not _COMMAND_WATCHDOG:  # from here on every step is watched: a member that hangs ends the command
            _COMMAND_WATCHDOG.append(Watchdog(group.rank(), group.size(), timeout))
        return model, tok

    def save_state(path, state, flag="state file"):
        save_state_file(path, state, loaded["model"], flag)

    return load, load_state_file, save_state


def is_backend_error(e: BaseException) -> bool:
    """Whether `e` is a distributed backend's error (a lost member: "connection to a peer was lost")."""
    return isinstance(e, RuntimeError) and str(e).startswith(("[ring]", "[nccl]", "[mpi]", "[jaccl]"))


def exit_lost(e: BaseException) -> None:
    """End this member after the backend's error `e` (a member lost): one MAD error message, exit code 2.
    `os._exit`: from any thread, and without waiting on collectives that can no longer complete."""
    print(f"error: tensor parallel: a member of the group was lost ({e})", file=sys.stderr, flush=True)
    os._exit(2)


def _report_lost_members() -> None:
    """Turn the backend's error for a lost member into a MAD error message and exit code 2."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if is_backend_error(value):
            exit_lost(value)
        previous(kind, value, tb)

    sys.excepthook = hook
