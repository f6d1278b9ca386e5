"""The sibling-linear fusion pass (`mad.passes`) and `Program(fuse=...)`: which nodes fuse, that fused
and unfused programs compute the same thing (float32, random weights, biases and soft-caps), that
checkpoints keep their per-node names, and the MAD_FUSE override. Also the Program's input fast path."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mad.block import Block, Dim, LinearForm, TensorType, register, with_last
from mad.errors import MadError
from mad.graph import build_graph
from mad.passes import FusedLinear, find_sibling_linears
from mad.program import FUSED, Program, fuse_enabled
from mad.topology import load_topology

import plugins_example  # noqa: F401 - registers the recurrent test block `running_sum`

ROOT = Path(__file__).resolve().parents[1]
XLSTM_TINY = ROOT / "topologies" / "xlstm-tiny.yaml"
RNG = np.random.default_rng(20240611)
# Soft-caps small enough to bend the gate pre-activations (random, fixed by the seed above)
CAPS = {k: round(float(RNG.uniform(0.5, 3.0)), 3) for k in ("i", "f", "head", "c", "d", "h")}
EXACT = dict(rtol=1e-6, atol=1e-6)  # same dot products: equal on the CPU, rounding at most elsewhere

# A hand-made topology: siblings of every kind (plain, bias, soft-cap, both), a non-linear sibling
# (ignored), a recurrent node, a second group on another value; at the top level a tie source and a
# tied linear reading the same value as two fusable siblings (the tie pair must stay unfused), and
# siblings in different stages.
SIBLINGS = f"""\
mad: 1
name: siblings
dims: {{B: batch, T: seq, V: 48, D: 16, H: 24}}
inputs:
  tokens: {{shape: [B, T], dtype: int32}}
templates:
  layer:
    nodes:
      norm: {{type: rmsnorm}}
      a: {{type: linear, out: D, in: norm}}
      b: {{type: linear, out: 5, bias: true, in: norm}}
      c: {{type: linear, out: 3, softcap: {CAPS['c']}, in: norm}}
      d: {{type: linear, out: D, bias: true, softcap: {CAPS['d']}, in: norm}}
      side: {{type: rmsnorm, in: norm}}
      acc: {{type: running_sum, in: norm}}
      b_up: {{type: linear, out: D, in: b}}
      c_up: {{type: linear, out: D, in: c}}
      mix: {{type: add, in: [x, a, d, side, acc, b_up, c_up]}}
      ffn_norm: {{type: rmsnorm}}
      up: {{type: linear, out: H, in: ffn_norm}}
      gate: {{type: linear, out: H, bias: true, in: ffn_norm}}
      glu: {{type: gate, act: silu, in: [gate, up]}}
      down: {{type: linear, out: D}}
      out: {{type: add, in: [mix, down]}}
nodes:
  embedding: {{type: embedding, vocab: V, dim: D}}
  layers: {{repeat: 2, body: layer}}
  out_norm: {{type: rmsnorm}}
  shared: {{type: linear, out: D, in: out_norm}}
  tied: {{type: linear, out: D, tie: shared, in: out_norm}}
  side_a: {{type: linear, out: 6, in: out_norm}}
  side_b: {{type: linear, out: 7, bias: true, softcap: {CAPS['h']}, in: out_norm}}
  final: {{type: add, in: [out_norm, shared, tied]}}
  head: {{type: linear, out: V, softcap: {CAPS['h']}}}
  head_c: {{type: linear, out: 5, bias: true, in: final}}
