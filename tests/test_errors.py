"""User mistakes become `MadError`s that point at FILE:LINE:COL, name the node (and the template/repeat
chain), come all at once, and reach the CLI as exit code 2 without a Python traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import networkx as nx
import pytest

import mad
from mad.errors import MadError
from mad.graph import build_graph, check_state
from mad.loading import load_state_file, save_state_file
from mad.program import Program
from mad.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "topologies" / "examples" / "tiny.yaml"

QUOTE = '"'
HEAD = """\
mad: 1
name: t
dims: {B: batch, T: seq, V: 16, D: 8}
inputs:
  tokens: {shape: [B, T], dtype: int32}
"""


from yaml_files import cli, where, write  # noqa: E402
import plugins_example  # noqa: E402,F401 - registers the recurrent test block `running_sum`




def errors_of(path: Path, overrides=()) -> MadError:
    with pytest.raises(MadError) as info:
        build_graph(load_topology(path, list(overrides)))
    return info.value


# ----------------------------------------------------------------------------------------- file-level
def test_yaml_syntax_error(tmp_path):
    path = write(tmp_path, HEAD + "nodes:\n  embedding: {type: embedding, vocab: V, dim: D]\n  lm_head: {type: linear}\n")
    err = errors_of(path)
    assert err.render() == f"{where(path, 'dim: D]', ']')}: error: YAML syntax: expected ',' or '}}', but got ']'"


def test_yaml_syntax_error_mapping_value(tmp_path):
    path = write(tmp_path, HEAD + "nodes:\n  embedding: {type: embedding, vocab: V, dim: D}\n  lm_head: type: linear\n")
    err = errors_of(path)
    assert err.render() == f"{where(path, 'lm_head: type', ': linear')}: error: YAML syntax: mapping values are not allowed here"


def test_unknown_top_level_field(tmp_path):
    path = write(tmp_path, HEAD + "nodez: {}\n")
    assert errors_of(path).render() == f"{path}:6:1: error: unknown field 'nodez'\n  did you mean 'nodes'?"


def test_unknown_block_type_with_did_you_mean(tmp_path):
    path = write(tmp_path, HEAD + """\
nodes:
  embedding: {type: embeding, vocab: V, dim: D}
  lm_head: {type: linear, out: V}
outputs: {logits: lm_head}
""")
    err = errors_of(path)
    assert err.render() == (f"{where(path, 'embeding', 'type')}: error: unknown block type 'embeding' for node "
                            f"'embedding'\n  did you mean 'embedding'?")


def test_unknown_field_with_did_you_mean(tmp_path):
    path = write(tmp_path, HEAD + """\
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  lm_head: {type: linear, out: V, bais: true}
outputs: {logits: lm_head}
""")
    err = errors_of(path)
    assert err.render() == (f"{where(path, 'bais', 'bais')}: error: node 'lm_head' (linear): unknown field 'bais'\n"
                            f"  did you mean 'bias'?")


REPEATED = HEAD + """\
templates:
  block:
    nodes:
      norm: {type: rmsnorm}
      ffn: {type: swiglu, hiden: 16}
      residual: {type: add, in: [x, ffn]}
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  blocks: {repeat: 3, body: block}
  lm_head: {type: linear, out: V}
