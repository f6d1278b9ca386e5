"""A user's own block type (tests/plugins_example.py), registered with `@mad.register` and used through
the `plugins:` key of a topology, directly from Python, in `mad schema` and in generated shape tests."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mad
from yaml_files import where, write  # noqa: E402 - tests/ is on sys.path
from mad.block import BLOCKS, TensorType
from mad.dims import DimVal, Sym
from mad.errors import MadError
from mad.graph import build_graph
from mad.schema import topology_schema
from mad.testing import build_dict, check_lazy_shapes, topologies
from mad.topology import load_topology

TESTS = Path(__file__).resolve().parent
PLUGIN = "plugins_example"

TOPOLOGY = f"""\
mad: 1
name: custom
plugins: [{PLUGIN}]
dims: {{B: batch, T: seq, V: 16, D: 8}}
inputs:
  tokens: {{shape: [B, T], dtype: int32}}
nodes:
  embedding: {{type: embedding, vocab: V, dim: D}}
  act: {{type: scaled_tanh, scale: 2.0, dim: D}}
  acts: {{repeat: 2, body: {{type: scaled_tanh}}}}
  lm_head: {{type: linear, out: V}}
outputs: {{logits: lm_head}}
"""


@pytest.fixture
def fresh_plugin(monkeypatch):
    """The plugin module on sys.path but not yet imported, and `scaled_tanh` not registered."""
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.delitem(sys.modules, PLUGIN, raising=False)
    monkeypatch.delitem(BLOCKS, "scaled_tanh", raising=False)
    yield


@pytest.fixture
def plugin(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    return importlib.import_module(PLUGIN)




def test_plugins_key_imports_and_registers_the_block(fresh_plugin, tmp_path):
    assert "scaled_tanh" not in BLOCKS
    graph = build_graph(load_topology(write(tmp_path, TOPOLOGY)))
    assert PLUGIN in sys.modules and BLOCKS["scaled_tanh"].__module__ == PLUGIN
    g = graph.g
    assert [(n, g.nodes[n]["block_type"]) for n in graph.blocks()] == [
        ("embedding", "embedding"), ("act", "scaled_tanh"), ("acts.0", "scaled_tanh"),
        ("acts.1", "scaled_tanh"), ("lm_head", "linear")]
    assert g.nodes["act"]["params"] == {"weight": (8,)}
    assert g.nodes["act"]["spec"].scale == 2.0 and g.nodes["acts.0"]["spec"].scale == 1.0
    assert str(g.nodes["acts.1"]["type"]) == "(B, T, D=8) float"


def test_without_the_plugin_the_type_is_unknown(fresh_plugin, tmp_path):
    path = write(tmp_path, TOPOLOGY.replace(f"plugins: [{PLUGIN}]\n", ""))
    with pytest.raises(MadError) as info:
        build_graph(load_topology(path))
    text = info.value.render()
    first = info.value.diagnostics[0].render()
    assert first == f"{where(path, 'act: {', 'type')}: error: unknown block type 'scaled_tanh' for node 'act'"
    assert "for node 'acts.0'" in text


def test_plugin_that_fails_to_import(tmp_path):
    path = write(tmp_path, TOPOLOGY.replace(PLUGIN, "no_such_plugin_module_xyz"))
    with pytest.raises(MadError) as info:
        build_graph(load_topology(path))
    first = info.value.diagnostics[0].render()
    assert first == (f"{path}: error: plugin 'no_such_plugin_module_xyz' failed to import: "
                     f"ModuleNotFoundError: No module named 'no_such_plugin_module_xyz'")


def test_plugin_block_runs(fresh_plugin, tmp_path):
    program = mad.build(write(tmp_path, TOPOLOGY), compile="none")
    params = program.parameters()
    assert params["act.weight"].shape == (8,) and "acts.1.weight" in params
    program.load_weights({**params, "act.weight": mx.full((8,), 3.0)})
    ids = mx.array([[1, 2, 3]], dtype=mx.int32)
    trace = program.trace(ids)
    np.testing.assert_allclose(np.array(trace["act"]), 3.0 * np.tanh(2.0 * np.array(trace["embedding"])),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(trace["acts.0"]), np.tanh(np.array(trace["act"])), rtol=1e-5, atol=1e-6)
    out, _ = program(ids)
    assert out["logits"].shape == (1, 3, 16)


def test_resolved_yaml_keeps_the_plugin(fresh_plugin, tmp_path):
    resolved = load_topology(write(tmp_path, TOPOLOGY))
    text = resolved.to_yaml()
    assert f"plugins: [{PLUGIN}]" in text
    again = build_graph(load_topology(write(tmp_path, text, "resolved.yaml")))
    assert [again.g.nodes[n]["block_type"] for n in again.blocks()] == [
        "embedding", "scaled_tanh", "scaled_tanh", "scaled_tanh", "linear"]


def test_plugin_block_directly(plugin):
    cls = plugin.ScaledTanh
    assert BLOCKS["scaled_tanh"] is cls and cls.block_type == "scaled_tanh"
    spec = cls.model_validate({"type": "scaled_tanh", "scale": 0.5, "dim": "D"}, context={"dims": {"D": DimVal(4, "D")}})
    assert int(spec.dim) == 4
    x = TensorType((Sym("B", "batch"), DimVal(4, "D")))
    assert spec.infer(x) == x
    with pytest.raises(mad.ShapeError, match="expected last dim 4"):
        spec.infer(TensorType((Sym("B", "batch"), DimVal(5, "E"))))
    with pytest.raises(mad.ShapeError, match="needs a float input"):
        spec.infer(TensorType((Sym("B", "batch"), DimVal(4, "D")), "int32"))
    module = spec.build(x)
    y = module(mx.array([[0.0, 1.0, -1.0, 2.0]]))
    np.testing.assert_allclose(np.array(y), np.tanh(0.5 * np.array([[0.0, 1.0, -1.0, 2.0]])), rtol=1e-6)


def test_plugin_block_errors_point_at_the_node(plugin, tmp_path):
    text = TOPOLOGY.replace("scale: 2.0, dim: D", "scal: 2.0, dim: D + 1")
    path = write(tmp_path, text)
    with pytest.raises(MadError) as info:
        build_graph(load_topology(path))
    assert info.value.render() == (
        f"{where(path, 'scal:', 'scal:')}: error: node 'act' (scaled_tanh): unknown field 'scal'\n"
        f"  did you mean 'scale'?")
    path = write(tmp_path, TOPOLOGY.replace("scale: 2.0, dim: D}", "scale: 2.0, dim: D + 1}"))
    with pytest.raises(MadError) as info:
        build_graph(load_topology(path))
    assert info.value.render().startswith(f"{where(path, 'act: {')}: error: shape mismatch on edge embedding -> act\n"
                                          f"  scaled_tanh: expected last dim 9, got (B, T, D=8) float")


def test_registering_wrongly():
    with pytest.raises(TypeError, match="needs a subclass of mad.Block"):
        mad.register("not_a_block")(dict)

    with pytest.raises(ValueError, match="block type 'rmsnorm' is already registered"):
        @mad.register("rmsnorm")
        class Impostor(mad.Block):
            pass
    assert BLOCKS["rmsnorm"].__name__ == "RMSNormBlock"


def test_plugin_block_in_schema(plugin, tmp_path, monkeypatch, capsys):
    from mad import cli

    monkeypatch.setattr(sys, "argv", ["mad", "schema"])
    cli.main()
    schema = json.loads(capsys.readouterr().out)
    block = schema["$defs"]["block.scaled_tanh"]
    assert block["properties"]["type"] == {"const": "scaled_tanh"}
    assert {"scale", "dim", "in", "stage"} <= set(block["properties"])
    assert block["additionalProperties"] is False
    assert {"$ref": "#/$defs/block.scaled_tanh"} in schema["$defs"]["Node"]["anyOf"]
    validator = jsonschema.Draft202012Validator(schema)
    doc = yaml.safe_load(TOPOLOGY)
    assert list(validator.iter_errors(doc)) == []
    doc["nodes"]["act"]["scal"] = 1.0
    assert len(list(validator.iter_errors(doc))) == 1
    assert topology_schema()["$defs"]["block.scaled_tanh"] == block


def _scaled_tanh_layer(width: int):
    return st.builds(lambda scale, explicit: ({"type": "scaled_tanh", "scale": scale,
                                               **({"dim": width} if explicit else {})}, width),
                     st.sampled_from([0.5, 1.0, 3.0]), st.booleans())


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(topologies(extra_layers=(_scaled_tanh_layer,), max_layers=5))
def test_plugin_block_in_generated_topologies(topo):
    """The documented way to shape-test one's own block: add its layer strategy to `topologies()`."""
    topo = {**topo, "plugins": [PLUGIN]}
    added = str(TESTS) not in sys.path
    if added:
        sys.path.insert(0, str(TESTS))
    try:
        check_lazy_shapes(build_dict(topo))
    finally:
        if added:
            sys.path.remove(str(TESTS))
