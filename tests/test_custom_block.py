"""A user's own block type (tests/plugins_example.py), registered with `@mad.register` and used through
the `plugins:` key of a topology, directly from Python, in `mad schema` and in generated shape tests.

A topology's `plugins:` are imported only with the caller's opt-in (`trust_plugins=True`, `--trust-plugins`):
without it each one is an error at its entry and nothing is imported."""

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
from mad.testing import check_lazy_shapes, topologies
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
    graph = build_graph(load_topology(write(tmp_path, TOPOLOGY), trust_plugins=True))
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
        build_graph(load_topology(path, trust_plugins=True))
    first = info.value.diagnostics[0].render()
    assert first == (f"{where(path, 'plugins:', 'no_such')}: error: plugin 'no_such_plugin_module_xyz' failed to "
                     f"import: ModuleNotFoundError: No module named 'no_such_plugin_module_xyz'")


def test_plugin_block_runs(fresh_plugin, tmp_path):
    program = mad.build(write(tmp_path, TOPOLOGY), compile="none", trust_plugins=True)
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
    resolved = load_topology(write(tmp_path, TOPOLOGY), trust_plugins=True)
    text = resolved.to_yaml()
    assert f"plugins: [{PLUGIN}]" in text
    again = build_graph(load_topology(write(tmp_path, text, "resolved.yaml"), trust_plugins=True))
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
        build_graph(load_topology(path, trust_plugins=True))
    assert info.value.render() == (
        f"{where(path, 'scal:', 'scal:')}: error: node 'act' (scaled_tanh): unknown field 'scal'\n"
        f"  did you mean 'scale'?")
    path = write(tmp_path, TOPOLOGY.replace("scale: 2.0, dim: D}", "scale: 2.0, dim: D + 1}"))
    with pytest.raises(MadError) as info:
        build_graph(load_topology(path, trust_plugins=True))
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
        text = yaml.safe_dump(topo, sort_keys=False)
        check_lazy_shapes(build_graph(load_topology("<generated>", text=text, trust_plugins=True)))
    finally:
        if added:
            sys.path.remove(str(TESTS))


# ----------------------------------------------------------------------------------------- trust
def test_untrusted_plugin_is_refused_and_not_imported(fresh_plugin, tmp_path):
    path = write(tmp_path, TOPOLOGY)
    with pytest.raises(MadError) as info:
        build_graph(load_topology(path))
    assert PLUGIN not in sys.modules and "scaled_tanh" not in BLOCKS
    # one error, at the entry; the block types it would register are not reported as unknown
    assert info.value.render() == (
        f"{where(path, 'plugins:', PLUGIN)}: error: this file asks to import the Python module '{PLUGIN}' (plugins:), "
        f"which runs its code; to allow it, pass --trust-plugins (CLI) or trust_plugins=True (Python)")


def test_untrusted_plugin_errors_come_with_the_others(fresh_plugin, tmp_path):
    path = write(tmp_path, TOPOLOGY.replace("vocab: V", "vocab: V, vocb: 3"))
    with pytest.raises(MadError) as info:
        build_graph(load_topology(path))
    messages = [d.message for d in info.value.diagnostics]
    assert len(messages) == 2 and "--trust-plugins" in messages[0] and "unknown field 'vocb'" in messages[1]
    assert PLUGIN not in sys.modules


