"""Random inputs to the Python API and the CLI end in success or a MadError (exit code 2 on the CLI):
no other exception, no crash, whatever the token arrays (dtype, shape, huge or negative ids), sampler
arguments (NaN, inf, negative), state dicts (wrong shapes, dtypes, keys, types) or flags.

Small models (topologies/examples/tiny.yaml, topologies/xlstm-tiny.yaml), derandomized, bounded examples.
`Program.__call__` checks the rank and dtype of token inputs but not their values (that is
`LanguageModel`'s check, where the vocabulary is known), so its fuzz keeps ids inside the vocabulary.
"""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import mad
from mad.errors import MadError
from mad.sampling import make_sampler
from mad.tokenizers import ByteTokenizer
from mad.loading import load, load_state_file, save_state_file

from yaml_files import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "topologies" / "examples" / "tiny.yaml"
XTINY = ROOT / "topologies" / "xlstm-tiny.yaml"

def fuzz(max_examples: int = 60) -> settings:
    return settings(derandomize=True, deadline=None, database=None, max_examples=max_examples,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


FUZZ = fuzz()


@pytest.fixture(scope="module")
def xmodel():
    return load(XTINY, compile="none")[0]  # uncompiled: each odd shape would otherwise compile anew


DTYPES = {"int8": mx.int8, "int16": mx.int16, "int32": mx.int32, "int64": mx.int64, "uint8": mx.uint8,
          "uint32": mx.uint32, "uint64": mx.uint64, "float32": mx.float32, "float16": mx.float16,
          "bfloat16": mx.bfloat16, "bool": mx.bool_}
IDS = st.one_of(st.integers(0, 300), st.integers(-3, 3), st.integers(-2**40, 2**40), st.sampled_from([2**31 - 1, 2**63 - 1,
                                                                                                    -2**63, 2**32]))


@st.composite
def token_arrays(draw, max_value=None):
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.lists(st.integers(0, 3), min_size=ndim, max_size=ndim)))
    values = np.array(draw(st.lists(IDS if max_value is None else st.integers(0, max_value - 1),
                                    min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))),
                      dtype=object).reshape(shape)
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    if dtype.startswith("float") or dtype == "bfloat16":
        arr = mx.array(values.astype(np.float64).astype(np.float32)).astype(DTYPES[dtype])
    elif dtype == "bool":
        arr = mx.array(values.astype(bool))
    else:
        info = np.iinfo(np.dtype(dtype))  # values the dtype cannot hold wrap around, as a C cast would
        span = int(info.max) - int(info.min) + 1
        wrapped = [(int(v) - int(info.min)) % span + int(info.min) for v in values.reshape(-1)]
        arr = mx.array(np.array(wrapped, dtype=np.dtype(dtype)).reshape(shape))
    return arr


def ok_or_mad(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except MadError:
        return None


@FUZZ
@given(tokens=token_arrays())
def test_fuzz_model_tokens(xmodel, tokens):
    out = ok_or_mad(xmodel, tokens)
    if out is not None:
        logits, state = out
        mx.eval(logits, state)
        assert logits.shape == (*tokens.shape, xmodel.vocab_size)
        assert int(tokens.min()) >= 0 and int(tokens.max()) < xmodel.vocab_size
    out = ok_or_mad(xmodel.prefill, tokens, step_size=2)
    if out is not None:
        mx.eval(out)


@FUZZ
@given(tokens=token_arrays(max_value=256))
def test_fuzz_program_tokens(xmodel, tokens):
    out = ok_or_mad(xmodel.program, tokens)
    if out is not None:
        mx.eval(out)
    out = ok_or_mad(xmodel.program, {"tokens": tokens.tolist() if tokens.ndim else tokens.item()})
    if out is not None:
        mx.eval(out)


@FUZZ
@given(prompt=st.one_of(st.lists(IDS, max_size=4), st.text(max_size=6), st.just(b"bytes"), st.integers(),
                        st.lists(st.sampled_from([1.5, None, "a", True]), min_size=1, max_size=2)))
def test_fuzz_prompts(xmodel, prompt):
    out = ok_or_mad(lambda: list(mad.stream_generate(xmodel, ByteTokenizer(), prompt, max_tokens=1)))
    if out is not None:
        assert len(out) == 1


NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5), st.sampled_from([0, 1, 0.5]),
                    st.text(max_size=2), st.none(), st.booleans())


