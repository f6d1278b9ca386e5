"""The one IR: a networkx DiGraph built from a resolved topology, with every check done on it.

Node key = fully qualified name (weight prefix, state key, where errors point). Node data: `spec`
(the validated block), `source`, `inputs` (source names in port order), `type` (output TensorType),
`state` (name -> TensorType), `params` (weight name -> shape), `stage`. Input nodes have
`kind="input"`. Edge data: `ports`, `type`.

The graph holds no weights: a `mad.Program` builds and owns its modules from the specs, so any number of
programs (dtypes, fused or not) can be built from one graph without sharing anything.
"""

from __future__ import annotations

import importlib
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import networkx as nx
from mlx.utils import tree_flatten
from pydantic import ValidationError

from .block import Block, ShapeError, TensorType, block_types, entry_point_errors, is_builtin
from .dims import DimError, DimVal, Size, Sym, check, evaluate, label, names_in, resolve_dims, shape_str
from .errors import Diagnostics, MadError, Source, did_you_mean
from .topology import Resolved, report_validation
from .yamlio import position

MAX_AXIS = 2**31 - 1
"""The largest size of one tensor axis (MLX's shapes are 32-bit)."""
MAX_TENSOR = 2**36
"""The most elements of one weight, state or activation (per position of the runtime dims)."""
MAX_PARAMS = 2**40
"""The most parameters of a model (xLSTM-7B has 6.9e9, about 2**33)."""

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


def _input_type(spec, env: dict, where: Source, diags: Diagnostics, name: str, broken: set) -> TensorType | None:
    shape = []
    for d in spec.shape:
        if isinstance(d, str) and names_in(d) & broken:
            return None  # the dim's own error is reported
        try:
            if isinstance(d, str) and isinstance(env.get(d.strip()), Sym):
                shape.append(env[d.strip()])
                continue
            size = evaluate(d, env)
        except DimError as e:
            diags.error(f"input '{name}': {e}", where)
            return None
        if not 1 <= size <= MAX_AXIS:
            diags.error(f"input '{name}': a size must be between 1 and {MAX_AXIS:,}, got {label(size)}", where)
            return None
        shape.append(size)
    return TensorType(tuple(shape), spec.dtype)


@dataclass
class Declarations:
    """What `check_declarations` found: the dims, the registry and every node spec that validated."""

    env: dict[str, Size]
    broken: set[str]  # dims with errors
    registry: dict[str, type[Block]]
    inputs: dict[str, TensorType] = field(default_factory=dict)
    specs: dict[str, tuple[Any, Block, str]] = field(default_factory=dict)  # name -> (decl, spec, block type)
    failed: set[str] = field(default_factory=set)  # inputs and nodes with errors: their readers report nothing


_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _import_plugin(module: str, folder: Optional[str]) -> None:
    """Import `module`, looking first in `folder` (the folder of the file that listed it), which is on
    sys.path only while the module is imported (later imports the plugin makes lazily do not see it)."""
    added = folder is not None and folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        importlib.invalidate_caches()
        importlib.import_module(module)
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


def _plugins(resolved: Resolved, diags: Diagnostics) -> bool:
    """Import the plugins the topology lists, if it is trusted; return True if some were refused."""
    refused = False
    trusted = getattr(resolved, "trust_plugins", False)
    positions = getattr(resolved, "plugins_pos", [])
    folders = getattr(resolved, "plugin_dirs", [])
    for i, module in enumerate(resolved.plugins):
        where = positions[i] if i < len(positions) and positions[i] is not None else Source(resolved.file)
        if not isinstance(module, str) or not _MODULE_NAME.fullmatch(module):
            diags.error(f"plugins: {module!r} is not a Python module name (e.g. my_package.blocks)", where)
            continue
        if not trusted:
            refused = True
            diags.error(f"this file asks to import the Python module '{module}' (plugins:), which runs its code; "
                        f"to allow it, pass --trust-plugins (CLI) or trust_plugins=True (Python)", where,
                        once=("plugin", module, where.file, where.line, where.col))
            continue
        try:
            _import_plugin(module, folders[i] if i < len(folders) else None)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - a user's plugin may fail in any way
            text = "; ".join(d.message for d in e.diagnostics) if isinstance(e, MadError) else str(e)
            diags.error(f"plugin '{module}' failed to import: {type(e).__name__}: {text}", where)
    return refused