def test_untrusted_plugin_in_an_included_file(fresh_plugin, tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    base = write(lib, TOPOLOGY, "base.yaml")
    path = write(tmp_path, "mad: 1\nname: user\ninclude: [lib/base.yaml]\ndims: {D: 4}\n")
    with pytest.raises(MadError) as info:
        build_graph(load_topology(path))
    assert info.value.diagnostics[0].render().startswith(f"{where(base, 'plugins:', PLUGIN)}: error: this file asks "
                                                         f"to import the Python module '{PLUGIN}'")
    assert PLUGIN not in sys.modules
    graph = build_graph(load_topology(path, trust_plugins=True))
    assert graph.g.nodes["act"]["params"] == {"weight": (4,)}


def test_untrusted_plugin_in_a_build_folder(fresh_plugin, tmp_path):
    text = load_topology(write(tmp_path, TOPOLOGY), trust_plugins=True).to_yaml()
    resolved = write(tmp_path, text, "resolved.yaml")
    with pytest.raises(MadError, match="--trust-plugins"):
        build_graph(load_topology(resolved))
    with pytest.raises(MadError, match="--trust-plugins"):
        mad.load(tmp_path / "resolved.yaml")


def test_plugins_from_set_are_refused_too(fresh_plugin):
    with pytest.raises(MadError) as info:
        build_graph(load_topology(TESTS.parent / "topologies" / "examples" / "tiny.yaml", [f"plugins=[{PLUGIN}]"]))
    assert info.value.diagnostics[0].message.startswith(f"this file asks to import the Python module '{PLUGIN}'")
    assert PLUGIN not in sys.modules


MY_BLOCKS = '''
import mad

@mad.register("doubled")
class Doubled(mad.Block):
    def infer(self, x):
        return x

    def build(self, x):
        return lambda v: 2 * v
'''


def test_trusted_plugin_next_to_the_topology_is_found(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "my_blocks_beside.py").write_text(MY_BLOCKS)
    monkeypatch.delitem(sys.modules, "my_blocks_beside", raising=False)
    monkeypatch.delitem(BLOCKS, "doubled", raising=False)
    path = write(folder, TOPOLOGY.replace(PLUGIN, "my_blocks_beside").replace(
        "act: {type: scaled_tanh, scale: 2.0, dim: D}", "act: {type: doubled}").replace("scaled_tanh", "doubled"))
    before = list(sys.path)
    with pytest.raises(MadError, match="--trust-plugins"):
        build_graph(load_topology(path))
    assert "my_blocks_beside" not in sys.modules
    graph = build_graph(load_topology(path, trust_plugins=True))
    assert graph.g.nodes["act"]["block_type"] == "doubled"
    assert sys.path == before  # the folder was on sys.path only while the plugin was imported


def test_plugin_cannot_replace_a_builtin_block(tmp_path, monkeypatch):
    (tmp_path / "impostor_blocks.py").write_text(
        "import mad\n\n@mad.register('rmsnorm')\nclass RMSNormBlock(mad.Block):\n    pass\n")
    monkeypatch.delitem(sys.modules, "impostor_blocks", raising=False)
    path = write(tmp_path, TOPOLOGY.replace(PLUGIN, "impostor_blocks").replace(
        "act: {type: scaled_tanh, scale: 2.0, dim: D}", "act: {type: rmsnorm}").replace(
        "{type: scaled_tanh}", "{type: rmsnorm}"))
    with pytest.raises(MadError) as info:
        build_graph(load_topology(path, trust_plugins=True))
    text = info.value.render()
    assert text.startswith(f"{where(path, 'plugins:', 'impostor')}: error: plugin 'impostor_blocks' failed to import")
    assert "block type 'rmsnorm' is already registered by mad.blocks.core (RMSNormBlock)" in text
    assert "impostor_blocks (RMSNormBlock) cannot replace it" in text
    assert BLOCKS["rmsnorm"].__module__ == "mad.blocks.core"


def test_register_same_name_from_another_module_is_refused():
    class Other(mad.Block):
        pass

    Other.__module__ = "somewhere_else"
    first = mad.register("a_test_only_type")(type("First", (mad.Block,), {}))
    try:
        with pytest.raises(MadError, match="'a_test_only_type' is already registered by .*somewhere_else"):
            mad.register("a_test_only_type")(Other)
        assert mad.register("a_test_only_type")(first) is first  # the same class again is fine
    finally:
        BLOCKS.pop("a_test_only_type", None)


class _FakeEntryPoint:
    name, value = "fake", "fake_module:register"

    def __init__(self, log: list):
        self.log = log

    def load(self):
        self.log.append("loaded")
        raise ImportError("nothing here")


def test_entry_points_load_only_when_trusted(tmp_path, monkeypatch):
    import mad.block as block

    log: list = []
    monkeypatch.setattr(block, "_ENTRY_POINTS_LOADED", False)
    monkeypatch.setattr(block, "_ENTRY_POINT_ERRORS", [])
    monkeypatch.setattr(block.importlib.metadata, "entry_points", lambda group: [_FakeEntryPoint(log)])
    tiny = TESTS.parent / "topologies" / "examples" / "tiny.yaml"
    build_graph(load_topology(tiny))
    block.block_types()
    assert log == []
    with pytest.raises(MadError) as info:
        build_graph(load_topology(tiny, trust_plugins=True))
    assert log == ["loaded"]
    assert info.value.render() == ("error: entry point 'fake' (fake_module:register, group mad.blocks) failed to load: "
                                   "ImportError: nothing here")
