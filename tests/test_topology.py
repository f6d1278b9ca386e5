"""The topology language: dims, templates, groups (repeat / pattern / at / every), includes, --set,
and the resolved YAML as a fixed point of `mad build`."""

from __future__ import annotations

from pathlib import Path

import pytest

from mad.dims import DimError, DimVal, Sym, check, evaluate, resolve_dims, round_up, shape_str
from mad.errors import MadError
from mad.graph import Graph, build_graph
from mad.pattern import parse_pattern
from mad.topology import load_topology
from yaml_files import write

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "topologies" / "examples" / "tiny.yaml"

HEAD = """\
mad: 1
name: t
dims: {B: batch, T: seq, V: 16, D: 8}
inputs:
  tokens: {shape: [B, T], dtype: int32}
"""


def build(path: Path, overrides=()) -> Graph:
    return build_graph(load_topology(path, list(overrides)))


def layout(graph: Graph) -> list[tuple[str, str, list[str], str]]:
    """(node, block type, inputs, stage) for every block, in execution order."""
    g = graph.g
    return [(n, g.nodes[n]["block_type"], g.nodes[n]["inputs"], g.nodes[n]["stage"]) for n in graph.blocks()]


def signature(graph: Graph) -> dict:
    """Everything that defines a built graph, as comparable plain data."""
    g = graph.g
    nodes = {}
    for n, d in g.nodes(data=True):
        entry = {"kind": d.get("kind", "block"), "type": str(d["type"])}
        if d.get("kind") == "block":
            spec = d["spec"].model_dump(by_alias=True)
            entry.update(
                block_type=d["block_type"], stage=d["stage"], inputs=list(d["inputs"]),
                spec={k: (int(v), v.expr) if isinstance(v, DimVal) else v for k, v in spec.items()},
                state={k: str(t) for k, t in d["state"].items()}, params=dict(d["params"]),
            )
        nodes[n] = entry
    edges = {(u, v): (list(d["ports"]), str(d["type"])) for u, v, d in g.edges(data=True)}
    dims = {k: (int(v), v.expr) if isinstance(v, DimVal) else str(v) for k, v in graph.dims.items()}
    return {"order": graph.blocks(), "nodes": nodes, "edges": edges, "stages": graph.stages(),
            "outputs": dict(graph.outputs), "inputs": {k: str(t) for k, t in graph.inputs.items()}, "dims": dims}


