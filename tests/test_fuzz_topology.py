"""Fuzzing: random mutations of the shipped topologies (characters, lines, values, keys) and random `--set`
arguments end in a built graph or a `MadError` (whose rendering works), never another exception, and each
within a time bound (hypothesis' deadline).

`build_graph` only creates MLX arrays lazily (nothing is evaluated), so every shipped topology, the 7B one
included, is fuzzed through the graph step. The node limit is lowered to 3,000 here (the largest shipped
topology has ~900 nodes), so that a mutation that multiplies a layer count fails at once instead of
building a large, valid model; the limit itself is tested in tests/test_bad_topology.py.
Derandomized, so CI runs the same cases every time; MAD_FUZZ_EXAMPLES=N runs N examples per test
(default 200; try 5000 for a longer search).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mad.spec
from mad.errors import MadError, Source
from mad.graph import build_graph
from mad.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "topologies").glob("*.yaml")) + [ROOT / "topologies" / "examples" / "tiny.yaml"]
TEXTS = {path: path.read_text() for path in SHIPPED}

EXAMPLES = int(os.environ.get("MAD_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=5000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

CHARS = list(":[]{}-,#&*!|>'\"%@`?~=<\\/\t \n\r") + ["\x00", "\x07", "\x85", "\u2028", "\ufeff", "é", "\U0001F600"] + \
    list("0123456789xXeE._()+*aDLV") + ["**", "//", "%", "\n  ", "\n- ", ": ", "{{", "}}", "{i}", "{j}"]
LINES = [
    "  x: *a", "a: &a [1, 2]", "include: [xlstm-7b.yaml]", "include: [no_such.yaml]", "include: [tiny.yaml]",
    "plugins: [os]", "plugins: [no_such_plugin_module]", "<<: *a", "? [a]", ": 1", "dims: {D: 0}", "dims: {L: 1000000}",
    "  blocks: {repeat: 1000000000, body: block}", "  g: {pattern: 'm x 99999999999', choices: {m: rmsnorm}}",
    "  n: {type: rmsnorm, eps: -1}", "  n: {type: linear, out: 0, softcap: 0}", "  n: {type: mlstm_cell, heads: 0}",
    "  n: {type: rmsnorm, in: [[x]], stage: [a]}", "  n: {type: [a]}", "  \"a\\nb\": {type: rmsnorm}",
    "outputs: {logits: nowhere}", "constraints: ['D ** 2 > 0', 'min()', 'round_up(D, 0) > 1']",
    "      as: '{j}'", "      every: {x: {n: 2, offset: 5}}", "---", "...", "%YAML 1.1", "!!python/object:os.system",
    "x: " + "[" * 200 + "]" * 200, "D: " + "9" * 50, "  E: '" + "(" * 300 + "D" + ")" * 300 + "'",
]
VALUES = [0, -1, 1, 2**64, 10**12, 2**40 + 1, True, False, None, "", "a\nb", "D * D", "D // 0", "round_up(D, 0)",
          "min()", "int()", "{j}", "{i:>9999}", 1e308, float("nan"), float("inf"), -0.0, "x" * 300, "(" * 600,
          "batch", "seq", "rmsnorm", "block", [], {}, [[[[[[[[[[1]]]]]]]]]], {"a": {"b": {"c": 1}}}, "m x 9999999999",
          "(m s) x 1000000", "lm_head", "tokens", "D + 1", "-D", "V // 3", "2.5", 2.5, "\x07", "é", "os"]
SET_KEYS = ["dims.D", "dims.L", "dims.V", "dims.NH", "dims.Q", "nodes.lm_head.softcap", "nodes.lm_head.out",
            "nodes.lm_head", "nodes.blocks.repeat", "nodes.blocks", "nodes.embedding.type", "name", "mad", "plugins",
            "include", "outputs.logits", "inputs.tokens.shape", "templates", "nodes.backbone.blocks.repeat",
            "nodes.xlstm_block_stack.blocks.every", "constraints", "dims", "nodes..x", "", "D"]


@pytest.fixture(scope="module", autouse=True)
def small_node_limit():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mad.spec, "MAX_NODES", 3000)
        yield


def attempt(path: Path, text: str, overrides=()) -> None:
    """Success or a MadError that renders; anything else fails the test."""
    try:
        build_graph(load_topology(path, list(overrides), text=text))
    except MadError as e:
        assert e.diagnostics
        assert all(d.source is None or isinstance(d.source, Source) for d in e.diagnostics)
        assert e.render()


def test_every_shipped_topology_builds():
    for path, text in TEXTS.items():
        attempt(path, text)
        build_graph(load_topology(path, text=text))


# ----------------------------------------------------------------------------------------- characters
anywhere = st.integers(0, 2**20)  # a position, taken modulo the length (uniform over the file)
edits = st.lists(st.tuples(anywhere, st.sampled_from(["replace", "delete", "insert"]), st.sampled_from(CHARS)),
                 min_size=1, max_size=4)


def apply_edits(text: str, ops) -> str:
    for where, op, char in ops:
        i = where % (len(text) + 1)
        if op == "replace":
            text = text[:i] + char + text[i + 1:]
        elif op == "delete":
            text = text[:i] + text[i + len(char):]
        else:
            text = text[:i] + char + text[i:]
    return text


@FUZZ
@given(st.sampled_from(SHIPPED), edits)
def test_character_mutations(path, ops):
    attempt(path, apply_edits(TEXTS[path], ops))


# ----------------------------------------------------------------------------------------- lines
line_ops = st.lists(st.tuples(anywhere, anywhere,
                              st.sampled_from(["delete", "duplicate", "swap", "insert", "indent", "dedent"]),
                              st.sampled_from(LINES)), min_size=1, max_size=3)


def apply_line_ops(text: str, ops) -> str:
    lines = text.split("\n")
    for a, b, op, new in ops:
        i, j = a % len(lines), b % len(lines)
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "swap":
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "insert":
            lines.insert(i, new)
        elif op == "indent":
            lines[i] = "  " + lines[i]
        else:
            lines[i] = lines[i][2:] if lines[i].startswith("  ") else lines[i]
        if not lines:
            lines = [""]
    return "\n".join(lines)


@FUZZ
@given(st.sampled_from(SHIPPED), line_ops)
def test_line_mutations(path, ops):
    attempt(path, apply_line_ops(TEXTS[path], ops))


# ----------------------------------------------------------------------------------------- values and keys
def _paths(tree, prefix=()):
    """Every (path, value) of a plain YAML tree, containers included."""
    out = [(prefix, tree)]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += _paths(v, prefix + (i,))
    return out


def _replace(tree, path, value, rename=False):
    if not path:
        return value
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    if rename and isinstance(parent, dict):
        parent[value if isinstance(value, (str, int, float, bool)) or value is None else str(value)] = \
            parent.pop(path[-1])
    else:
        parent[path[-1]] = value
    return tree


DATA = {path: yaml.safe_load(text) for path, text in TEXTS.items()}


@FUZZ
@given(st.sampled_from(SHIPPED), st.lists(st.tuples(anywhere, st.sampled_from(VALUES), st.booleans()),
                                          min_size=1, max_size=3))
def test_value_and_key_swaps(path, swaps):
    tree = yaml.safe_load(TEXTS[path])
    for where, value, rename in swaps:
        paths = _paths(tree)[1:]  # not the whole file
        if not paths:
            break
        target, _ = paths[where % len(paths)]
        tree = _replace(tree, target, copy.deepcopy(value), rename=rename)
    attempt(path, yaml.safe_dump(tree, sort_keys=False, allow_unicode=True))


# ----------------------------------------------------------------------------------------- --set
set_values = st.one_of(st.sampled_from([yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("\n...")
                                        for v in VALUES if v is not None]),
                       st.lists(st.sampled_from(CHARS), max_size=8).map("".join))
assignments = st.builds(lambda k, v: f"{k}={v}", st.sampled_from(SET_KEYS), set_values)
plausible = st.sampled_from(["dims.D=16", "dims.D=32", "dims.V=300", "dims.L=3", "nodes.lm_head.softcap=5.0",
                             "nodes.lm_head.softcap=null", "dims.NH=2", "dims.CHUNK=8"])
noise = st.lists(st.sampled_from(CHARS + ["=", "dims.", "nodes."]), max_size=12).map("".join)
set_args = st.integers(0, 9).flatmap(lambda k: noise if k == 0 else plausible if k < 3 else assignments)


@FUZZ
@given(st.sampled_from(SHIPPED), st.lists(set_args, min_size=1, max_size=2))
def test_random_set_arguments(path, overrides):
    attempt(path, TEXTS[path], overrides)
