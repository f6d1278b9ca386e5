"""The runtime: compile modes, state (init, prefill + steps, save/load), dtypes, weights, tied heads."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mad
from mad.errors import MadError
from mad.generate import stream_generate
from mad.model import LanguageModel
from mad.tokenizers import ByteTokenizer
from mad.graph import build_graph
from mad.loading import load_state_file, save_state_file
from mad.program import Program
from mad.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "topologies" / "examples" / "tiny.yaml"


import plugins_example  # noqa: E402,F401 - registers the recurrent test block `running_sum`


RECURRENT = """\
mad: 1
name: rec
dims: {B: batch, T: seq, V: 32, D: 8}
inputs:
  tokens: {shape: [B, T], dtype: int32}
templates:
  layer:
    nodes:
      norm: {type: rmsnorm}
      acc: {type: running_sum}
      mix: {type: linear, out: D}
      out: {type: add, in: [x, mix]}
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  layers: {repeat: 2, body: layer}
  out_norm: {type: rmsnorm}
  lm_head: {type: linear, out: V}
outputs: {logits: lm_head}
"""


def np_(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def same_weights(dst: Program, src: Program) -> None:
    dst.load_weights(src.parameters())


@pytest.fixture(scope="module")
def rec_graph(tmp_path_factory):
    path = tmp_path_factory.mktemp("rec") / "rec.yaml"
    path.write_text(RECURRENT)
    return build_graph(load_topology(path))


@pytest.fixture(scope="module")
def tiny_graph():
    return build_graph(load_topology(TINY))


def tokens(batch: int, seq: int, vocab: int, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, vocab, (batch, seq)), dtype=mx.int32)


# ----------------------------------------------------------------------------------------- compile modes
def test_compile_modes_agree_on_tiny(tiny_graph):
    ref = Program(tiny_graph, compile="none")
    ids = tokens(2, 7, 256)
    expected, state = ref(ids)
    assert state == {}
    assert expected["logits"].shape == (2, 7, 256) and expected["logits"].dtype == mx.float32
    for mode in ("program", "stage"):
        p = Program(tiny_graph, compile=mode)
        same_weights(p, ref)
        for seq in (7, 3, 7):  # different shapes, then a cached one again
            ids = tokens(2, seq, 256, seed=seq)
            want, _ = ref(ids)
            got, _ = p(ids)
            np.testing.assert_allclose(np_(got["logits"]), np_(want["logits"]), rtol=1e-5, atol=1e-5)


def test_compile_modes_agree_with_state(rec_graph):
    ref = Program(rec_graph, compile="none")
    ids = tokens(3, 5, 32)
    state0 = ref.init_state(3)
    state0 = {n: {k: mx.random.normal(v.shape, key=mx.random.key(1)) for k, v in s.items()} for n, s in state0.items()}
    want, want_state = ref(ids, state0)
    for mode in ("program", "stage"):
        p = Program(rec_graph, compile=mode)
        same_weights(p, ref)
        got, got_state = p(ids, state0)
        np.testing.assert_allclose(np_(got["logits"]), np_(want["logits"]), rtol=1e-5, atol=1e-5)
        assert set(got_state) == {"layers.0.acc", "layers.1.acc"}
        for n in got_state:
            np.testing.assert_allclose(np_(got_state[n]["s"]), np_(want_state[n]["s"]), rtol=1e-5, atol=1e-5)


def test_trace_matches_the_call(tiny_graph):
    p = Program(tiny_graph, compile="program")
    ids = tokens(1, 4, 256)
    out, _ = p(ids)
    trace = p.trace(ids)
    assert list(trace) == tiny_graph.blocks()
    np.testing.assert_allclose(np_(trace["lm_head"]), np_(out["logits"]), rtol=1e-5, atol=1e-5)


def test_plan_of_a_recurrent_program(rec_graph):
    plan = Program(rec_graph).plan()
    assert [s["name"] for s in plan["stages"]] == ["embedding", "layers.0", "layers.1", "out_norm", "lm_head"]
    assert plan["stages"][1] == {
        "name": "layers.0", "nodes": ["layers.0.norm", "layers.0.acc", "layers.0.mix", "layers.0.out"],
        "reads": ["embedding"], "writes": ["layers.0.out"], "state": ["layers.0.acc"]}
    assert plan["outputs"] == {"logits": "lm_head"}


# ----------------------------------------------------------------------------------------- state
def test_init_state(rec_graph, tiny_graph):
    assert Program(tiny_graph).init_state(4) == {}
    state = Program(rec_graph).init_state(3)
    assert set(state) == {"layers.0.acc", "layers.1.acc"}
    for entry in state.values():
        assert set(entry) == {"s"}
        assert entry["s"].shape == (3, 8) and entry["s"].dtype == mx.float32
        assert float(mx.abs(entry["s"]).max()) == 0.0
    assert rec_graph.state_bytes() == 2 * 8 * 4  # per sequence, batch excluded


@pytest.mark.parametrize("compile", ["program", "stage", "none"])
def test_prefill_plus_steps_equals_one_call(rec_graph, compile):
    p = Program(rec_graph, compile=compile)
    ids = tokens(2, 9, 32, seed=3)
    full, full_state = p(ids)
    logits, state = p(ids[:, :5])
    parts = [logits["logits"]]
    for t in range(5, 9):
        out, state = p(ids[:, t:t + 1], state)
        parts.append(out["logits"])
    np.testing.assert_allclose(np_(mx.concatenate(parts, axis=1)), np_(full["logits"]), rtol=1e-4, atol=1e-4)
    for n in full_state:
        np.testing.assert_allclose(np_(state[n]["s"]), np_(full_state[n]["s"]), rtol=1e-4, atol=1e-4)
    # the state really carries the past: a step from zeros differs
    fresh, _ = p(ids[:, 8:9])
    assert not np.allclose(np_(fresh["logits"]), np_(parts[-1]), atol=1e-3)


def test_stateless_program_rejects_a_state_without_owner(tiny_graph):
    p = Program(tiny_graph, compile="none")
    with pytest.raises(MadError, match="state 'blocks.0.mlstm' has no owner"):
        p(tokens(1, 2, 256), {"blocks.0.mlstm": {"C": mx.zeros((1, 2))}})


def test_parallel_mode_from_zero_state_equals_auto(rec_graph):
    p = Program(rec_graph, compile="none")
    ids = tokens(2, 6, 32)
    auto, _ = p(ids)
    par, _ = p(ids, mode="parallel")
    np.testing.assert_allclose(np_(par["logits"]), np_(auto["logits"]), rtol=1e-5, atol=1e-5)


def test_state_file_round_trip(rec_graph, tmp_path):
    p = Program(rec_graph)
    _, state = p(tokens(2, 4, 32))
    path = tmp_path / "state" / "s.safetensors"
    save_state_file(path, state)
    assert [f.name for f in path.parent.iterdir()] == ["s.safetensors"]  # written atomically, no temp left
    loaded = load_state_file(path, p)
    assert set(loaded) == set(state)
    for n in state:
        assert set(loaded[n]) == {"s"}
        assert loaded[n]["s"].dtype == mx.float32
        np.testing.assert_array_equal(np_(loaded[n]["s"]), np_(state[n]["s"]))
    # continuing from the loaded state equals continuing from the live one
    nxt = tokens(2, 2, 32, seed=9)
    a, _ = p(nxt, state)
    b, _ = p(nxt, loaded)
    np.testing.assert_array_equal(np_(a["logits"]), np_(b["logits"]))


def test_generation_state_has_read_prompt_and_output(rec_graph):
    lm = LanguageModel(Program(rec_graph))
    prompt = [1, 2, 3]
    responses = list(stream_generate(lm, ByteTokenizer(), prompt, max_tokens=4))
    assert len(responses) == 4 and responses[-1].finish_reason == "length"
    generated = [r.token for r in responses]
    _, state = lm(mx.array([prompt + generated], dtype=mx.int32))
    final = responses[-1].state
    for n in state:
        np.testing.assert_allclose(np_(final[n]["s"]), np_(state[n]["s"]), rtol=1e-4, atol=1e-4)
    # greedy generation is the argmax chain of the full model
    logits, _ = lm(mx.array([prompt + generated[:-1]], dtype=mx.int32))
    assert np.argmax(np_(logits[0]), axis=-1)[len(prompt) - 1:].tolist() == generated


# ----------------------------------------------------------------------------------------- dtypes
def test_bfloat16_program_keeps_state_float32(rec_graph):
    p32 = Program(rec_graph)
    p16 = Program(rec_graph, dtype="bfloat16")
    same_weights(p16, p32)
    assert {v.dtype for v in p16.parameters().values()} == {mx.bfloat16}
    assert all(v.dtype == mx.float32 for s in p16.init_state(2).values() for v in s.values())
    ids = tokens(2, 5, 32)
    out16, state16 = p16(ids)
    out32, _ = p32(ids)
    assert out16["logits"].dtype == mx.bfloat16
    assert all(v.dtype == mx.float32 for s in state16.values() for v in s.values())
    np.testing.assert_allclose(np_(out16["logits"]), np_(out32["logits"]), rtol=0.1, atol=0.15)
    # steps from a bfloat16 program's state keep it float32
    out, state = p16(ids[:, :1], state16)
    assert all(v.dtype == mx.float32 for s in state.values() for v in s.values())


def test_unknown_dtype():
    with pytest.raises(MadError, match="unknown dtype 'float8'"):
        mad.build(TINY, dtype="float8")


# ----------------------------------------------------------------------------------------- weights
def test_load_weights_reports_everything_and_changes_nothing(tiny_graph):
    p = Program(tiny_graph)
    before = {k: np_(v) for k, v in p.parameters().items()}
    bad = {k: mx.zeros(v.shape) for k, v in p.parameters().items()}
    del bad["out_norm.weight"], bad["blocks.1.ffn.up_proj.weight"]
    bad["extra.weight"] = mx.zeros((3,))
    bad["blocks.0.norm.weight"] = mx.zeros((65,))
    with pytest.raises(MadError) as info:
        p.load_weights(bad, where="ckpt")
    assert [d.message for d in info.value.diagnostics] == [
        "ckpt: missing weight 'blocks.1.ffn.up_proj.weight' (176, 64)",
        "ckpt: missing weight 'out_norm.weight' (64,)",
        "ckpt: unexpected weight 'extra.weight' (3,)",
        "ckpt: weight 'blocks.0.norm.weight' has shape (65,), the model expects (64,)",
    ]
    after = p.parameters()
    assert set(after) == set(before)
    for k, v in before.items():
        np.testing.assert_array_equal(np_(after[k]), v)


def test_load_weights_not_strict(tiny_graph):
    p = Program(tiny_graph)
    new = mx.full((64,), 2.0)
    p.load_weights({"out_norm.weight": new, "other.weight": mx.zeros((2,))}, strict=False)
    np.testing.assert_array_equal(np_(p.parameters()["out_norm.weight"]), np.full(64, 2.0))
    with pytest.raises(MadError, match=r"weight 'out_norm.weight' has shape \(3,\), the model expects \(64,\)"):
        p.load_weights({"out_norm.weight": mx.zeros((3,))}, strict=False)


def test_load_weights_reach_a_compiled_program(tiny_graph):
    p = Program(tiny_graph, compile="program")
    ids = tokens(1, 4, 256)
    first, _ = p(ids)
    mx.eval(first)
    new = {k: v * 0.5 for k, v in p.parameters().items()}
    p.load_weights(new)
    second, _ = p(ids)
    ref = Program(tiny_graph, compile="none")
    ref.load_weights(new)
    want, _ = ref(ids)
    np.testing.assert_allclose(np_(second["logits"]), np_(want["logits"]), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np_(second["logits"]), np_(first["logits"]), atol=1e-3)


def test_load_weights_casts_to_the_program_dtype(tiny_graph):
    p = Program(tiny_graph, dtype="bfloat16")
    p.load_weights({k: mx.ones(v.shape, dtype=mx.float32) for k, v in p.parameters().items()})
    assert {v.dtype for v in p.parameters().values()} == {mx.bfloat16}


def test_tied_lm_head_uses_the_embedding_weight(tiny_graph):
    p = Program(tiny_graph, compile="none")
    params = p.parameters()
    assert "lm_head.weight" not in params and not any(k.startswith("lm_head") for k in params)
    assert tiny_graph.g.nodes["lm_head"]["params"] == {}
    ids = tokens(2, 3, 256)
    trace = p.trace(ids)
    E = params["embedding.weight"]
    np.testing.assert_allclose(np_(trace["lm_head"]), np_(trace["out_norm"] @ E.T), rtol=1e-5, atol=1e-5)
    # a new embedding weight moves the head with it, also in a compiled program
    q = Program(tiny_graph, compile="program")
    q(ids)
    E2 = mx.random.normal(E.shape, key=mx.random.key(7))
    q.load_weights({**q.parameters(), "embedding.weight": E2})
    out, _ = q(ids)
    tr = q.trace(ids)
    np.testing.assert_allclose(np_(out["logits"]), np_(tr["out_norm"] @ E2.T), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------- last_only
XLSTM_TINY = ROOT / "topologies" / "xlstm-tiny.yaml"
V1_TINY = ROOT / "topologies" / "xlstm-v1-tiny.yaml"


def test_last_only_runs_the_positionwise_tail_on_the_last_position(rec_graph):
    p = Program(rec_graph)
    # the last layer's mix/out and the head read only positionwise nodes; every acc reads all positions
    assert p.tail == {"layers.1.mix", "layers.1.out", "out_norm", "lm_head"}
    ids = tokens(2, 9, 32, seed=5)
    full, full_state = p(ids)
    last, state = p(ids, last_only=True)
    assert last["logits"].shape == (2, 1, 32)
    np.testing.assert_allclose(np_(last["logits"]), np_(full["logits"][:, -1:]), rtol=1e-6, atol=1e-6)
    for n in full_state:
        np.testing.assert_array_equal(np_(state[n]["s"]), np_(full_state[n]["s"]))


@pytest.mark.parametrize("topology", [XLSTM_TINY, V1_TINY], ids=["xlstm-7b-family", "xlstm-v1"])
@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("compile", ["program", "stage", "none"])
def test_last_only_equals_the_last_position_of_a_full_call(topology, fuse, compile):
    p = Program(build_graph(load_topology(topology)), compile=compile, fuse=fuse)
    lm = LanguageModel(p)
    ids = tokens(2, 37, lm.vocab_size, seed=1)
    full, full_state = lm(ids)
    last, state = lm(ids, last_only=True)
    assert last.shape == (2, 1, lm.vocab_size) and p.tail
    np.testing.assert_allclose(np_(last), np_(full[:, -1:]), rtol=1e-6, atol=1e-6)
    for n in full_state:
        for k in full_state[n]:
            np.testing.assert_array_equal(np_(state[n][k]), np_(full_state[n][k]))
    # reading a prompt: only the last position goes through the head
    logits, pre_state = lm.prefill(ids, step_size=16)
    np.testing.assert_allclose(np_(logits), np_(full[:, -1]), rtol=1e-5, atol=1e-5)


def test_fused_group_members_are_in_the_tail_together():
    # the last block's ogate_preact reads the same norm as q, k, v and the gates (which feed the cell):
    # unfused it runs on the last position only, fused it runs with its group on every position
    g = build_graph(load_topology(XLSTM_TINY))
    og = "backbone.blocks.1.mlstm_layer.ogate_preact"
    assert og in Program(g, fuse=False).tail
    fused = Program(build_graph(load_topology(XLSTM_TINY)), fuse=True)
    assert any(og in grp.members for grp in fused.fusion_groups) and og not in fused.tail
    assert "lm_head" in fused.tail


def test_last_only_of_an_output_outside_the_tail(rec_graph, tmp_path):
    # an output read straight from a recurrent node is sliced at the end
    path = tmp_path / "rec2.yaml"
    path.write_text(RECURRENT.replace("outputs: {logits: lm_head}", "outputs: {logits: lm_head, acc: layers.1.acc}"))
    p = Program(build_graph(load_topology(path)))
    ids = tokens(2, 9, 32, seed=2)
    full, _ = p(ids)
    last, _ = p(ids, last_only=True)
    assert last["acc"].shape[1] == 1
    np.testing.assert_array_equal(np_(last["acc"]), np_(full["acc"][:, -1:]))


# ----------------------------------------------------------------------------------------- ownership
@pytest.mark.parametrize("fuse", [False, True])
def test_programs_from_one_graph_are_independent(tiny_graph, fuse):
    """The graph holds no weights: each Program builds and owns its own, so a second program (another
    dtype, loaded weights) changes nothing in the first."""
    first = Program(tiny_graph, fuse=fuse)
    before = {k: np_(v) for k, v in first.parameters().items()}
    second = Program(tiny_graph, dtype="bfloat16", fuse=fuse)
    assert all("module" not in tiny_graph.g.nodes[n] for n in tiny_graph.blocks())
    assert {v.dtype for v in first.parameters().values()} == {mx.float32}
    assert {v.dtype for v in second.parameters().values()} == {mx.bfloat16}
    assert not any(a is b for a, b in zip(first.parameters().values(), second.parameters().values()))
    assert all(first.fns[n] is not second.fns[n] for n in first.fns if n in second.fns and n in first.root)
    second.load_weights({k: mx.ones(v.shape) for k, v in second.parameters().items()})
    for k, v in first.parameters().items():
        assert v.dtype == mx.float32
        np.testing.assert_array_equal(np_(v), before[k])
    first.set_dtype("float16")
    assert {v.dtype for v in second.parameters().values()} == {mx.bfloat16}
    ids = tokens(1, 4, 256)
    assert first(ids)[0]["logits"].dtype == mx.float16 and second(ids)[0]["logits"].dtype == mx.bfloat16


# ----------------------------------------------------------------------------------------- profile
@pytest.mark.parametrize("fuse", [False, True])
def test_profile_times_every_stage(tiny_graph, fuse):
    from mad.program import block_type_totals

    program = Program(tiny_graph, fuse=fuse)
    ids = tokens(2, 5, 256)
    entries = program.profile(ids, repeats=2)
    assert [e["stage"] for e in entries] == [s.name for s in program.stages]
    assert [e["nodes"] for e in entries] == [s.nodes for s in program.stages]
    assert all(e["seconds"] > 0 for e in entries)
    kinds = {n: tiny_graph.g.nodes[n]["block_type"] for n in tiny_graph.blocks()}
    for e in entries:
        assert sum(e["block_types"].values()) == len(e["nodes"])
        assert e["block_types"] == {k: [kinds[n] for n in e["nodes"]].count(k) for k in {kinds[n] for n in e["nodes"]}}
    totals = block_type_totals(entries)
    assert {k: t["nodes"] for k, t in totals.items()} == {k: list(kinds.values()).count(k) for k in set(kinds.values())}
    assert sum(t["seconds"] for t in totals.values()) == pytest.approx(sum(e["seconds"] for e in entries))
    by_type = program.profile_block_types(ids, repeats=1)
    assert set(by_type) == set(kinds.values()) and all(t["seconds"] > 0 for t in by_type.values())
    with pytest.raises(MadError, match="repeats must be an integer >= 1"):
        program.profile(ids, repeats=0)



def test_the_trace_log_records_each_trace_once():
    """`Program.traces` grows by one (first input's shape, last_only) per whole-program trace: a repeated shape
    reuses the compiled function; `clear_compiled` makes the next call trace anew."""
    import mlx.core as mx

    import mad

    program = mad.build("topologies/examples/tiny.yaml")
    for tokens, last_only in (((1, 3), False), ((1, 3), False), ((2, 5), False), ((1, 3), True)):
        program({"tokens": mx.zeros(tokens, dtype=mx.int32)}, last_only=last_only)
    assert program.traces == [((1, 3), False), ((2, 5), False), ((1, 3), True)]
    program.clear_compiled()
    program({"tokens": mx.zeros((1, 3), dtype=mx.int32)})
    assert program.traces[-1] == ((1, 3), False) and len(program.traces) == 4