outputs: {logits: lm_head}
"""


def test_unknown_field_in_repeated_template_names_the_chain_once(tmp_path):
    path = write(tmp_path, REPEATED)
    err = errors_of(path)
    assert len(err.diagnostics) == 1  # one written mistake, one error (not one per instance)
    assert err.render() == (
        f"{where(path, 'hiden', 'hiden')}: error: node 'blocks.0.ffn' (swiglu): unknown field 'hiden'\n"
        f"  did you mean 'hidden'?\n"
        f"  from: template 'block' as 'blocks.0' <- repeat 'blocks' i=0 (block) at {where(path, 'blocks: {repeat')}")


def test_unknown_block_type_in_template_names_the_chain(tmp_path):
    path = write(tmp_path, REPEATED.replace("hiden: 16", "hidden: 16").replace("type: rmsnorm", "type: rmsnrom"))
    text = errors_of(path).render()
    first = text.split("\n" + str(path))[0]
    assert first == (
        f"{where(path, 'rmsnrom', 'type')}: error: unknown block type 'rmsnrom' for node 'blocks.0.norm'\n"
        f"  did you mean 'rmsnorm'?\n"
        f"  from: template 'block' as 'blocks.0' <- repeat 'blocks' i=0 (block) at {where(path, 'blocks: {repeat')}")


def test_unknown_block_type_in_repeated_template_reported_once(tmp_path):
    path = write(tmp_path, REPEATED.replace("hiden: 16", "hidden: 16").replace("type: rmsnorm", "type: rmsnrom"))
    assert len(errors_of(path).diagnostics) == 1


def test_unknown_group_field(tmp_path):
    path = write(tmp_path, HEAD + """\
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  g: {repeat: 3, bdy: rmsnorm}
  lm_head: {type: linear, out: V}
outputs: {logits: lm_head}
""")
    assert errors_of(path).render() == (f"{where(path, 'bdy', 'bdy')}: error: group 'g': unknown field 'bdy'\n"
                                        f"  did you mean 'body'?")


def test_bad_dim_expression_in_a_field(tmp_path):
    path = write(tmp_path, HEAD + """\
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  lm_head: {type: linear, out: V * Q}
outputs: {logits: lm_head}
""")
    assert errors_of(path).render() == (
        f"{where(path, 'V * Q', 'out')}: error: node 'lm_head' (linear): out: unknown dim 'Q' in 'V * Q'")


def test_bad_dim_expression_in_dims(tmp_path):
    path = write(tmp_path, HEAD.replace("D: 8}", "D: 8, E: D // / 2}") + """\
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  lm_head: {type: linear, out: V}
outputs: {logits: lm_head}
""")
    assert errors_of(path).render() == (
        f"{where(path, 'E: D', 'E:')}: error: dim 'E': 'D // / 2' is not a valid expression")


def test_violated_constraint(tmp_path):
    path = write(tmp_path, HEAD + """\
constraints: ["V >= 2", "D % 3 == 0"]
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  lm_head: {type: linear, out: V}
outputs: {logits: lm_head}
""")
    assert errors_of(path).render() == (
        f"{where(path, 'constraints', QUOTE + 'D %')}: "
        f"error: constraint 'D % 3 == 0' is violated (D=8)")


def test_shape_mismatch_on_an_edge(tmp_path):
    path = write(tmp_path, HEAD + """\
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  norm: {type: rmsnorm, dim: 9}
  lm_head: {type: linear, out: V}
outputs: {logits: lm_head}
""")
    assert errors_of(path).render() == (
        f"{where(path, 'norm: {')}: error: shape mismatch on edge embedding -> norm\n"
        f"  input: expected (B, T, 9), got (B, T, D=8)\n"
        f"  inputs: embedding: (B, T, D=8) float")


def test_shape_mismatch_between_two_inputs(tmp_path):
    path = write(tmp_path, HEAD + """\
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  wide: {type: linear, out: 2 * D}
  sum: {type: add, in: [embedding, wide]}
  lm_head: {type: linear, out: V}
outputs: {logits: lm_head}
""")
    text = errors_of(path).render()
    assert text.startswith(f"{where(path, 'sum: {')}: error: shape mismatch on edges embedding, wide -> sum\n")
    assert "add inputs differ in shape: (B, T, D=8) vs (B, T, 2 * D=16)" in text


def test_dtype_mismatch_int_tokens_into_a_norm(tmp_path):
    path = write(tmp_path, HEAD + """\
nodes:
  norm: {type: rmsnorm}
  lm_head: {type: linear, out: V}
outputs: {logits: lm_head}
""")
    assert errors_of(path).render() == (
        f"{where(path, 'norm: {')}: error: shape mismatch on edge tokens -> norm\n"
        f"  input must be a float tensor, got (B, T) int32\n"
        f"  inputs: tokens: (B, T) int32")


def test_unconnected_input(tmp_path):
    path = write(tmp_path, HEAD + """\
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  norm: {type: rmsnorm}
  lm_head: {type: linear, out: V, in: nrom}
