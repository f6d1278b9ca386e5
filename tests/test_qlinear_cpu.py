"""The CPU variant of `quantized_linear` (kernels/qlinear.py): a prompt-shaped call unpacks the matrix once
and runs the float32 BLAS product (MLX's CPU `quantized_matmul` took 50-70x as long at 256 rows); the
unpacking is bit-equal to `mx.dequantize`, the results equal the reference's to float32 rounding, gradients
reach x and the bias, and decode-shaped calls keep the reference."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mad
from mad.kernels.qlinear import PROMPT_ROWS, dequantized, quantized_linear, quantized_linear_cpu
from mad.kernels.registry import Unsupported, dispatch, use_reference

from test_qlinear_kernel import packed_matrix

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_unpacking_is_mx_dequantize(bits, group_size, dtype, on_cpu):
    m = packed_matrix(48, 256, bits, group_size, dtype)
    want = mx.dequantize(m.weight, m.scales.astype(mx.float32), m.biases.astype(mx.float32),
                         group_size=group_size, bits=bits)
    assert mx.array_equal(dequantized(m), want).item()


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_prompt_calls_equal_the_reference(bits, dtype, on_cpu):
    """Parts, caps and a bias; bf16 and float32 inputs; 2/4/8 bits unpacked by shifts, 3/6 by mx.dequantize."""
    rng = np.random.default_rng(bits)
    m = packed_matrix(96, 128, bits, 64, dtype)
    x = mx.array(rng.standard_normal((2, 16, 128)).astype(np.float32)).astype(dtype)
    bias = mx.array(rng.standard_normal(96).astype(np.float32)).astype(dtype)
    got = quantized_linear_cpu(x, m, bias, (32, 80), (None, 3.0, None))
    want = quantized_linear(x, m, bias, (32, 80), (None, 3.0, None))
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == dtype and g.shape == w.shape
        g, w = np.array(g.astype(mx.float32)), np.array(w.astype(mx.float32))
        tol = 1e-5 if dtype == mx.float32 else 1e-2  # float32 sums in another order; bf16: one rounding apart
        np.testing.assert_allclose(g, w, rtol=0, atol=tol * np.abs(w).max())


@pytest.mark.parametrize("shape", [(1, 1, 128), (32, 1, 128), (4, 128), (1, PROMPT_ROWS - 1, 128)])
def test_decode_shaped_calls_keep_the_reference(shape, on_cpu):
    with pytest.raises(Unsupported):
        quantized_linear_cpu(mx.zeros(shape), packed_matrix(64, 128, 4, 64, mx.float32))


def test_gradients_reach_x_and_the_bias(on_cpu):
    m = packed_matrix(64, 128, 4, 64, mx.float32)
    x = mx.array(np.random.default_rng(1).standard_normal((1, 12, 128)).astype(np.float32))
    bias = mx.zeros((64,))

    def loss(x, b):
        return (dispatch("quantized_linear")(x, m, b)[0] ** 2).sum()

    got = mx.grad(loss, argnums=(0, 1))(x, bias)
    with use_reference():
        want = mx.grad(loss, argnums=(0, 1))(x, bias)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.array(g), np.array(w), rtol=1e-4, atol=1e-5 * float(mx.abs(w).max()))


def test_a_quantized_model_reads_a_prompt_as_the_reference(on_cpu):
    from mad.quantize import quantize_model

    model, _ = mad.load(ROOT / "topologies" / "xlstm-tiny.yaml")
    quantize_model(model, bits=4, group_size=32)
    tokens = mx.array(np.random.default_rng(2).integers(0, model.vocab_size, (1, 40)), dtype=mx.int32)
    got, state = model(tokens)
    with use_reference():
        model.program.clear_compiled()
        want, want_state = model(tokens)
    model.program.clear_compiled()
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=0, atol=1e-4 * float(mx.abs(want).max()))
    for node, entries in want_state.items():
        for name, a in entries.items():
            np.testing.assert_allclose(np.array(state[node][name]), np.array(a), rtol=1e-4,
                                       atol=1e-4 * max(1.0, float(mx.abs(a).max())))
