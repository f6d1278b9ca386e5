"""Nothing a user types can hurt them: every bad topology (the corpus in tests/bad_inputs/topology/, listed
with the expected error in its cases.yaml) ends in a `MadError` that points at FILE:LINE:COL, quickly and
without building anything large; the CLI prints it and exits with code 2, without a traceback.

Also: YAML data files for other readers (`load_yaml_data`), includes from a user's folder, the resolved
YAML written by an emitter (no injection, a round trip), and `--set` values."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mad.dims import DimError, evaluate, resolve_dims, round_up
from mad.errors import MadError
from mad.graph import build_graph
from mad.pattern import parse_pattern
from mad.spec import MAX_NODES
from mad.topology import load_topology
from mad.yamlio import MAX_FILE_BYTES, YDict, load_yaml, load_yaml_data
from yaml_files import write

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).resolve().parent / "bad_inputs" / "topology"
CASES: dict = yaml.safe_load((CORPUS / "cases.yaml").read_text())
TINY = ROOT / "topologies" / "examples" / "tiny.yaml"
SECONDS = 2.0  # each case fails in milliseconds; the bound leaves room for a slow, busy CI machine


def _path(name: str) -> Path:
    return CORPUS / CASES[name].get("file", name)


def _check_position(case: dict, path: Path, source) -> None:
    at = case["at"]
    if at == "":
        assert source is not None and source.line == 0 and source.file == str(path)
    elif at.startswith("--set"):
        assert str(source) == at
    elif re.fullmatch(r"\d+:\d+", at):
        assert str(source) == f"{path}:{at}"
    else:  # another file, e.g. a shipped topology the case includes
        assert str(source).replace(os.sep, "/").endswith(at), str(source)


def test_every_corpus_file_has_a_case():
    files = {p.name for p in CORPUS.glob("*.yaml")} - {"cases.yaml", "good.yaml"}
    used = {case.get("file", name) for name, case in CASES.items()}
    assert files <= used, sorted(files - used)
    assert all((CORPUS / f).is_file() for f in used)


def test_the_good_file_builds():
    assert build_graph(load_topology(CORPUS / "good.yaml")).blocks() == ["embedding", "lm_head"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name):
    case, path = CASES[name], _path(name)
    start = time.perf_counter()
    with pytest.raises(MadError) as info:
        build_graph(load_topology(path, case.get("set", [])))
    elapsed = time.perf_counter() - start
    diags = info.value.diagnostics
    text = info.value.render()
    assert case["error"] in diags[0].message, text
    _check_position(case, path, diags[0].source)
    assert len(diags) == case.get("count", 1), text
    assert elapsed < SECONDS, f"{name} took {elapsed:.2f} s"
    assert "corpus_plugin_never_imported" not in sys.modules


CLI_CASES = sorted(name for name, case in CASES.items() if case.get("cli"))


@pytest.mark.parametrize("name", CLI_CASES)
def test_bad_input_through_the_cli(name):
    case, path = CASES[name], _path(name)
    args = [sys.executable, "-m", "mad.cli", "build", str(path)]
    for assignment in case.get("set", []):
        args += ["--set", assignment]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=dict(os.environ, COLUMNS="200"))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert case["error"] in proc.stderr
    assert proc.stdout == ""


def test_cli_set_value_error_exit_2():
    proc = subprocess.run([sys.executable, "-m", "mad.cli", "build", str(TINY), "--set", "dims.D=[1"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("--set dims.D=[1: error: --set: cannot read the value '[1': YAML syntax")


def test_untrusted_corpus_plugin_is_never_imported():
    with pytest.raises(MadError):
        build_graph(load_topology(CORPUS / "plugin_untrusted.yaml"))
    assert "corpus_plugin_never_imported" not in sys.modules
    # with the opt-in it is imported (and fails, loudly, as the module says)
    with pytest.raises(MadError) as info:
        build_graph(load_topology(CORPUS / "plugin_untrusted.yaml", trust_plugins=True))
    assert "RuntimeError: corpus_plugin_never_imported was imported without --trust-plugins" in info.value.render()
    sys.modules.pop("corpus_plugin_never_imported", None)


# ----------------------------------------------------------------------------------------- files
def test_file_too_large_fails_before_parsing(tmp_path):
    path = tmp_path / "long.yaml"
    line = "  n{}: {{type: rmsnorm}}\n"
    with open(path, "w") as f:
        f.write("mad: 1\nname: t\nnodes:\n")
        i = 0
        while f.tell() <= MAX_FILE_BYTES:
            f.write(line.format(i))
            i += 1
    start = time.perf_counter()
    with pytest.raises(MadError) as info:
        load_topology(path)
    assert time.perf_counter() - start < 0.5
    assert info.value.render() == f"{path}: error: topology file is too large: more than 4 MiB (a topology or " \
                                  f"config file is a few KB)"


def test_text_too_large(tmp_path):
    with pytest.raises(MadError, match="too large"):
        load_topology(tmp_path / "x.yaml", text="#" * (MAX_FILE_BYTES + 1))


def test_a_folder_is_not_a_topology(tmp_path):
    with pytest.raises(MadError, match="no such topology file"):
        load_topology(tmp_path)


# ----------------------------------------------------------------------------------------- load_yaml_data
def test_load_yaml_data_gives_plain_values(tmp_path):
    text = "model:\n  embedding_dim: 64\n  slstm_at: [1, 3]\n  base: &b {x: 1}\n  other: {<<: *b, y: 2}\n"
    path = write(tmp_path, text, "config.yaml")
    data = load_yaml_data(path)
    assert data == {"model": {"embedding_dim": 64, "slstm_at": [1, 3], "base": {"x": 1}, "other": {"x": 1, "y": 2}}}
    assert type(data) is dict and type(data["model"]["slstm_at"]) is list
    assert not isinstance(load_yaml(path), dict) or isinstance(load_yaml(path), YDict)


@pytest.mark.parametrize("name, message", [
    ("alias_bomb.yaml", ":7:4: error: aliases expand this to more than 1,000,000 values (an alias bomb?)"),
    ("binary.yaml", ":2:8: error: config.yaml is binary data, not YAML text (a NUL byte)"),
    ("not_utf8.yaml", ":2:10: error: config.yaml is not UTF-8 text (byte 0xe9 at line 2, column 10)"),
    ("yaml_syntax.yaml", ":7:48: error: YAML syntax: expected ',' or '}', but got ']'"),
    ("deep_flow.yaml", ":6:113: error: nested deeper than 100 levels"),
    ("complex_key.yaml", ":6:3: error: a mapping key must be a plain value (a name or a number), not a list"),
    ("duplicate_key.yaml", ":9:3: error: duplicate key 'embedding'"),
    ("python_tag.yaml", ":2:7: error: YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed"),
    ("big_int.yaml", ":3:36: error: integer too large"),
])
def test_load_yaml_data_errors_name_the_file(name, message):
    start = time.perf_counter()
    with pytest.raises(MadError) as info:
        load_yaml_data(CORPUS / name, "config.yaml")
    assert time.perf_counter() - start < SECONDS
    assert info.value.render().startswith(f"{CORPUS / name}{message}")


def test_load_yaml_data_unreadable(tmp_path):
    with pytest.raises(MadError) as info:
        load_yaml_data(tmp_path / "missing.yaml", "config.yaml")
    missing = tmp_path / "missing.yaml"
    assert info.value.render() == f"{missing}: error: cannot read config.yaml: No such file or directory"
    with pytest.raises(MadError, match="it is a folder"):
        load_yaml_data(tmp_path, "config.yaml")


# ----------------------------------------------------------------------------------------- includes
def test_include_finds_shipped_topologies_from_a_users_folder(tmp_path):
    path = write(tmp_path, "mad: 1\nname: mine\ninclude: [xlstm-7b.yaml]\n"
                           "dims: {V: 256, D: 64, L: 2, NH: 4, CHUNK: 16}\n")
    graph = build_graph(load_topology(path))
    assert graph.blocks()[-1] == "lm_head" and int(graph.dims["L"]) == 2
    assert graph.g.nodes["lm_head"]["source"].file == str(ROOT / "topologies" / "xlstm-7b.yaml")


def test_include_next_to_the_file_comes_first(tmp_path):
    write(tmp_path, (ROOT / "topologies" / "examples" / "tiny.yaml").read_text(), "xlstm-7b.yaml")
    path = write(tmp_path, "mad: 1\nname: mine\ninclude: [xlstm-7b.yaml]\ndims: {D: 32}\n")
    graph = build_graph(load_topology(path))
    assert graph.g.nodes["lm_head"]["source"].file == str(tmp_path / "xlstm-7b.yaml")


# ----------------------------------------------------------------------------------------- resolved.yaml
INJECT = """\
mad: 1
name: "t\\nplugins: [os]"
description: "line one\\nplugins: [os]\\n# a: b"
dims: {B: batch, T: seq, V: 16, D: 8}
inputs:
  tokens: {shape: [B, T], dtype: int32}