outputs: {{logits: head, a: side_a, b: side_b, c: head_c}}
"""


@pytest.fixture(autouse=True)
def no_mad_fuse(monkeypatch):
    """These tests choose fuse= themselves: a MAD_FUSE in the environment would override it."""
    monkeypatch.delenv("MAD_FUSE", raising=False)


def siblings_graph():
    return build_graph(load_topology("siblings.yaml", text=SIBLINGS))


def xlstm_graph():
    caps = [f"templates.mlstm_layer.nodes.igate_preact.softcap={CAPS['i']}",
            f"templates.mlstm_layer.nodes.fgate_preact.softcap={CAPS['f']}", f"nodes.lm_head.softcap={CAPS['head']}"]
    return build_graph(load_topology(XLSTM_TINY, caps))


def random_weights(program: Program, seed: int) -> dict[str, mx.array]:
    """Every weight random: matrices ~ N(0, 1/in), vectors (norm weights, biases) ~ N(0, 1)."""
    key = mx.random.key(seed)
    out = {}
    for i, (name, w) in enumerate(program.parameters().items()):
        r = mx.random.normal(w.shape, key=mx.random.split(key, len(program.parameters()))[i])
        out[name] = r / np.sqrt(w.shape[-1]) if w.ndim == 2 and "embedding" not in name else r
    return out


def pair(graph_fn, compile="program", dtype="float32", seed=0) -> tuple[Program, Program]:
    """An unfused and a fused program (each on its own graph) with the same random weights."""
    plain, fused = Program(graph_fn(), dtype, compile, fuse=False), Program(graph_fn(), dtype, compile, fuse=True)
    weights = random_weights(plain, seed)
    plain.load_weights(weights)
    fused.load_weights(weights)
    return plain, fused


def np_(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def tokens(batch: int, seq: int, vocab: int, seed: int) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, vocab, (batch, seq)), dtype=mx.int32)


def assert_same(got, want, **tol) -> None:
    """Equal nested outputs/states ({name: array} or {node: {name: array}})."""
    tol = tol or EXACT
    assert set(got) == set(want)
    for k in want:
        if isinstance(want[k], dict):
            assert_same(got[k], want[k], **tol)
        else:
            np.testing.assert_allclose(np_(got[k]), np_(want[k]), **tol, err_msg=k)


# ----------------------------------------------------------------------------------------- the pass
def test_groups_of_xlstm_tiny():
    groups = find_sibling_linears(xlstm_graph())
    layer, ffn = "backbone.blocks.{}.mlstm_layer.", "backbone.blocks.{}.ffn."
    assert [g.members for g in groups] == [
        tuple(layer.format(i) + m for m in ("q", "k", "v", "ogate_preact", "igate_preact", "fgate_preact"))
        if j == 0 else (ffn.format(i) + "proj_up_gate", ffn.format(i) + "proj_up")
        for i in range(2) for j in range(2)]
    g = groups[0]
    assert g.source == "backbone.blocks.0.norm_mlstm" and g.d_in == 64
    assert g.widths == (32, 32, 64, 64, 4, 4)
    assert g.bias == (False, False, False, False, True, True)
    assert g.softcap == (None, None, None, None, CAPS["i"], CAPS["f"])
    assert g.bounds == [(0, 32), (32, 64), (64, 128), (128, 192), (192, 196), (196, 200)]


def test_groups_of_mixed_siblings():
    graph = siblings_graph()
    members = [g.members for g in find_sibling_linears(graph)]
    per_layer = [(f"layers.{i}.a", f"layers.{i}.b", f"layers.{i}.c", f"layers.{i}.d") for i in range(2)]
    ffn = [(f"layers.{i}.up", f"layers.{i}.gate") for i in range(2)]
    # not fused: the tie source `shared` and the tied `tied` (same input as side_a/b), the lone
    # b_up, c_up, down
    assert members == [per_layer[0], ffn[0], per_layer[1], ffn[1], ("side_a", "side_b"), ("head", "head_c")]
    # compiled stage by stage, a group stays inside one stage: each top-level node is a stage
    assert [g.members for g in find_sibling_linears(graph, by_stage=True)] == members[:-2]
    g = find_sibling_linears(graph)[0]
    assert g.widths == (16, 5, 3, 16) and g.bias == (False, True, False, True)
    assert g.softcap == (None, None, CAPS["c"], CAPS["d"])


# ----------------------------------------------------------------------------------------- same results
@pytest.mark.parametrize("compile", ["program", "stage", "none"])
def test_fused_equals_unfused_on_xlstm_tiny(compile, on_cpu):
    """Equal on the CPU, where a product's sums do not depend on how many columns the matmul has. On a GPU
    the fused and unfused products are matmuls of different widths, run by different kernels with other
    summation orders, and the mLSTM cells amplify that rounding (seen on an H200: logits 3e-6 apart)."""
    plain, fused = pair(xlstm_graph, compile, seed=1)
    assert fused.fused and not plain.fused and len(fused.fusion_groups) == 4
    ids = tokens(2, 37, 256, seed=2)  # 37 tokens, chunk size 16: the chunkwise path with a remainder
    want, want_state = plain(ids)
    got, got_state = fused(ids)
    assert_same(got, want)
    assert_same(got_state, want_state)
    for t in range(3):  # decode steps from that state
        step = tokens(2, 1, 256, seed=10 + t)
        want, want_state = plain(step, want_state)
        got, got_state = fused(step, got_state)
        assert_same(got, want)
        assert_same(got_state, want_state)
    # every node's output is still there, by name, and equal
    ids = tokens(1, 5, 256, seed=3)
    want, got = plain.trace(ids), fused.trace(ids)
    assert list(got) == list(want) == plain.nodes
    assert_same(got, want)
    # the logits really depend on the soft-capped, biased gates (the test is not vacuous)
    assert float(mx.abs(got["backbone.blocks.0.mlstm_layer.igate_preact"]).max()) > 0.3 * CAPS["i"]


@pytest.mark.parametrize("compile", ["program", "stage", "none"])
def test_fused_equals_unfused_on_mixed_siblings(compile):
    plain, fused = pair(siblings_graph, compile, seed=4)
    n_groups = 4 if compile == "stage" else 6
    assert len(fused.plan()["fuse"]["groups"]) == n_groups
    ids = tokens(3, 6, 48, seed=5)
    want, want_state = plain(ids)
    got, got_state = fused(ids)
    assert set(got) == {"logits", "a", "b", "c"} and set(got_state) == {"layers.0.acc", "layers.1.acc"}
    assert_same(got, want)
    assert_same(got_state, want_state)
    step = tokens(3, 1, 48, seed=6)
    assert_same(fused(step, got_state)[0], plain(step, want_state)[0])
    ids = tokens(2, 4, 48, seed=7)
    assert_same(fused.trace(ids), plain.trace(ids))


def test_bfloat16_fused_program():
    plain, fused = pair(siblings_graph, dtype="bfloat16", seed=8)
    params = fused.parameters()
    assert {v.dtype for v in params.values()} == {mx.bfloat16}
    assert all(v.dtype == mx.bfloat16 for _, v in tree_flatten(fused.root.parameters()))
    ids = tokens(2, 5, 48, seed=9)
    want, _ = plain(ids)
    got, _ = fused(ids)
    assert got["logits"].dtype == mx.bfloat16
    assert_same(got, want)  # the same bfloat16 weights and dot products
    # set_dtype reaches the fused weights too
    fused.set_dtype("float32")
    assert {v.dtype for v in fused.parameters().values()} == {mx.float32}
    assert fused(ids)[0]["logits"].dtype == mx.float32


# ----------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("graph_fn", [xlstm_graph, siblings_graph])
def test_parameters_keep_per_node_names_and_shapes(graph_fn):
    plain, fused = pair(graph_fn, seed=10)
    p, f = plain.parameters(), fused.parameters()
    assert list(f) == list(p)  # same names, same order
    assert {k: v.shape for k, v in f.items()} == {k: v.shape for k, v in p.items()}
    assert_same(f, p, rtol=0, atol=0)  # and the very values that were loaded
    assert any(k.endswith("mlstm_layer.q.weight") or k == "layers.0.a.weight" for k in f)


def test_fused_weights_are_stored_once():
    """A fused program speaks per-node names (checkpoints, optimizers and gradients see the unfused
    tree), while each weight is stored once: the members' weights are rows of their group's
    concatenation, and the compiled function receives the concatenations, not the members."""
    plain, fused = pair(xlstm_graph, seed=11)
    stored = dict(tree_flatten(fused.root.parameters()))
    unfused = plain.parameters()
    assert {k: v.shape for k, v in stored.items()} == {k: v.shape for k, v in unfused.items()}
    first = fused.root[FUSED][0]
    assert isinstance(first, FusedLinear) and first.weight.shape == (200, 64)
    group = fused.fusion_groups[0]
    rows = 0
    for member, width in zip(group.members, group.widths):
        assert mx.array_equal(stored[f"{member}.weight"], first.weight[rows:rows + width]).item()
        rows += width
    # what the compiled function receives as inputs: the fused weights, no member module
    members = {id(fused.root[m]) for g in fused.fusion_groups for m in g.members}
    assert not any(id(m) in members for m in fused._compile_inputs)
    inputs = dict(tree_flatten(fused.root.state))
    assert inputs[f"{FUSED}.0.weight"] is first.weight


def test_load_round_trip_through_a_file(tmp_path, on_cpu):  # compares fused with unfused: see above
    plain, _ = pair(xlstm_graph, seed=12)
    path = tmp_path / "model.safetensors"
    mx.save_safetensors(str(path), plain.parameters())
    fused = Program(xlstm_graph(), fuse=True)
    fused.load_weights(mx.load(str(path)))
    ids = tokens(2, 9, 256, seed=13)
    assert_same(fused(ids)[0], plain(ids)[0])
    # and back: a fused program's parameters load into an unfused one
    path2 = tmp_path / "fused.safetensors"
    mx.save_safetensors(str(path2), fused.parameters())
    again = Program(xlstm_graph(), fuse=False)
    again.load_weights(mx.load(str(path2)))
    assert_same(again(ids)[0], plain(ids)[0])


def strict_errors(program: Program) -> tuple[list[str], dict]:
    params = program.parameters()
    bad = {k: mx.zeros(v.shape) for k, v in params.items()}
    del bad["backbone.out_norm.weight"], bad["backbone.blocks.1.mlstm_layer.igate_preact.bias"]
    del bad["backbone.blocks.0.ffn.proj_up.weight"]
    bad["extra.weight"] = mx.zeros((3,))
    bad["backbone.blocks.0.mlstm_layer.k.weight"] = mx.zeros((33, 64))
    bad["backbone.blocks.1.mlstm_layer.fgate_preact.bias"] = mx.zeros((5,))
    with pytest.raises(MadError) as info:
        program.load_weights(bad, where="ckpt")
    return [d.message for d in info.value.diagnostics], params


def test_strict_load_errors_are_unchanged_and_change_nothing():
    plain, fused = pair(xlstm_graph, seed=14)
    want, _ = strict_errors(plain)
    got, before = strict_errors(fused)
    assert got == want
    assert got == [
        "ckpt: missing weight 'backbone.blocks.0.ffn.proj_up.weight' (192, 64)",
        "ckpt: missing weight 'backbone.blocks.1.mlstm_layer.igate_preact.bias' (4,)",
        "ckpt: missing weight 'backbone.out_norm.weight' (64,)",
        "ckpt: unexpected weight 'extra.weight' (3,)",
        "ckpt: weight 'backbone.blocks.0.mlstm_layer.k.weight' has shape (33, 64), the model expects (32, 64)",
        "ckpt: weight 'backbone.blocks.1.mlstm_layer.fgate_preact.bias' has shape (5,), the model expects (4,)",
    ]
    assert_same(fused.parameters(), before, rtol=0, atol=0)


def test_non_strict_load_of_one_member():
    plain, fused = pair(xlstm_graph, seed=15)
    before = fused.parameters()
    q, bias = "backbone.blocks.1.mlstm_layer.q.weight", "backbone.blocks.1.mlstm_layer.fgate_preact.bias"
    fused.load_weights({q: mx.full((32, 64), 0.5), bias: mx.full((4,), -2.0), "nope": mx.zeros(1)}, strict=False)
    after = fused.parameters()
    np.testing.assert_array_equal(np_(after[q]), np.full((32, 64), 0.5))
    np.testing.assert_array_equal(np_(after[bias]), np.full(4, -2.0))
    assert_same({k: v for k, v in after.items() if k not in (q, bias)},
                {k: v for k, v in before.items() if k not in (q, bias)}, rtol=0, atol=0)


def test_loaded_weights_reach_a_compiled_fused_program():
    """The compiled function reads the fused weights as inputs, not as constants baked in."""
    plain, fused = pair(xlstm_graph, seed=16)
    ids = tokens(1, 4, 256, seed=17)
    first, _ = fused(ids)
    mx.eval(first)
    new = random_weights(plain, seed=18)
    fused.load_weights(new)
    plain.load_weights(new)
    second, _ = fused(ids)
    assert_same(second, plain(ids)[0])
    assert not np.allclose(np_(second["logits"]), np_(first["logits"]), atol=1e-3)


def test_load_casts_to_the_dtype_of_a_fused_program():
    fused = Program(xlstm_graph(), dtype="bfloat16", fuse=True)
    fused.load_weights({k: mx.ones(v.shape, dtype=mx.float32) for k, v in fused.parameters().items()})
    assert {v.dtype for v in fused.parameters().values()} == {mx.bfloat16}
    assert all(m.weight.dtype == mx.bfloat16 for m in fused.root[FUSED])


# ----------------------------------------------------------------------------------------- the option
def test_plan_lists_the_groups():
    plain, fused = pair(siblings_graph, seed=19)
    plan = fused.plan()["fuse"]
    assert plan["enabled"] is True and plan["setting"] is True
    assert plan["groups"][0] == {"input": "layers.0.norm", "nodes": ["layers.0.a", "layers.0.b", "layers.0.c",
                                                                   "layers.0.d"], "out": [16, 5, 3, 16], "in": 16}
    assert plan["groups"][-1]["nodes"] == ["head", "head_c"]
    # an unfused program lists the same candidates, not enabled
    assert plain.plan()["fuse"] == {**plan, "setting": False, "enabled": False}


def test_auto_is_on():
    assert fuse_enabled("auto") is True and Program(siblings_graph()).fused
    assert fuse_enabled(True) is True and fuse_enabled(False) is False
    with pytest.raises(MadError, match="fuse must be True, False or 'auto', got 'yes'"):
        Program(siblings_graph(), fuse="yes")


def test_mad_fuse_environment_variable_forces_it(monkeypatch):
    monkeypatch.setenv("MAD_FUSE", "1")
    p = Program(siblings_graph(), fuse=False)
    assert p.fused and p.plan()["fuse"]["MAD_FUSE"] == "1" and FUSED in p.root
    monkeypatch.setenv("MAD_FUSE", "0")
    p = Program(siblings_graph(), fuse=True)
    assert not p.fused and FUSED not in p.root and "layers.0.a" in p.root
    monkeypatch.setenv("MAD_FUSE", "yes")
    with pytest.raises(MadError, match="MAD_FUSE must be 0 or 1, got 'yes'"):
        Program(siblings_graph())


def test_fused_and_unfused_programs_on_one_graph_stay_independent():
    """Each program builds its own modules (the graph holds none): loading one changes no other."""
    graph = xlstm_graph()
    plain = Program(graph, fuse=False)
    before = {k: np_(v) for k, v in plain.parameters().items()}
    fused = Program(graph, fuse=True)
    fused.load_weights(random_weights(fused, seed=20))
    q = "backbone.blocks.0.mlstm_layer.q"
    assert "module" not in graph.g.nodes[q] and graph.g.nodes[q]["params"]["weight"] == (32, 64)
    np.testing.assert_array_equal(np_(plain.parameters()[f"{q}.weight"]), before[f"{q}.weight"])
    plain(tokens(1, 3, 256, seed=21))  # still runs


# ----------------------------------------------------------------------------------------- inputs
def test_inputs_fast_path_and_conversions():
    p = Program(siblings_graph(), fuse=False)
    ids = tokens(2, 3, 48, seed=22)
    assert p._check_inputs(ids)["tokens"] is ids  # fits: passed as it is
    d = {"tokens": ids}
    assert p._check_inputs(d) is d
    # what does not fit exactly takes the slow path: converted ...
    for given in (ids.astype(mx.int64), np.array(ids), np.array(ids).tolist()):
        x = p._check_inputs({"tokens": given})["tokens"]
        assert x.dtype == mx.int32 and x.shape == (2, 3)
    want, _ = p(ids)
    assert_same(p(np.array(ids))[0], want, rtol=0, atol=0)
    # ... or explained, all at once
    with pytest.raises(MadError) as info:
        p({"tokens": mx.zeros((2, 3, 1)), "other": ids})
    assert [d.message for d in info.value.diagnostics] == [
        "input 'tokens' has shape (2, 3, 1), expected (B, T)",
        "input 'tokens' must hold integer ids, got mlx.core.float32",
        "unknown input 'other' (inputs: tokens)"]


def test_inputs_with_fixed_sizes_are_checked_on_the_fast_path():
    text = """\
