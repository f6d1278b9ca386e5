"""The device kernels' bodies run on the CPU (backends/host.py: one thread per GPU thread, CUDA's warp sums):
their indexing, barriers, row splits, staging and folds checked against the references on a machine without
a GPU. Small shapes (a thread per GPU thread is slow); skipped without a C++20 compiler."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mad.backends import host
from mad.kernels import mlstm_device
from mad.kernels.device import DeviceKernel
from mad.kernels.fold import folded_linear, head_norm_gate
from mad.kernels.linear_device import folded_linear_device
from mad.kernels.mlstm import mlstm_step
from mad.kernels.norm_device import head_norm_gate_device
from mad.kernels.qlinear import QuantizedMatrix
from mad.kernels.qlinear_device import _launch as quantized_launch

pytestmark = pytest.mark.skipif(not host.available(), reason="needs a C++20 compiler (g++ or CXX)")
NAN = float("nan")


def rand(shape, seed, scale=1.0, dtype=mx.float32) -> mx.array:
    return mx.array(np.random.default_rng(seed).normal(0, scale, shape).astype(np.float32)).astype(dtype)


def err(got, want) -> float:
    got, want = (np.array(a.astype(mx.float32), np.float64) for a in (got, want))
    assert np.isfinite(got).all(), "NaN in the output: an element left unwritten"
    return float(np.abs(got - want).max() / np.abs(want).max())


def step_inputs(B=2, NH=2, DQK=40, DV=72):
    """bf16 q, k, v and gates, a float32 state; DQK = 40 splits unevenly in 3."""
    q, k, v = (rand((B, NH, 1, d), s, dtype=mx.bfloat16) for s, d in ((0, DQK), (1, DQK), (2, DV)))
    i, f = rand((B, NH, 1), 3, 2.0, mx.bfloat16), (rand((B, NH, 1), 4) + 2).astype(mx.bfloat16)
    state = (rand((B, NH, DQK, DV), 5), rand((B, NH, DQK), 6), rand((B, NH), 7))
    return (q, k, v, i, f), state


@pytest.mark.parametrize("splits", [1, 3, 4])
def test_mlstm_step_body_with_its_rows_split(splits):
    (q, k, v, i, f), state = step_inputs()
    h, (C, n, m) = mlstm_device.mlstm_step_device(q, k, v, i, f, state, backend="host", poison=NAN, splits=splits)
    want_h, (want_C, want_n, want_m) = mlstm_step(q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32),
                                                  i, f, state)
    assert h.dtype == mx.bfloat16 and err(h, want_h) < 1e-2
    for a, b in ((C, want_C), (n, want_n), (m, want_m)):
        assert a.dtype == mx.float32 and err(a, b) < 1e-6


def fused_views(arrays: list) -> list:
    """Each (B, 1, n) array as a slice of one concatenation along the last axis: the views of a fused
    projection's output that a decode step hands on."""
    fused = mx.concatenate(arrays, axis=-1)
    ends = np.cumsum([a.shape[-1] for a in arrays]).tolist()
    return [fused[..., e - a.shape[-1]:e] for a, e in zip(arrays, ends)]


@pytest.mark.parametrize("B,splits", [(1, 1), (2, 1), (1, 3)])
def test_mlstm_step_body_in_the_layers_layout(B, splits):
    """q, k, v, i, f as slices of one fused projection (B, 1, N), as a decode step hands them on, with
    `heads`: the head-major call's bits, h as (B, 1, NH*DV) (the body indexes flat memory), row splits too."""
    (q, k, v, i, f), state = step_inputs(B=B)
    NH, DV = q.shape[1], v.shape[-1]
    views = fused_views([x.reshape(B, 1, -1) for x in (q, k, v, i, f)])
    h, new = mlstm_device.mlstm_step_device(*views, state, heads=NH, backend="host", poison=NAN, splits=splits)
    want_h, want = mlstm_device.mlstm_step_device(q, k, v, i, f, state, backend="host", splits=splits)
    assert h.shape == (B, 1, NH * DV)
    assert np.array_equal(np.array(h.astype(mx.float32)), np.array(want_h.astype(mx.float32).reshape(B, 1, -1)))
    for a, b in zip(new, want):
        assert np.array_equal(np.array(a), np.array(b))