def check_declarations(resolved: Resolved, diags: Diagnostics) -> Declarations:
    """Everything about a topology's dims, constraints, plugins, inputs and nodes that needs no edges:
    dim errors, violated constraints, plugins (imported only if trusted), unknown block types, unknown or
    bad fields. A dim with an error hides only what reads it."""
    env, dim_errors = resolve_dims(resolved.dims)
    for name, msg in dim_errors.items():
        diags.error(msg if name in msg else f"dim '{name}': {msg}", resolved.dims_pos.get(name))
    broken = set(dim_errors)
    for text, where in resolved.constraints:
        if names_in(text) & broken:
            continue
        try:
            if not check(text, env):
                values = ", ".join(f"{k}={int(v)}" for k, v in env.items()
                                   if isinstance(v, int) and re.search(rf"\b{re.escape(k)}\b", text))
                diags.error(f"constraint '{text}' is violated ({values})", where)
        except DimError as e:
            diags.error(f"constraint '{text}': {e}", where)

    refused = _plugins(resolved, diags)
    trusted = getattr(resolved, "trust_plugins", False)
    registry = block_types(trust_plugins=trusted)
    if trusted:
        for message in entry_point_errors():
            diags.error(message, None, once=("entry point", message))
    out = Declarations(env, broken, registry)

    for name, spec in resolved.inputs.items():
        t = _input_type(spec, env, resolved.inputs_pos[name], diags, name, broken)
        if t is None:
            out.failed.add(name)
        else:
            out.inputs[name] = t

    seen: dict[str, Source] = dict.fromkeys(resolved.inputs, None)
    for decl in resolved.nodes:
        if decl.name in seen:
            first = seen[decl.name] or resolved.inputs_pos.get(decl.name)
            diags.error(f"node '{decl.name}' is defined twice", decl.source, f"first: {first}")
            continue
        seen[decl.name] = decl.source
        type_name = decl.raw.get("type")
        cls = registry.get(type_name) if isinstance(type_name, str) else None
        if cls is None:
            out.failed.add(decl.name)
            where = position(decl.fields, ("type",), decl.source)
            where = Source(where.file, where.line, where.col, decl.source.chain)
            if type_name is not None and refused:
                continue  # may well come from a plugin that was not imported (reported above)
            choices = list(registry) + list(getattr(resolved, "templates", []))
            shown = type_name if isinstance(type_name, str) else repr(type_name)
            once = (where.file, where.line, where.col, "type", shown)  # once per written mistake
            if type_name is None:
                diags.error(f"node '{decl.name}' has no 'type'", where, once=once)
            elif not isinstance(type_name, str):
                diags.error(f"node '{decl.name}': type must be a block type or template name, got {shown}", where,
                            once=once)
            else:
                diags.error(f"unknown block type '{type_name}' for node '{decl.name}'", where,
                            did_you_mean(type_name, choices), once=once)
            continue
        try:
            spec = cls.model_validate({**decl.raw, "in": decl.inputs}, context={"dims": env, "broken": broken})
        except ValidationError as e:
            out.failed.add(decl.name)
            report_validation(e, cls, decl.fields, decl.source, diags, f"node '{decl.name}' ({type_name})")
            continue
        except Exception as e:  # noqa: BLE001 - a plugin's own validator may fail in any way
            if is_builtin(cls):
                raise
            out.failed.add(decl.name)
            diags.error(f"node '{decl.name}' ({type_name}): {type(e).__name__}: {e}", decl.source,
                        once=(decl.source.file, decl.source.line, decl.source.col, "validate", str(e)))
            continue
        out.specs[decl.name] = (decl, spec, type_name)
    return out


