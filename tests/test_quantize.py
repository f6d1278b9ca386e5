"""Quantized models (`mad.quantize`, `Program.quantize`, `mad convert`).

- Exactness: a quantized program computes what the same program computes unquantized with the weights
  replaced by `mx.dequantize` of the stored ones (an independent computation: plain float modules, the
  `linear` kernel): equal in float32 on the CPU for the affine mode, fused and unfused, in every mode,
  prefill + steps included; to float32 rounding for the floating-point modes (MLX applies their scales
  after each group's sum).
- Quality: each quantized projection is within its rounding bound (|x| times half a quantization step per
  weight), and the logits are as far from the float model's as those of the float model with its weights
  moved by uniform noise of one quantization step (the error model of rounding to nearest).
- Files: convert -> load -> save -> load is bitwise; mad.json records the quantization and loading checks it
  and the packed weights; `mad convert` and its errors (exit 2, one message).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mad
from mad.errors import MadError
from mad.graph import build_graph
from mad.program import FUSED, Program
from mad.quantize import (CLI_FLAGS, MODES, QuantizedFusedLinear, QuantSettings, quant_settings, quantize_model,
                          quantized_linear)
from mad.topology import load_topology

from yaml_files import cli

ROOT = Path(__file__).resolve().parents[1]
XTINY = ROOT / "topologies" / "xlstm-tiny.yaml"
TINY = ROOT / "topologies" / "examples" / "tiny.yaml"   # swiglu (nn.Linear leaves) and a tied head
HF_TINY = ROOT / "tests" / "fixtures" / "hf-tiny"
TINY_SET = ["dims.F=192"]  # tiny.yaml's F = 176 is divisible by no affine group size (see test_group_size_...)


def graph_of(file: Path, overrides=()):
    return build_graph(load_topology(file, list(overrides)))


def settings_of(config: dict, path: str) -> dict:
    own = config.get(path)
    return own if isinstance(own, dict) else {k: config[k] for k in ("group_size", "bits", "mode")}


def dequantized(program: Program) -> dict[str, mx.array]:
    """The program's weights with every quantized matrix replaced by `mx.dequantize` of what it stores."""
    params, config = program.parameters(), program.quantization
    out = {}
    for name, value in params.items():
        base, _, leaf = name.rpartition(".")
        if leaf in ("scales", "biases"):
            continue
        if leaf == "weight" and f"{base}.scales" in params:
            s = settings_of(config, base)
            value = mx.dequantize(value, params[f"{base}.scales"], params.get(f"{base}.biases"),
                                  group_size=s["group_size"], bits=s["bits"], mode=s["mode"])
        out[name] = value
    return out


def pair(file: Path, overrides=(), fuse=True, seed=0, **settings) -> tuple[Program, Program]:
    """(a quantized program, the float program holding its dequantized weights)."""
    graph = graph_of(file, overrides)
    mx.random.seed(seed)
    quantized = Program(graph, fuse=fuse)
    quantize_model(quantized, **settings)
    reference = Program(graph, fuse=fuse)
    reference.load_weights(dequantized(quantized))
    return quantized, reference


def ids(batch: int, length: int, seed: int, vocab: int = 256) -> mx.array:
    return mx.random.randint(0, vocab, (batch, length), key=mx.random.key(seed)).astype(mx.int32)


def logits(program: Program, tokens: mx.array, state=None, mode="auto") -> tuple[np.ndarray, dict]:
    out, state = program({"tokens": tokens}, state, mode=mode)
    return np.array(out["logits"].astype(mx.float32)), state


# ----------------------------------------------------------------------------------------- settings
def accepted_by_mlx(mode: str, group_size: int, bits: int) -> bool:
    try:
        mx.eval(mx.quantize(mx.ones((2, 128)), group_size, bits, mode=mode))
        return True
    except (ValueError, RuntimeError):
        return False


def test_settings_are_what_mx_quantize_accepts():
    for mode, spec in MODES.items():
        for group_size in (16, 32, 64, 128):
            for bits in range(1, 9):
                ours = group_size in spec.group_sizes and bits in spec.bits
                if ours:
                    assert accepted_by_mlx(mode, group_size, bits), (mode, group_size, bits)
                    assert quant_settings(bits, group_size, mode) == QuantSettings(bits, group_size, mode)
                else:
                    with pytest.raises(MadError, match="what mx.quantize accepts"):
                        quant_settings(bits, group_size, mode)
        assert accepted_by_mlx(mode, spec.default_group_size, spec.default_bits)
    # what mx.quantize refuses, MAD refuses (affine 1-bit is the one combination MLX has and MAD does not offer)
    assert not accepted_by_mlx("mxfp4", 32, 8) and not accepted_by_mlx("affine", 16, 4)