templates:
  "blk: #x":
    nodes:
      "n: 'q\\" # r": {type: rmsnorm}
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  "? a": {type: rmsnorm}
  "b: c #d": {repeat: 2, body: "blk: #x", as: "{name}-{i:02d}"}
  "- x": {type: rmsnorm, stage: "s: t"}
  LONG: {type: rmsnorm}
  "[y]": {type: layernorm, eps: 1.0e-07}
  lm_head: {type: linear, out: V}
outputs: {logits: lm_head, "o: p": "b: c #d"}
"""


def test_resolved_yaml_is_written_by_an_emitter(tmp_path):
    long_name = "n" * 300 + ": x"
    text = INJECT.replace("LONG", f'"{long_name}"')
    resolved = load_topology(tmp_path / "a\nb #c.yaml", text=text)
    graph = build_graph(resolved)
    out = resolved.to_yaml()
    for line in out.splitlines():  # no line was broken or injected
        assert not line.startswith("plugins") and not line.startswith("# a: b")
    assert "  # from " + str(tmp_path / "a\\nb #c.yaml") + ":12:3" in out
    again = load_topology(write(tmp_path, out, "resolved.yaml"))
    assert again.plugins == [] and again.name == resolved.name and again.description == resolved.description
    assert [(d.name, d.raw, d.inputs, d.unit) for d in again.nodes] == [
        (d.name, d.raw, d.inputs, d.unit) for d in resolved.nodes]
    assert again.outputs.keys() == resolved.outputs.keys()
    assert build_graph(again).blocks() == graph.blocks()
    assert long_name in graph.blocks()


def test_resolved_yaml_round_trips_every_shipped_topology(tmp_path):
    for path in sorted((ROOT / "topologies").glob("**/*.yaml")):
        resolved = load_topology(path)
        again = load_topology(write(tmp_path, resolved.to_yaml(), "resolved.yaml"))
        assert [(d.name, d.raw, d.inputs, d.unit) for d in again.nodes] == [
            (d.name, d.raw, d.inputs, d.unit) for d in resolved.nodes], path
        assert again.dims == resolved.dims and [c for c, _ in again.constraints] == [c for c, _ in resolved.constraints]


# ----------------------------------------------------------------------------------------- dims and sugar
@pytest.mark.parametrize("expr, message", [
    ("round_up(8, 0)", "round_up: the multiple must be positive"),
    ("round_up(8, -4)", "round_up: the multiple must be positive"),
    ("min()", "min() takes 1 or more arguments"),
    ("max()", "max() takes 1 or more arguments"),
    ("int()", "int() takes 1 argument"),
    ("int(1, 2)", "int() takes 1 argument"),
    ("round_up(1)", "round_up() takes 2 arguments"),
    ("(D > 1) * 3", "a comparison cannot be used as a number"),
    ("1e308 * 10", "too large"),
    ("1e20 * 1e20 * 1e20", "too large"),
    ("int(1e300)", "too large"),
    (" * ".join(["D"] * 50), "too large"),
    ("(" * 300 + "D" + ")" * 300, "expression too long"),
    ("+".join(["1"] * 200), "nested too deeply"),
    ("2 ** 10", "is not a dim expression"),
    ("min(*D)", "is not a dim expression"),
    ("D / 0.0", "division by zero"),
])
def test_dim_expression_mistakes(expr, message):
    with pytest.raises(DimError, match=re.escape(message)):
        evaluate(expr, {"D": 1024})


def test_round_up_is_exact_for_large_integers():
    assert round_up(2**50 + 1, 2) == 2**50 + 2
    assert int(evaluate("round_up(int(64 * 2.667), 16)", {})) == 176
    assert int(evaluate("min(3)", {})) == 3


def test_dims_bounds_and_long_tables():
    env, errors = resolve_dims({"D": 2**40, "E": 2**40 + 1, "F": "D + 1", "G": -5})
    assert int(env["D"]) == 2**40 and int(env["G"]) == -5
    assert "too large for a dim" in errors["E"] and "too large for a dim" in errors["F"]
    table = {f"d{i}": f"d{i - 1} + 1" for i in range(1, 20000)}
    table["d0"] = 1
    start = time.perf_counter()
    env, errors = resolve_dims(table)
    assert errors == {} and int(env["d19999"]) == 20000
    cycle = {f"c{i}": f"c{(i + 1) % 5000}" for i in range(5000)}
    env, errors = resolve_dims(cycle)
    assert len(errors) == 5000 and "part of a cycle: c0, c1," in errors["c0"] and "(5000 dims)" in errors["c0"]
    assert time.perf_counter() - start < 5 * SECONDS


@pytest.mark.parametrize("text, message", [
    ("m x 99999999999", "more than the limit"),
    ("((m x 1000) x 1000) x 1000", f"expands to more than {MAX_NODES:,} instances"),
    ("(" * 5000 + "m" + ")" * 5000 + " x 7 x 2", "'x N' must follow a name"),
    ("(" * 5000 + "m", "unbalanced '('"),
])
def test_pattern_limits(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_pattern(text)


def test_deep_patterns_parse_without_recursion():
    assert parse_pattern("(" * 5000 + "m s" + ")" * 5000 + " x 2") == ["m", "s", "m", "s"]
    assert len(parse_pattern("(m x 10) x 10000")) == 100_000


# ----------------------------------------------------------------------------------------- --set
@pytest.mark.parametrize("assignment, message", [
    ("dims.D=[1", "--set dims.D=[1: error: --set: cannot read the value '[1': YAML syntax: expected ',' or ']', "
                  "but got '<stream end>' (column 3)"),
    ("garbage", "--set garbage: error: expected --set key=value (e.g. dims.D=512)"),
    ("dims.D=", "--set dims.D=: error: --set: no value after '=' (write dims.D=null for none)"),
    ("dims.D=a: b: c", "--set dims.D=a: b: c: error: --set: cannot read the value 'a: b: c': YAML syntax: mapping "
                       "values are not allowed here (column 5)"),
    ("dims.D={a: 1}", "--set dims.D={a: 1}: error: dims.D: Input should be a valid integer, or input should be a "
                      "valid string"),
    ("nodes.lm_head=3", "--set nodes.lm_head=3: error: nodes.lm_head: Input should be a valid dictionary"),
    ("dims.D=\x01", "--set dims.D=\\x01: error: --set: cannot read the value '\\x01': character #x0001 is not "
                    "allowed in YAML (a control character)"),
])
def test_set_value_errors(assignment, message):
    with pytest.raises(MadError) as info:
        build_graph(load_topology(TINY, [assignment]))
    assert info.value.render() == message


def test_set_repeat_from_a_checkpoint_sized_dim():
    path = CORPUS / "good.yaml"
    start = time.perf_counter()
    with pytest.raises(MadError) as info:
        load_topology(ROOT / "topologies" / "xlstm-7b.yaml", ["dims.L=1000000"])
    assert time.perf_counter() - start < SECONDS
    text = info.value.render()
    assert "repeat: L = 1,000,000 instances are more than the limit of 100,000" in text
    assert "L is set at --set dims.L=1000000" in text
    assert path.is_file()


# ----------------------------------------------------------------------------------------- plugins through the CLI
def test_cli_plugin_needs_trust(tmp_path):
    """A plugin next to the topology: refused (not imported) without --trust-plugins, found and used with it."""
    marker = tmp_path / "imported"
    (tmp_path / "cli_doubled_blocks.py").write_text(
        "import mad\n\n"
        f"open({str(marker)!r}, 'w').close()\n\n"
        "@mad.register('cli_doubled')\nclass Doubled(mad.Block):\n"
        "    def infer(self, x):\n        return x\n\n    def build(self, x):\n        return lambda v: 2 * v\n")
    text = (CORPUS / "good.yaml").read_text().replace("name: t", "name: t\nplugins: [cli_doubled_blocks]")
    path = write(tmp_path, text.replace("  lm_head:", "  twice: {type: cli_doubled}\n  lm_head:"))
    run = [sys.executable, "-m", "mad.cli", "build", str(path)]
    proc = subprocess.run(run, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{path}:3:11: error: this file asks to import the Python module 'cli_doubled_blocks'" in proc.stderr
    assert not marker.exists()
    proc = subprocess.run(run + ["--trust-plugins"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert marker.exists() and "cli_doubled" in proc.stdout