mad: 1
name: feats
dims: {B: batch, T: seq, D: 4}
inputs:
  x: {shape: [B, T, D], dtype: float}
nodes:
  proj: {type: linear, out: 3, in: x}
outputs: {y: proj}
"""
    p = Program(build_graph(load_topology("feats.yaml", text=text)), fuse=False)
    assert p(mx.ones((2, 5, 4)))[0]["y"].shape == (2, 5, 3)
    with pytest.raises(MadError, match=r"input 'x' has shape \(2, 5, 3\), expected \(B, T, D=4\)"):
        p(mx.ones((2, 5, 3)))
    with pytest.raises(MadError, match="missing input 'x'"):
        p({})
    assert p({"x": mx.ones((1, 1, 4), dtype=mx.float16)})[0]["y"].dtype == mx.float32  # cast on the slow path


# ----------------------------------------------------------------------------------------- profile
def test_profile_times_a_fused_group_in_its_first_members_stage():
    """A whole-program compile fuses across stages (`head` and `head_c` are two stages): `profile`
    times each group in the stage of its first member, every node once."""
    graph = siblings_graph()
    program = Program(graph, fuse=True)
    entries = program.profile(tokens(1, 3, 48, seed=30), repeats=1)
    assert sorted(n for e in entries for n in e["nodes"]) == sorted(graph.blocks())
    assert all(e["seconds"] > 0 for e in entries)
    crossing = [g for g in program.fusion_groups if len({graph.g.nodes[m]["stage"] for m in g.members}) > 1]
    assert crossing
    for grp in program.fusion_groups:
        assert len({i for i, e in enumerate(entries) if set(grp.members) & set(e["nodes"])}) == 1


# ----------------------------------------------------------------------------------------- declared forms
class _Projection(nn.Module):
    """A linear with its weight at another name (`proj.kernel`) and a class the pass has never seen."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = {"kernel": mx.random.normal((d_out, d_in)) * d_in ** -0.5}

    def __call__(self, x: mx.array) -> mx.array:
        return x @ self.proj["kernel"].T