outputs: {logits: lm_head, h: norm}
""")
    assert errors_of(path).render() == (
        f"{where(path, 'lm_head: {')}: error: unconnected input: node 'lm_head' reads 'nrom', which is not a node "
        f"or input\n  did you mean 'norm'?")


def test_unused_output(tmp_path):
    path = write(tmp_path, HEAD + """\
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  side: {type: rmsnorm, in: embedding}
  lm_head: {type: linear, out: V, in: embedding}
outputs: {logits: lm_head}
""")
    assert errors_of(path).render() == (
        f"{where(path, 'side: {')}: error: unused output: the output of 'side' is never read and is not a model output")


def test_unused_input(tmp_path):
    path = write(tmp_path, HEAD + """\
  extra: {shape: [B, T, D]}
nodes:
  embedding: {type: embedding, vocab: V, dim: D, in: tokens}
  lm_head: {type: linear, out: V}
outputs: {logits: lm_head}
""")
    assert errors_of(path).render() == f"{where(path, 'extra:')}: error: unused input: graph input 'extra' is never read"


def test_unknown_output(tmp_path):
    path = write(tmp_path, HEAD + """\
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  lm_head: {type: linear, out: V}
outputs: {logits: lm_haed}
""")
    assert errors_of(path).render() == (
        f"{where(path, 'outputs', 'logits')}: error: output 'logits' refers to unknown node 'lm_haed'\n"
        f"  did you mean 'lm_head'?")


def test_cycle_two_nodes_reading_each_other(tmp_path):
    path = write(tmp_path, HEAD + """\
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  a: {type: add, in: [embedding, b]}
  b: {type: rmsnorm, in: a}
  lm_head: {type: linear, out: V, in: b}
outputs: {logits: lm_head}
""")
    assert errors_of(path).render() == f"{where(path, 'a: {')}: error: cycle: a -> b -> a"


def test_unknown_port(tmp_path):
    path = write(tmp_path, HEAD + """\
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  g: {type: gate, in: {gate: embedding, y: embedding}}
  lm_head: {type: linear, out: V}
outputs: {logits: lm_head}
""")
    loc = where(path, "  g: {")
    assert errors_of(path).render() == (
        f"{loc}: error: node 'g': block type 'gate' has no input port 'y' (ports: gate, x)\n"
        f"{loc}: error: unconnected input: node 'g' port(s) x not connected")


def test_wrong_number_of_inputs(tmp_path):
    path = write(tmp_path, HEAD + """\
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  g: {type: gate, in: [embedding]}
  lm_head: {type: linear, out: V}
outputs: {logits: lm_head}
""")
    assert errors_of(path).render() == (
        f"{where(path, '  g: {')}: error: node 'g': block type 'gate' takes 2 input(s) (gate, x), got 1")


def test_template_input_errors(tmp_path):
    path = write(tmp_path, HEAD + """\
templates:
  two:
    inputs: [a, b]
    nodes:
      s: {type: add, in: [a, b]}
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  t: {type: two}
  u: {type: two, in: {a: embedding, c: t}}
  lm_head: {type: linear, out: V}
outputs: {logits: lm_head}
""")
    err = errors_of(path)
    msgs = [d.render() for d in err.diagnostics]
    assert msgs[0] == f"{where(path, 't: {')}: error: template 'two' takes 2 input(s) ['a', 'b'], got 1"
    assert msgs[1] == f"{where(path, 'u: {')}: error: template 'two' has no input 'c' (inputs: ['a', 'b'])"


def test_all_errors_of_a_file_at_once(tmp_path):
    path = write(tmp_path, HEAD + """\
constraints: ["D > 100"]
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  norm: {type: rmsnorm, epss: 1}
  side: {type: rmsnorm, in: embedding}
  lm_head: {type: linear, out: V, in: embedding}
