"""The runtime: a checked `Graph` compiled into stages of MLX code.

A stage is a pure function `(inputs, state) -> (outputs, new_state)` over a run of nodes; the
Program chains its stages inside one `mx.compile` (or compiles each stage on its own). Graph walking
happens only while MLX traces: at run time a call is one compiled function, with no per-node Python
dispatch and no host synchronisation.

State is a plain dict `{node: {name: array}}` of float32 arrays, owned by the recurrent nodes.

A Program builds its modules from the graph's specs and owns them (the graph holds no weights): two
programs built from one graph never share a weight.

Stages are the topology's units (`stage:`, or one per template instance); `plan()` lists them and
`profile()` times each on its own.

With `fuse` on, sibling `linear` nodes that read the same value run as one matmul (`mad.passes`); the
weights keep their per-node names and shapes for `parameters()` and `load_weights`: the members' own
modules hold them (row slices of the group's concatenated weight), and the concatenation follows them
(`_sync_fused`), so `root` is one tree of per-node parameters that MLX training (`nn.value_and_grad`,
optimizers) reads and updates.

`last_only=True` returns the outputs at the last position only, as reading a prompt needs: the
positionwise nodes that feed only the outputs (a language model's final norm and head, the last block's
feed-forward) then run on that position alone.

`valid=r` (an integer; the compiled program reads it as an array, so every r of one width runs one trace)
makes the positions from r on inert padding: every stateful
node leaves its state as the first r positions left it, and `last_only` reads position r - 1. A prompt
piece of any length then runs at one of a few padded shapes in one call (`mad.generate.next_prompt_end`)
instead of several calls of power-of-two lengths, each reading every weight. A program pads when each of
its stateful modules declares it can (`inert_padding = True` and a `valid` argument: the mLSTM cell, the
causal conv); `pads_exactly` says whether it does.

With fusion on, a linear also does the elementwise work next to it in its own kernel where a device
kernel takes the call (decode-sized calls on a GPU): the RMS norm it reads, the residual add or the gated
activation it feeds (`mad.passes.find_folds`, kernels/fold.py; `MAD_FOLD=0` turns it off), and a gate
applies the per-head layer norm it reads in the same kernel (`find_norm_gates`). Everywhere else the nodes
run as they are.

`quantize(config)` swaps the projections, the head and the embeddings for MLX-quantized modules
(`mad.quantize`), after the program is built and before weights are loaded; the fusion pass then groups
only siblings quantized alike.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Literal, Mapping, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .block import TensorType
from .dims import Sym, shape_str
from .errors import Diagnostics, MadError
from .graph import Graph, check_state
from .kernels.registry import gradients
from .passes import Fold, FusionGroup, NormGate, find_folds, find_norm_gates, find_sibling_linears
from .quantize import fused_linear, quantized_modules

Mode = Literal["auto", "step", "chunkwise", "parallel"]
CompileMode = Literal["program", "stage", "none"]
FuseMode = Union[bool, Literal["auto"]]
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
FUSED = "_<fused>"  # the key of the fused modules in `Program.root`: not a node name, and (leading "_") not a
# parameter for MLX (`nn.Module.parameters()` skips it), while `root.state` holds it


def dtype_of(name: str | mx.Dtype) -> mx.Dtype:
    if isinstance(name, mx.Dtype):
        if name not in DTYPES.values():
            raise MadError(f"unsupported dtype {name} (choose from {', '.join(DTYPES)})")
        return name
    if not isinstance(name, str) or name not in DTYPES:
        raise MadError(f"unknown dtype '{name}' (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def seq_axis(t: TensorType) -> int | None:
    """The axis of the sequence dim in a value's shape, or None if it has none."""
    return next((i for i, d in enumerate(t.shape) if isinstance(d, Sym) and d.kind == "seq"), None)


def last_position(x: mx.array, axis: int, valid: Optional[mx.array] = None) -> mx.array:
    """Position -1 of `axis` (size 1 there), or position valid - 1 when the positions after it are padding;
    `valid` of shape (B, P) instead picks P positions of each sequence (`Program.__call__`'s `positions`)."""
    if valid is None:
        return x[(slice(None),) * axis + (slice(-1, None),)]
    if valid.ndim == 2:
        index = valid.reshape(valid.shape + (1,) * (x.ndim - 2))
        if axis != 1:
            index = mx.moveaxis(index, 1, axis)
        return mx.take_along_axis(x, index, axis=axis)
    return mx.take(x, valid - 1, axis=axis)


def fuse_enabled(fuse: FuseMode) -> bool:
    """Whether sibling linears are fused: `MAD_FUSE=0` / `MAD_FUSE=1` in the environment forces it,
    else True/False as given; "auto" (MAD's default) is on for every device: fusing was faster on the CPU
    and within noise on the GPU (benchmarks/RESULTS.md). Fused or not, outputs agree to rounding (float32:
    equal on the CPU with MLX's own BLAS, whose sums do not depend on the product's width)."""
    env = os.environ.get("MAD_FUSE", "")
    if env:
        if env not in ("0", "1"):
            raise MadError(f"MAD_FUSE must be 0 or 1, got '{env}'")
        return env == "1"
    if fuse == "auto":
        return True
    if isinstance(fuse, bool):
        return fuse
    raise MadError(f"fuse must be True, False or 'auto', got {fuse!r}")


