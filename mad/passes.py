"""Graph-level passes over a checked `Graph`: rewrites of how nodes run that leave the model unchanged.

Sibling-linear fusion
---------------------
Several linear nodes that read the same value, like q, k, v, the output gate and the i/f gates of an
mLSTM layer, or the up and gate projections of a feed-forward, are one matrix multiply in disguise:

    [y_1 | y_2 | ... | y_n] = x @ [W_1; W_2; ...; W_n]^T

A block takes part by declaring it (`Block.linear_form` -> `LinearForm`: "I am y = softcap(x W^T + b),
with W and b under these parameter names"); the pass reads only those declarations and the graph's
parameter shapes, so it knows no block class. `find_sibling_linears` finds the groups;
`FusedLinear` runs one group as a single matmul (the `linear` kernel over the concatenation) whose
output is split back into the members' outputs, each with its own bias and soft-cap. Fewer, larger
matmuls mean fewer kernel launches and fewer compiled-function inputs, which is what decode (batch 1,
one token, launch-bound on a GPU) needs; each output element is still the same dot product of one row
of x with one row of W, so results agree with the unfused graph to rounding (equal, on the CPU). On the
CPU a multi-token call computes each member's part as a product of its own (the `linear` kernel's CPU
variant, kernels/linear.py): the members' outputs are then contiguous arrays, which MLX's CPU
elementwise kernels read faster than split columns (see benchmarks/RESULTS.md).

Checkpoints do not change: a `FusedLinear` owns the concatenated weight and bias (one copy in
memory), `named_parameters()` gives the members' weights and biases back under their own names and
shapes as slices of them (views, no copies), and `load()` rebuilds the concatenations from pieces
named per member. `mad.program.Program(fuse=...)` decides whether the pass is applied; the Program
runs a group at its first member and puts every member's output under the member's name.

A node joins a group when
  - its block declares a `LinearForm` for its inputs (one input, its own weights: a tied linear
    declares none),
  - no node ties to it (`tie:` on another node: its weight is someone else's too), and
  - with `by_stage` (a Program compiled stage by stage), it runs in the same stage as the others: a
    compiled stage can only produce its own nodes. A whole-program compile fuses across stages.
  - its weight is stored as the others' are (`storage`): float in the compute dtype, or quantized with
    the same bits, group size and mode (`mad.quantize`). A quantized group is one `mx.quantized_matmul`
    over the members' packed weights, scales and biases stacked by rows (`QuantizedFusedLinear`).
Reading exactly the same value implies the same input width. Other block types that read the same
value (a norm, a `swiglu` with its own projections inside) are not touched: their weights are internal
to their module, not separate nodes of the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .block import FoldForm, LinearForm
from .errors import MadError
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
    forms: tuple[LinearForm, ...]         # each member's declaration (its parameter names)
    quant: Any = None                     # the members' `mad.quantize.QuantSettings`; None: float weights

    def names(self) -> list[tuple[str, Optional[str]]]:
        """Each member's weight and bias names as `parameters()` gives them (`node.weight`, `node.bias`
        or None)."""
        return [(f"{m}.{f.weight}", f"{m}.{f.bias}" if f.bias else None) for m, f in zip(self.members, self.forms)]

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
        out = {"input": self.source, "nodes": list(self.members), "out": list(self.widths), "in": self.d_in}
        if self.quant is not None:
            out["quantized"] = self.quant.to_dict()
        return out


def linear_forms(graph: Graph) -> dict[str, LinearForm]:
    """{node: its declared `LinearForm`} for the nodes the fusion pass may merge: a declaration, one
    input, a 2-d weight [out, in] (and a bias [out]) among its parameters, and no node tying to it."""
    g = graph.g
    tie_sources = {getattr(g.nodes[n]["spec"], "tie", None) for n in graph.blocks()}
    out = {}
    for n in graph.blocks():
        d = g.nodes[n]
        if n in tie_sources or len(d["inputs"]) != 1:
            continue
        x = g.nodes[d["inputs"][0]]["type"]
        form = d["spec"].linear_form(x)
        if form is None:
            continue
        shape = d["params"].get(form.weight)
        if shape is None or len(shape) != 2 or shape[1] != int(x.shape[-1]) or (
                form.bias is not None and d["params"].get(form.bias) != (shape[0],)):
            raise MadError(f"node '{n}' ({d['block_type']}) declares a linear form whose parameters do not fit: "
                           f"weight '{form.weight}' {shape}, bias '{form.bias}' {d['params'].get(form.bias)}")
        out[n] = form
    return out


def fusable_linears(graph: Graph) -> list[str]:
    """Nodes the fusion pass may merge, in execution order (see `linear_forms`)."""
    return list(linear_forms(graph))


def find_sibling_linears(graph: Graph, by_stage: bool = False,
                         storage: Optional[Callable[[str], Hashable]] = None) -> list[FusionGroup]:
    """Groups of >= 2 fusable linear nodes that read the same value (and, with `by_stage`, run in
    the same stage) and store their weights alike (`storage(node)`: None for float weights, the
    quantization settings of a quantized node; None for every node when not given).

    Groups are listed in the order of their first member; members in execution order. A group runs
    where its first member would: every member only needs the shared input, computed before that.
    """
    g = graph.g
    forms = linear_forms(graph)
    storage = storage or (lambda n: None)
    by_source: dict[tuple[str, str | None, Hashable], list[str]] = {}
    for n in forms:  # graph.blocks() order = execution order
        key = (g.nodes[n]["inputs"][0], g.nodes[n]["stage"] if by_stage else None, storage(n))
        by_source.setdefault(key, []).append(n)
    groups = []
    for (source, _, quant), members in by_source.items():
        if len(members) < 2:
            continue
        shapes = [g.nodes[m]["params"][forms[m].weight] for m in members]
        groups.append(FusionGroup(
            source=source, members=tuple(members),
            widths=tuple(int(s[0]) for s in shapes), d_in=int(shapes[0][1]),
            bias=tuple(forms[m].bias is not None for m in members),
            softcap=tuple(forms[m].softcap or None for m in members),
            forms=tuple(forms[m] for m in members), quant=quant))
    return groups


@dataclass(frozen=True)
class Fold:
    """Work a linear unit (a `linear` node, or a fused group at its first member) does in its own kernel
    at decode (kernels/fold.py): it reads the input of the RMS norm `norm` instead of the norm's output,
    and/or its result goes to `node`, an `add` whose other input is `residual` or a `gate` whose
    activation is `pair`. Where no kernel takes the call, every node runs as it would unfolded."""

    unit: str
    node: str                        # where the result goes: the unit itself, or the add / gate node
    norm: Optional[str] = None       # the rms_norm node the unit reads
    residual: Optional[str] = None   # the add's other input
    pair: Optional[str] = None       # the gate's activation (act(first member) * second member)
    norm_form: Optional[FoldForm] = None  # what `norm` declares (its weight's name and eps)

    def describe(self) -> dict:
        """The fold as data (for `plan.json`)."""
        return {k: v for k, v in (("linear", self.unit), ("into", self.node), ("norm", self.norm),
                                  ("residual", self.residual), ("pair", self.pair)) if v is not None}


def fold_forms(graph: Graph) -> dict[str, FoldForm]:
    """{node: its declared `FoldForm`} (`Block.fold_form`)."""
    g = graph.g
    out = {}
    for n in graph.blocks():
        d = g.nodes[n]
        form = d["spec"].fold_form(*(g.nodes[s]["type"] for s in d["inputs"]))
        if form is not None:
            out[n] = form
    return out


def _readers(graph: Graph) -> dict[str, list[str]]:
    """{value: the nodes that read it, in execution order}."""
    readers: dict[str, list[str]] = {}
    for n in graph.blocks():
        for s in graph.g.nodes[n]["inputs"]:
            readers.setdefault(s, []).append(n)
    return readers


def find_folds(graph: Graph, groups: list[FusionGroup]) -> list[Fold]:
    """The folds of `graph` with the fused `groups` (`Fold`), in the order of their units.

    A unit is a fusable linear node (`linear_forms`) outside the groups, or a group. It folds
      - the RMS norm it reads (one input, a weight), whoever else reads the norm;
      - an `add` of two inputs, one of them a single linear node that nothing else reads and that is no
        output of the graph: the add's other input becomes the linear's residual;
      - a `gate` whose gate and x are the two members of a group of two (in that order, equal widths),
        read by nothing else and no outputs of the graph.
    """
    g = graph.g
    forms = fold_forms(graph)
    outputs = set(graph.outputs.values())
    readers = _readers(graph)
    grouped = {m: grp for grp in groups for m in grp.members}
    units = {n: g.nodes[n]["inputs"][0] for n in linear_forms(graph) if n not in grouped}
    units.update({grp.members[0]: grp.source for grp in groups})

    def norm_of(unit: str) -> Optional[str]:
        src = units[unit]
        form = forms.get(src)
        return src if form is not None and form.kind == "rms_norm" and len(g.nodes[src]["inputs"]) == 1 else None

    def alone(n: str, reader: str) -> bool:
        return readers.get(n) == [reader] and n not in outputs

    def fold(unit: str, node: str, **work: Any) -> Fold:
        norm = norm_of(unit)
        return Fold(unit, node, norm, norm_form=forms.get(norm) if norm else None, **work)

    claimed: dict[str, Fold] = {}
    for n, form in forms.items():
        ins = g.nodes[n]["inputs"]
        if form.kind == "add" and len(ins) == 2:
            for lin, other in ((ins[1], ins[0]), (ins[0], ins[1])):
                if lin in units and lin not in grouped and lin != other and alone(lin, n) and lin not in claimed:
                    claimed[lin] = fold(lin, n, residual=other)
                    break
        elif form.kind == "gate" and len(ins) == 2:
            grp = grouped.get(ins[0])
            if (grp is not None and grp.members == tuple(ins) and grp.widths[0] == grp.widths[1]
                    and all(alone(m, n) for m in ins) and grp.members[0] not in claimed):
                claimed[grp.members[0]] = fold(grp.members[0], n, pair=form.act)
    folds = []
    for unit in units:
        if unit in claimed:
            folds.append(claimed[unit])
        elif norm_of(unit) is not None:
            folds.append(fold(unit, unit))
    order = {n: i for i, n in enumerate(graph.blocks())}
    return sorted(folds, key=lambda f: order[f.unit])


@dataclass(frozen=True)
class NormGate:
    """A `gate` node whose gated input is a per-head layer norm (`head_norm` form) that nothing else reads:
    at decode one kernel computes act(gate) * norm(x) (kernels/fold.py `head_norm_gate`) where the norm
    and the gate ran as two or three. Where no kernel takes the call, both nodes run as they are."""

    node: str                        # the gate node
    norm: str                        # the head_norm node it gates
    gate: str                        # the gate's first input (what goes through the activation)
    act: str
    norm_form: FoldForm              # what `norm` declares (weight, bias, eps, heads, offset)

    def describe(self) -> dict:
        """The fold as data (for `plan.json`)."""
        return {"norm": self.norm, "into": self.node, "gate": self.gate, "act": self.act}


def find_norm_gates(graph: Graph) -> list[NormGate]:
    """The `NormGate`s of `graph`, in execution order: a `gate` of two inputs whose second is a `head_norm`
    node of one input that only the gate reads and that is no output of the graph."""
    g = graph.g
    forms = fold_forms(graph)
    outputs = set(graph.outputs.values())
    readers = _readers(graph)
    found = []
    for n, form in forms.items():
        ins = g.nodes[n]["inputs"]
        if form.kind != "gate" or len(ins) != 2:
            continue
        norm = ins[1]
        norm_form = forms.get(norm)
        if (norm_form is not None and norm_form.kind == "head_norm" and len(g.nodes[norm]["inputs"]) == 1
                and readers.get(norm) == [n] and norm not in outputs and ins[0] != norm):
            found.append(NormGate(n, norm, ins[0], form.act, norm_form))
    return found


class FusedLinear(nn.Module):
    """One `FusionGroup` as one matmul: `x -> [y_1, ..., y_n]`, the members' outputs in order.

    It runs the `linear` kernel (`kernels.linear`: matmul, bias, soft-cap) that a `linear` node runs,
    once for all members: the output is split back at the members' bounds and each part gets its
    member's soft-cap, so every output element is computed as unfused. It holds `weight` [sum of
    widths, d_in], the members' weights stacked by rows (each member's module keeps a row slice of it
    under the member's name: the Program keeps the two in step), and, when any member has a bias,
    `bias` [sum of widths], the members' biases end to end with zeros for the members without one. The
    bias is added inside the matmul (`addmm`, or the device kernel's float32 sum), so each output is
    rounded once, as unfused (an add after a bfloat16 matmul would round twice), and adding zero
    changes nothing for the members without a bias.
    """

    def __init__(self, group: FusionGroup, weights: list[mx.array], biases: dict[int, mx.array]):
        super().__init__()
        self.weight = mx.concatenate(weights, axis=0)
        if biases:
            self.bias = mx.concatenate([biases[i] if i in biases else mx.zeros((w,), weights[0].dtype)
                                        for i, w in enumerate(group.widths)])
        self.group = group  # a frozen dataclass: kept as a plain attribute, not a parameter

    @classmethod
    def from_modules(cls, group: FusionGroup, modules: list[nn.Module]) -> "FusedLinear":
        """Take over the weights the members' modules hold under their declared names."""
        weights, biases = [], {}
        for i, (module, form) in enumerate(zip(modules, group.forms)):
            params = dict(tree_flatten(module.parameters()))
            weights.append(params[form.weight])
            if form.bias is not None:
                biases[i] = params[form.bias]
        return cls(group, weights, biases)

    def row_attrs(self) -> tuple[str, ...]:
        """The arrays stacked by rows: `weight`, and `bias` when a member has one."""
        return ("weight", "bias") if "bias" in self else ("weight",)

    def member_params(self, form: LinearForm) -> list[tuple[str, str]]:
        """(attribute here, the member's parameter name) of one member's rows."""
        return [("weight", form.weight)] + ([("bias", form.bias)] if form.bias is not None else [])

    def __call__(self, x: mx.array) -> list[mx.array]:
        return dispatch("linear")(x, *self.linear_args())

    def linear_args(self) -> tuple:
        """(weight, bias, splits, caps): the `linear` kernel's arguments after x."""
        return (self.weight, self.bias if "bias" in self else None, [stop for _, stop in self.group.bounds[:-1]],
                self.group.softcap)

    # ------------------------------------------------------------------ the members' names
    def named_parameters(self) -> dict[str, mx.array]:
        """{member's weight, member's bias (if it has one): slices (views) of the concatenations}, in
        member order: the members' own names and shapes."""
        out = {}
        for (weight, bias), (start, stop) in zip(self.group.names(), self.group.bounds):
            out[weight] = self.weight[start:stop]
            if bias is not None:
                out[bias] = self.bias[start:stop]
        return out

    def load(self, pieces: dict[str, mx.array]) -> None:
        """Take the members' weights/biases from `{member's weight or bias name: array}` (names and
        shapes checked by the caller): the concatenations are rebuilt from them. Members not in
        `pieces` keep their current values (and members without a bias their zeros)."""
        names = self.group.names()
        for attr, keys in (("weight", [w for w, _ in names]), ("bias", [b for _, b in names])):
            if any(k in pieces for k in keys if k is not None):
                current = self[attr]
                self[attr] = mx.concatenate([pieces[k] if k in pieces else current[start:stop]
                                             for k, (start, stop) in zip(keys, self.group.bounds)])
