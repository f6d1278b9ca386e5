"""Property tests over generated topologies (strategies from `mad.testing`): they build, inferred
shapes equal MLX's lazy shapes, the resolved YAML is a fixed point, and a conflicting dim is an error
naming the node."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mad.dims import DimVal
from mad.errors import MadError
from mad.graph import Graph, build_graph
from mad.testing import build_dict, check_lazy_shapes, first_node, inferred_shapes, lazy_shapes, topologies
from mad.topology import load_topology

# deterministic (CI), modest, and no per-example deadline (the first MLX call is slow)
PROPS = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def expected_nodes(topo: dict) -> list[str]:
    """The node names the expansion must produce, in order, computed from the generated dict."""
    names = []
    for name, entry in topo["nodes"].items():
        if "repeat" in entry:
            body = topo["templates"][entry["body"]]["nodes"]
            names += [f"{name}.{i}.{inner}" for i in range(entry["repeat"]) for inner in body]
        else:
            names.append(name)
    return names


def signature(graph: Graph) -> dict:
    g = graph.g
    nodes = {}
    for n, d in g.nodes(data=True):
        entry: dict[str, Any] = {"kind": d.get("kind", "block"), "type": str(d["type"])}
        if d.get("kind") == "block":
            spec = d["spec"].model_dump(by_alias=True)
            entry.update(block_type=d["block_type"], stage=d["stage"], inputs=list(d["inputs"]),
                         spec={k: (int(v), v.expr) if isinstance(v, DimVal) else v for k, v in spec.items()},
                         state={k: str(t) for k, t in d["state"].items()}, params=dict(d["params"]))
        nodes[n] = entry
    edges = {(u, v): (list(d["ports"]), str(d["type"])) for u, v, d in g.edges(data=True)}
    return {"order": graph.blocks(), "nodes": nodes, "edges": edges, "stages": graph.stages(),
            "outputs": dict(graph.outputs)}


@PROPS
@given(topologies())
def test_every_generated_topology_builds(topo):
    graph = build_dict(topo)
    assert graph.blocks() == expected_nodes(topo)
    width_out = int(topo["dims"]["V"])
    assert int(graph.g.nodes["lm_head"]["type"].shape[-1]) == width_out
    assert str(graph.g.nodes["embedding"]["type"]) == f"(B, T, D={topo['dims']['D']}) float"
    assert graph.outputs == {"logits": "lm_head"}


@PROPS
@given(topologies(), st.integers(1, 3), st.integers(1, 5))
def test_inferred_shapes_equal_lazy_mlx_shapes(topo, batch, seq):
    graph = build_dict(topo)
    check_lazy_shapes(graph, batch=batch, seq=seq)
    # and the check is not vacuous: it covers every node
    assert set(lazy_shapes(graph, batch, seq)) == set(inferred_shapes(graph, batch, seq)) == set(graph.blocks())
    assert inferred_shapes(graph, batch, seq)["lm_head"] == (batch, seq, int(topo["dims"]["V"]))


@PROPS
@given(topologies())
def test_resolved_yaml_is_a_fixed_point(topo):
    import yaml

    resolved = load_topology("<generated>", text=yaml.safe_dump(topo, sort_keys=False))
    first = build_graph(resolved)
    text = resolved.to_yaml()
    again = load_topology("<resolved>", text=text)
    second = build_graph(again)
    assert signature(second) == signature(first)
    strip = lambda t: [line for line in t.splitlines() if not line.lstrip().startswith("#")]  # noqa: E731
    assert strip(again.to_yaml()) == strip(text)


def _explicit_dim_norms(graph: Graph, topo: dict) -> list[tuple[str, str, int]]:
    """(first node FQN, --set path, its width) for every norm entry written with an explicit `dim:`."""
    out = []
    seen = set()
    for n in graph.blocks():
        d = graph.g.nodes[n]
        if d["block_type"] not in ("rmsnorm", "layernorm") or d["spec"].dim is None:
            continue
        if n in topo["nodes"]:
            key = f"nodes.{n}.dim"
        else:  # groupI.K.lJ -> templates.blockI.nodes.lJ
            group, _, inner = n.split(".")
            key = f"templates.{topo['nodes'][group]['body']}.nodes.{inner}.dim"
        if key not in seen:
            seen.add(key)
            out.append((n, key, int(d["spec"].dim)))
    return out


@PROPS
@given(topologies(), st.data())
def test_a_conflicting_dim_names_the_node(topo, data):
    graph = build_dict(topo)
    candidates = _explicit_dim_norms(graph, topo)
    assume(candidates)
    node, key, width = data.draw(st.sampled_from(candidates))
    with pytest.raises(MadError) as info:
        build_dict(topo, [f"{key}={width + 1}"])
    err = info.value
    assert len(err.diagnostics) == 1  # the nodes after it are not checked against a broken input
    text = err.render()
    src = graph.g.nodes[node]["inputs"][0]
    assert f"error: shape mismatch on edge {src} -> {node}\n" in text
    assert f"expected (B, T, {width + 1}), got (B, T, " in text


@PROPS
@given(topologies(), st.integers(2, 40))
def test_set_vocab_changes_head_and_embedding(topo, vocab):
    graph = build_dict(topo, [f"dims.V={vocab}"])
    assert graph.g.nodes["embedding"]["params"]["weight"] == (vocab, int(topo["dims"]["D"]))
    assert str(graph.g.nodes["lm_head"]["type"]).endswith(f"V={vocab}) float")
    check_lazy_shapes(graph)


def test_first_node_helper():
    topo = {"mad": 1, "name": "x", "dims": {"B": "batch", "T": "seq", "V": 5, "D": 4},
            "inputs": {"tokens": {"shape": ["B", "T"], "dtype": "int32"}},
            "nodes": {"embedding": {"type": "embedding", "vocab": "V", "dim": "D"},
                      "a": {"type": "rmsnorm"}, "b": {"type": "rmsnorm", "dim": 4},
                      "lm_head": {"type": "linear", "out": "V"}},
            "outputs": {"logits": "lm_head"}}
    graph = build_dict(topo)
    assert first_node(graph, "rmsnorm") == "a"
    assert first_node(graph, "rmsnorm", "dim") == "b"
    assert first_node(graph, "layernorm") is None