def fold_enabled() -> bool:
    """Whether linears fold their neighbours' elementwise work (`MAD_FOLD=0` turns it off; on by default,
    with fusion, in a program compiled whole)."""
    env = os.environ.get("MAD_FOLD", "")
    if env not in ("", "0", "1"):
        raise MadError(f"MAD_FOLD must be 0 or 1, got '{env}'")
    return env != "0"


@dataclass
class Stage:
    """A run of nodes executed as one function. `reads`/`writes` are the values crossing its border."""

    name: str
    nodes: list[str]
    reads: list[str]
    writes: list[str]


class Program:
    """A compiled model: `program(inputs, state=None) -> (outputs, new_state)`.

    Args:
        graph: a checked graph (`mad.build_graph`).
        dtype: compute and weight dtype for float tensors; recurrent state stays float32.
        compile: "program" (one compiled function, the default), "stage" (one per stage) or "none".
        fuse: run sibling linear nodes that read the same value as one matmul (`mad.passes`): True,
            False or "auto" (MAD's default: on). `MAD_FUSE=0/1` overrides it.

    Weights: the program builds every node's module from its spec and owns it. `root` holds each module
    at the node's name: `tree_flatten(root.parameters())` names are the weight names, fused or not. A
    fused group's `FusedLinear` (at `root["_<fused>"]`, which MLX does not count as a parameter) holds the
    members' weights concatenated, and each member's module holds its rows of that (a view, one copy in
    memory). The members' arrays are the truth: whoever replaces them (`root.update`, an optimizer,
    `load_weights`, `set_dtype`) has the concatenation rebuilt from them before the next run
    (`_sync_fused`, an identity check per member), so a gradient taken through the fused matmul reaches
    the members' arrays. The compiled functions read the unfused nodes' modules and the concatenations
    as inputs (`mx.compile(inputs=...)`), so new arrays of the same shapes are used without re-tracing.
    A quantized group (`quantize`) stacks the members' packed weights, scales and biases the same way.
    """

    def __init__(self, graph: Graph, dtype: str | mx.Dtype = "float32", compile: CompileMode = "program",
                 fuse: FuseMode = "auto"):
        if compile not in ("program", "stage", "none"):
            raise MadError(f"compile must be 'program', 'stage' or 'none', got {compile!r}")
        self.graph = graph
        self.dtype = dtype_of(dtype)
        g = graph.g
        self.nodes = graph.blocks()
        self.reads = {n: g.nodes[n]["inputs"] for n in self.nodes}
        self.stateful = {n for n in self.nodes if g.nodes[n]["state"]}
        self._state_keys = graph.state_keys()  # checked on every call: keep the check cheap
        self._inputs = [(name, len(t.shape), tuple((i, int(s)) for i, s in enumerate(t.shape) if not isinstance(s, Sym)),
                         t.dtype) for name, t in graph.inputs.items()]  # for the fast path of `_check_inputs`

        # sibling linears: `fusion_groups` are the candidates (listed in the plan), fused when `fused`.
        # A fused node has no entry in `fns`: it runs through its group's FusedLinear.
        self.fuse = fuse
        self.fused = fuse_enabled(fuse)
        self._fuse_env = os.environ.get("MAD_FUSE") or None  # shown in the plan when it decided
        self._by_stage = compile == "stage"
        self.fusion_groups: list[FusionGroup] = find_sibling_linears(graph, by_stage=self._by_stage)
        self._fold_on = fold_enabled()  # read once: a program folds (or not) for its whole life
        self.quantization: Optional[dict] = None  # the config `quantize` applied (mad.quantize)
        # every node's module, built in execution order whether fused or not (so a fused and an unfused
        # program built from the same random seed start from the same weights)
        self._install({n: self._build(n) for n in self.nodes}, self.fusion_groups)
        if self.dtype != mx.float32:
            self.set_dtype(self.dtype)
        self.stages = self._plan()
        self.compile_mode = compile

    def _install(self, modules: dict[str, Callable], groups: list[FusionGroup]) -> None:
        """Own `modules` (every node's module or function, by node) and run `groups` fused when fusion is
        on: `root`, the fused modules and what the compiled functions read, the ties, `last_only`'s tail.
        Forgets the compiled functions (they read the previous modules)."""
        active = groups if self.fused else []
        self._group_of = {m: grp for grp in active for m in grp.members}
        self.fns: dict[str, Callable] = {n: m for n, m in modules.items() if n not in self._group_of}
        # the fused module of each group, by its first member (where the group runs): it concatenates the
        # members' weights, and the members' modules keep (views of) their rows, never run
        self._fused: dict[str, nn.Module] = {
            grp.members[0]: fused_linear(grp, [modules[m] for m in grp.members]) for grp in active}

        self.root = nn.Module()
        for n, module in modules.items():
            if isinstance(module, nn.Module):
                self.root[n] = module
        if self._fused:
            self.root[FUSED] = list(self._fused.values())
        # per group: (member's module, parameter path, attribute of the fused module, rows) of every array
        # a member holds rows of (weight and bias; packed weight, scales, biases and bias when quantized)
        self._slots: dict[str, list[tuple[nn.Module, tuple[str, ...], str, int, int]]] = {}
        self._attrs: dict[str, tuple[str, ...]] = {}
        for first, fl in self._fused.items():
            grp = fl.group
            self._attrs[first] = fl.row_attrs()
            self._slots[first] = [
                (self.root[m], tuple(name.split(".")), attr, start, stop)
                for m, form, (start, stop) in zip(grp.members, grp.forms, grp.bounds)
                for attr, name in fl.member_params(form)]
        self._synced: dict[str, tuple] = {}
        self._watch: dict[str, list] = {}
        self._watched: Optional[list] = None
        for first in self._fused:
            self._point_members(first)
        # what the compiled functions read: every module but the fused members' (whose arrays reach them
        # through the concatenations)
        self._compile_inputs = [self.root[n] for n in self.root if n not in self._group_of]
        for n in self.nodes:
            tie = getattr(self.graph.g.nodes[n]["spec"], "tie", None)
            if tie:  # never a fused node: the pass leaves tied nodes and their sources alone
                self.fns[n].tie(self.fns[tie])
        self._compiled: dict[Any, Callable] = {}
        self.traces: list[tuple[tuple[int, ...], bool]] = []  # (first input's shape, last_only) per whole-program trace
        self.tail = self._last_only_nodes(active)
        # folds need the whole program's values at hand (not a stage's) and a module that gives its arguments
        folding = self.fused and not self._by_stage and self._fold_on
        folds = find_folds(self.graph, active) if folding else []
        self.folds: list[Fold] = [f for f in folds if hasattr(self._unit(f.unit), "linear_args")]
        self._fold_at = {f.node: f for f in self.folds}
        gates = find_norm_gates(self.graph) if folding else []
        self.norm_gates: list[NormGate] = [ng for ng in gates if ng.node not in self._fold_at]
        self._norm_gate_at = {ng.node: ng for ng in self.norm_gates}

    def modules(self) -> dict[str, Callable]:
        """Every node's module (or function, for nodes without weights), by node, in execution order."""
        return {n: self.root[n] if n in self.root else self.fns[n] for n in self.nodes}

    def quantize(self, config: Mapping[str, Any]) -> None:
        """Replace the projections, the head and the embeddings by MLX-quantized ones, as `config` says
        (mlx-lm's `quantization` entry: {"group_size", "bits", "mode", module path: false | settings}; see
        `mad.quantize`), quantizing the weights they hold now. Call it before loading a quantized
        checkpoint (its weights then load into the quantized modules) or on a loaded float model.

        Sibling linears are regrouped: only members quantized alike (or all float) fuse, a quantized group
        running as one `mx.quantized_matmul` over stacked packed weights. `quantization` records the
        config, checked; a bad config (settings MLX refuses, a group size that does not divide a
        projection's inputs, a module this model lacks) is a MadError naming it, and changes nothing."""
        if self.quantization is not None:
            raise MadError("the model is quantized already")
        self._sync_fused()
        modules, storage, checked = quantized_modules(self.graph, self.modules(), config)
        self.fusion_groups = find_sibling_linears(self.graph, by_stage=self._by_stage, storage=storage.get)
        self._install(modules, self.fusion_groups)
        self.quantization = checked

    def clear_compiled(self) -> None:
        """Forget the compiled functions: the next call traces anew. (MLX aborts at exit if a function traced
        in a thread that has ended is still alive: a server's engine thread calls this as it stops.)"""
        self._compiled.clear()

    def _last_only_nodes(self, groups: list[FusionGroup]) -> frozenset[str]:
        """The nodes that `last_only` runs on the last position alone: positionwise, with a sequence
        dim, and read only by such nodes (or an output). The members of a fused group run on one input,
        so they are in or out together."""
        g = self.graph.g
        outputs = set(self.graph.outputs.values())
        excluded: set[str] = set()
        while True:
            tail: set[str] = set()
            for n in reversed(self.nodes):
                readers = list(g.successors(n))
                if (n not in excluded and g.nodes[n]["spec"].positionwise and n not in self.stateful
                        and seq_axis(g.nodes[n]["type"]) is not None and (readers or n in outputs)
                        and all(r in tail for r in readers)):
                    tail.add(n)
            split = [m for grp in groups if 0 < len(tail & set(grp.members)) < len(grp.members) for m in grp.members]
            if not split:
                return frozenset(tail)
            excluded.update(split)

    def _build(self, node: str) -> Callable:
        """A new module (or function) for `node`, built from its spec for its input types."""
        data = self.graph.g.nodes[node]
        return data["spec"].build(*(self.graph.g.nodes[s]["type"] for s in data["inputs"]))

    # ------------------------------------------------------------------ plan
    def _plan(self) -> list[Stage]:
        stages = []
        outputs = set(self.graph.outputs.values())
        for name, nodes in self.graph.stages():
            inside = set(nodes)
            reads = list(dict.fromkeys(s for n in nodes for s in self.reads[n] if s not in inside))
            stages.append(Stage(name, nodes, reads, []))
        later: set[str] = set(outputs)
        for stage in reversed(stages):
            stage.writes = [n for n in stage.nodes if n in later]
            later |= set(stage.reads)
        return stages

    def plan(self) -> dict:
        """The stages as data (for `plan.json`), the sibling linears run as one matmul (`fuse.groups`:
        those the pass found; `fuse.enabled`: whether this program fuses them) and the quantization
        config (`quantization`: None when the weights are not quantized)."""
        return {
            "name": self.graph.name,
            "compile": self.compile_mode,
            "stages": [
                {"name": s.name, "nodes": s.nodes, "reads": s.reads, "writes": s.writes,
                 "state": [n for n in s.nodes if n in self.stateful]}
                for s in self.stages
            ],
            "outputs": self.graph.outputs,
            "fuse": {"setting": self.fuse, "MAD_FUSE": self._fuse_env, "enabled": self.fused,
                     "groups": [grp.describe() for grp in self.fusion_groups]},
            "folds": [f.describe() for f in self.folds] + [ng.describe() for ng in self.norm_gates],
            "quantization": self.quantization,
        }

    # ------------------------------------------------------------------ weights
    def parameters(self) -> dict[str, mx.array]:
        """{weight name: array} by node, in execution order: `tree_flatten(root.parameters())`. A fused
        node's weight is its module's, a row slice (a view) of its group's concatenated weight once the
        program has run or loaded."""
        self._sync_fused()
        return dict(tree_flatten(self.root.parameters()))

    def set_dtype(self, dtype: str | mx.Dtype) -> None:
        self.dtype = dtype_of(dtype)
        self.root.set_dtype(self.dtype)  # every node's floating-point arrays (not packed weights); the fused below
        for first, fl in self._fused.items():
            for attr in self._attrs[first]:
                if mx.issubdtype(fl[attr].dtype, mx.floating):
                    fl[attr] = fl[attr].astype(self.dtype)
            self._point_members(first)

    # ------------------------------------------------------------------ fused groups
    @staticmethod
    def _get(module: nn.Module, path: tuple[str, ...]) -> Any:
        for part in path:
            module = module[part]
        return module

    @staticmethod
    def _set(module: nn.Module, path: tuple[str, ...], value: mx.array) -> None:
        for part in path[:-1]:
            module = module[part]
        module[path[-1]] = value

    def _point_members(self, first: str) -> None:
        """Make the members' arrays of group `first` the rows of its concatenations (views)."""
        fl = self._fused[first]
        for module, path, attr, start, stop in self._slots[first]:
            self._set(module, path, fl[attr][start:stop])
        self._synced[first] = (tuple(fl[a] for a in self._attrs[first]),
                               tuple(self._get(m, p) for m, p, *_ in self._slots[first]))
        # (owner, key, the array there now) of every array the group's sync reads: one flat identity check
        # per call tells that nothing was replaced
        owners = [(self._get(m, p[:-1]), p[-1]) for m, p, *_ in self._slots[first]]
        self._watch[first] = [(fl, a, fl[a]) for a in self._attrs[first]] + [(o, k, o[k]) for o, k in owners]
        self._watched = None

    def _sync_fused(self) -> None:
        """Rebuild each group's concatenation from its members' arrays where any was replaced since the
        last sync (an identity check, cheap enough for every call), then point the members at its rows.
        Where only the concatenation was replaced (`FusedLinear.load`), the members follow it."""
        if self._watched is None:
            self._watched = [w for ws in self._watch.values() for w in ws]
        if all(owner[key] is a for owner, key, a in self._watched):
            return
        for first, fl in self._fused.items():
            concatenations, synced = self._synced[first]
            slots = self._slots[first]
            members = [self._get(m, p) for m, p, *_ in slots]
            if all(a is b for a, b in zip(members, synced)):
                if any(fl[a] is not c for a, c in zip(self._attrs[first], concatenations)):
                    self._point_members(first)
                continue
            pieces = {(attr, start): a for (_, _, attr, start, _), a in zip(slots, members)}
            for attr in self._attrs[first]:
                parts = [pieces.get((attr, start)) for start, _ in fl.group.bounds]
                dtype = next(p.dtype for p in parts if p is not None)  # a bias: zeros for members without one
                fl[attr] = mx.concatenate([p if p is not None else mx.zeros((stop - start,), dtype)
                                           for p, (start, stop) in zip(parts, fl.group.bounds)])
            self._point_members(first)

    def load_weights(self, weights: Mapping[str, mx.array], strict: bool = True, where: str = "checkpoint") -> None:
        """Load `{weight name: array}`; missing, unexpected and wrong-shape keys are reported together.

        Arrays are cast to the program's dtype; nothing is changed unless every key fits.
        """
        own = self.parameters()
        diags = Diagnostics()
        missing = [k for k in own if k not in weights]
        unexpected = [k for k in weights if k not in own]
        not_arrays = [k for k in weights if not isinstance(weights[k], mx.array)]
        for k in not_arrays:
            diags.error(f"{where}: weight '{k}' is a {type(weights[k]).__name__}, not an MLX array")
        wrong = [k for k in weights if k in own and k not in not_arrays
                 and tuple(weights[k].shape) != tuple(own[k].shape)]
        if strict:
            for k in missing:
                diags.error(f"{where}: missing weight '{k}' {tuple(own[k].shape)}")
            for k in unexpected:
                diags.error(f"{where}: unexpected weight '{k}' {tuple(getattr(weights[k], 'shape', ()))}")
        for k in wrong:
            diags.error(f"{where}: weight '{k}' has shape {tuple(weights[k].shape)}, the model expects "
                        f"{tuple(own[k].shape)}")
        for k in weights:  # a float parameter needs float weights: ints and bools would be loaded as they are
            if k in own and k not in not_arrays and mx.issubdtype(own[k].dtype, mx.floating) \
                    and not mx.issubdtype(weights[k].dtype, mx.floating):
                diags.error(f"{where}: weight '{k}' has dtype {weights[k].dtype}, the model expects floating-point "
                            f"weights ({own[k].dtype})")
            elif k in own and k not in not_arrays and not mx.issubdtype(own[k].dtype, mx.floating) \
                    and weights[k].dtype != own[k].dtype:  # quantized: packed values, floating-point-mode scales
                diags.error(f"{where}: weight '{k}' has dtype {weights[k].dtype}, the quantized model expects "
                            f"{own[k].dtype}")
        diags.raise_if_any()
        by_node: dict[str, list] = {}
        for k, v in weights.items():
            if k in own:
                node = self._owner(k)
                v = v.astype(self.dtype) if mx.issubdtype(v.dtype, mx.floating) else v
                by_node.setdefault(node, []).append((k[len(node) + 1:], v))
        self.root.update({n: tree_unflatten(items) for n, items in by_node.items()})
        self._sync_fused()  # one concatenated weight per group, built from the pieces

    def _owner(self, key: str) -> str:
        parts = key.split(".")
        for i in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in self.reads:
                return prefix
        raise KeyError(key)

    # ------------------------------------------------------------------ state
    def init_state(self, batch: int) -> dict[str, dict[str, mx.array]]:
        """Zero state for `batch` sequences: {node: {name: float32 array}}."""
        state = {}
        for n in self.nodes:
            if n in self.stateful:
                state[n] = {
                    name: mx.zeros(tuple(batch if isinstance(s, Sym) else int(s) for s in t.shape),
                                   dtype=mx.float32 if t.dtype in ("float32", "float") else mx.int32)
                    for name, t in self.graph.g.nodes[n]["state"].items()
                }
        return state

    # ------------------------------------------------------------------ running
    def _read(self, env: dict, src: str, node: str, last_only: bool, valid: Optional[mx.array] = None) -> mx.array:
        """The value `node` reads from `src`: its last (real) position when `node` runs on that alone."""
        x = env[src]
        if last_only and node in self.tail and src not in self.tail:
            axis = seq_axis(self.graph.g.nodes[src]["type"])
            if axis is not None:
                return last_position(x, axis, valid)
        return x

    def _run_nodes(self, nodes: list[str], env: dict, state: dict, new_state: dict, mode: str,
                   last_only: bool = False, valid: Optional[mx.array] = None) -> None:
        pad = {} if valid is None or valid.ndim == 2 else {"valid": valid}  # (B, P): picked positions, no padding
        for n in nodes:
            group = self._group_of.get(n)
            if group is not None:  # a fused group runs at its first member and yields every member's output
                if n != group.members[0]:
                    continue
                env.update(zip(group.members, self._fused[n](self._read(env, group.source, n, last_only, valid))))
            else:
                xs = [self._read(env, s, n, last_only, valid) for s in self.reads[n]]
                if n in self.stateful:
                    env[n], new_state[n] = self.fns[n](*xs, state=None if mode == "parallel" else state[n], mode=mode,
                                                       **pad)
                else:
                    env[n] = self.fns[n](*xs)
            if n in self._fold_at:
                self._fold(self._fold_at[n], env, last_only, valid)
            elif n in self._norm_gate_at:
                self._norm_gate(self._norm_gate_at[n], env, last_only, valid)

    def _unit(self, unit: str) -> Any:
        """The module of a fold's linear unit: its group's fused module, or its own."""
        return self._fused[unit] if unit in self._fused else self.fns[unit]

    def _fold(self, f: Fold, env: dict, last_only: bool, valid: Optional[mx.array] = None) -> None:
        """Replace the value(s) fold `f` produces by its folded kernel's where one takes the call
        (kernels/fold.py `apply`; MLX drops the unfolded nodes no output reads then)."""
        from .kernels.fold import apply  # here: importing MAD loads no kernel module (kernels/registry.py)

        group = self._group_of.get(f.unit)
        raw = self.reads[f.norm][0] if f.norm is not None else group.source if group else self.reads[f.unit][0]
        if raw not in env or (f.residual is not None and f.residual not in env):
            return  # a part of the program run alone (`profile`): the nodes as they are
        norm = None
        if f.norm is not None:
            x = self._read(env, raw, f.norm, last_only, valid)
            norm = (self.fns[f.norm][f.norm_form.weight], f.norm_form.eps)
        else:
            x = self._read(env, raw, f.unit, last_only, valid)
        if f.node == f.unit:
            members = group.members if group else (f.unit,)
            value = [env[m] for m in members]
            out = apply(value, x, *self._unit(f.unit).linear_args(), norm=norm)
            if all(a.shape == b.shape for a, b in zip(out, value)):
                env.update(zip(members, out))
        else:
            residual = self._read(env, f.residual, f.node, last_only, valid) if f.residual is not None else None
            out = apply(env[f.node], x, *self._unit(f.unit).linear_args(), norm=norm, pair=f.pair, residual=residual)
            if out.shape == env[f.node].shape:
                env[f.node] = out

    def _norm_gate(self, ng: NormGate, env: dict, last_only: bool, valid: Optional[mx.array] = None) -> None:
        """Replace the gate's value by `head_norm_gate`'s where a kernel takes the call (kernels/fold.py)."""
        from .kernels.fold import apply_head_norm_gate

        raw = self.reads[ng.norm][0]
        if raw not in env or ng.gate not in env:
            return  # a part of the program run alone (`profile`): the nodes as they are
        norm, form = self.fns[ng.norm], ng.norm_form
        out = apply_head_norm_gate(env[ng.node], self._read(env, ng.gate, ng.node, last_only, valid),
                                   self._read(env, raw, ng.norm, last_only, valid), norm[form.weight],
                                   norm[form.bias] if form.bias else None, eps=form.eps, heads=form.heads,
                                   offset=form.offset, act=ng.act)
        if out.shape == env[ng.node].shape:
            env[ng.node] = out

    def _stage_fn(self, stage: Stage, mode: str, last_only: bool, inputs: dict, state: dict) -> tuple[dict, dict]:
        env, new_state = dict(inputs), {}
        self._run_nodes(stage.nodes, env, state, new_state, mode, last_only)
        return {n: env[n] for n in stage.writes}, new_state

    def _outputs(self, env: dict, last_only: bool, valid: Optional[mx.array] = None) -> dict[str, mx.array]:
        out = {}
        for k, v in self.graph.outputs.items():
            axis = seq_axis(self.graph.g.nodes[v]["type"])
            out[k] = last_position(env[v], axis, valid) if last_only and v not in self.tail and axis is not None \
                else env[v]
        return out

    def _program_fn(self, mode: str, last_only: bool, inputs: dict, state: dict,
                    valid: Optional[mx.array] = None) -> tuple[dict, dict]:
        # MLX calls this only while tracing (once per new input shape): the log shows what a run traced
        self.traces.append((tuple(next(iter(inputs.values())).shape), last_only))
        env, new_state = dict(inputs), {}
        self._run_nodes(self.nodes, env, state, new_state, mode, last_only, valid)
        return self._outputs(env, last_only, valid), new_state

    def _fn(self, key: Any, fn: Callable) -> Callable:
        if key not in self._compiled:
            self._compiled[key] = fn if self.compile_mode == "none" else mx.compile(fn, inputs=self._compile_inputs)
        return self._compiled[key]

    def _check_inputs(self, inputs: Any) -> dict[str, mx.array]:
        """The inputs as {name: array} of the declared dtypes; every mistake reported at once.

        Fast path (every decode step): one array or a dict holding exactly the inputs, already MLX
        arrays of the right rank, fixed sizes and dtype, pass as they are. Anything else takes the
        slow path below, which converts what it can and explains what it cannot.
        """
        fits = self._fitting_inputs(inputs)
        if fits is not None:
            return fits
        if not isinstance(inputs, Mapping):
            if len(self.graph.inputs) != 1:
                raise MadError(f"this program takes named inputs: {', '.join(self.graph.inputs)}")
            inputs = {next(iter(self.graph.inputs)): inputs}
        diags = Diagnostics()
        out = {}
        for name, t in self.graph.inputs.items():
            if name not in inputs:
                diags.error(f"missing input '{name}' {shape_str(t.shape)}")
                continue
            x = inputs[name]
            if not isinstance(x, mx.array):
                try:
                    x = mx.array(x)
                except Exception as e:  # noqa: BLE001 - ragged lists, objects, strings, ...
                    diags.error(f"input '{name}' cannot be read as an array: {e}")
                    continue
            if x.ndim != len(t.shape) or any(not isinstance(s, Sym) and int(s) != d for s, d in zip(t.shape, x.shape)):
                diags.error(f"input '{name}' has shape {tuple(x.shape)}, expected {shape_str(t.shape)}")
            elif x.size == 0:
                diags.error(f"input '{name}' is empty (shape {tuple(x.shape)})")
            if t.dtype == "int32":
                # the dtype is checked here; the values (ids inside the vocabulary) by `LanguageModel`
                if x.dtype == mx.bool_ or not mx.issubdtype(x.dtype, mx.integer):
                    diags.error(f"input '{name}' must hold integer ids, got {x.dtype}")
                x = x.astype(mx.int32)
            else:
                if x.dtype == mx.bool_ or not (mx.issubdtype(x.dtype, mx.floating) or mx.issubdtype(x.dtype, mx.integer)):
                    diags.error(f"input '{name}' must hold real numbers, got {x.dtype}")
                x = x.astype(mx.float32 if t.dtype == "float32" else self.dtype)
            out[name] = x
        for name in inputs:
            if name not in self.graph.inputs:
                diags.error(f"unknown input '{name}' (inputs: {', '.join(self.graph.inputs)})")
        diags.raise_if_any()
        return out

    def _fitting_inputs(self, inputs: Any) -> dict[str, mx.array] | None:
        """`inputs` as {name: array} if they need no conversion and no check fails, else None."""
        if type(inputs) is mx.array:
            if len(self._inputs) != 1:
                return None
            inputs = {self._inputs[0][0]: inputs}
        elif type(inputs) is not dict or len(inputs) != len(self._inputs):
            return None
        for name, ndim, fixed, dtype in self._inputs:
            x = inputs.get(name)
            if type(x) is not mx.array or x.ndim != ndim or x.size == 0:
                return None
            want = mx.int32 if dtype == "int32" else mx.float32 if dtype == "float32" else self.dtype
            if x.dtype != want:
                return None
            if fixed:
                shape = x.shape
                if any(shape[i] != size for i, size in fixed):
                    return None
        return inputs

    def trace(self, inputs: Any, state: dict | None = None, mode: Mode = "auto") -> dict[str, mx.array]:
        """Every node's output (uncompiled, lazy): for tests and debugging, not for speed."""
        inputs = self._check_inputs(inputs)
        self._sync_fused()
        env = dict(inputs)
        state = state if state is not None else self.init_state(next(iter(inputs.values())).shape[0])
        self._run_nodes(self.nodes, env, state, {}, mode)
        return {n: env[n] for n in self.nodes}

    @property
    def pads_exactly(self) -> bool:
        """Whether a call can end in inert padding (`valid`, module doc): every stateful module declares
        `inert_padding`, and the program runs whole (not stage by stage)."""
        return not self._by_stage and all(getattr(self.fns.get(n), "inert_padding", False) for n in self.stateful)

    def _padding(self, valid: Any, inputs: dict) -> Optional[mx.array]:
        """`valid` checked against the inputs' sequence length T, as the array the padded program reads (also
        for valid = T: a caller that pads some calls runs one trace per shape), or None."""
        if valid is None:
            return None
        x = next(iter(inputs.values()))
        t = x.shape[1] if x.ndim > 1 else 1
        if isinstance(valid, bool) or not isinstance(valid, int) or not 1 <= valid <= t:
            raise MadError(f"valid must be an integer from 1 to the sequence length {t}, got {valid!r}")
        if not self.pads_exactly:
            if valid == t:
                return None
            which = [n for n in self.nodes if n in self.stateful
                     and not getattr(self.fns.get(n), "inert_padding", False)]
            raise MadError(f"this program cannot end a call in padding: "
                           + (f"node '{which[0]}' keeps state without inert padding" if which
                              else "it runs stage by stage"))
        return mx.array([valid], dtype=mx.int32)

    def __call__(self, inputs: Any, state: dict | None = None, mode: Mode = "auto",
                 last_only: bool = False, valid: Optional[int] = None,
                 positions: Optional[mx.array] = None) -> tuple[dict, dict]:
        """Run the program on `inputs` ({name: array} or one array) from `state` (None = zeros).

        Returns (outputs {name: array}, new_state). Nothing is evaluated: MLX stays lazy. With
        `last_only`, each output that has a sequence dim holds its last position only (size 1 there).
        `valid` (1..T): the positions from `valid` on are inert padding (module doc); `last_only` then
        reads position valid - 1, and the state is the one the first `valid` positions leave.
        `positions`, an integer (B, P) array of positions 0..T-1 (values not checked here: no host read):
        each output with a sequence dim holds those P positions of each sequence, and the nodes that
        `last_only` runs on the last position alone run on these alone (training on a few scored positions
        of each sequence need not compute the head at every position).
        """
        inputs = self._check_inputs(inputs)
        if positions is not None:
            if last_only or valid is not None:
                raise MadError("positions cannot be combined with last_only or valid")
            if self.compile_mode == "stage":
                raise MadError("this program cannot pick positions: it runs stage by stage")
            x = next(iter(inputs.values()))
            if not isinstance(positions, mx.array) or positions.ndim != 2 or positions.shape[0] != x.shape[0] \
                    or positions.shape[1] < 1 or not mx.issubdtype(positions.dtype, mx.integer):
                raise MadError(f"positions must be an integer array of shape (batch {x.shape[0]}, P >= 1), got "
                               f"{getattr(positions, 'shape', type(positions).__name__)} "
                               f"{getattr(positions, 'dtype', '')}".rstrip())
            last_only = True
        pad = self._padding(valid, inputs) if positions is None else positions.astype(mx.int32)
        if state is None:
            batch = next(iter(inputs.values())).shape[0] if inputs else 1
            state = self.init_state(batch)
        elif state.keys() != self._state_keys.keys() or any(
                state[n].keys() != names for n, names in self._state_keys.items()):
            check_state(self.graph, state)  # explains what is wrong
        if self._fused:
            self._sync_fused()
        if self.compile_mode != "stage":
            key = (mode, last_only, pad is not None and pad.ndim, gradients())  # inside `inference()`: kernels run bare
            fn = self._compiled.get(key)
            if fn is None:
                fn = self._fn(key, partial(self._program_fn, mode, last_only))
            return fn(inputs, state) if pad is None else fn(inputs, state, pad)
        env = dict(inputs)
        new_state: dict = {}
        for stage in self.stages:
            fn = self._fn((stage.name, mode, last_only), partial(self._stage_fn, stage, mode, last_only))
            outs, st = fn({k: env[k] for k in stage.reads}, {n: state[n] for n in stage.nodes if n in self.stateful})
            env.update(outs)
            new_state.update(st)
        return self._outputs(env, last_only), new_state

    # ------------------------------------------------------------------ profiling
    def profile(self, inputs: Any, state: dict | None = None, mode: Mode = "auto", repeats: int = 3) -> list[dict]:
        """Time each stage on its own: one entry per stage, in execution order,
        `{"stage": name, "nodes": [...], "block_types": {type: count}, "seconds": median}`.

        Each stage is compiled by itself, fed the values it reads (computed by the stages before it, from
        `inputs` and `state`, None = zeros), run once to compile, then `repeats` times, evaluated each
        time; `seconds` is the median. A diagnostic, not the program's speed: one compiled program
        overlaps and fuses across stages, and each stage here pays its own call and evaluation. A fused
        group of linears is timed in the stage of its first member.
        """
        return self._profile([(s.name, s.nodes) for s in self.stages], inputs, state, mode, repeats)

    def profile_block_types(self, inputs: Any, state: dict | None = None, mode: Mode = "auto",
                            repeats: int = 3) -> dict[str, dict]:
        """Seconds per block type: every node timed on its own (as `profile` times a stage; a fused group
        as one), summed by block type (`block_type_totals`). Slower than `profile`: one compile per node."""
        units = [(self.graph.g.nodes[n]["stage"], [n]) for n in self.nodes]
        return block_type_totals(self._profile(units, inputs, state, mode, repeats))

    def _profile(self, units: list[tuple[str, list[str]]], inputs: Any, state: dict | None, mode: str,
                 repeats: int) -> list[dict]:
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise MadError(f"repeats must be an integer >= 1, got {repeats!r}")
        inputs = self._check_inputs(inputs)
        if state is None:
            state = self.init_state(next(iter(inputs.values())).shape[0] if inputs else 1)
        else:
            check_state(self.graph, state)
        self._sync_fused()
        g = self.graph.g
        # a fused group runs at its first member, so all its members are timed in that member's unit
        placed: list[tuple[str, list[str]]] = [(name, []) for name, _ in units]
        unit_of_group: dict[str, int] = {}
        for i, (_, nodes) in enumerate(units):
            for n in nodes:
                group = self._group_of.get(n)
                j = i if group is None else unit_of_group.setdefault(group.members[0], i)
                placed[j][1].append(n)
        stages = []
        for name, nodes in placed:
            if nodes:
                inside = set(nodes)
                reads = list(dict.fromkeys(s for n in nodes for s in self.reads[n] if s not in inside))
                stages.append(Stage(name, nodes, reads, []))
        later = set(self.graph.outputs.values())
        for stage in reversed(stages):
            stage.writes = [n for n in stage.nodes if n in later]
            later |= set(stage.reads)

        env: dict[str, mx.array] = dict(inputs)
        entries = []
        for stage in stages:
            fn = mx.compile(partial(self._stage_fn, stage, mode, False), inputs=self._compile_inputs)
            args = ({k: env[k] for k in stage.reads}, {n: state[n] for n in stage.nodes if n in self.stateful})
            mx.eval(args)
            outs, new_state = fn(*args)  # compiles
            mx.eval(outs, new_state)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                outs, new_state = fn(*args)
                mx.eval(outs, new_state)
                times.append(time.perf_counter() - start)
            env.update(outs)
            entries.append({"stage": stage.name, "nodes": list(stage.nodes),
                            "block_types": dict(Counter(g.nodes[n]["block_type"] for n in stage.nodes)),
                            "seconds": statistics.median(times)})
        return entries


def block_type_totals(entries: list[dict]) -> dict[str, dict]:
    """`{block type: {"nodes": count, "seconds": total}}` from `Program.profile` entries, most seconds
    first. An entry's seconds go to its block types in proportion to their node counts: exact for
    entries of one type (as `Program.profile_block_types` times them), an estimate for a stage."""
    totals: dict[str, dict] = {}
    for entry in entries:
        count = sum(entry["block_types"].values())
        for kind, k in entry["block_types"].items():
            t = totals.setdefault(kind, {"nodes": 0, "seconds": 0.0})
            t["nodes"] += k
            t["seconds"] += entry["seconds"] * k / count
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]["seconds"]))