outputs: {logits: lm_head, n: norm}
""")
    err = errors_of(path)
    assert [d.render() for d in err.diagnostics] == [
        f"{where(path, 'constraints', QUOTE + 'D >')}: error: constraint 'D > 100' is violated (D=8)",
        f"{where(path, 'epss', 'epss')}: error: node 'norm' (rmsnorm): unknown field 'epss'\n  did you mean 'eps'?",
        f"{where(path, 'side: {')}: error: unused output: the output of 'side' is never read and is not a model output",
    ]


def test_three_node_mistakes_at_once(tmp_path):
    path = write(tmp_path, HEAD + """\
nodes:
  embedding: {type: embeding, vocab: V, dim: D}
  norm: {type: rmsnorm, in: embedding, epss: 1}
  lm_head: {type: linear, out: V, in: norm, bias: maybe}
outputs: {logits: lm_head}
""")
    err = errors_of(path)
    assert len(err.diagnostics) == 3
    lines = [d.render().splitlines()[0] for d in err.diagnostics]
    assert lines[0] == f"{where(path, 'embeding', 'type')}: error: unknown block type 'embeding' for node 'embedding'"
    assert lines[1] == f"{where(path, 'epss', 'epss')}: error: node 'norm' (rmsnorm): unknown field 'epss'"
    assert lines[2].startswith(f"{where(path, 'maybe', 'bias')}: error: node 'lm_head' (linear): bias: ")


def test_bad_input_shape_reports_one_error(tmp_path):
    path = write(tmp_path, HEAD.replace("[B, T]", "[B, T, Z]") + """\
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  lm_head: {type: linear, out: V}
outputs: {logits: lm_head}
""")
    err = errors_of(path)
    assert err.render() == f"{where(path, 'tokens:')}: error: input 'tokens': unknown dim 'Z' in 'Z'"


# ----------------------------------------------------------------------------------------- tied weights
TIE = HEAD + """\
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  lm_head: {type: linear, out: OUT, tie: TARGET}
outputs: {logits: lm_head}
"""


def test_tie_to_unknown_node_is_a_user_error(tmp_path):
    path = write(tmp_path, TIE.replace("OUT", "V").replace("TARGET", "embeding"))
    with pytest.raises(MadError) as info:
        mad.build(path)
    text = info.value.render()
    assert text.startswith(f"{where(path, 'lm_head: {')}") or text.startswith(f"{where(path, 'tie:', 'tie')}")
    assert "lm_head" in text and "embeding" in text


def test_tie_with_wrong_shape_is_a_user_error(tmp_path):
    path = write(tmp_path, TIE.replace("OUT", "5").replace("TARGET", "embedding"))
    with pytest.raises(MadError) as info:
        mad.build(path)
    assert "lm_head" in info.value.render()


# ----------------------------------------------------------------------------------------- state
RECURRENT = HEAD + """\
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  acc: {type: running_sum}
  lm_head: {type: linear, out: V}