@FUZZ
@given(args=st.fixed_dictionaries({}, optional={
    "temp": NUMBERS, "top_p": NUMBERS, "top_k": NUMBERS, "min_p": NUMBERS, "repetition_penalty": NUMBERS,
    "repetition_context": NUMBERS}), max_tokens=st.one_of(st.integers(-2, 3), st.floats(0, 2), st.none()))
def test_fuzz_sampling(xmodel, args, max_tokens):
    out = ok_or_mad(lambda: list(mad.stream_generate(xmodel, ByteTokenizer(), [1, 2, 3], max_tokens=max_tokens, **args)))
    if out is not None:
        assert len(out) == max(max_tokens, 1)
        assert all(r.token is None or 0 <= r.token < xmodel.vocab_size for r in out)
    sampler_args = {k: v for k, v in args.items() if k in ("temp", "top_p", "top_k", "min_p")}
    sampler = ok_or_mad(make_sampler, **sampler_args)
    if sampler is not None:
        token = sampler(mx.array([[0.0, 1.0, float("nan"), -float("inf"), 3.0]]))
        assert 0 <= int(token.item()) < 5


@st.composite
def states(draw, model):
    state = {n: dict(e) for n, e in model.init_state(draw(st.integers(1, 2))).items()}
    for _ in range(draw(st.integers(0, 3))):
        node = draw(st.sampled_from(sorted(state)))
        kind = draw(st.sampled_from(["shape", "dtype", "drop", "add", "type", "node", "batch", "nan"]))
        name = draw(st.sampled_from(sorted(state[node]) or ["C"]))
        arr = state[node].get(name)
        if kind == "shape":
            shape = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=5)))
            state[node][name] = mx.zeros(shape)
        elif kind == "dtype" and isinstance(arr, mx.array):
            state[node][name] = arr.astype(draw(st.sampled_from([mx.int32, mx.float16, mx.bool_])))
        elif kind == "drop":
            state[node].pop(name, None)
        elif kind == "add":
            state[node][draw(st.sampled_from(["x", "C", "zz"]))] = mx.zeros((1,))
        elif kind == "type":
            state[node][name] = draw(st.sampled_from([None, 3, [1.0], np.zeros((1, 4))]))
        elif kind == "node":
            state[draw(st.sampled_from(["nope", node + "x"]))] = {}
        elif kind == "batch" and isinstance(arr, mx.array) and arr.ndim:
            state[node][name] = mx.zeros((arr.shape[0] + 1, *arr.shape[1:]))
        elif kind == "nan" and isinstance(arr, mx.array):
            state[node][name] = mx.full(arr.shape, float("nan"))
    if draw(st.booleans()) and draw(st.booleans()):
        return draw(st.sampled_from([[], None, 5, {"a": 1}]))
    return state


@FUZZ
@given(data=st.data())
def test_fuzz_states(xmodel, tmp_path_factory, data):
    state = data.draw(states(xmodel))
    batch = data.draw(st.integers(1, 2))
    tokens = mx.array([[1, 2]] * batch)
    out = ok_or_mad(xmodel, tokens, state=state)
    if out is not None:
        mx.eval(out)
    out = ok_or_mad(lambda: list(mad.stream_generate(xmodel, ByteTokenizer(), [1, 2], max_tokens=1, state=state)))
    path = tmp_path_factory.mktemp("s") / "state"
    if ok_or_mad(save_state_file, path, state) is not None or path.exists():
        loaded = ok_or_mad(load_state_file, path, xmodel)
        if loaded is not None:
            mx.eval(xmodel(mx.array([[1]] * next(iter(loaded.values()))["C"].shape[0]), state=loaded))