def build_graph(resolved: Resolved) -> Graph:
    """Validate every node, wire the graph and check shapes, state and connectivity.

    All errors of the topology are collected and raised together as one `MadError`. Plugins the topology
    lists are imported only if `resolved.trust_plugins` (see `load_topology`).
    """
    diags = Diagnostics()
    decls = check_declarations(resolved, diags)
    failed = decls.failed
    env, inputs = decls.env, decls.inputs

    g = nx.DiGraph()
    for name, t in inputs.items():
        g.add_node(name, kind="input", type=t, source=resolved.inputs_pos[name])
    for name, (decl, spec, type_name) in decls.specs.items():
        g.add_node(name, kind="block", spec=spec, source=decl.source, stage=decl.unit, block_type=type_name)

    # wire edges (port order kept in node data)
    for decl in resolved.nodes:
        if decl.name not in decls.specs or decls.specs[decl.name][0] is not decl:
            continue
        spec: Block = g.nodes[decl.name]["spec"]
        srcs = _bind_ports(spec, decl, diags)
        if srcs is None:
            continue
        ok = not any(src in failed for _, src in srcs)
        for port, src in srcs:
            if src not in g and src not in failed:
                where = decl.source
                diags.error(f"unconnected input: node '{decl.name}' reads '{src}', which is not a node or input",
                            where, did_you_mean(src, g.nodes), once=(where.file, where.line, where.col, "reads", src))
                ok = False
        if not ok:
            continue
        g.nodes[decl.name]["inputs"] = [s for _, s in srcs]
        for port, src in srcs:
            if g.has_edge(src, decl.name):
                g.edges[src, decl.name]["ports"].append(port)
            else:
                g.add_edge(src, decl.name, ports=[port])

    cycle = None
    if not nx.is_directed_acyclic_graph(g):
        try:
            cycle = nx.find_cycle(g)
        except nx.NetworkXNoCycle:
            cycle = None
    if cycle:
        names = [u for u, _ in cycle] + [cycle[0][0]]
        diags.error("cycle: " + " -> ".join(names), g.nodes[cycle[0][0]]["source"])
        diags.raise_if_any()  # types cannot be inferred around a cycle

    graph = Graph(g, resolved, env, inputs, {k: v for k, (v, _) in resolved.outputs.items()})
    order = graph.blocks()
    _infer(graph, diags, order)
    _check_ties(graph, diags, order)

    # every block's output must reach an output (reads counted as written, even by broken nodes)
    used = set(graph.outputs.values())
    for decl in resolved.nodes:
        used.update(decl.inputs.values() if isinstance(decl.inputs, dict) else decl.inputs)
    for n in order:
        if n not in used:
            where = g.nodes[n]["source"]
            diags.error(f"unused output: the output of '{n}' is never read and is not a model output",
                        where, once=(where.file, where.line, where.col, "unused"))
    for name in inputs:
        if name not in used:
            diags.error(f"unused input: graph input '{name}' is never read", resolved.inputs_pos[name])
    diags.raise_if_any()
    return graph


def _bind_ports(spec: Block, decl, diags: Diagnostics) -> list[tuple[str, str]] | None:
    """(port, source) pairs in port order; port mistakes are reported once per written node (a template
    repeated 32 times with a wrong port is one error)."""
    ports, given = spec.ports, decl.inputs
    src = decl.source
    at = (src.file, src.line, src.col)
    if isinstance(given, dict):
        unknown = [p for p in given if p not in ports]
        missing = [p for p in ports if p not in given]
        for p in unknown:
            diags.error(f"node '{decl.name}': block type '{spec.type}' has no input port '{p}' "
                        f"(ports: {', '.join(ports)})", src, did_you_mean(p, ports), once=at + ("port", p))
        if missing:
            diags.error(f"unconnected input: node '{decl.name}' port(s) {', '.join(missing)} not connected", src,
                        once=at + ("missing", tuple(missing)))
        return None if unknown or missing else [(p, given[p]) for p in ports]
    if spec.variadic:
        if not given:
            diags.error(f"unconnected input: node '{decl.name}' needs at least one input", src, once=at + ("none",))
            return None
        return [(f"{ports[0]}{i}", s) for i, s in enumerate(given)]
    if len(given) != len(ports):
        diags.error(f"node '{decl.name}': block type '{spec.type}' takes {len(ports)} input(s) "
                    f"({', '.join(ports)}), got {len(given)}", src, once=at + ("count", len(given)))
        return None
    return list(zip(ports, given))


def _too_big(t: TensorType, what: str) -> str:
    """Why a tensor type cannot exist (an axis over MAX_AXIS or below 1, too many elements), or ''."""
    numel = 1
    for size in t.shape:
        if isinstance(size, Sym):
            continue
        if not 1 <= int(size) <= MAX_AXIS:
            return f"{what} {shape_str(t.shape)} has a size {label(size)} (sizes are 1 to {MAX_AXIS:,})"
        numel *= int(size)
    if numel > MAX_TENSOR:
        return f"{what} {shape_str(t.shape)} has {numel:,} elements per position (the limit is 2**36)"
    return ""