def test_bad_settings_name_the_flags():
    with pytest.raises(MadError) as e:
        quant_settings(8, None, "mxfp4", CLI_FLAGS)
    assert str(e.value) == ("error: mxfp4 quantization takes --q-bits 4 and --q-group-size 32 (what mx.quantize "
                            "accepts), got --q-bits 8")
    with pytest.raises(MadError, match="--q-mode must be one of affine, mxfp4, mxfp8, nvfp4, got 'int4'"):
        quant_settings(None, None, "int4", CLI_FLAGS)
    with pytest.raises(MadError, match="got --q-bits 7 and --q-group-size 48"):
        quant_settings(7, 48, "affine", CLI_FLAGS)
    with pytest.raises(MadError, match="bits must be an integer, got 4.0"):
        quant_settings(4.0)


# ----------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("file,overrides", [(XTINY, ()), (TINY, TINY_SET)], ids=["xlstm-tiny", "tiny-tied"])
def test_quantized_equals_dequantized_float(file, overrides, fuse, on_cpu):
    """Every quantized product equals the float product with the dequantized matrix, bit for bit (the CPU,
    float32, MLX's own BLAS): the whole model then too, in every mode and step by step."""
    quantized, reference = pair(file, overrides, fuse=fuse, group_size=32)
    tokens = ids(2, 37, seed=1)
    for mode in ("auto", "parallel", "chunkwise"):
        got, got_state = logits(quantized, tokens, mode=mode)
        want, want_state = logits(reference, tokens, mode=mode)
        np.testing.assert_array_equal(got, want)
        for node in want_state:
            for k in want_state[node]:
                np.testing.assert_array_equal(np.array(got_state[node][k]), np.array(want_state[node][k]))
    # prefill, then steps
    got, got_state = logits(quantized, tokens[:, :30])
    want, want_state = logits(reference, tokens[:, :30])
    np.testing.assert_array_equal(got, want)
    steps = []
    for t in range(30, 37):
        got, got_state = logits(quantized, tokens[:, t:t + 1], got_state, mode="step")
        want, want_state = logits(reference, tokens[:, t:t + 1], want_state, mode="step")
        np.testing.assert_array_equal(got, want)
        steps.append(got)
    # and prefill + steps is the full forward (to the float32 distance between the modes, as for float models)
    full, _ = logits(quantized, tokens)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full[:, 30:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["mxfp4", "mxfp8", "nvfp4"])
def test_floating_point_modes_equal_dequantized_float_to_rounding(mode, on_cpu):
    quantized, reference = pair(XTINY, mode=mode)
    tokens = ids(2, 20, seed=2)
    got, _ = logits(quantized, tokens)
    want, _ = logits(reference, tokens)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert quantized.quantization["mode"] == mode


def test_bfloat16_products_on_the_cpu_accumulate_in_float32(on_cpu):
    """MLX's CPU quantized_matmul sums bfloat16 in bfloat16 (about 10% off on a 4096-wide row); MAD's runs it
    in float32, so the result is the float32 product rounded once."""
    x = mx.random.normal((3, 4096), key=mx.random.key(3)).astype(mx.bfloat16)
    w = mx.random.normal((64, 4096), key=mx.random.key(4)).astype(mx.bfloat16)
    q = QuantSettings(4, 64)
    wq, scales, biases = mx.quantize(w, q.group_size, q.bits)
    w32 = mx.dequantize(wq, scales.astype(mx.float32), biases.astype(mx.float32), q.group_size, q.bits)
    exact = x.astype(mx.float32) @ w32.T
    (got,) = quantized_linear(x, wq, scales, biases, q)
    assert got.dtype == mx.bfloat16
    err = float(mx.abs(got.astype(mx.float32) - exact).max())
    assert err <= 2 ** -8 * float(mx.abs(exact).max()), err  # one bfloat16 rounding