outputs: {logits: lm_head}
"""


@pytest.fixture
def rec_graph(tmp_path):
    return build_graph(load_topology(write(tmp_path, RECURRENT, "rec.yaml")))


def test_state_without_an_owner(rec_graph):
    good = {"acc": {"s": mx.zeros((1, 8))}}
    check_state(rec_graph, good)  # fine
    with pytest.raises(MadError) as info:
        check_state(rec_graph, {"acc": {"s": mx.zeros((1, 8))}, "acc2": {"s": mx.zeros((1, 8))}})
    assert info.value.render() == ("error: state: state 'acc2' has no owner: no recurrent node of that name\n"
                                   "  did you mean 'acc'?")


def test_state_missing_and_unknown_entries(rec_graph):
    with pytest.raises(MadError) as info:
        check_state(rec_graph, {"ac": {"s": mx.zeros((1, 8))}})
    assert [d.message for d in info.value.diagnostics] == [
        "state: state 'ac' has no owner: no recurrent node of that name",
        "state: missing state of recurrent node 'acc'",
    ]
    with pytest.raises(MadError) as info:
        check_state(rec_graph, {"acc": {"sum": mx.zeros((1, 8))}})
    assert [d.message for d in info.value.diagnostics] == [
        "state: state of 'acc' lacks 's'",
        "state: state 'acc.sum' has no owner (node 'acc' declares s)",
    ]


def test_state_file_with_a_wrong_key(rec_graph, tmp_path):
    program = Program(rec_graph, compile="none")
    path = tmp_path / "state.safetensors"
    save_state_file(path, {"acc": {"s": mx.ones((1, 8))}, "blocks.9": {"s": mx.ones((1, 8))}})
    with pytest.raises(MadError) as info:
        load_state_file(path, program)
    assert info.value.render() == f"error: {path}: state 'blocks.9' has no owner: no recurrent node of that name"


def test_state_file_bad_key_format(rec_graph, tmp_path):
    path = tmp_path / "flat.safetensors"
    mx.save_safetensors(str(path), {"acc": mx.ones((1, 8))})
    with pytest.raises(MadError) as info:
        load_state_file(path, Program(rec_graph, compile="none"))
    assert info.value.render() == f"{path}: error: state file: key 'acc' is not 'node/name'"


def test_program_rejects_a_foreign_state(rec_graph):
    program = Program(rec_graph, compile="none")
    with pytest.raises(MadError, match="state 'other' has no owner"):
        program(mx.array([[1, 2]]), {"acc": {"s": mx.zeros((1, 8))}, "other": {"s": mx.zeros((1, 8))}})


def test_program_input_errors(rec_graph):
    program = Program(rec_graph, compile="none")
    with pytest.raises(MadError) as info:
        program({"tokens": mx.zeros((2, 3, 4)), "tokenz": mx.zeros((2,))})
    assert [d.message for d in info.value.diagnostics] == [
        "input 'tokens' has shape (2, 3, 4), expected (B, T)",
        "input 'tokens' must hold integer ids, got mlx.core.float32",
        "unknown input 'tokenz' (inputs: tokens)",
    ]


# ----------------------------------------------------------------------------------------- CLI
THREE_MISTAKES = HEAD + """\
nodes:
  embedding: {type: embeding, vocab: V, dim: D}
  norm: {type: rmsnorm, in: embedding, epss: 1}
  lm_head: {type: linear, out: V, in: norm, bias: maybe}
