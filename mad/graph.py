"""The one IR: a networkx DiGraph built from a resolved topology, with every check done on it.

Node key = fully qualified name (weight prefix, state key, where errors point). Node data: `spec`
(the validated block), `source`, `inputs` (source names in port order), `type` (output TensorType),
`state` (name -> TensorType), `params` (weight name -> shape), `stage`. Input nodes have
`kind="input"`. Edge data: `ports`, `type`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import networkx as nx
from mlx.utils import tree_flatten
from pydantic import ValidationError

from .block import Block, ShapeError, TensorType, block_types
from .dims import DimError, DimVal, Size, Sym, check, evaluate, label, resolve_dims, shape_str
from .errors import Diagnostics, Source, did_you_mean
from .topology import Resolved, report_validation
from .yamlio import position

DTYPE_BYTES = {"float32": 4, "int32": 4, "float": 4}


@dataclass
class Graph:
    """A checked model graph: the DiGraph plus the dims, inputs and outputs of its topology."""

    g: nx.DiGraph
    resolved: Resolved
    dims: dict[str, Size]
    inputs: dict[str, TensorType]
    outputs: dict[str, str]

    @property
    def name(self) -> str:
        return self.resolved.name

    def blocks(self) -> list[str]:
        """Block nodes in a fixed topological order (ties broken by declaration order)."""
        order = {d.name: i for i, d in enumerate(self.resolved.nodes)}
        topo = nx.lexicographical_topological_sort(self.g, key=lambda n: order.get(n, -1))
        return [n for n in topo if self.g.nodes[n].get("kind") == "block"]

    def state_keys(self) -> dict[str, set[str]]:
        """{recurrent node: its state names}: what every state must hold, exactly."""
        return {n: set(self.g.nodes[n]["state"]) for n in self.state_nodes()}

    def state_nodes(self) -> list[str]:
        return [n for n in self.blocks() if self.g.nodes[n]["state"]]

    def param_count(self, node: str | None = None) -> int:
        nodes = [node] if node else self.blocks()
        return sum(_numel(s) for n in nodes for s in self.g.nodes[n]["params"].values())

    def state_bytes(self, node: str | None = None) -> int:
        """Recurrent state bytes per sequence (batch dims excluded)."""
        nodes = [node] if node else self.state_nodes()
        total = 0
        for n in nodes:
            for t in self.g.nodes[n]["state"].values():
                total += _numel([s for s in t.shape if not isinstance(s, Sym)]) * DTYPE_BYTES.get(t.dtype, 4)
        return total

    def stages(self) -> list[tuple[str, list[str]]]:
        """Consecutive nodes of one stage, in execution order."""
        out: list[tuple[str, list[str]]] = []
        for n in self.blocks():
            stage = self.g.nodes[n]["stage"]
            if out and out[-1][0] == stage:
                out[-1][1].append(n)
            else:
                out.append((stage, [n]))
        return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _input_type(spec, env: dict, where: Source, diags: Diagnostics, name: str) -> TensorType | None:
    shape = []
    for d in spec.shape:
        try:
            if isinstance(d, str) and isinstance(env.get(d.strip()), Sym):
                shape.append(env[d.strip()])
            else:
                shape.append(evaluate(d, env))
        except DimError as e:
            diags.error(f"input '{name}': {e}", where)
            return None
    return TensorType(tuple(shape), spec.dtype)


def build_graph(resolved: Resolved) -> Graph:
    """Validate every node, wire the graph and check shapes, state and connectivity.

    All errors of the topology are collected and raised together as one `MadError`.
    """
    diags = Diagnostics()

    # dims and constraints
    env, dim_errors = resolve_dims(resolved.dims)
    for name, msg in dim_errors.items():
        diags.error(msg if name in msg else f"dim '{name}': {msg}", resolved.dims_pos.get(name))
    if not dim_errors:
        for text, where in resolved.constraints:
            try:
                if not check(text, env):
                    values = ", ".join(f"{k}={int(v)}" for k, v in env.items()
                                       if isinstance(v, int) and k in text)
                    diags.error(f"constraint '{text}' is violated ({values})", where)
            except DimError as e:
                diags.error(f"constraint '{text}': {e}", where)
    if dim_errors:
        diags.raise_if_any()  # nothing can be checked without dims

    for module in resolved.plugins:
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - a user's plugin may fail in any way
            diags.error(f"plugin '{module}' failed to import: {type(e).__name__}: {e}", Source(resolved.file))
    registry = block_types()

    g = nx.DiGraph()
    inputs: dict[str, TensorType] = {}
    failed: set[str] = set()  # inputs and nodes with errors: their readers report nothing more
    for name, spec in resolved.inputs.items():
        t = _input_type(spec, env, resolved.inputs_pos[name], diags, name)
        if t is None:
            failed.add(name)
        else:
            inputs[name] = t
            g.add_node(name, kind="input", type=t, source=resolved.inputs_pos[name])

    # validate node specs
    for decl in resolved.nodes:
        if decl.name in g:
            diags.error(f"node '{decl.name}' is defined twice", decl.source, f"first: {g.nodes[decl.name]['source']}")
            continue
        type_name = decl.raw.get("type")
        cls = registry.get(type_name) if isinstance(type_name, str) else None
        if cls is None:
            failed.add(decl.name)
            where = position(decl.fields, ("type",), decl.source)
            where = Source(where.file, where.line, where.col, decl.source.chain)
            choices = list(registry) + list(getattr(resolved, "templates", []))
            once = (where.file, where.line, where.col, type_name)  # once per written mistake
            if type_name is None:
                diags.error(f"node '{decl.name}' has no 'type'", where, once=once)
            else:
                diags.error(f"unknown block type '{type_name}' for node '{decl.name}'", where,
                            did_you_mean(type_name, choices), once=once)
            continue
        try:
            spec = cls.model_validate({**decl.raw, "in": decl.inputs}, context={"dims": env})
        except ValidationError as e:
            failed.add(decl.name)
            report_validation(e, cls, decl.fields, decl.source, diags, f"node '{decl.name}' ({type_name})")
            continue
        g.add_node(decl.name, kind="block", spec=spec, source=decl.source, stage=decl.unit, block_type=type_name)

    # wire edges (port order kept in node data)
    for decl in resolved.nodes:
        if decl.name not in g or g.nodes[decl.name].get("kind") != "block":
            continue
        spec: Block = g.nodes[decl.name]["spec"]
        srcs = _bind_ports(spec, decl, diags)
        if srcs is None:
            continue
        ok = not any(src in failed for _, src in srcs)
        for port, src in srcs:
            if src not in g and src not in failed:
                diags.error(f"unconnected input: node '{decl.name}' reads '{src}', which is not a node or input",
                            decl.source, did_you_mean(src, g.nodes))
                ok = False
        if not ok:
            continue
        g.nodes[decl.name]["inputs"] = [s for _, s in srcs]
        for port, src in srcs:
            if g.has_edge(src, decl.name):
                g.edges[src, decl.name]["ports"].append(port)
            else:
                g.add_edge(src, decl.name, ports=[port])

    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        cycle = None
    if cycle:
        names = [u for u, _ in cycle] + [cycle[0][0]]
        diags.error("cycle: " + " -> ".join(names), g.nodes[cycle[0][0]]["source"])
        diags.raise_if_any()  # types cannot be inferred around a cycle

    graph = Graph(g, resolved, env, inputs, {k: v for k, (v, _) in resolved.outputs.items()})
    _infer(graph, diags)
    _check_ties(graph, diags)

    # every block's output must reach an output (reads counted as written, even by broken nodes)
    used = set(graph.outputs.values())
    for decl in resolved.nodes:
        used.update(decl.inputs.values() if isinstance(decl.inputs, dict) else decl.inputs)
    for n in graph.blocks():
        if n not in used:
            diags.error(f"unused output: the output of '{n}' is never read and is not a model output",
                        g.nodes[n]["source"])
    for name in inputs:
        if name not in used:
            diags.error(f"unused input: graph input '{name}' is never read", resolved.inputs_pos[name])
    diags.raise_if_any()
    return graph


def _bind_ports(spec: Block, decl, diags: Diagnostics) -> list[tuple[str, str]] | None:
    ports, given = spec.ports, decl.inputs
    if isinstance(given, dict):
        unknown = [p for p in given if p not in ports]
        missing = [p for p in ports if p not in given]
        for p in unknown:
            diags.error(f"node '{decl.name}': block type '{spec.type}' has no input port '{p}' (ports: {', '.join(ports)})",
                        decl.source, did_you_mean(p, ports))
        if missing:
            diags.error(f"unconnected input: node '{decl.name}' port(s) {', '.join(missing)} not connected", decl.source)
        return None if unknown or missing else [(p, given[p]) for p in ports]
    if spec.variadic:
        if not given:
            diags.error(f"unconnected input: node '{decl.name}' needs at least one input", decl.source)
            return None
        return [(f"{ports[0]}{i}", s) for i, s in enumerate(given)]
    if len(given) != len(ports):
        diags.error(f"node '{decl.name}': block type '{spec.type}' takes {len(ports)} input(s) "
                    f"({', '.join(ports)}), got {len(given)}", decl.source)
        return None
    return list(zip(ports, given))


def _infer(graph: Graph, diags: Diagnostics) -> None:
    """Propagate types in topological order; each block checks its inputs and declares its state."""
    g = graph.g
    for n in graph.blocks():
        data = g.nodes[n]
        srcs = data.get("inputs")
        if srcs is None or any("type" not in g.nodes[s] for s in srcs):
            continue  # an upstream error was reported already
        in_types = [g.nodes[s]["type"] for s in srcs]
        spec: Block = data["spec"]
        try:
            out = spec.infer(*in_types)
            state = spec.state(*in_types)
            module = spec.build(*in_types)
        except ShapeError as e:
            edge = ", ".join(dict.fromkeys(srcs)) + f" -> {n}"
            diags.error(f"shape mismatch on edge{'s' if len(set(srcs)) > 1 else ''} {edge}", data["source"], str(e),
                        "inputs: " + ", ".join(f"{s}: {shape_str(t.shape)} {t.dtype}" for s, t in zip(srcs, in_types)))
            continue
        data["type"] = out
        data["state"] = state
        data["params"] = {k: tuple(v.shape) for k, v in tree_flatten(getattr(module, "parameters", dict)())}
        data["module"] = module
        for s, t in zip(srcs, in_types):
            g.edges[s, n]["type"] = t


def _check_ties(graph: Graph, diags: Diagnostics) -> None:
    """A node with `tie: other` reads `other`'s weight, which must exist with this node's weight shape."""
    g = graph.g
    for n in graph.blocks():
        d = g.nodes[n]
        tie = getattr(d["spec"], "tie", None)
        if not tie or "type" not in d:
            continue
        target = g.nodes[tie] if tie in g and g.nodes[tie].get("kind") == "block" else None
        if target is None:
            diags.error(f"node '{n}': tie: '{tie}' is not a node", d["source"], did_you_mean(tie, graph.blocks()))
            continue
        want = (int(d["type"].shape[-1]), int(g.nodes[d["inputs"][0]]["type"].shape[-1]))
        have = target.get("params", {}).get("weight")
        if have != want:
            diags.error(f"node '{n}': tie: '{tie}' has weight {have}, this node needs {want} (out, in)",
                        d["source"])


def summary_rows(graph: Graph) -> list[dict[str, Any]]:
    """One row per node: name, type, symbolic and concrete output shape, params, state bytes."""
    rows = []
    for name, t in graph.inputs.items():
        rows.append({"node": name, "type": "input", "shape": shape_str(t.shape), "concrete": _concrete(t.shape),
                     "dtype": t.dtype, "params": 0, "state_bytes": 0})
    for n in graph.blocks():
        d = graph.g.nodes[n]
        t = d["type"]
        rows.append({"node": n, "type": d["block_type"], "shape": _symbolic(t.shape), "concrete": _concrete(t.shape),
                     "dtype": t.dtype, "params": graph.param_count(n), "state_bytes": graph.state_bytes(n)})
    return rows


def _symbolic(shape) -> str:
    return "(" + ", ".join(s.expr if isinstance(s, DimVal) else label(s) for s in shape) + ")"


def _concrete(shape) -> str:
    return "(" + ", ".join(str(int(s)) if isinstance(s, int) else label(s) for s in shape) + ")"


def check_state(graph: Graph, state: dict, where: str = "state") -> None:
    """A state must have exactly the keys of the graph's recurrent nodes (each node owns its state)."""
    owners = {n: graph.g.nodes[n]["state"] for n in graph.state_nodes()}
    diags = Diagnostics()
    for key in state:
        if key not in owners:
            diags.error(f"{where}: state '{key}' has no owner: no recurrent node of that name",
                        None, did_you_mean(key, owners))
    for node, spec in owners.items():
        if node not in state:
            diags.error(f"{where}: missing state of recurrent node '{node}'")
            continue
        for name in spec:
            if name not in state[node]:
                diags.error(f"{where}: state of '{node}' lacks '{name}'")
        for name in state[node]:
            if name not in spec:
                diags.error(f"{where}: state '{node}.{name}' has no owner (node '{node}' declares "
                            f"{', '.join(spec)})")
    diags.raise_if_any()