# ----------------------------------------------------------------------------------------- quality
def step_noise(program: Program, floats: dict[str, mx.array], seed: int) -> dict[str, mx.array]:
    """`floats` with every quantized matrix moved by uniform noise in [-s/2, s/2], s its group's step."""
    params, out = program.parameters(), dict(floats)
    key = mx.random.key(seed)
    for name, w in floats.items():
        base = name.rpartition(".")[0]
        if name.endswith(".weight") and f"{base}.scales" in params:
            key, sub = mx.random.split(key)
            step = mx.abs(mx.repeat(params[f"{base}.scales"], settings_of(program.quantization, base)["group_size"],
                                    axis=-1))
            out[name] = w + (mx.random.uniform(shape=w.shape, key=sub) - 0.5) * step
    return out


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_projections_are_within_their_rounding_bound(fuse, on_cpu):
    """Affine quantization maps each group to 2^bits levels a step s apart and rounds to the nearest, but MLX
    puts the group's larger-magnitude end exactly on a level (zero stays exact), which can leave the other
    end up to one step beyond the last level: |w - w_q| <= |s|. A projection's output then moves by at most
    |x| . |s| (soft-caps only shrink differences)."""
    graph = graph_of(XTINY)
    mx.random.seed(5)
    program = Program(graph, fuse=fuse)
    floats = program.parameters()
    quantize_model(program, bits=4, group_size=32)
    tokens = ids(2, 16, seed=6)
    trace = program.trace({"tokens": tokens})
    params = program.parameters()
    checked = 0
    for node in program.nodes:
        if f"{node}.scales" not in params:
            continue
        step = mx.abs(mx.repeat(params[f"{node}.scales"], 32, axis=-1))  # MLX may store a negative scale
        source = graph.g.nodes[node]["inputs"][0]
        if source == "tokens":  # the embedding: each row within a step
            bound, diff = step[tokens] * (1 + 1e-5), mx.abs(trace[node] - floats[f"{node}.weight"][tokens])
        else:
            x = trace[source]
            y = x @ floats[f"{node}.weight"].T
            cap = graph.g.nodes[node]["spec"].softcap
            y = cap * mx.tanh(y / cap) if cap else y
            bound, diff = mx.abs(x) @ step.T, mx.abs(trace[node] - y)
            bound = bound + 1e-5 * (mx.abs(x) @ mx.abs(floats[f"{node}.weight"]).T)  # float32 rounding
        assert bool(mx.all(diff <= bound)), node
        assert float(diff.max()) > 0, node  # it was quantized
        checked += 1
    assert checked == 2 * 8 + 2  # q, k, v, ogate, out_proj and the three ffn projections per block; embedding, head


def test_logits_err_as_much_as_rounding_noise(on_cpu):
    """The error model of rounding to nearest: each weight moved by uniform noise of one step. The quantized
    model's logits are as far from the float model's as the noisy models' are (within a factor 2 of their
    mean distance), and 8 bits are over 8x closer than 4 (the step shrinks 17x)."""
    graph = graph_of(XTINY)
    mx.random.seed(7)
    base = Program(graph)
    floats = base.parameters()
    tokens = ids(2, 32, seed=8)
    want, _ = logits(base, tokens)
    errors = {}
    for bits in (4, 8):
        quantized = Program(graph)
        quantized.load_weights(floats)
        quantize_model(quantized, bits=bits, group_size=32)
        got, _ = logits(quantized, tokens)
        noise = []
        for seed in range(3):
            noisy = Program(graph)
            noisy.load_weights(step_noise(quantized, floats, seed))
            noise.append(np.abs(logits(noisy, tokens)[0] - want).mean())
        errors[bits] = np.abs(got - want).mean()
        assert 0.5 * np.mean(noise) <= errors[bits] <= 2 * np.mean(noise), (bits, errors[bits], noise)
    assert errors[8] * 8 < errors[4], errors


def test_small_gates_stay_float_and_fuse_apart():
    quantized, _ = pair(XTINY, group_size=32)
    config = quantized.quantization
    gates = [n for n in quantized.nodes if n.endswith(("igate_preact", "fgate_preact"))]
    assert config == {"group_size": 32, "bits": 4, "mode": "affine", **{g: False for g in gates}}
    params = quantized.parameters()
    assert all(params[f"{g}.weight"].dtype == mx.float32 and f"{g}.scales" not in params for g in gates)
    groups = quantized.plan()["fuse"]["groups"]
    assert groups[0] == {"input": "backbone.blocks.0.norm_mlstm", "in": 64, "out": [32, 32, 64, 64],
                         "nodes": [f"backbone.blocks.0.mlstm_layer.{m}" for m in ("q", "k", "v", "ogate_preact")],
                         "quantized": {"group_size": 32, "bits": 4, "mode": "affine"}}
    assert groups[1]["nodes"] == gates[:2] and "quantized" not in groups[1]
    assert quantized.plan()["quantization"] == config