def test_splits_below_one_are_refused_before_any_launch():
    (q, k, v, i, f), state = step_inputs()
    with pytest.raises(ValueError, match="splits must be 1 or more"):
        mlstm_device.mlstm_step_device(q, k, v, i, f, state, backend="host", splits=0)


def test_a_broken_body_fails_here():
    """The emulation runs the body's own indices: a split that skips its last row is caught."""
    broken = DeviceKernel("mad_mlstm_step_broken", mlstm_device.STEP_KERNEL.inputs, mlstm_device.STEP_KERNEL.outputs,
                          mlstm_device.STEP_BODY.replace("(split + 1) * ROWS)", "(split + 1) * ROWS - 1)"))
    saved = mlstm_device.STEP_KERNEL
    (q, k, v, i, f), state = step_inputs()
    try:
        mlstm_device.STEP_KERNEL = broken
        _, (C, _, _) = mlstm_device.mlstm_step_device(q, k, v, i, f, state, backend="host", splits=3, poison=NAN)
    finally:
        mlstm_device.STEP_KERNEL = saved
    _, (want_C, _, _) = mlstm_step(q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32), i, f, state)
    C = np.array(C)
    assert broken.body != mlstm_device.STEP_BODY and not np.allclose(C, np.array(want_C), atol=1e-3, equal_nan=False)


@pytest.mark.parametrize("dtype,tol", [(mx.float32, 1e-6), (mx.bfloat16, 1e-2)])
@pytest.mark.parametrize("offset,bias,act", [(0.0, False, "sigmoid"), (1.0, True, "silu")])
def test_head_norm_gate_body(dtype, tol, offset, bias, act):
    heads, DH, rows = 4, 96, 3
    D = heads * DH
    x, o = rand((rows, 1, D), 0, 3.0, dtype) + 1, rand((rows, 1, D), 1, dtype=dtype)
    w, b = rand((D,), 2, dtype=dtype), rand((D,), 3, dtype=dtype) if bias else None
    got = head_norm_gate_device(o, x, w, b, eps=1e-6, heads=heads, offset=offset, act=act, backend="host", poison=NAN)
    f32 = lambda a: None if a is None else a.astype(mx.float32)  # noqa: E731
    want = head_norm_gate(f32(o), f32(x), f32(w), f32(b), eps=1e-6, heads=heads, offset=offset, act=act)
    assert got.dtype == dtype and err(got, want) < tol


@pytest.mark.parametrize("N", [16, 300])
def test_float_kernel_folds_a_narrow_units_norm_only(N):
    """FOLD_NORM off (the default): a unit of up to NORM_FOLD_WIDTH features (an mLSTM layer's gates beside a
    quantized q|k|v|o) takes its norm in the float kernel, to the reference's figure; a wider one leaves it."""
    from mad.kernels import linear_device
    from mad.kernels.registry import Unsupported

    assert not linear_device.FOLD_NORM and 16 <= linear_device.NORM_FOLD_WIDTH < 300
    K = 256
    w, x, g = rand((N, K), 0, 0.05, mx.bfloat16), rand((1, 1, K), 1, dtype=mx.bfloat16), rand((K,), 2, dtype=mx.bfloat16)
    if N > linear_device.NORM_FOLD_WIDTH:
        with pytest.raises(Unsupported, match="NORM_FOLD_WIDTH"):
            folded_linear_device(x, w, None, (), (None,), norm=(g, 1e-6), backend="host")
        return
    (got,) = folded_linear_device(x, w, None, (), (None,), norm=(g, 1e-6), backend="host", poison=NAN)
    f32 = lambda a: a.astype(mx.float32)  # noqa: E731
    (want,) = folded_linear(f32(x), f32(w), None, (), (None,), norm=(f32(g), 1e-6))
    assert err(got, want) < 1e-2