@register("test_only_projection")
class _ProjectionBlock(Block):
    positionwise = True
    out: Dim

    def infer(self, x: TensorType) -> TensorType:
        return with_last(x, self.out)

    def build(self, x: TensorType) -> nn.Module:
        return _Projection(int(x.shape[-1]), int(self.out))

    def linear_form(self, x: TensorType) -> LinearForm:
        return LinearForm(weight="proj.kernel")


DECLARED = """\
mad: 1
name: declared
dims: {B: batch, T: seq, V: 40, D: 12}
inputs:
  tokens: {shape: [B, T], dtype: int32}
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  norm: {type: rmsnorm}
  p: {type: test_only_projection, out: D, in: norm}
  q: {type: linear, out: D, bias: true, in: norm}
  mix: {type: add, in: [p, q]}
  head: {type: linear, out: V}
outputs: {logits: head}
"""


def test_a_block_that_declares_a_linear_form_is_fused(tmp_path):
    """The pass reads `Block.linear_form` only: a user's block with its own module and weight name
    fuses with a `linear`, and its weight keeps its own name."""
    path = tmp_path / "declared.yaml"
    path.write_text(DECLARED)
    graph = build_graph(load_topology(path))
    (group,) = find_sibling_linears(graph)
    assert group.members == ("p", "q") and group.bias == (False, True)
    assert group.names() == [("p.proj.kernel", None), ("q.weight", "q.bias")]
    plain, fused = Program(graph, fuse=False), Program(graph, fuse=True)
    fused.load_weights(random_weights(fused, seed=31))
    plain.load_weights(fused.parameters())
    assert list(fused.parameters()) == list(plain.parameters()) and "p.proj.kernel" in fused.parameters()
    ids = tokens(2, 4, 40, seed=32)
    assert_same(fused(ids)[0], plain(ids)[0])