# ----------------------------------------------------------------------------------------- the CLI
def flag_values(tmp: Path) -> dict:
    (tmp / "bad.txt").write_bytes(b"\xff\xfe bad")
    (tmp / "good.txt").write_text("héllo")
    (tmp / "junk.state").write_bytes(b"\x00" * 16)
    return {
        "--max-tokens": ["0", "1", "2", "-1", "abc", "", "1.5"],
        "--temp": ["0", "0.7", "-1", "nan", "inf", "-inf", "1e309", "x"],
        "--top-p": ["1", "0.5", "0", "2", "-0.1", "nan"],
        "--top-k": ["0", "3", "-5", "1.5"],
        "--min-p": ["0", "0.1", "1", "2", "-1", "nan"],
        "--repetition-penalty": ["1", "1.3", "0", "-1", "inf"],
        "--seed": ["0", "7", "-1", str(2**64), str(2**64 - 1), "x"],
        "--dtype": ["float32", "bfloat16", "float16", "float64", "int8", ""],
        "--device": ["cpu", "gpu", "tpu", ""],
        "--prompt": ["Hi", "", "é", "-"],
        "--prompt-ids": ["1,2", "1,300", "-1", ",", "x", "99999999999999999999999"],
        "--prompt-file": [str(tmp / "bad.txt"), str(tmp / "good.txt"), str(tmp / "missing.txt"), str(tmp)],
        "--save-state": [str(tmp / "out.state"), str(tmp), str(tmp / "bad.txt" / "x"), str(tmp / "new" / "s")],
        "--load-state": [str(tmp / "out.state"), str(tmp / "junk.state"), str(tmp / "nope"), str(tmp)],
        "--set": ["dims.D=32", "garbage", "dims.V=8", "nodes.lm_head.softcap=5", "dims.D=-1"],
        "--tokenizer": ["bytes", str(tmp / "bad.txt"), str(tmp / "nope.json")],
        "--tf32": [None],
        "--no-memory-check": [None],
        "--trust-plugins": [None],
    }


@fuzz(40)
@given(data=st.data())
def test_fuzz_cli_run(tmp_path_factory, monkeypatch, capsys, data):
    tmp = tmp_path_factory.mktemp("cli")
    values = flag_values(tmp)
    model = data.draw(st.sampled_from([TINY, XTINY]))
    args = ["run", str(model)]
    for flag in data.draw(st.lists(st.sampled_from(sorted(values)), max_size=3, unique=True)):
        value = data.draw(st.sampled_from(values[flag]))
        args += [flag] if value is None else [flag, value]
    if "--max-tokens" not in args:
        args += ["--max-tokens", "2"]
    monkeypatch.setenv("MLX_ENABLE_TF32", "0")  # --tf32 sets it for the process: restored after each test
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data.draw(st.sampled_from([b"hi", b"\xff", b""])))))
    previous = mx.default_device()
    try:
        code, out, err = cli(monkeypatch, capsys, *args)
    finally:
        mx.set_default_device(previous)
    event(f"exit {code}")
    assert code in (0, 2), (args, err)
    assert "Traceback" not in err, (args, err)


@fuzz(20)
@given(data=st.data())
def test_fuzz_cli_other_commands(tmp_path_factory, monkeypatch, capsys, data):
    tmp = tmp_path_factory.mktemp("cli")
    command = data.draw(st.sampled_from(["bench", "chat", "build"]))
    args = [command, str(data.draw(st.sampled_from([TINY, XTINY])))]
    if command == "bench":
        for flag, choices in (("-p", ["1", "3", "0", "-2", "x"]), ("-g", ["0", "2", "-1"]), ("-n", ["1", "0"]),
                              ("-b", ["1", "2", "0"]), ("--prefill-step", ["1", "2", "0"]),
                              ("--kernels", ["auto", "reference", "fast"]), ("--dtype", ["float16", "x"])):
            if data.draw(st.booleans()):
                args += [flag, data.draw(st.sampled_from(choices))]
        args += ["-n", "1", "-p", "2", "-g", "1"] if "-n" not in args else []
    elif command == "chat":
        for flag, choices in (("-m", ["0", "1", "-1"]), ("--temp", ["0", "nan"]), ("--top-p", ["1", "3"]),
                              ("--save-state", [str(tmp / "c"), str(tmp)]), ("--tokenizer", ["bytes", "nope"])):
            if data.draw(st.booleans()):
                args += [flag, data.draw(st.sampled_from(choices))]
        if "-m" not in args:
            args += ["-m", "1"]
        text = data.draw(st.lists(st.sampled_from([b"hi\n", b"\xff\n", b"\n", b"q\n"]), max_size=3))
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"".join(text))))
    else:
        (tmp / "mine").mkdir()
        (tmp / "mine" / "x").write_text("x")
        (tmp / "file").write_text("x")
        args += ["-o", data.draw(st.sampled_from([str(tmp / "o"), str(tmp / "mine"), str(tmp / "file"),
                                                  str(tmp / "file" / "x"), "."]))]
    code, out, err = cli(monkeypatch, capsys, *args)
    event(f"{command} exit {code}")
    assert code in (0, 2), (args, err)
    assert "Traceback" not in err, (args, err)
    if command == "build":
        assert (tmp / "mine" / "x").read_text() == "x" and (tmp / "file").read_text() == "x"