@pytest.mark.parametrize("shared_x", [False, True])
@pytest.mark.parametrize("fold", ["norm+pair", "norm+residual"])
def test_float_linear_body_staged_or_not(monkeypatch, shared_x, fold):
    """The float decode kernel with its norm folded (FOLD_NORM) and x staged in shared memory or read by each
    warp, a pair or a residual: the same figure as the float32 reference."""
    from mad.kernels import linear_device

    monkeypatch.setattr(linear_device, "FOLD_NORM", True)
    monkeypatch.setattr(linear_device, "SHARED_X", shared_x)
    K, width, M = 520, 9, 2
    pair = "silu" if "pair" in fold else None
    N = 2 * width if pair else width
    w, x = rand((N, K), 0, 0.05, mx.bfloat16), rand((M, 1, K), 1, dtype=mx.bfloat16)
    g = rand((K,), 2, dtype=mx.bfloat16)
    residual = rand((M, 1, width), 3, dtype=mx.bfloat16) if "residual" in fold else None
    splits = (width,) if pair else ()
    caps = (None,) * (len(splits) + 1)
    got = folded_linear_device(x, w, None, splits, caps, norm=(g, 1e-6), pair=pair, residual=residual, backend="host",
                               poison=NAN)
    f32 = lambda a: None if a is None else a.astype(mx.float32)  # noqa: E731
    want = folded_linear(f32(x), f32(w), None, splits, caps, norm=(f32(g), 1e-6), pair=pair, residual=f32(residual))
    assert err(got, want) < 1e-2


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("norm", [False, True])
def test_parts_are_outputs_of_their_own(quantized, norm):
    """A fused projection's parts (q|k|v|o|i|f: uneven widths, the last two soft-capped) come out of the float
    and the 4-bit kernels as outputs of their own, each (M, 1, width) and row-contiguous, every element
    written (NaN-poisoned first), each the reference's part: no split of one output afterwards."""
    from mad.kernels.linear import linear
    from mad.kernels.linear_device import linear_device
    from mad.kernels.qlinear_device import folded_quantized_linear_device, quantized_linear_device

    K, widths, M = 256, (24, 24, 40, 40, 4, 4), 2
    splits = tuple(np.cumsum(widths)[:-1].tolist())
    caps = (None, None, None, None, 15.0, 15.0)
    N = sum(widths)
    x, g = rand((M, 1, K), 1, dtype=mx.bfloat16), rand((K,), 2, dtype=mx.bfloat16)
    f32 = lambda a: a.astype(mx.float32)  # noqa: E731
    if quantized:
        packed, scales, biases = mx.quantize(rand((N, K), 0, 0.05), 64, 4)
        weight = QuantizedMatrix(packed, scales.astype(mx.bfloat16), biases.astype(mx.bfloat16), 64, 4)
        dense = mx.dequantize(packed, scales, biases, 64, 4)
    else:
        weight = rand((N, K), 0, 0.05, mx.bfloat16)
        dense = f32(weight)
    if norm:
        got = folded_quantized_linear_device(x, weight, None, splits, caps, norm=(g, 1e-6), backend="host",
                                             poison=NAN)
        want = folded_linear(f32(x), dense, None, splits, caps, norm=(f32(g), 1e-6))
    else:
        run = quantized_linear_device if quantized else linear_device
        got = run(x, weight, None, splits, caps, backend="host", poison=NAN)
        want = linear(f32(x), dense, None, splits, caps)
    assert len(got) == len(widths)
    for part, ref, width in zip(got, want, widths):
        assert part.shape == (M, 1, width) and part.dtype == mx.bfloat16
        assert err(part, ref) < 1e-2


