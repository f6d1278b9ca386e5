"""The runtime: a checked `Graph` compiled into stages of MLX code.

A stage is a pure function `(inputs, state) -> (outputs, new_state)` over a run of nodes; the
Program chains its stages inside one `mx.compile` (or compiles each stage on its own). Graph walking
happens only while MLX traces: at run time a call is one compiled function, with no per-node Python
dispatch and no host synchronisation.

State is a plain dict `{node: {name: array}}` of float32 arrays, owned by the recurrent nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Literal, Mapping

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .dims import Sym, shape_str
from .errors import Diagnostics, MadError
from .graph import Graph, check_state

Mode = Literal["auto", "step", "chunkwise", "parallel"]
CompileMode = Literal["program", "stage", "none"]
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def dtype_of(name: str | mx.Dtype) -> mx.Dtype:
    if isinstance(name, mx.Dtype):
        return name
    if name not in DTYPES:
        raise MadError(f"unknown dtype '{name}' (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


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
    """

    def __init__(self, graph: Graph, dtype: str | mx.Dtype = "float32", compile: CompileMode = "program"):
        self.graph = graph
        self.dtype = dtype_of(dtype)
        g = graph.g
        self.nodes = graph.blocks()
        self.fns: dict[str, Callable] = {n: g.nodes[n]["module"] for n in self.nodes}
        self.reads = {n: g.nodes[n]["inputs"] for n in self.nodes}
        self.stateful = {n for n in self.nodes if g.nodes[n]["state"]}
        self._state_keys = graph.state_keys()  # checked on every call: keep the check cheap
        # every node with weights sits at its fully qualified name: flattened names are weight names
        self.root = nn.Module()
        for n in self.nodes:
            if isinstance(self.fns[n], nn.Module):
                self.root[n] = self.fns[n]
        for n in self.nodes:
            tie = getattr(g.nodes[n]["spec"], "tie", None)
            if tie:
                self.fns[n].tie(self.fns[tie])
        if self.dtype != mx.float32:
            self.set_dtype(self.dtype)
        self.stages = self._plan()
        self.compile_mode = compile
        self._compiled: dict[Any, Callable] = {}

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
        """The stages as data (for `plan.json`)."""
        return {
            "name": self.graph.name,
            "compile": self.compile_mode,
            "stages": [
                {"name": s.name, "nodes": s.nodes, "reads": s.reads, "writes": s.writes,
                 "state": [n for n in s.nodes if n in self.stateful]}
                for s in self.stages
            ],
            "outputs": self.graph.outputs,
        }

    # ------------------------------------------------------------------ weights
    def parameters(self) -> dict[str, mx.array]:
        return dict(tree_flatten(self.root.parameters()))

    def set_dtype(self, dtype: str | mx.Dtype) -> None:
        self.dtype = dtype_of(dtype)
        self.root.set_dtype(self.dtype)

    def load_weights(self, weights: Mapping[str, mx.array], strict: bool = True, where: str = "checkpoint") -> None:
        """Load `{weight name: array}`; missing, unexpected and wrong-shape keys are reported together.

        Arrays are cast to the program's dtype; nothing is changed unless every key fits.
        """
        own = self.parameters()
        diags = Diagnostics()
        missing = [k for k in own if k not in weights]
        unexpected = [k for k in weights if k not in own]
        wrong = [k for k in weights if k in own and tuple(weights[k].shape) != tuple(own[k].shape)]
        if strict:
            for k in missing:
                diags.error(f"{where}: missing weight '{k}' {tuple(own[k].shape)}")
            for k in unexpected:
                diags.error(f"{where}: unexpected weight '{k}' {tuple(weights[k].shape)}")
        for k in wrong:
            diags.error(f"{where}: weight '{k}' has shape {tuple(weights[k].shape)}, the model expects "
                        f"{tuple(own[k].shape)}")
        diags.raise_if_any()
        by_node: dict[str, list] = {}
        for k, v in weights.items():
            if k in own:
                node = self._owner(k)
                by_node.setdefault(node, []).append((k[len(node) + 1:], v.astype(self.dtype) if
                                                     mx.issubdtype(v.dtype, mx.floating) else v))
        self.root.update({n: tree_unflatten(items) for n, items in by_node.items()})

    def _owner(self, key: str) -> str:
        parts = key.split(".")
        for i in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in self.fns:
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
    def _run_nodes(self, nodes: list[str], env: dict, state: dict, new_state: dict, mode: str) -> None:
        for n in nodes:
            xs = [env[s] for s in self.reads[n]]
            if n in self.stateful:
                env[n], new_state[n] = self.fns[n](*xs, state=None if mode == "parallel" else state[n], mode=mode)
            else:
                env[n] = self.fns[n](*xs)

    def _stage_fn(self, stage: Stage, mode: str, inputs: dict, state: dict) -> tuple[dict, dict]:
        env, new_state = dict(inputs), {}
        self._run_nodes(stage.nodes, env, state, new_state, mode)
        return {n: env[n] for n in stage.writes}, new_state

    def _program_fn(self, mode: str, inputs: dict, state: dict) -> tuple[dict, dict]:
        env, new_state = dict(inputs), {}
        self._run_nodes(self.nodes, env, state, new_state, mode)
        return {k: env[v] for k, v in self.graph.outputs.items()}, new_state

    def _fn(self, key: Any, fn: Callable) -> Callable:
        if key not in self._compiled:
            self._compiled[key] = fn if self.compile_mode == "none" else mx.compile(fn, inputs=self.root.state)
        return self._compiled[key]

    def _check_inputs(self, inputs: Any) -> dict[str, mx.array]:
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
                x = mx.array(x)
            if x.ndim != len(t.shape) or any(not isinstance(s, Sym) and int(s) != d for s, d in zip(t.shape, x.shape)):
                diags.error(f"input '{name}' has shape {tuple(x.shape)}, expected {shape_str(t.shape)}")
            if t.dtype == "int32":
                if mx.issubdtype(x.dtype, mx.floating):
                    diags.error(f"input '{name}' must hold integer ids, got {x.dtype}")
                x = x.astype(mx.int32)
            else:
                x = x.astype(mx.float32 if t.dtype == "float32" else self.dtype)
            out[name] = x
        for name in inputs:
            if name not in self.graph.inputs:
                diags.error(f"unknown input '{name}' (inputs: {', '.join(self.graph.inputs)})")
        diags.raise_if_any()
        return out

    def trace(self, inputs: Any, state: dict | None = None, mode: Mode = "auto") -> dict[str, mx.array]:
        """Every node's output (uncompiled, lazy): for tests and debugging, not for speed."""
        inputs = self._check_inputs(inputs)
        env = dict(inputs)
        state = state if state is not None else self.init_state(next(iter(inputs.values())).shape[0])
        self._run_nodes(self.nodes, env, state, {}, mode)
        return {n: env[n] for n in self.nodes}

    def __call__(self, inputs: Any, state: dict | None = None, mode: Mode = "auto") -> tuple[dict, dict]:
        """Run the program on `inputs` ({name: array} or one array) from `state` (None = zeros).

        Returns (outputs {name: array}, new_state). Nothing is evaluated: MLX stays lazy.
        """
        inputs = self._check_inputs(inputs)
        if state is None:
            batch = next(iter(inputs.values())).shape[0] if inputs else 1
            state = self.init_state(batch)
        elif state.keys() != self._state_keys.keys() or any(
                state[n].keys() != names for n, names in self._state_keys.items()):
            check_state(self.graph, state)  # explains what is wrong
        if self.compile_mode != "stage":
            return self._fn(mode, partial(self._program_fn, mode))(inputs, state)
        env = dict(inputs)
        new_state: dict = {}
        for stage in self.stages:
            fn = self._fn((stage.name, mode), partial(self._stage_fn, stage, mode))
            outs, st = fn({k: env[k] for k in stage.reads}, {n: state[n] for n in stage.nodes if n in self.stateful})
            env.update(outs)
            new_state.update(st)
        return {k: env[v] for k, v in self.graph.outputs.items()}, new_state