outputs: {logits: lm_head}
"""


def test_cli_build_bad_file_exit_2_and_no_dir(tmp_path, monkeypatch, capsys):
    path = write(tmp_path, THREE_MISTAKES)
    out_dir = tmp_path / "out"
    code, out, err = cli(monkeypatch, capsys, "build", path, "-o", out_dir)
    assert code == 2
    assert "Traceback" not in err + out
    assert f"{where(path, 'embeding', 'type')}: error: unknown block type 'embeding' for node 'embedding'" in err
    assert f"{where(path, 'epss', 'epss')}: error: node 'norm' (rmsnorm): unknown field 'epss'" in err
    assert err.count(": error: ") == 3
    assert not out_dir.exists()
    assert list(tmp_path.iterdir()) == [path]  # no half-written temp folders either


def test_cli_bad_file_keeps_existing_dir(tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "out"
    code, _, _ = cli(monkeypatch, capsys, "build", TINY, "-o", out_dir)
    assert code == 0
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    path = write(tmp_path, THREE_MISTAKES)
    code, _, err = cli(monkeypatch, capsys, "build", path, "-o", out_dir)
    assert code == 2 and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before


def test_cli_set_error_and_missing_file(tmp_path, monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "build", TINY, "--set", "dims.Q=3")
    assert code == 2 and err.strip() == "--set dims.Q=3: error: --set: unknown dim 'Q'"
    code, _, err = cli(monkeypatch, capsys, "build", tmp_path / "nope.yaml")
    assert code == 2 and err.strip() == f"{tmp_path / 'nope.yaml'}: error: no such topology file: {tmp_path / 'nope.yaml'}"
    assert "Traceback" not in err


def test_cli_run_errors(tmp_path, monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "run", TINY, "--prompt-ids", "1,x")
    assert code == 2 and err.strip() == "error: --prompt-ids must be comma-separated integers, got '1,x'"
    code, _, err = cli(monkeypatch, capsys, "run", TINY, "--prompt-ids", "1,999", "-m", "1")
    assert code == 2 and err.strip() == "error: token id 999 is outside the vocabulary (0..255)"
    code, _, err = cli(monkeypatch, capsys, "run", tmp_path / "missing")
    assert code == 2 and err.strip() == f"error: no such file or folder: {tmp_path / 'missing'}"


def test_cli_usage_error_exit_2(monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "build", TINY, "--no-such-option")
    assert code == 2
    assert "no-such-option" in err and "Traceback" not in err


def test_cli_build_writes_all_files(tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "build"
    code, out, err = cli(monkeypatch, capsys, "build", TINY, "-o", out_dir)
    assert code == 0, err
    assert "blocks.1.residual" in out and "Parameters: 84,160" in out
    names = {"resolved.yaml", "graph.json", "graph.mmd", "graph.dot", "plan.json", "summary.txt", ".mad-build"}
    assert {p.name for p in out_dir.iterdir()} == names  # .mad-build: the marker that lets a rebuild replace it
    graph = mad.build(TINY).graph
    g = nx.node_link_graph(json.loads((out_dir / "graph.json").read_text()), edges="edges")
    assert set(g.nodes) == set(graph.g.nodes)
    assert set(g.edges) == set(graph.g.edges)
    assert g.nodes["lm_head"]["shape"] == "(B, T, V=256)" and g.nodes["lm_head"]["block_type"] == "linear"
    assert g.edges["blocks.0.ffn", "blocks.0.residual"]["ports"] == ["x1"]
    assert g.graph["outputs"] == {"logits": "lm_head"}
    plan = json.loads((out_dir / "plan.json").read_text())
    assert [s["name"] for s in plan["stages"]] == ["embedding", "blocks.0", "blocks.1", "out_norm", "lm_head"]
    assert plan["stages"][1] == {"name": "blocks.0", "nodes": ["blocks.0.norm", "blocks.0.ffn", "blocks.0.residual"],
                                 "reads": ["embedding"], "writes": ["blocks.0.residual"], "state": []}
    assert (out_dir / "graph.mmd").read_text().startswith("flowchart TD\n")
    assert (out_dir / "graph.dot").read_text().startswith('digraph "tiny" {')
    assert "Parameters: 84,160" in (out_dir / "summary.txt").read_text()
    resolved = (out_dir / "resolved.yaml").read_text()
    assert "blocks.1.ffn: {type: swiglu, hidden: F, in: [blocks.1.norm], stage: blocks.1}" in resolved
    # the build folder runs (through resolved.yaml)
    code, out, err = cli(monkeypatch, capsys, "run", out_dir, "--prompt-ids", "1,2", "-m", "2")
    assert code == 0, err
    assert "Generation: 2 tokens" in out


def test_cli_rebuild_replaces_dir_atomically(tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "build"
    assert cli(monkeypatch, capsys, "build", TINY, "-o", out_dir)[0] == 0
    (out_dir / "stale.txt").write_text("old")
    assert cli(monkeypatch, capsys, "build", TINY, "-o", out_dir, "--set", "dims.D=32")[0] == 0
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        ["resolved.yaml", "graph.json", "graph.mmd", "graph.dot", "plan.json", "summary.txt", ".mad-build"])
    assert "  D: 32\n" in (out_dir / "resolved.yaml").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["build"]  # no temp or old folders left beside it


def test_cli_subprocess_exit_code_and_stderr(tmp_path):
    path = write(tmp_path, THREE_MISTAKES)
    env = dict(os.environ, COLUMNS="80")
    proc = subprocess.run([sys.executable, "-m", "mad.cli", "build", str(path), "-o", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count(": error: ") == 3
    assert f"{where(path, 'epss', 'epss')}: error: node 'norm' (rmsnorm): unknown field 'epss'" in proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "o").exists()


def test_cli_debug_shows_traceback(tmp_path):
    path = write(tmp_path, THREE_MISTAKES)
    proc = subprocess.run([sys.executable, "-m", "mad.cli", "--debug", "build", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and proc.returncode != 2
    assert "Traceback" in proc.stderr and "MadError" in proc.stderr