def test_quantized_body_steps_ahead_and_staging_give_the_same_bits():
    """The 4-bit kernel: its loads AHEAD steps early and x staged once a block change no bit (NOTES-gpu 40,
    41), and the result is the dequantized product's; with a folded norm and pair too."""
    K, N = 512, 12
    w = rand((N, K), 0, 0.05)
    packed, scales, biases = mx.quantize(w, 64, 4)
    matrix = QuantizedMatrix(packed, scales.astype(mx.bfloat16), biases.astype(mx.bfloat16), 64, 4)
    x = rand((1, 1, K), 1, dtype=mx.bfloat16)
    want = x.astype(mx.float32) @ mx.dequantize(packed, scales, biases, 64, 4).T
    outs = {(a, s): quantized_launch(x, matrix, None, (), (None,), "host", NAN, steps_ahead=a, shared_x=s)[0]
            for a in (0, 1, 2) for s in (False, True)}
    first = outs[(0, False)]
    assert err(first, want) < 1e-2
    assert all(mx.array_equal(y, first).item() for y in outs.values())
    g = rand((K,), 2, dtype=mx.bfloat16)
    for s in (False, True):
        (got,) = quantized_launch(x, matrix, None, (N // 2,), (None, None), "host", NAN, shared_x=s,
                                  norm=(g, 1e-6), pair="silu", width=N // 2)
        want = folded_linear(x.astype(mx.float32), mx.dequantize(packed, scales, biases, 64, 4), None, (N // 2,),
                             (None, None), norm=(g.astype(mx.float32), 1e-6), pair="silu")
        assert err(got, want) < 1e-2


@pytest.mark.parametrize("bits", [None, 4])
def test_folded_decode_through_the_device_kernels_on_the_host(monkeypatch, bits):
    """The Program's folds end to end: a 2-block model of xLSTM-7B's shape decoding with the CUDA variants'
    bodies on the host (the mLSTM step, the linears with their folded norm, pair and residuals, float or
    4-bit, the norm-and-gate kernel) agrees with the references' decode, and each kernel took its calls."""
    import functools

    import mad
    from mad.kernels import registry
    from mad.kernels.linear_device import linear_device
    from mad.kernels.qlinear_device import folded_quantized_linear_device, quantized_linear_device
    from mad.quantize import quantize_model

    variants = {"mlstm_step": mlstm_device.mlstm_step_device, "folded_linear": folded_quantized_linear_device,
                "head_norm_gate": head_norm_gate_device,
                **({"quantized_linear": quantized_linear_device} if bits else {"linear": linear_device})}
    calls = dict.fromkeys(variants, 0)

    def counted(name, *a, **k):
        calls[name] += 1
        return variants[name](*a, backend="host", **k)

    overrides = ["dims.L=2", "dims.D=64", "dims.NH=2", "dims.V=96"]
    tokens = mx.array(np.random.default_rng(0).integers(0, 96, (1, 4)), mx.int32)
    with mx.stream(mx.cpu):
        reference = mad.build("topologies/xlstm-7b.yaml", overrides, compile="none")
        folded = mad.build("topologies/xlstm-7b.yaml", overrides, compile="none")
        folded.load_weights(reference.parameters())
        if bits:
            for program in (reference, folded):
                quantize_model(program, bits=bits, group_size=64)
        with registry.use_reference():
            _, state = reference(tokens[:, :3])
            want = [reference(tokens[:, t:t + 1], state)[0]["logits"] for t in (3, 2)]
        for name in variants:  # the host bodies as this machine's variants, for this test
            monkeypatch.setitem(registry.get(name).variants, "cpu", functools.partial(counted, name))
        with registry.use_reference(False), mad.inference():
            got = [folded(tokens[:, t:t + 1], state)[0]["logits"] for t in (3, 2)]
    assert all(calls.values()), calls
    for a, b in zip(got, want):
        assert err(a, b) < 1e-4