def strip_comments(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


# ----------------------------------------------------------------------------------------- dims
def test_dims_expressions_resolve_in_dependency_order():
    env, errors = resolve_dims({
        "F": "round_up(int(D * 2.667), 64)",  # written before the dims it uses
        "B": "batch", "T": "seq", "S": "dynamic",
        "D": 768, "NH": 4, "DH": "D // NH",
        "M": "min(D, 100) + max(NH, 7)", "R": "D % 5 - 2 * NH", "N": "-NH + 10", "P": "(D + 1) // 2",
        "Q": "int(D / 3)", "H": "D / 4",
    })
    assert errors == {}
    assert env["B"] == Sym("B", "batch") and env["T"] == Sym("T", "seq") and env["S"] == Sym("S", "dynamic")
    expected = {"D": 768, "NH": 4, "DH": 192, "F": 2048, "M": 107, "R": -5, "N": 6, "P": 384, "Q": 256, "H": 192}
    assert {k: int(v) for k, v in env.items() if not isinstance(v, Sym)} == expected
    # every resolved dim remembers its own name, so shapes print `D=768`
    assert isinstance(env["DH"], DimVal) and env["DH"].expr == "DH"
    assert env["DH"].label() == "DH=192"
    assert shape_str((env["B"], env["T"], env["D"])) == "(B, T, D=768)"


def test_round_up_and_int():
    assert round_up(2048, 64) == 2048
    assert round_up(2049, 64) == 2112
    assert round_up(1, 16) == 16
    assert int(evaluate("round_up(int(64 * 2.667), 16)", {})) == 176  # int(170.688) = 170 -> 176
    assert int(evaluate("int(10 * 0.99)", {})) == 9


def test_evaluate_keeps_expression_and_label():
    d = evaluate("D * 3", {"D": DimVal(4, "D")})
    assert int(d) == 12 and d.expr == "D * 3" and d.label() == "D * 3=12"
    assert evaluate(5, {}).label() == "5"
    assert evaluate("7", {}).label() == "7"


def test_constraints():
    env = {"D": DimVal(12, "D"), "NH": DimVal(4, "NH")}
    assert check("D % NH == 0", env) is True
    assert check("D % 5 == 0", env) is False
    assert check("0 < NH <= D", env) is True
    assert check("NH > 4 or D == 12", env) is True
    assert check("NH > 4 and D == 12", env) is False


@pytest.mark.parametrize("table, name, message", [
    ({"B": "batch", "D": "B * 2"}, "D", "'B' is a runtime dim (batch); it cannot be used in 'B * 2'"),
    ({"A": "A + 1"}, "A", "dim 'A' refers to itself"),
    ({"A": "B + 1", "B": "A + 1", "C": 4}, "A", "dim 'A' is part of a cycle: A, B"),
    ({"A": "B + 1", "B": "A + 1", "C": 4}, "B", "dim 'B' is part of a cycle: A, B"),
    ({"D": 3, "A": "Dd + 1"}, "A", "unknown dim 'Dd' in 'Dd + 1'; did you mean 'D'?"),
    ({"Z": "3 // 0"}, "Z", "division by zero in '3 // 0'"),
    ({"A": "7 / 2"}, "A", "'7 / 2' is not an integer (3.5); use int(...) or round_up(...)"),
    ({"F": 2.5}, "F", "a dim must be an integer, got 2.5"),
    ({"D": 2, "P": "D ** 2"}, "P", "'D ** 2' is not a dim expression"),
    ({"D": 2, "I": "len(D)"}, "I", "'len(D)' is not a dim expression"),
    ({"D": 2, "K": "D == 2"}, "K", "'D == 2' does not give an integer"),
    ({"E": "D // / 2", "D": 2}, "E", "'D // / 2' is not a valid expression"),
    ({"A": "1 // 0", "W": "A + 1"}, "W", "dim 'W' depends on a dim with an error"),
])
def test_dim_errors(table, name, message):
    env, errors = resolve_dims(table)
    assert name not in env
    assert message in errors[name]


def test_dim_errors_do_not_hide_good_dims():
    env, errors = resolve_dims({"B": "batch", "D": 8, "E": "B * 2", "F": "G + 1", "G": "F - 1", "H": "D * 2"})
    assert set(errors) == {"E", "F", "G"}
    assert int(env["H"]) == 16 and int(env["D"]) == 8


@pytest.mark.parametrize("expr", ["__import__('os')", "D.real", "[1]", "'a'", "True", "D if D else 1"])
def test_dim_expression_rejects_python(expr):
    with pytest.raises(DimError, match="not a dim expression|does not give an integer|expected a dim"):
        evaluate(expr, {"D": DimVal(2, "D")})


def test_dims_in_a_file_give_positioned_errors(tmp_path):
    path = write(tmp_path, name="dims.yaml", text=HEAD.replace("D: 8}", "D: 8, E: 'B * 2', F: G + 1, G: F - 1}") + """\
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  lm_head: {type: linear, out: V}
outputs: {logits: lm_head}
""")
    with pytest.raises(MadError) as info:
        build(path)
    text = info.value.render()
    line = 'dims: {B: batch, T: seq, V: 16, D: 8, E: \'B * 2\', F: G + 1, G: F - 1}'
    assert f"{path}:3:{line.index('E:') + 1}: error: dim 'E': 'B' is a runtime dim (batch)" in text
    assert f"{path}:3:{line.index('F:') + 1}: error: dim 'F' is part of a cycle: F, G" in text
    assert f"{path}:3:{line.index('G:') + 1}: error: dim 'G' is part of a cycle: F, G" in text
    assert len(info.value.diagnostics) == 3


# ----------------------------------------------------------------------------------------- tiny
def test_tiny_nodes_shapes_and_stages():
    graph = build(TINY)
    assert layout(graph) == [
        ("embedding", "embedding", ["tokens"], "embedding"),
        ("blocks.0.norm", "rmsnorm", ["embedding"], "blocks.0"),
        ("blocks.0.ffn", "swiglu", ["blocks.0.norm"], "blocks.0"),
        ("blocks.0.residual", "add", ["embedding", "blocks.0.ffn"], "blocks.0"),
        ("blocks.1.norm", "rmsnorm", ["blocks.0.residual"], "blocks.1"),
        ("blocks.1.ffn", "swiglu", ["blocks.1.norm"], "blocks.1"),
        ("blocks.1.residual", "add", ["blocks.0.residual", "blocks.1.ffn"], "blocks.1"),
        ("out_norm", "rmsnorm", ["blocks.1.residual"], "out_norm"),
        ("lm_head", "linear", ["out_norm"], "lm_head"),
    ]
    g = graph.g
    assert str(g.nodes["embedding"]["type"]) == "(B, T, D=64) float"
    assert str(g.nodes["lm_head"]["type"]) == "(B, T, V=256) float"
    assert str(graph.inputs["tokens"]) == "(B, T) int32"
    assert int(graph.dims["F"]) == 176  # round_up(int(64 * 2.667), 16)
    assert g.nodes["blocks.0.ffn"]["params"] == {
        "gate_proj.weight": (176, 64), "up_proj.weight": (176, 64), "down_proj.weight": (64, 176)}
    assert g.nodes["lm_head"]["params"] == {}  # tied to the embedding
    assert [s for s, _ in graph.stages()] == ["embedding", "blocks.0", "blocks.1", "out_norm", "lm_head"]
    assert g.edges["embedding", "blocks.0.residual"]["ports"] == ["x0"]
    assert g.edges["blocks.0.ffn", "blocks.0.residual"]["ports"] == ["x1"]
    assert graph.outputs == {"logits": "lm_head"}
    assert graph.param_count() == 256 * 64 + 2 * (64 + 3 * 176 * 64) + 64


# ----------------------------------------------------------------------------------------- templates
TEMPLATE_BINDING = HEAD + """\
templates:
  two:
    inputs: [a, b]
    nodes:
      g: {type: gate, in: {gate: a, x: b}}
      s: {type: add, in: [g, b]}
    output: s
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  n1: {type: rmsnorm}
  n2: {type: layernorm, in: embedding}
  t: {type: two, in: {a: n1, b: n2}}
  t2: {type: two, in: [t, n1]}
  lm_head: {type: linear, out: V}
outputs: {logits: lm_head, mid: t}
"""


def test_template_in_binding_by_dict_and_list(tmp_path):
    graph = build(write(tmp_path, name="tpl.yaml", text=TEMPLATE_BINDING))
    assert layout(graph) == [
        ("embedding", "embedding", ["tokens"], "embedding"),
        ("n1", "rmsnorm", ["embedding"], "n1"),
        ("n2", "layernorm", ["embedding"], "n2"),
        ("t.g", "gate", ["n1", "n2"], "t"),
        ("t.s", "add", ["t.g", "n2"], "t"),
        ("t2.g", "gate", ["t.s", "n1"], "t2"),  # list binding: a=t (its output t.s), b=n1
        ("t2.s", "add", ["t2.g", "n1"], "t2"),
        ("lm_head", "linear", ["t2.s"], "lm_head"),
    ]
    assert graph.g.edges["n1", "t.g"]["ports"] == ["gate"]
    assert graph.g.edges["n2", "t.g"]["ports"] == ["x"]
    assert graph.outputs == {"logits": "lm_head", "mid": "t.s"}


def test_template_sources_carry_the_chain(tmp_path):
    path = write(tmp_path, name="tpl.yaml", text=TEMPLATE_BINDING)
    graph = build(path)
    src = graph.g.nodes["t2.g"]["source"]
    lines = path.read_text().splitlines()
    line = next(i for i, l in enumerate(lines, 1) if "g: {type: gate" in l)
    assert (src.file, src.line, src.col) == (str(path), line, 7)
    assert src.chain == ("template 'two' as 't2'",)


NESTED = HEAD + """\
templates:
  inner:
    nodes:
      n: {type: rmsnorm}
      r: {type: add, in: [x, n]}
  outer:
    nodes:
      pre: {type: layernorm}
      layers: {repeat: 2, body: inner, as: "L{i}"}
      post: {type: add, in: [x, layers]}
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  enc: {type: outer}
  lm_head: {type: linear, out: V}
outputs: {logits: lm_head, h: enc}
"""


def test_group_inside_template(tmp_path):
    graph = build(write(tmp_path, name="nest.yaml", text=NESTED))
    assert layout(graph) == [
        ("embedding", "embedding", ["tokens"], "embedding"),
        ("enc.pre", "layernorm", ["embedding"], "enc"),
        ("enc.L0.n", "rmsnorm", ["enc.pre"], "enc"),
        ("enc.L0.r", "add", ["enc.pre", "enc.L0.n"], "enc"),
        ("enc.L1.n", "rmsnorm", ["enc.L0.r"], "enc"),
        ("enc.L1.r", "add", ["enc.L0.r", "enc.L1.n"], "enc"),
        ("enc.post", "add", ["embedding", "enc.L1.r"], "enc"),
        ("lm_head", "linear", ["enc.post"], "lm_head"),
    ]
    assert graph.outputs == {"logits": "lm_head", "h": "enc.post"}
    src = graph.g.nodes["enc.L1.n"]["source"]
    path = tmp_path / "nest.yaml"
    assert str(src) == f"{path}:9:7"  # the template line that wrote it
    assert src.chain == ("template 'outer' as 'enc'", f"repeat 'enc.layers' i=1 (inner) at {path}:14:7",
                         "template 'inner' as 'enc.L1'")


# ----------------------------------------------------------------------------------------- groups
def test_repeat_with_as_and_default_names(tmp_path):
    path = write(tmp_path, name="rep.yaml", text=HEAD + """\
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  norms: {repeat: 3, body: rmsnorm}
  layers: {repeat: 2, body: {type: layernorm, eps: 0.001}, as: "{name}_{i}"}
  lm_head: {type: linear, out: V}
outputs: {logits: lm_head, hidden: layers}
""")
    graph = build(path)
    assert layout(graph) == [
        ("embedding", "embedding", ["tokens"], "embedding"),
        ("norms.0", "rmsnorm", ["embedding"], "norms.0"),
        ("norms.1", "rmsnorm", ["norms.0"], "norms.1"),
        ("norms.2", "rmsnorm", ["norms.1"], "norms.2"),
        ("layers_0", "layernorm", ["norms.2"], "layers_0"),
        ("layers_1", "layernorm", ["layers_0"], "layers_1"),
        ("lm_head", "linear", ["layers_1"], "lm_head"),
    ]
    assert graph.g.nodes["layers_1"]["spec"].eps == 0.001
    assert graph.outputs == {"logits": "lm_head", "hidden": "layers_1"}
    chain = graph.g.nodes["norms.2"]["source"].chain
    assert chain == (f"repeat 'norms' i=2 (rmsnorm) at {path}:8:3",)


PATTERN = HEAD + """\
templates:
  res:
    nodes:
      norm: {type: rmsnorm}
      ffn: {type: swiglu, hidden: 16}
      out: {type: add, in: [x, ffn]}
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  blocks:
    pattern: "(a a b) x 2"
    choices: {a: res, b: {type: layernorm}}
  lm_head: {type: linear, out: V}
outputs: {logits: lm_head}
"""


def test_pattern_with_choices(tmp_path):
    graph = build(write(tmp_path, name="pattern.yaml", text=PATTERN))
    got = layout(graph)
    expected = [("embedding", "embedding", ["tokens"], "embedding")]
    prev = "embedding"
    for i, kind in enumerate("aabaab"):
        if kind == "a":
            p = f"blocks.{i}"
            expected += [(f"{p}.norm", "rmsnorm", [prev], p), (f"{p}.ffn", "swiglu", [f"{p}.norm"], p),
                         (f"{p}.out", "add", [prev, f"{p}.ffn"], p)]
            prev = f"{p}.out"
        else:
            expected.append((f"blocks.{i}", "layernorm", [prev], f"blocks.{i}"))
            prev = f"blocks.{i}"
    expected.append(("lm_head", "linear", ["blocks.5"], "lm_head"))
    assert got == expected
    assert graph.g.nodes["blocks.3.ffn"]["params"]["gate_proj.weight"] == (16, 8)
    assert graph.g.nodes["blocks.5"]["source"].chain[0].startswith("pattern 'blocks' i=5 (layernorm) at ")


@pytest.mark.parametrize("text, keys", [
    ("(a a b) x 2", list("aabaab")),
    ("m x 7 s", ["m"] * 7 + ["s"]),
    ("(m m m s) x 3", list("mmms") * 3),
    ("a (b (c d) x 2) x 2 e", ["a"] + ["b", "c", "d", "c", "d"] * 2 + ["e"]),
    ("mlstm x2 slstm", ["mlstm", "mlstm", "slstm"]),
])
def test_parse_pattern(text, keys):
    assert parse_pattern(text) == keys


@pytest.mark.parametrize("text, message", [
    ("(a a x 2", "unbalanced '('"),
    ("a a) x 2", "unbalanced ')'"),
    ("x 2", "'x N' must follow a name"),
    ("", "is empty"),
    ("a, b", "cannot read pattern"),
])
def test_parse_pattern_errors(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_pattern(text)


def test_at_and_every_place_bodies(tmp_path):
    path = write(tmp_path, name="at.yaml", text=HEAD + """\
templates:
  ffa: {nodes: {f: {type: swiglu, hidden: 4}}}
  ffb: {nodes: {f: {type: gated_gelu, hidden: 4}}}
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  layers:
    repeat: 9
    body: rmsnorm
    as: "L{i}"
    every: {layernorm: 3, ffa: {n: 4, offset: 1}}
    at: {ffb: [6, -1]}
  lm_head: {type: linear, out: V}
outputs: {logits: lm_head}
""")
    graph = build(path)
    # rmsnorm everywhere; every 3 -> layernorm at 0, 3, 6; every {4, offset 1} -> ffa at 1, 5;
    # at [6, -1] -> ffb at 6 and 8 (at wins over every)
    assert [(n, t) for n, t, _, _ in layout(graph)] == [
        ("embedding", "embedding"),
        ("L0", "layernorm"), ("L1.f", "swiglu"), ("L2", "rmsnorm"), ("L3", "layernorm"), ("L4", "rmsnorm"),
        ("L5.f", "swiglu"), ("L6.f", "gated_gelu"), ("L7", "rmsnorm"), ("L8.f", "gated_gelu"),
        ("lm_head", "linear"),
    ]
    assert graph.g.nodes["L7"]["inputs"] == ["L6.f"]
    assert graph.g.nodes["L6.f"]["stage"] == "L6"


@pytest.mark.parametrize("group, message", [
    ("{pattern: '(a b) x 2', choices: {a: rmsnorm}}", "group 'g': pattern names 'b', which is not in choices (a)"),
    ("{repeat: 3, body: rmsnorm, at: {layernorm: [5]}}", "group 'g': at: index 5 is outside 0..2"),
    ("{repeat: 3, body: rmsnorm, as: same}", "group 'g': 'as: same' gives the same name twice; put {i} in it"),
    ("{repeat: 3}", "group 'g': 'repeat' needs a 'body'"),
    ("{repeat: 2, pattern: a, body: rmsnorm, choices: {a: rmsnorm}}",
     "group 'g': a group needs exactly one of 'repeat' or 'pattern'"),
    ("{repeat: 0, body: rmsnorm}", "group 'g': repeat"),
])
def test_group_errors(tmp_path, group, message):
    path = write(tmp_path, name="g.yaml", text=HEAD + f"""\
nodes:
  embedding: {{type: embedding, vocab: V, dim: D}}
  g: {group}
  lm_head: {{type: linear, out: V}}
outputs: {{logits: lm_head}}
""")
    with pytest.raises(MadError) as info:
        load_topology(path)
    text = info.value.render()
    assert message in text
    assert text.startswith(f"{path}:8:")


# ----------------------------------------------------------------------------------------- includes
BASE = """\
mad: 1
name: base
dims: {B: batch, T: seq, V: 16, D: 8, F: "round_up(int(D * 1.5), 4)"}
constraints: ["D % 2 == 0"]
inputs:
  tokens: {shape: [B, T], dtype: int32}
templates:
  block:
    nodes:
      norm: {type: rmsnorm, dim: D}
      ffn: {type: swiglu, hidden: F}
      residual: {type: add, in: [x, ffn]}
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  blocks: {repeat: 2, body: block}
  lm_head: {type: linear, out: V}
outputs: {logits: lm_head}
"""


@pytest.fixture
def included(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "base.yaml").write_text(BASE)
    (tmp_path / "variant.yaml").write_text("mad: 1\nname: variant\ninclude: [lib/base.yaml]\ndims: {D: 12}\n")
    (tmp_path / "variant2.yaml").write_text("""\
mad: 1
name: variant2
include: [lib/base.yaml]
dims: {D: 6, V: 20}
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  blocks: {repeat: 3, body: block, as: "b{i}"}
  head: {type: linear, out: V, bias: true}
outputs: {logits: head}
""")
    return tmp_path


def test_include_overrides_dims_and_keeps_graph(included):
    graph = build(included / "variant.yaml")
    assert graph.name == "variant"
    assert int(graph.dims["D"]) == 12 and int(graph.dims["F"]) == 20  # round_up(18, 4)
    assert [n for n, *_ in layout(graph)] == [
        "embedding", "blocks.0.norm", "blocks.0.ffn", "blocks.0.residual",
        "blocks.1.norm", "blocks.1.ffn", "blocks.1.residual", "lm_head"]
    assert graph.g.nodes["blocks.1.ffn"]["params"]["down_proj.weight"] == (12, 20)
    # the nodes point into the file that wrote them
    src = graph.g.nodes["blocks.0.norm"]["source"]
    assert (src.file, src.line, src.col) == (str(included / "lib" / "base.yaml"), 10, 7)
    assert str(graph.g.nodes["lm_head"]["source"]) == f"{included / 'lib' / 'base.yaml'}:16:3"


def test_include_with_own_graph_uses_base_templates(included):
    graph = build(included / "variant2.yaml")
    assert [n for n, *_ in layout(graph)] == [
        "embedding", "b0.norm", "b0.ffn", "b0.residual", "b1.norm", "b1.ffn", "b1.residual",
        "b2.norm", "b2.ffn", "b2.residual", "head"]
    assert str(graph.g.nodes["head"]["type"]) == "(B, T, V=20) float"
    assert graph.g.nodes["b2.ffn"]["params"]["gate_proj.weight"] == (12, 6)  # F = round_up(9, 4)
    assert str(graph.g.nodes["head"]["source"]) == f"{included / 'variant2.yaml'}:8:3"


def test_included_constraint_checked_with_overridden_dims(included):
    with pytest.raises(MadError) as info:
        build(included / "variant.yaml", ["dims.D=7"])
    assert info.value.render() == (
        f"{included / 'lib' / 'base.yaml'}:4:15: error: constraint 'D % 2 == 0' is violated (D=7)")


def test_set_a_dim_defined_only_in_the_include(included):
    graph = build(included / "variant.yaml", ["dims.F=40"])
    assert int(graph.dims["F"]) == 40 and int(graph.dims["D"]) == 12
    assert graph.g.nodes["blocks.0.ffn"]["params"]["gate_proj.weight"] == (40, 12)


def test_include_with_text_argument(included):
    text = (included / "variant.yaml").read_text()
    try:
        graph = build_graph(load_topology(included / "variant.yaml", text=text))
    except MadError as e:  # refusing includes here would be fine too, but not ignoring them
        assert "include" in e.render()
        return
    assert graph.blocks()[-1:] == ["lm_head"]
    assert int(graph.dims["D"]) == 12


def test_include_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("mad: 1\nname: a\ninclude: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("mad: 1\nname: b\ninclude: [a.yaml, missing.yaml]\n")
    with pytest.raises(MadError) as info:
        load_topology(tmp_path / "a.yaml")
    msgs = [d.render() for d in info.value.diagnostics]
    assert len(msgs) == 2
    assert msgs[0].startswith(f"{tmp_path / 'b.yaml'}:3:11: error: include cycle: ")
    col = "include: [a.yaml, missing.yaml]".index("missing") + 1
    assert msgs[1] == f"{tmp_path / 'b.yaml'}:3:{col}: error: included file not found: missing.yaml"


# ----------------------------------------------------------------------------------------- --set
def test_set_overrides_dims_and_fields():
    base = build(TINY)
    graph = build(TINY, ["dims.D=32", "nodes.blocks.repeat=3", "dims.F=48"])
    assert int(graph.dims["D"]) == 32 and int(graph.dims["F"]) == 48
    assert [n for n in graph.blocks() if n.endswith(".ffn")] == ["blocks.0.ffn", "blocks.1.ffn", "blocks.2.ffn"]
    assert graph.g.nodes["blocks.2.ffn"]["params"]["up_proj.weight"] == (48, 32)
    assert str(graph.g.nodes["out_norm"]["type"]) == "(B, T, D=32) float"
    assert graph.param_count() != base.param_count()


def test_set_expression_and_yaml_value():
    graph = build(TINY, ["dims.D=V // 8", "nodes.lm_head.tie=null", "nodes.lm_head.bias=true"])
    assert int(graph.dims["D"]) == 32
    assert graph.g.nodes["lm_head"]["params"] == {"weight": (256, 32), "bias": (256,)}


def test_set_a_dotted_node_name_in_a_resolved_file(tmp_path):
    out = tmp_path / "resolved.yaml"
    out.write_text(load_topology(TINY).to_yaml())
    graph = build(out, ["nodes.blocks.0.norm.eps=0.5", "nodes.blocks.1.ffn.hidden=32"])
    assert graph.g.nodes["blocks.0.norm"]["spec"].eps == 0.5
    assert graph.g.nodes["blocks.1.norm"]["spec"].eps == 1e-6
    assert graph.g.nodes["blocks.1.ffn"]["params"]["up_proj.weight"] == (32, 64)
    assert graph.g.nodes["blocks.0.ffn"]["params"]["up_proj.weight"] == (176, 64)


@pytest.mark.parametrize("assignment, message", [
    ("dims.Q=5", "--set dims.Q=5: error: --set: unknown dim 'Q'"),
    ("nodez.x=5", "--set nodez.x=5: error: --set: 'nodez' not found in 'nodez.x'\n  did you mean 'nodes'?"),
    ("dims.D", "--set dims.D: error: expected --set key=value (e.g. dims.D=512)"),
    ("name.x=1", "--set name.x=1: error: --set: 'name.x' does not name a field"),
    ("D=32", "--set D=32: error: --set: 'D' is a dim: write dims.D=32"),
])
def test_set_errors(assignment, message):
    with pytest.raises(MadError) as info:
        load_topology(TINY, [assignment])
    assert info.value.render() == message


def test_set_conflicting_dim_names_the_node():
    with pytest.raises(MadError) as info:
        build(TINY, ["nodes.out_norm.dim=D + 1"])
    text = info.value.render()
    assert text.startswith(f"{TINY}:18:3: error: shape mismatch on edge blocks.1.residual -> out_norm\n")
    assert "expected (B, T, D + 1=65), got (B, T, D=64)" in text


# ----------------------------------------------------------------------------------------- fixed point
def _fixed_point(tmp_path: Path, path: Path, overrides=()) -> None:
    resolved = load_topology(path, list(overrides))
    first = build_graph(resolved)
    text = resolved.to_yaml()
    out = tmp_path / "resolved.yaml"
    out.write_text(text)
    again = load_topology(out)
    second = build_graph(again)
    assert signature(second) == signature(first)
    # resolving the resolved file changes nothing but the `# from` comments
    assert strip_comments(again.to_yaml()) == strip_comments(text)
    # and the resolved file has no sugar left
    body = strip_comments(text)
    for sugar in ("repeat", "pattern", "choices", "templates", "include", "every", " at:"):
        assert sugar not in body


def test_resolved_yaml_is_a_fixed_point_tiny(tmp_path):
    _fixed_point(tmp_path, TINY)


def test_resolved_yaml_is_a_fixed_point_with_set(tmp_path):
    _fixed_point(tmp_path, TINY, ["dims.D=32", "nodes.blocks.repeat=3"])
    text = load_topology(TINY, ["dims.D=32"]).to_yaml()
    assert "  D: 32\n" in text


@pytest.mark.parametrize("source", ["pattern", "template", "nested", "include", "include2", "at"])
def test_resolved_yaml_is_a_fixed_point(tmp_path, included, source):
    files = {"pattern": PATTERN, "template": TEMPLATE_BINDING, "nested": NESTED}
    if source in files:
        path = write(tmp_path, name=f"{source}.yaml", text=files[source])
    elif source == "include":
        path = included / "variant.yaml"
    elif source == "include2":
        path = included / "variant2.yaml"
    else:
        path = write(tmp_path, name="at.yaml", text=HEAD + """\
templates:
  ffa: {nodes: {f: {type: swiglu, hidden: 4}, r: {type: add, in: [x, f]}}}
nodes:
  embedding: {type: embedding, vocab: V, dim: D, stage: front}
  layers: {repeat: 5, body: rmsnorm, every: {layernorm: 2}, at: {ffa: [3]}}
  lm_head: {type: linear, out: V, softcap: 5.0}
outputs: {logits: lm_head, h: layers}
""")
    _fixed_point(tmp_path, path)


def test_resolved_yaml_keeps_explicit_stage(tmp_path):
    path = write(tmp_path, name="stage.yaml", text=HEAD + """\
nodes:
  embedding: {type: embedding, vocab: V, dim: D, stage: front}
  n: {type: rmsnorm, stage: front}
  lm_head: {type: linear, out: V}
outputs: {logits: lm_head}
""")
    graph = build(path)
    assert graph.stages() == [("front", ["embedding", "n"]), ("lm_head", ["lm_head"])]
    resolved = load_topology(path)
    out = tmp_path / "resolved.yaml"
    out.write_text(resolved.to_yaml())
    assert build(out).stages() == graph.stages()


def test_stage_in_inline_group_body(tmp_path):
    path = write(tmp_path, name="stage.yaml", text=HEAD + """\
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  g: {repeat: 2, body: {type: rmsnorm, stage: norms}}
  lm_head: {type: linear, out: V}
outputs: {logits: lm_head}
""")
    graph = build(path)
    assert graph.stages()[1] == ("norms", ["g.0", "g.1"])


def test_in_inside_group_body_is_not_silently_dropped(tmp_path):
    path = write(tmp_path, name="inbody.yaml", text=HEAD + """\
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  other: {type: rmsnorm}
  g: {repeat: 2, body: {type: rmsnorm, in: embedding}}
  lm_head: {type: linear, out: V}
outputs: {logits: lm_head}
""")
    try:
        graph = build(path)
    except MadError as e:  # rejecting it is fine ...
        assert "'in'" in e.render() and "g" in e.render()
        return
    assert graph.g.nodes["g.0"]["inputs"] == ["embedding"]  # ... and so is honouring it


def test_duplicate_key_and_not_a_mapping(tmp_path):
    path = write(tmp_path, name="dup.yaml", text=HEAD + "nodes:\n  a: {type: rmsnorm}\n  a: {type: rmsnorm}\n")
    with pytest.raises(MadError) as info:
        load_topology(path)
    assert info.value.render() == f"{path}:8:3: error: duplicate key 'a'"
    path = write(tmp_path, name="list.yaml", text="- 1\n- 2\n")
    with pytest.raises(MadError) as info:
        load_topology(path)
    assert info.value.render() == (f"{path}:1:1: error: a topology file must be a mapping "
                                   "(mad: 1, name: ..., nodes: ...)")


def test_topology_reexports_the_split_modules():
    """mad.topology keeps the names other modules and users import from it."""
    import mad.expand
    import mad.pattern
    import mad.spec
    import mad.validation
    from mad import topology

    assert topology.parse_pattern is mad.pattern.parse_pattern and topology.Resolved is mad.spec.Resolved
    assert topology.report_validation is mad.validation.report_validation and topology.MAX_NODES == mad.spec.MAX_NODES
    assert topology.Expander is mad.expand.Expander and topology.shipped_topologies() is not None
