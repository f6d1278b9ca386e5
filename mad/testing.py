"""Hypothesis strategies and checks for topologies and blocks, for MAD's tests and for users' own blocks.

    from hypothesis import given
    from mad.testing import topologies, build_dict, check_lazy_shapes

    @given(topologies())
    def test_builds(topo):
        check_lazy_shapes(build_dict(topo))

`topologies(extra_layers=...)` takes more layer strategies, so a user's block joins generated models.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import mlx.core as mx
from hypothesis import strategies as st

from .block import TensorType
from .dims import Sym
from .graph import Graph, build_graph
from .program import Program
from .topology import load_topology
import yaml

# A layer strategy draws (node dict, new width) from the current width (an int) and the dims table.
Layer = Callable[[int], st.SearchStrategy]


def dims(max_dim: int = 32) -> st.SearchStrategy[dict]:
    """A dims table with runtime B, T, a vocabulary V and a model width D."""
    return st.fixed_dictionaries({
        "B": st.just("batch"), "T": st.just("seq"),
        "V": st.integers(2, 64), "D": st.integers(1, max_dim),
    })


def _norm(width: int) -> st.SearchStrategy:
    return st.sampled_from([
        ({"type": "rmsnorm", "dim": width}, width),
        ({"type": "layernorm", "dim": width}, width),
        ({"type": "rmsnorm"}, width),
    ])


def _ffn(width: int) -> st.SearchStrategy:
    return st.builds(lambda kind, hidden: ({"type": kind, "hidden": hidden}, width),
                     st.sampled_from(["swiglu", "gated_gelu"]), st.integers(1, 48))


def _linear(width: int) -> st.SearchStrategy:
    return st.builds(lambda out, bias, cap: ({"type": "linear", "out": out, "bias": bias,
                                              **({"softcap": cap} if cap else {})}, out),
                     st.integers(1, 48), st.booleans(), st.sampled_from([None, 5.0]))


BASE_LAYERS: tuple[Layer, ...] = (_norm, _ffn, _linear)


@st.composite
def topologies(draw: Callable, extra_layers: tuple[Layer, ...] = (), max_layers: int = 6) -> dict:
    """A valid topology (as a dict): embedding, a chain of layers (some in a residual template repeated
    with `repeat`), and a linear head."""
    table = draw(dims())
    width = int(table["D"])
    layers = BASE_LAYERS + tuple(extra_layers)
    nodes: dict[str, Any] = {"embedding": {"type": "embedding", "vocab": "V", "dim": "D"}}
    templates: dict[str, Any] = {}
    for i in range(draw(st.integers(0, max_layers))):
        if draw(st.booleans()):  # a residual block: width-preserving layers inside a template
            inner = {}
            for j in range(draw(st.integers(1, 3))):
                node, _ = draw(draw(st.sampled_from([_norm, _ffn]))(width))
                inner[f"l{j}"] = node
            inner["residual"] = {"type": "add", "in": ["x", f"l{len(inner) - 1}"]}
            templates[f"block{i}"] = {"nodes": inner}
            nodes[f"group{i}"] = {"repeat": draw(st.integers(1, 3)), "body": f"block{i}"}
        else:
            node, width = draw(draw(st.sampled_from(layers))(width))
            nodes[f"layer{i}"] = node
    nodes["lm_head"] = {"type": "linear", "out": "V"}
    return {"mad": 1, "name": "generated", "dims": table, "inputs": {"tokens": {"shape": ["B", "T"], "dtype": "int32"}},
            "templates": templates, "nodes": nodes, "outputs": {"logits": "lm_head"}}


def build_dict(topology: dict, overrides: list[str] = (), file: str = "<generated>") -> Graph:
    """Build a topology given as a dict (as `topologies()` draws them)."""
    return build_graph(load_topology(file, list(overrides), text=yaml.safe_dump(topology, sort_keys=False)))


def lazy_shapes(graph: Graph, batch: int = 2, seq: int = 3) -> dict[str, tuple[int, ...]]:
    """Every node's output shape as MLX computes it (lazily: nothing is evaluated)."""
    program = Program(graph, compile="none")
    sizes = {"batch": batch, "seq": seq}
    inputs = {}
    for name, t in graph.inputs.items():
        shape = tuple(sizes.get(s.kind, seq) if isinstance(s, Sym) else int(s) for s in t.shape)
        inputs[name] = mx.zeros(shape, dtype=mx.int32) if t.dtype == "int32" else mx.zeros(shape)
    return {n: tuple(a.shape) for n, a in program.trace(inputs).items()}


def inferred_shapes(graph: Graph, batch: int = 2, seq: int = 3) -> dict[str, tuple[int, ...]]:
    sizes = {"batch": batch, "seq": seq}
    out = {}
    for n in graph.blocks():
        t: TensorType = graph.g.nodes[n]["type"]
        out[n] = tuple(sizes.get(s.kind, seq) if isinstance(s, Sym) else int(s) for s in t.shape)
    return out


def check_lazy_shapes(graph: Graph, batch: int = 2, seq: int = 3) -> None:
    """Assert that the shapes MAD inferred equal the shapes MLX computes, node by node."""
    lazy, inferred = lazy_shapes(graph, batch, seq), inferred_shapes(graph, batch, seq)
    wrong = {n: (inferred[n], lazy[n]) for n in inferred if inferred[n] != lazy.get(n)}
    assert not wrong, f"inferred != computed shapes: {wrong}"


def first_node(graph: Graph, block_type: str, field: Optional[str] = None) -> Optional[str]:
    for n in graph.blocks():
        d = graph.g.nodes[n]
        if d["block_type"] == block_type and (field is None or getattr(d["spec"], field, None) is not None):
            return n
    return None
