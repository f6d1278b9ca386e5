"""The original xLSTM stack against NX-AI's `xLSTMLMModel`, through golden fixtures (no PyTorch).

`tests/fixtures/nxai-tiny` is a tiny NX-AI checkpoint (config.yaml + model.safetensors, vanilla sLSTM
layout) with every weight re-randomised, made by `tests/reference/make_nxai_fixtures.py`: vocab 101,
width 24, five blocks with sLSTM at 1 and 3. `golden.safetensors` holds NX-AI's outputs for batch 2,
23 tokens: the full forward (`logits`, and `logits64` from the same model in float64), 23 single
`step`s from the empty state (`step_logits`) and the state after them (`state/<node>/<name>`, in MAD's
names and layouts). NX-AI's own float32 forward is 1.3e-5 from float64 here, so the float32 reference is
the target, at the issue's 2e-4. `nxai-tiny-cuda` is the same model in NX-AI's experiment-file layout
with the sLSTM weights in NX-AI's CUDA layout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

import mad
from mad.errors import MadError
from mad.graph import build_graph
from mad.model import LanguageModel
from mad.loading import load
from mad.program import Program
from mad.topology import load_topology
from mad.formats.nxai_xlstm import sanitize as nxai_sanitize, topology as nxai_topology

FIX = Path(__file__).parent / "fixtures"
TINY, TINY_CUDA = FIX / "nxai-tiny", FIX / "nxai-tiny-cuda"
CONFIG = yaml.safe_load((TINY / "config.yaml").read_text())
TOL = 2e-4        # logits (the bound)
STATE_TOL = 1e-4  # recurrent state
SLSTM_AT = (1, 3)


@pytest.fixture(scope="module")
def golden():
    return load_file(str(TINY / "golden.safetensors"))


@pytest.fixture(scope="module")
def model():
    return load(TINY)[0]


def maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def state_diffs(state: dict, golden: dict) -> dict[str, float]:
    out = {}
    for key, ref in golden.items():
        if key.startswith("state/"):
            node, name = key[len("state/"):].rsplit("/", 1)
            out[key] = maxdiff(np.array(state[node][name]).reshape(ref.shape), ref)
    return out


def steps(model, tokens: mx.array, state=None, start: int = 0):
    logits = []
    for t in range(start, tokens.shape[1]):
        out, state = model(tokens[:, t:t + 1], state=state)
        logits.append(np.array(out))
    return np.concatenate(logits, axis=1), state


def test_the_fixture_is_a_mixed_stack(model, golden):
    g = model.program.graph.g
    cells = [n for n in g.nodes if g.nodes[n].get("spec") is not None and g.nodes[n]["spec"].type == "slstm_cell"]
    assert cells == [f"xlstm_block_stack.blocks.{i}.xlstm.slstm_cell" for i in SLSTM_AT]
    assert golden["tokens"].shape == (2, 23)
    assert len([k for k in golden if k.startswith("state/")]) == 3 * 3 + 2 * 4 + 5  # mLSTM C, n, m; sLSTM y, c, n, m; conv x


def test_full_forward_matches_nxai(model, golden):
    logits, _ = model(mx.array(golden["tokens"]))
    assert logits.dtype == mx.float32 and logits.shape == golden["logits"].shape
    assert maxdiff(logits, golden["logits"]) <= TOL
    assert maxdiff(logits, golden["logits64"]) <= TOL


def test_steps_match_nxai_step(model, golden):
    out, state = steps(model, mx.array(golden["tokens"]))
    assert maxdiff(out, golden["step_logits"]) <= TOL
    diffs = state_diffs(state, golden)
    assert max(diffs.values()) <= STATE_TOL, diffs
    assert all(a.dtype == mx.float32 for s in state.values() for a in s.values())


@pytest.mark.parametrize("t1", [1, 4, 13, 22])
def test_prefill_with_state_then_steps_equals_full_forward(model, golden, t1):
    """NX-AI's forward takes no state; MAD's does: prefill t1 tokens, step the rest."""
    tokens = mx.array(golden["tokens"])
    pre, state = model(tokens[:, :t1])
    out, state = steps(model, tokens, state, start=t1)
    assert maxdiff(np.concatenate([np.array(pre), out], axis=1), golden["logits"]) <= TOL
    assert max(state_diffs(state, golden).values()) <= STATE_TOL
    _, full_state = model(tokens)
    for node, entries in full_state.items():
        for name, arr in entries.items():
            assert maxdiff(state[node][name], arr) <= STATE_TOL, (node, name)


def test_two_prefills_equal_one(model, golden):
    tokens = mx.array(golden["tokens"])
    a, state = model(tokens[:, :9])
    b, state = model(tokens[:, 9:], state=state)
    assert maxdiff(mx.concatenate([a, b], axis=1), golden["logits"]) <= TOL
    assert max(state_diffs(state, golden).values()) <= STATE_TOL


@pytest.mark.parametrize("mode", ["step", "chunkwise", "parallel"])
def test_modes_agree(model, golden, mode):
    logits, _ = model(mx.array(golden["tokens"]), mode=mode)
    assert maxdiff(logits, golden["logits"]) <= TOL


def test_short_chunks_cross_chunk_borders(golden):
    """CHUNK 8: 23 tokens are two chunks and a remainder of 7 in the mLSTM cells."""
    topology, overrides = nxai_topology(CONFIG)
    program = Program(build_graph(load_topology(topology, overrides + ["dims.CHUNK=8"])))
    program.load_weights(nxai_sanitize(mx.load(str(TINY / "model.safetensors")), CONFIG))
    model = LanguageModel(program)
    logits, _ = model(mx.array(golden["tokens"]))
    assert maxdiff(logits, golden["logits"]) <= TOL


def test_cuda_layout_and_experiment_file_load_the_same_model(model, golden):
    cuda, _ = load(TINY_CUDA)
    tokens = mx.array(golden["tokens"])
    assert maxdiff(cuda(tokens)[0], model(tokens)[0]) == 0.0
    params, ref = cuda.program.parameters(), model.program.parameters()
    assert params.keys() == ref.keys() and all(maxdiff(params[k], ref[k]) == 0.0 for k in ref)


def test_config_json_and_experiment_layout(tmp_path, model, golden):
    folder = tmp_path / "json"
    folder.mkdir()
    shutil.copy(TINY / "model.safetensors", folder)
    (folder / "config.json").write_text(json.dumps({"model": CONFIG, "training": {"lr": 1e-3}}))
    loaded, tok = load(folder)
    tokens = mx.array(golden["tokens"])
    assert tok is None and maxdiff(loaded(tokens)[0], model(tokens)[0]) == 0.0


def test_bfloat16_weights_keep_float32_state(golden):
    m, _ = load(TINY, dtype="bfloat16")
    logits, state = m(mx.array(golden["tokens"][:, :7]))
    assert m.program.parameters()["lm_head.weight"].dtype == mx.bfloat16
    assert all(a.dtype == mx.float32 for s in state.values() for a in s.values())
    err = np.abs(np.array(logits) - golden["logits"][:, :7]).mean()
    assert err < 0.1 * np.abs(golden["logits"][:, :7]).mean()


def test_generation_and_cli(model, capsys, monkeypatch):
    tokens = [3, 14, 15, 92, 65]
    out = [r.token for r in mad.stream_generate(model, None, tokens, max_tokens=6)]
    seq = list(tokens)
    for _ in range(6):  # greedy = the argmax chain of full forwards
        logits, _ = model(mx.array([seq], dtype=mx.int32))
        seq.append(int(mx.argmax(logits[0, -1]).item()))
    assert out == seq[len(tokens):]
    from yaml_files import cli

    code, stdout, _ = cli(monkeypatch, capsys, "run", TINY, "--prompt-ids", "3,14,15,92,65", "--max-tokens", "6")
    assert code == 0 and stdout.startswith(" ".join(map(str, out))) and "Generation: 6 tokens" in stdout
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("A1 ?\n"))  # byte ids below the vocabulary size 101
    code, _, err = cli(monkeypatch, capsys, "chat", TINY, "--max-tokens", "3")
    assert code == 0, err


# ----------------------------------------------------------------------------------------- configs
def nxai_weights(program: Program) -> dict:
    """A program's weights under NX-AI's names (the inverse of the loader's renaming, vanilla layout)."""
    out = {}
    for k, v in program.parameters().items():
        k = k.replace(".slstm_cell.recurrent_kernel", ".slstm_cell._recurrent_kernel_")
        k = k.replace(".slstm_cell.bias", ".slstm_cell._bias_")
        out[k.removesuffix(".weight") if k.endswith(".learnable_skip.weight") else k] = v
    return out


def roundtrip(tmp_path, config: dict) -> tuple:
    """Build the topology a config describes with fresh weights, save them as an NX-AI checkpoint, load it."""
    topology, overrides = nxai_topology(config)
    fresh = Program(build_graph(load_topology(topology, overrides)))
    mx.eval(fresh.parameters())
    folder = tmp_path / "ckpt"
    folder.mkdir()
    weights = nxai_weights(fresh)
    if config.get("tie_weights"):
        weights["lm_head.weight"] = weights["token_embedding.weight"]
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    loaded, _ = load(folder)
    tokens = mx.array([[1, 5, 7, 2, 9]])
    assert maxdiff(loaded(tokens)[0], LanguageModel(fresh)(tokens)[0]) == 0.0
    return loaded, weights


def variant(**changes) -> dict:
    config = json.loads(json.dumps(CONFIG))
    for key, value in changes.items():
        node = config
        *path, leaf = key.split("__")
        for p in path:
            node = node[p]
        node[leaf] = value
    return config


@pytest.mark.parametrize("changes, expect", [
    ({}, {"slstm": 2}),
    ({"slstm_at": "all"}, {"slstm": 5}),
    ({"slstm_at": [], "slstm_block": None}, {"slstm": 0}),
    ({"slstm_at": [], "slstm_block": None, "embedding_dim": 30}, {"slstm": 0}),  # 4 sLSTM heads would not fit
    ({"mlstm_block": None}, {"slstm": 5}),
    ({"slstm_at": [-1, 0]}, {"slstm": 2}),
    ({"tie_weights": True}, {"no": "lm_head.weight"}),
    ({"bias": True}, {"has": "xlstm_block_stack.blocks.0.xlstm.q_proj.bias"}),
    ({"add_post_blocks_norm": False}, {"no": "xlstm_block_stack.post_blocks_norm.weight"}),
    ({"slstm_block__feedforward": None}, {"no": "xlstm_block_stack.blocks.1.ffn.proj_up.weight"}),
    ({"slstm_block__slstm__conv1d_kernel_size": 0}, {"no": "xlstm_block_stack.blocks.1.xlstm.conv1d.conv.weight"}),
    ({"slstm_block__feedforward__act_fn": "swish", "slstm_block__feedforward__bias": True},
     {"has": "xlstm_block_stack.blocks.1.ffn.proj_up.bias"}),
    ({"embedding_dim": 96, "mlstm_block__mlstm__proj_factor": 1.5, "mlstm_block__mlstm__round_proj_up_dim_up": False},
     {"shape": ("xlstm_block_stack.blocks.0.xlstm.proj_up.weight", (2 * 128, 96))}),  # 1.5 * 96 = 144 -> down to 128
], ids=lambda x: json.dumps(x) if isinstance(x, dict) else None)
def test_config_variants_build_and_load(tmp_path, changes, expect):
    config = variant(**changes)
    loaded, weights = roundtrip(tmp_path, config)
    g = loaded.program.graph.g
    cells = [n for n in g.nodes if g.nodes[n].get("spec") is not None and g.nodes[n]["spec"].type == "slstm_cell"]
    params = loaded.program.parameters()
    if "slstm" in expect:
        assert len(cells) == expect["slstm"]
    if "no" in expect:
        assert expect["no"] not in params
    if "has" in expect:
        assert expect["has"] in params
    if "shape" in expect:
        assert tuple(params[expect["shape"][0]].shape) == expect["shape"][1]


# ----------------------------------------------------------------------------------------- errors
def bad_folder(tmp_path, text: str, name: str = "config.yaml", weights: dict | None = None) -> Path:
    folder = tmp_path / "bad"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(text)
    if weights is None:
        shutil.copy(TINY / "model.safetensors", folder)
    else:
        mx.save_safetensors(str(folder / "model.safetensors"), weights)
    return folder


@pytest.mark.parametrize("changes, message", [
    ({"slstm_att": [1]}, "slstm_att: not a field of NX-AI's model config; did you mean 'slstm_at'?"),
    ({"slstm_block__slstm__num_head": 4}, "slstm_block.slstm.num_head: not a field of NX-AI's slstm config; "
                                          "did you mean 'num_heads'?"),
    ({"slstm_at": [5]}, "slstm_at: index 5 is outside 0..4 (num_blocks 5)"),
    ({"vocab_size": -1}, "vocab_size: not set"),
    ({"slstm_block__feedforward__act_fn": "relu^2"}, "slstm_block.feedforward.act_fn: 'relu^2' is not supported"),
    ({"slstm_block__slstm__function": "lstm"}, "slstm_block.slstm.function: 'lstm' is not supported"),
    ({"slstm_block__slstm__num_heads": 5}, "slstm_block.slstm.num_heads: 5 does not divide embedding_dim 24"),
    ({"mlstm_block__mlstm__qkv_proj_blocksize": 7}, "mlstm_block.mlstm.qkv_proj_blocksize: 7 does not divide"),
    ({"slstm_block": None}, "slstm_at: sLSTM blocks at [1, 3] but slstm_block is not set"),
    ({"embedding_dim": "big"}, "embedding_dim: expected int, got 'big'"),
    ({"mlstm_block__mlstm__proj_factor": 1.5, "mlstm_block__mlstm__round_proj_up_dim_up": False},
     "mlstm_block.mlstm.proj_factor: the inner dim rounds to 0 (embedding_dim 24)"),
    ({"context_length": "${dataset.length}"}, "context_length: reference '${dataset.length}' names nothing"),
])
def test_bad_configs_name_the_file_and_key(tmp_path, changes, message):
    folder = bad_folder(tmp_path, yaml.safe_dump(variant(**changes)))
    with pytest.raises(MadError) as e:
        load(folder)
    text = e.value.render()
    assert text.startswith(f"{folder / 'config.yaml'}: error: ") and message in text, text
    assert len(e.value.diagnostics) == 1


def test_bad_weights_are_listed_by_name(tmp_path):
    weights = dict(mx.load(str(TINY / "model.safetensors")))
    del weights["xlstm_block_stack.blocks.1.xlstm.slstm_cell._bias_"]
    weights["xlstm_block_stack.blocks.3.xlstm.slstm_cell._recurrent_kernel_"] = mx.zeros((4, 6, 6))
    weights["xlstm_block_stack.blocks.0.xlstm.learnable_skip"] = mx.zeros((3,))
    folder = bad_folder(tmp_path, (TINY / "config.yaml").read_text(), weights=weights)
    with pytest.raises(MadError) as e:
        load(folder)
    text = e.value.render()
    assert f"{folder}: missing weight 'xlstm_block_stack.blocks.1.xlstm.slstm_cell.bias' (96,)" in text
    assert ("weight 'xlstm_block_stack.blocks.3.xlstm.slstm_cell.recurrent_kernel' has shape (4, 6, 6), "
            "the model expects (4, 24, 6)") in text
    assert "weight 'xlstm_block_stack.blocks.0.xlstm.learnable_skip.weight' has shape (3,)" in text
    assert len(e.value.diagnostics) == 3


def test_cli_reports_config_errors_with_exit_2(tmp_path, monkeypatch, capsys):
    from yaml_files import cli

    folder = bad_folder(tmp_path, yaml.safe_dump(variant(slstm_att=[1])))
    code, out, err = cli(monkeypatch, capsys, "run", folder, "--max-tokens", "2")
    assert code == 2 and "Traceback" not in err
    assert f"{folder / 'config.yaml'}: error: slstm_att: not a field" in err