def test_fused_quantized_weights_are_stored_once():
    quantized, _ = pair(XTINY, group_size=32)
    fused = quantized.root[FUSED][0]
    assert isinstance(fused, QuantizedFusedLinear) and fused.weight.shape == (192, 64 * 4 // 32)
    stored = dict(tree_flatten(quantized.root.parameters()))
    rows = 0
    for member, width in zip(fused.group.members, fused.group.widths):
        for attr in ("weight", "scales", "biases"):
            assert mx.array_equal(stored[f"{member}.{attr}"], fused[attr][rows:rows + width]).item()
        rows += width
    # a member's array replaced (an update, a checkpoint) is what the next call runs
    q = "backbone.blocks.0.mlstm_layer.q"
    before, _ = logits(quantized, ids(1, 4, seed=9))
    quantized.load_weights({f"{q}.scales": stored[f"{q}.scales"] * 2}, strict=False)
    after, _ = logits(quantized, ids(1, 4, seed=9))
    assert mx.array_equal(quantized.root[FUSED][0].scales[:32], stored[f"{q}.scales"] * 2).item()
    assert not np.array_equal(before, after)


def test_bfloat16_keeps_the_packed_weights():
    quantized, _ = pair(XTINY, group_size=32)
    packed = quantized.parameters()["backbone.blocks.0.mlstm_layer.q.weight"]
    quantized.set_dtype("bfloat16")
    params = quantized.parameters()
    assert params["backbone.blocks.0.mlstm_layer.q.weight"].dtype == mx.uint32
    assert mx.array_equal(params["backbone.blocks.0.mlstm_layer.q.weight"], packed).item()
    assert params["backbone.blocks.0.mlstm_layer.q.scales"].dtype == mx.bfloat16
    assert quantized.root[FUSED][0].scales.dtype == mx.bfloat16
    assert np.isfinite(logits(quantized, ids(1, 3, seed=10))[0]).all()


def test_quantize_errors():
    graph = graph_of(XTINY)
    program = Program(graph)
    with pytest.raises(MadError, match="'backbone.blocks.0.mlstm_layer.qq' is not a projection or embedding of this "
                                       "model; did you mean 'backbone.blocks.0.mlstm_layer.q'"):
        program.quantize({"group_size": 64, "bits": 4, "backbone.blocks.0.mlstm_layer.qq": False})
    with pytest.raises(MadError, match=r"got quantization\['lm_head'\].bits 8$"):
        program.quantize({"group_size": 64, "bits": 4, "lm_head": {"bits": 8, "group_size": 32, "mode": "mxfp4"}})
    with pytest.raises(MadError, match="missing 'bits'"):
        program.quantize({"group_size": 64})
    assert program.quantization is None  # nothing changed
    quantize_model(program, group_size=32)
    with pytest.raises(MadError, match="quantized already"):
        quantize_model(program)


def test_group_size_must_divide_the_inputs():
    program = Program(graph_of(TINY))  # F = 176: the down projections' inputs
    with pytest.raises(MadError) as e:
        quantize_model(program, group_size=32)
    assert str(e.value) == (
        "error: quantization: the group size must divide a projection's input size; it does not for "
        "'blocks.0.ffn.down_proj' (176 inputs, group size 32), 'blocks.1.ffn.down_proj' (176 inputs, group size 32): "
        "mode nvfp4 (group size 16) divides them, or leave them unquantized (a predicate returning False for them, "
        "or false for them in the config)")
    # a predicate leaves them out (mlx-lm's quant_predicate)
    config = quantize_model(program, group_size=32, predicate=lambda path, m: not path.endswith("down_proj"))
    assert config["blocks.0.ffn.down_proj"] is False and "lm_head" not in config


# ----------------------------------------------------------------------------------------- files and the CLI
def test_convert_load_save_load(tmp_path, monkeypatch, capsys):
    out = tmp_path / "q4"
    code, stdout, err = cli(monkeypatch, capsys, "convert", XTINY, "-o", out, "-q", "--q-group-size", "32")
    assert code == 0, err
    assert "bits per weight" in stdout
    meta = json.loads((out / "mad.json").read_text())
    assert meta["quantization"]["bits"] == 4 and meta["quantization"]["group_size"] == 32
    model, tok = mad.load(out)
    assert model.program.quantization == meta["quantization"] and tok.is_bytes
    again = mad.save(model, tmp_path / "again")
    first, second = mx.load(str(out / "model.safetensors")), mx.load(str(again / "model.safetensors"))
    assert first.keys() == second.keys()
    assert all(first[k].dtype == second[k].dtype and mx.array_equal(first[k], second[k]).item() for k in first)
    assert json.loads((again / "mad.json").read_text())["quantization"] == meta["quantization"]
    reloaded, _ = mad.load(again)
    tokens = ids(1, 9, seed=11)
    np.testing.assert_array_equal(np.array(model(tokens)[0]), np.array(reloaded(tokens)[0]))
    # the source's fresh weights (seed 0), quantized: what convert wrote
    mx.random.seed(0)
    source, _ = mad.load(XTINY)
    quantize_model(source, group_size=32)
    np.testing.assert_array_equal(np.array(source(tokens)[0]), np.array(model(tokens)[0]))
    # the other commands read it
    code, stdout, err = cli(monkeypatch, capsys, "run", out, "-p", "Hi", "-m", "3")
    assert code == 0 and "Generation: 3 tokens" in stdout, err
    code, stdout, err = cli(monkeypatch, capsys, "bench", out, "-p", "4", "-g", "2", "-n", "1")
    assert code == 0 and "Medians" in stdout, err
    with pytest.raises(MadError, match="the model is quantized, and its source format has no quantized layout"):
        mad.save(model, tmp_path / "hf", format="source")


def test_per_module_settings_are_recorded_and_loaded(tmp_path, on_cpu):
    """mlx-lm's per-layer overrides: a predicate's dict gives a module settings of its own; the config records
    them and loading quantizes that module so (here the head at 8 bits beside 4-bit projections)."""
    mx.random.seed(12)
    model, _ = mad.load(XTINY)
    config = quantize_model(model, group_size=32, predicate=lambda path, m: {"bits": 8, "group_size": 64}
                            if path == "lm_head" else m.weight.shape[0] >= 32)
    assert config["lm_head"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    params = model.program.parameters()
    assert params["lm_head.weight"].shape == (256, 64 * 8 // 32) and params["lm_head.scales"].shape == (256, 1)
    reloaded, _ = mad.load(mad.save(model, tmp_path / "mixed"))
    assert reloaded.program.quantization == config
    tokens = ids(1, 6, seed=13)
    np.testing.assert_array_equal(np.array(reloaded(tokens)[0]), np.array(model(tokens)[0]))


def test_convert_a_hugging_face_folder(tmp_path, monkeypatch, capsys):
    out = tmp_path / "hf-q8"
    code, _, err = cli(monkeypatch, capsys, "convert", HF_TINY, "-o", out, "-q", "--q-bits", "8",
                       "--q-group-size", "32")
    assert code == 0, err
    model, tok = mad.load(out)
    assert (out / "tokenizer.json").is_file() and tok.eos_token_ids == (2,)
    source, _ = mad.load(HF_TINY)
    quantize_model(source, bits=8, group_size=32)
    tokens = mx.array([tok.encode("Hello there")])
    np.testing.assert_array_equal(np.array(model(tokens)[0]), np.array(source(tokens)[0]))


def test_convert_without_q_converts_the_dtype(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bf16"
    code, _, err = cli(monkeypatch, capsys, "convert", XTINY, "-o", out, "--dtype", "bfloat16")
    assert code == 0, err
    meta = json.loads((out / "mad.json").read_text())
    assert meta["dtype"] == "bfloat16" and "quantization" not in meta
    assert {v.dtype for v in mx.load(str(out / "model.safetensors")).values()} == {mx.bfloat16}


@pytest.mark.parametrize("args,message", [
    (["-q", "--q-mode", "mxfp4", "--q-bits", "8"],
     "error: mxfp4 quantization takes --q-bits 4 and --q-group-size 32 (what mx.quantize accepts), got --q-bits 8"),
    (["--q-bits", "4"], "error: --q-bits sets how to quantize: add -q to quantize"),
    (["-q", "--dtype", "float64"], "error: --dtype must be one of float32, bfloat16, float16, got 'float64'"),
], ids=["mode-bits", "no-q", "dtype"])
def test_convert_bad_flags(args, message, tmp_path, monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "convert", XTINY, "-o", tmp_path / "out", *args)
    assert code == 2 and err.strip() == message and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_convert_bad_source_and_target(tmp_path, monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "convert", tmp_path / "missing", "-o", tmp_path / "out", "-q")
    assert code == 2 and f"no such file or folder: {tmp_path / 'missing'}" in err and "Traceback" not in err
    target = tmp_path / "taken"
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    code, _, err = cli(monkeypatch, capsys, "convert", XTINY, "-o", target, "-q")
    assert code == 2 and err.strip() == (f"error: -o {target}: exists; mad convert writes a new folder (give another "
                                         "path, or remove it first)")
    assert (target / "mine.txt").read_text() == "keep" and len(list(target.iterdir())) == 1
    # a group size that does not divide a projection's inputs: the nodes named, nothing written
    code, _, err = cli(monkeypatch, capsys, "convert", HF_TINY, "-o", tmp_path / "hf", "-q")
    assert code == 2 and "Traceback" not in err
    assert ("it does not for 'backbone.blocks.0.ffn.proj_down' (96 inputs, group size 64), "
            "'backbone.blocks.1.ffn.proj_down' (96 inputs, group size 64): group size 32 divides them") in err
    assert not (tmp_path / "hf").exists()


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quantized") / "q4"
    mx.random.seed(0)
    model, tok = mad.load(XTINY)
    quantize_model(model, group_size=32)
    return mad.save(model, out)


def edited(src: Path, dst: Path, meta=None, weights=None) -> Path:
    """A copy of the checkpoint folder `src` with mad.json's entries and some weights replaced."""
    import shutil

    shutil.copytree(src, dst)
    if meta is not None:
        data = json.loads((dst / "mad.json").read_text())
        data.update(meta)
        (dst / "mad.json").write_text(json.dumps(data))
    if weights is not None:
        tensors = dict(mx.load(str(src / "model.safetensors")))
        tensors.update(weights)
        mx.save_safetensors(str(dst / "model.safetensors"), tensors)
    return dst


def test_loading_checks_the_config_and_the_packed_weights(converted, tmp_path):
    config = json.loads((converted / "mad.json").read_text())["quantization"]
    bad = edited(converted, tmp_path / "bits", meta={"quantization": {**config, "bits": 7}})
    with pytest.raises(MadError) as e:
        mad.load(bad)
    assert str(e.value) == (f"{bad / 'mad.json'}: error: affine quantization takes quantization.bits 2, 3, 4, 5, 6 "
                            "or 8 and quantization.group_size 32, 64 or 128 (what mx.quantize accepts), got "
                            "quantization.bits 7")
    q = "backbone.blocks.0.mlstm_layer.q"
    bad = edited(converted, tmp_path / "shape", meta={"quantization": {**config, "group_size": 64}})
    with pytest.raises(MadError, match=rf"weight '{q}.scales' has shape \(32, 2\), the model expects \(32, 1\)") as e:
        mad.load(bad)
    assert "4-bit affine, group size 64" in str(e.value)
    weights = mx.load(str(converted / "model.safetensors"))
    bad = edited(converted, tmp_path / "dtype", weights={f"{q}.weight": weights[f"{q}.weight"].astype(mx.float32)})
    with pytest.raises(MadError, match=rf"weight '{q}.weight' has dtype mlx.core.float32, the quantized model "
                                       "expects mlx.core.uint32"):
        mad.load(bad)
    bad = edited(converted, tmp_path / "float", meta={"quantization": None})
    with pytest.raises(MadError, match=f"unexpected weight '{q}.scales'"):
        mad.load(bad)


def test_convert_a_quantized_model(converted, tmp_path, monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "convert", converted, "-o", tmp_path / "again", "-q")
    assert code == 2 and err.strip() == f"error: {converted} is quantized already; convert the unquantized model"
    code, _, err = cli(monkeypatch, capsys, "convert", converted, "-o", tmp_path / "bf16", "--dtype", "bfloat16")
    assert code == 0, err
    meta = json.loads((tmp_path / "bf16" / "mad.json").read_text())
    assert meta["dtype"] == "bfloat16" and meta["quantization"] == json.loads((converted / "mad.json").read_text())[
        "quantization"]


def test_training_a_quantized_model_is_refused(converted, tmp_path):
    """mad train trains floating-point weights: a quantized checkpoint is refused before any step, and -o
    stays untouched."""
    from mad.train import TrainConfig, train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 200)
    out = tmp_path / "run"
    with pytest.raises(MadError, match="the model is quantized .*mad convert -q"):
        train(converted, corpus, out, TrainConfig(steps=2, batch=2, seq=16), echo=None, progress=False)
    assert not out.exists()