def _infer(graph: Graph, diags: Diagnostics, order: Optional[list[str]] = None) -> None:
    """Propagate types in topological order; each block checks its inputs and declares its state."""
    g = graph.g
    total = 0
    for n in order if order is not None else graph.blocks():
        data = g.nodes[n]
        srcs = data.get("inputs")
        if srcs is None or any("type" not in g.nodes[s] for s in srcs):
            continue  # an upstream error was reported already
        in_types = [g.nodes[s]["type"] for s in srcs]
        spec: Block = data["spec"]
        where = data["source"]
        at = (where.file, where.line, where.col)
        try:
            out = spec.infer(*in_types)
            state = spec.state(*in_types)
            problem = _too_big(out, "its output") or next(
                (p for k, t in state.items() if (p := _too_big(t, f"its state '{k}'"))), "")
            if problem:
                diags.error(f"node '{n}' ({data['block_type']}): {problem}", where, once=at + ("size", problem))
                continue
            try:
                # built only to learn the weights' names and shapes (MLX arrays are lazy: nothing is
                # computed), then dropped: the Program builds its own
                module = spec.build(*in_types)
            except (OverflowError, MemoryError) as e:  # MLX refuses the shape of a weight
                diags.error(f"node '{n}' ({data['block_type']}): a weight is too large: {e}", where,
                            once=at + ("build", str(e)))
                continue
        except ShapeError as e:
            edge = ", ".join(dict.fromkeys(srcs)) + f" -> {n}"
            shapes = "inputs: " + ", ".join(f"{s}: {shape_str(t.shape)} {t.dtype}" for s, t in zip(srcs, in_types))
            diags.error(f"shape mismatch on edge{'s' if len(set(srcs)) > 1 else ''} {edge}", where, str(e), shapes,
                        once=at + ("shape", str(e), tuple(str(t) for t in in_types)))
            continue
        except Exception as e:  # noqa: BLE001 - a plugin's own block may fail in any way; MAD's are bugs
            if is_builtin(type(spec)):
                raise
            diags.error(f"node '{n}' ({data['block_type']}): block type '{data['block_type']}' "
                        f"({type(spec).__module__}) failed: {type(e).__name__}: {e}", where, once=at + ("fail", str(e)))
            continue
        params = {k: tuple(v.shape) for k, v in tree_flatten(getattr(module, "parameters", dict)())}
        del module
        problem = next((p for k, shape in params.items()
                        if (p := _too_big(TensorType(tuple(shape)), f"its weight '{k}'"))), "")
        if problem:
            diags.error(f"node '{n}' ({data['block_type']}): {problem}", where, once=at + ("size", problem))
            continue
        total += sum(_numel(shape) for shape in params.values())
        data["type"] = out
        data["state"] = state
        data["params"] = params
        for s, t in zip(srcs, in_types):
            g.edges[s, n]["type"] = t
    if total > MAX_PARAMS:
        diags.error(f"the model has {total:,} parameters, more than the limit of 2**40", Source(graph.resolved.file))


def _check_ties(graph: Graph, diags: Diagnostics, order: Optional[list[str]] = None) -> None:
    """A node with `tie: other` reads `other`'s weight, which must exist with this node's weight shape."""
    g = graph.g
    order = order if order is not None else graph.blocks()
    for n in order:
        d = g.nodes[n]
        tie = getattr(d["spec"], "tie", None)
        if not tie or "type" not in d:
            continue
        target = g.nodes[tie] if tie in g and g.nodes[tie].get("kind") == "block" else None
        src = d["source"]
        if target is None:
            diags.error(f"node '{n}': tie: '{tie}' is not a node", src, did_you_mean(tie, order),
                        once=(src.file, src.line, src.col, "tie", tie))
            continue
        want = (int(d["type"].shape[-1]), int(g.nodes[d["inputs"][0]]["type"].shape[-1]))
        have = target.get("params", {}).get("weight")
        if have != want:
            diags.error(f"node '{n}': tie: '{tie}' has weight {have}, this node needs {want} (out, in)", src,
                        once=(src.file, src.line, src.col, "tie", tie, have, want))


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
