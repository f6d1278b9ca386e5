"""`mad.inference()`: calls traced inside it run the kernel variants bare (no custom function, so no graph
node around each kernel call of a decode step), with the same numbers; outside it everything stays
differentiable; the program keeps one compiled function for each."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mad
from mad.kernels.registry import gradients

ROOT = Path(__file__).resolve().parents[1]
HF_TINY = ROOT / "tests" / "fixtures" / "hf-tiny"


def custom_nodes(tmp_path: Path, *arrays: mx.array) -> int:
    """The custom-function nodes (`CustomTransforms`) in the graph of `arrays`."""
    dot = tmp_path / "graph.dot"
    mx.export_to_dot(str(dot), *arrays)
    return len(re.findall(r'label ="CustomTransforms', dot.read_text()))


def test_same_numbers_fewer_nodes(tmp_path, on_cpu):
    model, _ = mad.load(HF_TINY)
    tokens = mx.array([[5, 6, 7]], dtype=mx.int32)
    _, state = model(tokens)
    step = mx.array([[9]], dtype=mx.int32)
    mx.eval(state)
    plain = model(step, state)
    with mad.inference():
        assert not gradients()
        bare = model(step, state)
    assert gradients()
    leaves = lambda out: [out[0], *(a for e in out[1].values() for a in e.values())]  # noqa: E731
    # (before anything is evaluated: an evaluated array keeps no graph)
    assert custom_nodes(tmp_path, *leaves(plain)) > 0  # the CPU linear and activations carry their own gradients
    assert custom_nodes(tmp_path, *leaves(bare)) == 0
    assert mx.array_equal(plain[0], bare[0]).item()
    for node, entries in plain[1].items():
        for name, a in entries.items():
            assert mx.array_equal(a, bare[1][node][name]).item()
    keys = set(model.program._compiled)
    assert {k[-1] for k in keys} == {True, False}  # one compiled function each, by `gradients()`


def test_gradients_outside_still_work(on_cpu):
    """A model used inside `inference()` first still trains outside it (its own compiled function)."""
    model, _ = mad.load(HF_TINY)
    x = mx.array(np.random.default_rng(0).integers(0, model.vocab_size, (2, 8)), dtype=mx.int32)
    with mad.inference():
        mx.eval(model(x))

    def loss(m, x):
        return nn.losses.cross_entropy(m(x[:, :-1])[0], x[:, 1:]).mean()

    value, grads = nn.value_and_grad(model, loss)(model, x)
    mx.eval(value, grads)
    assert np.isfinite(value.item())


def test_the_switch_is_per_thread():
    seen = {}
    with mad.inference():
        t = threading.Thread(target=lambda: seen.setdefault("other", gradients()))
        t.start()
        t.join()
        seen["here"] = gradients()
    assert seen == {"other": True, "here": False} and gradients()


@pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX with CUDA (the device kernels, folds)")
@pytest.mark.parametrize("bits", [None, 4])
def test_same_numbers_on_the_gpu(bits):
    """The device kernels bare and wrapped (decode step, bf16 and 4-bit, folds on): the same bits."""
    model, _ = mad.load(ROOT / "topologies" / "xlstm-7b.yaml", dtype="bfloat16",
                        overrides=["dims.D=512", "dims.L=2", "dims.NH=4", "dims.V=512"])
    if bits:
        from mad.quantize import quantize_model
        quantize_model(model, bits=bits, group_size=64)
    _, state = model(mx.array([[5, 6, 7]], dtype=mx.int32))
    step = mx.array([[9]], dtype=mx.int32)
    plain = model(step, state)
    with mad.inference():
        bare = model(step, state)
    assert mx.array_equal(plain[0], bare[0]).item()
    for node, entries in plain[1].items():
        for name, a in entries.items():
            assert mx.array_equal(a, bare[1][node][name]).item(), (node, name)
