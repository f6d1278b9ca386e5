"""Kernel registry and device kernels.

The registry tests run everywhere. The device tests run where MLX has a GPU backend (CUDA or Metal)
and compare each device kernel against its pure-MLX reference, computed in float32 on the CPU
(a GPU float32 matmul may use TF32), on fresh random inputs of several shapes, with the outputs
poisoned (NaN) before the launch so that an unwritten element fails.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from test_host_kernels import fused_views
from test_mlstm_kernels import assert_h_close, assert_state_close, reference, to_np

import mad
from mad.model import LanguageModel
from mad.kernels import registry
from mad.kernels.activations import (exp_poly, round_down_up, round_up_down, sigmoid_cpu, sigmoid_mul_cpu,
                                    silu_cpu, silu_mul_cpu)
from mad.backends.cuda import PREAMBLE as CUDA_PREAMBLE
from mad.backends.metal import HEADER as METAL_HEADER, PREAMBLE as METAL_PREAMBLE
from mad.kernels.device import kernel_source
from mad.kernels.mlstm import chunk_recurrence, mlstm_sequence, mlstm_step
from mad.kernels.linear import capped_parts, linear, linear_cpu, softcap, split_parts
from mad.kernels.linear_device import linear_device
from mad.kernels.mlstm_device import STEP_BODY, chunk_recurrence_device, mlstm_step_device

ROOT = Path(__file__).resolve().parents[1]

GPU = "cuda" if mx.cuda.is_available() else ("metal" if mx.metal.is_available() else None)
needs_gpu = pytest.mark.skipif(GPU is None, reason="needs MLX with a CUDA or Metal GPU")


# ------------------------------------------------------------------------------------ registry
@pytest.fixture
def fake_kernel(monkeypatch):
    calls = []

    def reference(x):
        calls.append("reference")
        return x

    def variant(x):
        if x < 0:
            raise registry.Unsupported("negative")
        calls.append("cuda")
        return x

    registry.register_kernel("test_identity", reference)
    registry.register_variant("test_identity", "cuda", variant)
    monkeypatch.setattr(registry, "backend", lambda: "cuda")
    monkeypatch.delenv("MAD_KERNELS", raising=False)
    yield calls
    registry._KERNELS.pop("test_identity")


def test_dispatch_picks_the_backend_variant_and_falls_back(fake_kernel):
    fn = registry.dispatch("test_identity")
    assert fn(2) == 2 and fn(-1) == -1
    assert fake_kernel == ["cuda", "reference"]


def test_reference_is_forced_by_context_and_environment(fake_kernel, monkeypatch):
    with registry.use_reference():
        registry.dispatch("test_identity")(1)
    monkeypatch.setenv("MAD_KERNELS", "reference")
    registry.dispatch("test_identity")(1)
    registry.set_policy("auto")  # an explicit policy wins over the environment
    try:
        registry.dispatch("test_identity")(1)
    finally:
        registry.set_policy(None)
    assert fake_kernel == ["reference", "reference", "cuda"]
    monkeypatch.setenv("MAD_KERNELS", "fast")
    with pytest.raises(ValueError, match="MAD_KERNELS"):
        registry.dispatch("test_identity")
    with pytest.raises(ValueError, match="policy"):
        registry.set_policy("fast")


def test_cpu_gets_the_reference_or_its_cpu_variant():
    with mx.stream(mx.cpu):
        saved = mx.default_device()
        mx.set_default_device(mx.cpu)
        try:
            assert registry.backend() == "cpu"
            assert registry.dispatch("mlstm_step") is mlstm_step  # no CPU variant
            assert registry.dispatch("silu").__name__ == "silu[cpu]"
            assert registry.dispatch("silu_mul").__name__ == "silu_mul[cpu]"
            with registry.use_reference():
                assert registry.dispatch("silu") is nn.silu
        finally:
            mx.set_default_device(saved)


# ----------------------------------------------------------------------------------------- CPU activations
def test_exp_poly_is_mlx_exp_within_one_ulp(on_cpu):
    x = mx.concatenate([mx.random.normal((1 << 16,), key=mx.random.key(s)) * scale
                        for s, scale in enumerate((1e-3, 1.0, 8.0, 30.0))] + [mx.array([0.0, -87.0, 88.0, 1.0])])
    got, want = np.array(exp_poly(x)), np.array(mx.exp(x))
    inside = np.abs(np.array(x)) <= 88
    ulp = np.spacing(np.abs(want[inside]))
    assert np.all(np.abs(got[inside] - want[inside]) <= ulp), np.max(np.abs(got[inside] - want[inside]) / ulp)
    # outside [-88, 88] the argument is clipped
    edges = np.array(mx.exp(mx.array([-88.0, 88.0]))).tolist()
    assert np.array(exp_poly(mx.array([-200.0, 200.0]))).tolist() == np.array(exp_poly(mx.array([-88.0, 88.0]))).tolist()
    assert np.allclose(np.array(exp_poly(mx.array([-88.0, 88.0]))), edges, rtol=2.0 ** -23, atol=0)
    assert np.isnan(np.array(exp_poly(mx.array([np.nan])))).all()


def _activation_inputs() -> mx.array:
    return mx.concatenate([mx.random.normal((1 << 16,), key=mx.random.key(7)) * scale
                           for scale in (1e-4, 0.01, 0.3, 1.0, 6.0, 40.0)] + [mx.array([0.0, 0.625, -0.625, 88.5, -90.0])])


@pytest.mark.parametrize("name, variant, reference", [("sigmoid", sigmoid_cpu, mx.sigmoid), ("silu", silu_cpu, nn.silu)])
def test_cpu_activations_equal_mlx_within_float32_rounding(name, variant, reference, on_cpu):
    x = _activation_inputs()
    got, want = np.array(mx.compile(variant)(x), dtype=np.float64), np.array(reference(x), dtype=np.float64)
    # a few ulp (exp within 1, then 1 + e and the division), or, where exp's argument is clipped, below
    # the smallest normal float32 (SiLU: times |x|, see exp_parts)
    floor = np.finfo(np.float32).tiny * (np.abs(np.array(x)) if name == "silu" else 1.0)
    assert np.all(np.abs(got - want) <= 4 * 2.0 ** -23 * np.abs(want) + floor)
    # 16-bit inputs: computed in float32 and rounded once, so within half a 16-bit ulp (and the float32
    # variant's few ulp) of the exact activation of the 16-bit input; the reference rounds after each
    # operation (bf16: 2 ulp off here; float16 SiLU: 0 for -1.7e-4)
    for dtype in (mx.bfloat16, mx.float16):
        xb = x.astype(dtype)
        out = registry.dispatch(name)(xb)
        assert out.dtype == dtype and mx.array_equal(out, variant(xb.astype(mx.float32)).astype(dtype))
        exact = np.array(reference(xb.astype(mx.float32)), dtype=np.float64)
        half_ulp = 2.0 ** -(8 if dtype == mx.bfloat16 else 11)  # relative, at the bottom of a binade
        subnormal = 2.0 ** -24 if dtype == mx.float16 else 0.0  # float16's spacing below its smallest normal
        got16 = np.array(out.astype(mx.float32), dtype=np.float64)
        assert np.all(np.abs(got16 - exact) <= (half_ulp + 8 * 2.0 ** -23) * np.abs(exact) + subnormal + floor)


@pytest.mark.parametrize("name, variant, act", [("sigmoid_mul", sigmoid_mul_cpu, mx.sigmoid),
                                                ("silu_mul", silu_mul_cpu, nn.silu)])
def test_cpu_gates_equal_the_activation_times_x(name, variant, act, on_cpu):
    """act(g) * x in one division (x / (1 + e^-g), g x / (1 + e^-g)): within a few ulp of the activation
    and the product, on strided inputs (split columns: MLX's strided loops, not only its contiguous ones)."""
    g = _activation_inputs()
    gx = mx.stack([g, mx.random.normal(g.shape, key=mx.random.key(8)) * 3], axis=-1)  # (N, 2): strided halves
    g, x = gx[:, 0], gx[:, 1]
    got = np.array(mx.compile(variant)(g, x), dtype=np.float64)
    want = np.array(act(g) * x, dtype=np.float64)
    floor = np.finfo(np.float32).tiny * np.abs(np.array(x)) * (np.abs(np.array(g)) if name == "silu_mul" else 1.0)
    assert np.all(np.abs(got - want) <= 5 * 2.0 ** -23 * np.abs(want) + floor)
    assert registry.dispatch(name).__name__ == f"{name}[cpu]"
    xb, gb = x.astype(mx.bfloat16), g.astype(mx.bfloat16)  # float32 inside, one rounding
    out = registry.dispatch(name)(gb, xb)
    assert out.dtype == mx.bfloat16
    assert mx.array_equal(out, variant(gb.astype(mx.float32), xb.astype(mx.float32)).astype(mx.bfloat16))


def test_the_two_roundings_of_exp_parts_agree():
    """Kernels 2 and 3 of exp_parts round y each on its own: the same integer everywhere, ties included."""
    ties = np.arange(-130, 130) + 0.5
    rand = np.random.default_rng(0).uniform(-2.0 ** 22, 2.0 ** 22, 1 << 16)
    y = mx.array(np.concatenate([ties, rand, np.arange(-130, 130)]).astype(np.float32))
    assert mx.array_equal(round_down_up(y), round_up_down(y))
    assert np.array_equal(np.array(round_up_down(y)), np.rint(np.array(y)))  # numpy: ties to even as well


def test_cpu_exp_kernel_is_exp_poly_for_float32_only(on_cpu):
    x = mx.random.normal((4096,), key=mx.random.key(3)) * 10
    exp = registry.dispatch("exp")
    assert exp.__name__ == "exp[cpu]"
    assert mx.array_equal(exp(x), exp_poly(x))
    xb = x.astype(mx.bfloat16)
    assert mx.array_equal(exp(xb), mx.exp(xb))


def test_cpu_variants_leave_a_model_unchanged_within_float32(on_cpu):
    """The CPU variants against the references on a well-conditioned model (xlstm-tiny, its own init)."""
    lm = LanguageModel(mad.build(ROOT / "topologies" / "xlstm-tiny.yaml"))
    ids = mx.array(np.random.default_rng(0).integers(0, lm.vocab_size, (2, 37)), dtype=mx.int32)
    with registry.use_reference():
        want, _ = LanguageModel(lm.program)(ids)
    fresh = LanguageModel(mad.Program(lm.program.graph))  # traced anew, with the CPU variants
    fresh.program.load_weights(lm.program.parameters())
    got, _ = fresh(ids)
    assert registry.dispatch("silu").__name__ == "silu[cpu]"
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=0, atol=1e-5 * float(mx.abs(want).max()))


@pytest.mark.parametrize("caps,runs", [((None, None, 15.0, 15.0), 1), ((15.0, None, 15.0), 2), ((15.0, 15.0, 30.0), 2),
                                       ((None, 15.0), 1), ((15.0,), 1), ((None, None), 0)])
def test_neighbouring_parts_of_one_cap_are_capped_as_one(caps, runs):
    """Each part gets its own soft-cap, bit for bit, and a run of neighbouring parts of one cap (a fused
    q|k|v|o|i|f's gates) takes one elementwise kernel in a compiled graph, where each part took its own."""
    widths = [5, 7, 3, 4][:len(caps)]
    splits = np.cumsum(widths)[:-1].tolist()
    y = mx.array(np.random.default_rng(len(caps)).normal(0, 40, (2, 1, sum(widths))).astype(np.float32))
    want = [softcap(p, c) if c else p for p, c in zip(split_parts(y, splits), caps)]
    got = mx.compile(lambda y: capped_parts(y, splits, caps))(y)
    dot = io.StringIO()
    mx.export_to_dot(dot, *got)                                 # before evaluating: the graph is still there
    assert len(re.findall(r'label ="[A-Za-z]*Tanh', dot.getvalue())) == runs
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and mx.array_equal(a, b).item()


def test_every_kernel_has_a_reference_and_known_backends():
    ks = registry.kernels()
    assert "mlstm_step" in ks
    for k in ks.values():
        assert callable(k.reference)
        assert set(k.variants) <= set(registry.BACKENDS)


def test_cuda_and_metal_share_the_body():
    cuda_header, cuda_src = kernel_source("cuda", STEP_BODY)
    metal_header, metal_src = kernel_source("metal", STEP_BODY)
    assert cuda_src == STEP_BODY and metal_src.endswith(STEP_BODY)
    assert cuda_header == CUDA_PREAMBLE and metal_src == METAL_PREAMBLE + STEP_BODY and metal_header == METAL_HEADER
    # the preambles define the same names (as macros or functions)
    def names(text):
        found = {line.split()[1].split("(")[0] for line in text.splitlines() if line.startswith("#define")}
        return found | set(re.findall(r"inline (?:void|float) (\w+)\(", text))
    assert names(CUDA_PREAMBLE) == names(METAL_PREAMBLE + METAL_HEADER)


def test_bodies_built_for_metal_too_keep_to_the_common_subset():
    """The bodies registered for CUDA and Metal (register_device_kernel) name no CUDA-only construct: vector
    types and casts, alignment, device qualifiers, intrinsics, inline PTX."""
    from mad.kernels import linear_device, mlstm_device

    cuda_only = ("__align__", "reinterpret_cast", "float4", "uint4", "__device__", "__shfl", "__uint_as_float",
                 "asm(", "MASK_OR", "__syncthreads", "blockIdx", "threadIdx")
    bodies = {"STEP_BODY": mlstm_device.STEP_BODY, "COMBINE_BODY": mlstm_device.COMBINE_BODY,
              "RECURRENCE_BODY": mlstm_device.RECURRENCE_BODY, "LINEAR_BODY": linear_device.LINEAR_BODY}
    assert {name: [t for t in cuda_only if t in body] for name, body in bodies.items()} == dict.fromkeys(bodies, [])


def test_parted_kernels_write_each_part_through_store():
    """`DeviceKernel.parted(P)`: the linear kernels with one output per part (y0, y1, ...), the same body, the
    STORE macro for P parts in front of their header (plain C, as Metal builds the float kernel too); one part
    is the kernel itself; a kernel that does not write through STORE is refused."""
    from mad.kernels.device import store_macro
    from mad.kernels.linear_device import LINEAR_KERNEL
    from mad.kernels.mlstm_device import STEP_KERNEL
    from mad.kernels.qlinear_device import QLINEAR_KERNEL

    for kernel in (LINEAR_KERNEL, QLINEAR_KERNEL):
        assert kernel.parted(1) is kernel and kernel.header.startswith(store_macro(1))
        three = kernel.parted(3)
        assert three is kernel.parted(3) and three.name == kernel.name + "_3"
        assert three.outputs == ["y0", "y1", "y2"] and three.inputs == kernel.inputs and three.body == kernel.body
        assert three.header == store_macro(3) + kernel.header[len(store_macro(1)):]
        assert "STORE(" in kernel.body and "y[" not in kernel.body
    macro = store_macro(3)
    assert "PART1" in macro and "PART2" in macro and "y2[" in macro and "PART3" not in macro
    assert not any(t in macro for t in ("__", "reinterpret_cast", "asm"))
    with pytest.raises(ValueError, match="STORE"):
        STEP_KERNEL.parted(2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="1 or more"):
            LINEAR_KERNEL.parted(bad)


# ------------------------------------------------------------------------------------ device kernels
def step_inputs(rng, B, NH, DQK, DV, dtype):
    q = rng.normal(0, 1, (B, NH, 1, DQK))
    k = rng.normal(0, 0.7, (B, NH, 1, DQK))
    v = rng.normal(0, 0.5, (B, NH, 1, DV))
    i = rng.normal(0, 3, (B, NH, 1))
    f = rng.normal(2, 2, (B, NH, 1))
    C = rng.normal(0, 1, (B, NH, DQK, DV))
    n = rng.normal(0, 1, (B, NH, DQK))
    m = rng.normal(0, 2, (B, NH))
    qkv = [mx.array(x.astype(np.float32)).astype(dtype) for x in (q, k, v)]
    rest = [mx.array(x.astype(np.float32)).astype(dtype) for x in (i, f)]  # gates in the model's dtype
    state = tuple(mx.array(x.astype(np.float32)) for x in (C, n, m))
    return qkv, rest, state


def rel_err(out, ref):
    out, ref = (np.array(x.astype(mx.float32), dtype=np.float64) for x in (out, ref))
    assert np.isfinite(out).all(), "NaN/Inf in the output (unwritten or overflowed elements)"
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


@needs_gpu
@pytest.mark.parametrize("B,NH,DQK,DV", [(1, 8, 256, 512), (3, 4, 64, 64), (2, 3, 100, 72),
                                         (64, 8, 256, 512), (5, 2, 512, 512), (1, 1, 128, 33)])
@pytest.mark.parametrize("dtype,tol", [(mx.float32, 1e-5), (mx.bfloat16, 1e-2)])
@pytest.mark.parametrize("scale", ["q", "k"])
@pytest.mark.parametrize("splits", [None, 3, 4])
def test_mlstm_step_kernel_matches_reference(B, NH, DQK, DV, dtype, tol, scale, splits):
    """Every shape with the default row splits and with C's rows shared out over 3 (uneven) or 4 blocks."""
    rng = np.random.default_rng(B * 1000 + DQK + DV)
    qkv, gates, state = step_inputs(rng, B, NH, DQK, DV, dtype)
    for given_state in (state, None):
        h, new_state = mlstm_step_device(*qkv, *gates, given_state, scale=scale, backend=GPU, poison=float("nan"),
                                         splits=splits)
        with mx.stream(mx.cpu):  # float32 reference on the bf16-rounded inputs
            h_ref, ref_state = mlstm_step(*(x.astype(mx.float32) for x in qkv), *gates, given_state, scale=scale)
            mx.eval(h_ref, ref_state)
        assert h.dtype == dtype
        assert rel_err(h, h_ref) < tol
        for a, b in zip(new_state, ref_state):
            assert a.dtype == mx.float32
            assert rel_err(a, b) < 1e-5


@needs_gpu
@pytest.mark.parametrize("B", [1, 3])
def test_mlstm_step_kernel_in_the_layers_layout(B):
    """q, k, v, i, f as slices of one fused projection (B, 1, N), as a decode step hands them on (row-contiguous
    at batch 1, copied by MLX before the launch above it), with `heads`: the head-major call's bits."""
    NH, DQK, DV = 4, 64, 96
    qkv, gates, state = step_inputs(np.random.default_rng(B), B, NH, DQK, DV, mx.bfloat16)
    views = fused_views([x.reshape(B, 1, -1) for x in (*qkv, *gates)])
    h, new = mlstm_step_device(*views, state, heads=NH, backend=GPU, poison=float("nan"))
    want_h, want = mlstm_step_device(*qkv, *gates, state, backend=GPU)
    assert h.shape == (B, 1, NH * DV)
    assert mx.array_equal(h, want_h.reshape(B, 1, -1)).item()
    for a, b in zip(new, want):
        assert mx.array_equal(a, b).item()


@needs_gpu
def test_model_decode_uses_the_kernels_and_matches_the_cpu():
    """The tiny model on the GPU with its device kernels vs the same weights on the CPU (references).

    Tolerance: float32 rounding, with or without TF32 products; a wiring mistake in a kernel path
    (wrong head, gate or layout) gives errors of order 1.
    """
    from mad import load

    assert registry.dispatch("mlstm_step").__name__ == f"mlstm_step[{GPU}]"
    assert registry.dispatch("linear").__name__ == f"linear[{GPU}]"
    weights, logits = None, {}
    for name, device in (("gpu", mx.gpu), ("cpu", mx.cpu)):  # a model per device: a compiled graph keeps its streams
        mx.set_default_device(device)
        try:
            model, _ = load("topologies/xlstm-tiny.yaml")
            if weights is None:
                weights = model.program.parameters()
            else:
                model.program.load_weights(weights)
            tokens = mx.array(np.random.default_rng(0).integers(0, model.vocab_size, (2, 5)), dtype=mx.int32)
            _, state = model(tokens[:, :4])
            logits[name], _ = model(tokens[:, 4:], state)
            mx.eval(logits[name])
        finally:
            mx.set_default_device(mx.gpu)
    assert rel_err(logits["gpu"], logits["cpu"]) < 1e-5


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_multihead_norm_in_low_precision_is_float32_then_cast(dtype):
    """The multi-head norm normalises bf16/f16 input in the kernel's float32 arithmetic and rounds once,
    giving exactly the HF order (cast to float32, normalise, cast back, times the weight), also for
    large, offset and tiny inputs (on the default device: the GPU's kernel where there is one)."""
    from mad.blocks.mlstm import MultiHeadNorm

    norm = MultiHeadNorm(heads=4, dim=256, eps=1e-6, bias=False, weight_offset=0.0)
    rng = np.random.default_rng(0)
    norm.weight = mx.array(rng.normal(1, 0.5, (256,)).astype(np.float32)).astype(dtype)
    for mean, std in ((0.0, 1.0), (3.0, 30.0), (0.1, 1e-3)):
        x = mx.array(rng.normal(mean, std, (2, 3, 256)).astype(np.float32)).astype(dtype)
        xf = x.reshape(2, 3, 4, 64).astype(mx.float32)
        expected = mx.fast.layer_norm(xf, None, None, 1e-6).reshape(2, 3, 256).astype(dtype) * norm.weight
        out = norm(x)
        assert out.dtype == dtype and mx.array_equal(out, expected).item(), (mean, std)


def test_linear_reference_adds_the_bias_and_caps_each_part():
    rng = np.random.default_rng(3)
    x = mx.array(rng.normal(0, 1, (2, 3, 16)).astype(np.float32))
    w = mx.array(rng.normal(0, 1, (10, 16)).astype(np.float32))
    b = mx.array(rng.normal(0, 1, (10,)).astype(np.float32))
    parts = linear(x, w, b, (4, 7), (None, 2.0, 0.5))
    y = x @ w.T + b
    expected = [y[..., :4], 2.0 * mx.tanh(y[..., 4:7] / 2.0), 0.5 * mx.tanh(y[..., 7:] / 0.5)]
    assert [p.shape for p in parts] == [(2, 3, 4), (2, 3, 3), (2, 3, 3)]
    for p, e in zip(parts, expected):
        assert rel_err(p, e) < 1e-6
    with pytest.raises(ValueError, match="2 caps"):
        linear(x, w, b, (4, 7), (None, 2.0))


def test_linear_on_the_cpu_is_a_product_per_part(on_cpu):
    """The CPU variant: each part is its own product with the part's rows of the weight (the unfused
    layers' numbers, bit for bit), for several rows; one row keeps the single product."""
    rng = np.random.default_rng(4)
    w = mx.array(rng.normal(0, 1, (10, 16)).astype(np.float32))
    b = mx.array(rng.normal(0, 1, (10,)).astype(np.float32))
    assert registry.dispatch("linear").__name__ == "linear[cpu]"
    for shape in ((2, 3, 16), (1, 1, 16)):
        x = mx.array(rng.normal(0, 1, shape).astype(np.float32))
        for bias in (None, b):
            got = linear_cpu(x, w, bias, (4, 7), (None, 2.0, None))
            want = linear(x, w, bias, (4, 7), (None, 2.0, None))
            unfused = [mx.addmm(bias[a:z], x, w[a:z].T) if bias is not None else x @ w[a:z].T
                       for a, z in ((0, 4), (4, 7), (7, 10))]
            unfused[1] = 2.0 * mx.tanh(unfused[1] / 2.0)
            for g, wt, u in zip(got, want, unfused):
                assert g.shape == wt.shape and rel_err(g, wt) < 1e-6
                if shape[1] > 1:
                    assert mx.array_equal(g, u)
    assert linear_cpu(x, w, None)[0].shape == (1, 1, 10)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_linear_on_the_cpu_takes_16_bit_products_in_float32(dtype, on_cpu):
    """A 16-bit call of several positions: the float32 products of the converted inputs, bias and cap on the
    float32 sums, one rounding (bit for bit); its gradients are those of the float32 computation, rounded
    to the primals' dtypes. One position (decode) keeps the 16-bit product."""
    rng = np.random.default_rng(5)
    x32, w32, b32 = (mx.array(rng.normal(0, 1, s).astype(np.float32)).astype(dtype).astype(mx.float32)
                     for s in ((2, 9, 16), (10, 16), (10,)))
    x, w, b = (a.astype(dtype) for a in (x32, w32, b32))
    got = linear_cpu(x, w, b, (4, 7), (None, 2.0, None))
    want = linear_cpu(x32, w32, b32, (4, 7), (None, 2.0, None))
    for g, wt in zip(got, want):
        assert g.dtype == dtype and mx.array_equal(g, wt.astype(dtype)).item()
    one = x[:, :1]
    got = linear_cpu(one, w, b, (4, 7), (None, 2.0, None))
    for g, wt in zip(got, linear(one, w, b, (4, 7), (None, 2.0, None))):
        assert g.dtype == dtype and mx.array_equal(g, wt).item()  # the 16-bit product, as before

    def loss(x, w, b):
        return sum((p.astype(mx.float32) ** 2).sum() for p in linear_cpu(x, w, b, (4, 7), (None, 2.0, None)))

    got = mx.grad(loss, argnums=(0, 1, 2))(x, w, b)
    want = mx.grad(loss, argnums=(0, 1, 2))(x32, w32, b32)
    for g, wt in zip(got, want):
        assert g.dtype == dtype and rel_err(g.astype(mx.float32), wt) < 2e-2  # outputs rounded to 16 bits first


@needs_gpu
@pytest.mark.parametrize("M,K,N", [(1, 4096, 333), (3, 64, 7), (4, 1000, 4096), (2, 10944, 129), (1, 8, 1)])
@pytest.mark.parametrize("dtype,tol", [(mx.float32, 1e-5), (mx.bfloat16, 1e-2), (mx.float16, 1e-2)])
@pytest.mark.parametrize("shared_x", [False, True])
def test_linear_kernel_matches_reference(M, K, N, dtype, tol, shared_x):
    """Every shape with x read by each warp and staged in shared memory once a block (where it fits; else
    the same unstaged kernel: (2, 10944) in float32 is 87.6 KB)."""
    rng = np.random.default_rng(M * 7 + K + N)
    x = mx.array(rng.normal(0, 1, (M, K)).astype(np.float32)).astype(dtype)
    w = mx.array(rng.normal(0, 0.05, (N, K)).astype(np.float32)).astype(dtype)
    (y,) = linear_device(x, w, backend=GPU, poison=float("nan"), shared_x=shared_x)
    with mx.stream(mx.cpu):
        ref = x.astype(mx.float32) @ w.astype(mx.float32).T
    assert y.dtype == dtype and y.shape == (M, N)
    assert rel_err(y, ref) < tol
    (y3,) = linear_device(x.reshape(1, M, K), w, backend=GPU)  # leading dims are flattened
    assert y3.shape == (1, M, N) and rel_err(y3[0], ref) < tol


@needs_gpu
@pytest.mark.parametrize("dtype,tol", [(mx.float32, 1e-5), (mx.bfloat16, 1e-2)])
@pytest.mark.parametrize("M", [1, 4])
def test_linear_kernel_adds_the_bias_and_caps_each_part(M, dtype, tol):
    """A fused group's call: parts of widths 16, 8, 8, 9 with a bias over all of them, caps on two
    parts (one small enough that tanh saturates) and none on the others."""
    rng = np.random.default_rng(M)
    K, splits, caps = 512, (16, 24, 32), (None, 15.0, None, 0.5)
    x = mx.array(rng.normal(0, 1, (M, 1, K)).astype(np.float32)).astype(dtype)
    w = mx.array(rng.normal(0, 0.2, (41, K)).astype(np.float32)).astype(dtype)
    b = mx.array(rng.normal(0, 3, (41,)).astype(np.float32)).astype(dtype)
    parts = linear_device(x, w, b, splits, caps, backend=GPU, poison=float("nan"))
    with mx.stream(mx.cpu):
        refs = linear(*(a.astype(mx.float32) for a in (x, w, b)), splits, caps)
    assert [p.shape for p in parts] == [(M, 1, 16), (M, 1, 8), (M, 1, 8), (M, 1, 9)]
    for p, r in zip(parts, refs):
        assert p.dtype == dtype and rel_err(p, r) < tol
    (no_bias,) = linear_device(x, w, None, (), (None,), backend=GPU)
    with mx.stream(mx.cpu):
        assert rel_err(no_bias, x.astype(mx.float32) @ w.astype(mx.float32).T) < tol


@needs_gpu
def test_linear_declines_what_it_does_not_handle():
    w = mx.random.normal((16, 24))
    for x in (mx.random.normal((5, 24)), mx.random.normal((2, 24)).astype(mx.bfloat16)):
        with pytest.raises(registry.Unsupported):
            linear_device(x, w, backend=GPU)
        assert rel_err(registry.dispatch("linear")(x, w)[0], x.astype(mx.float32) @ w.T) < 1e-2


@needs_gpu
@pytest.mark.parametrize("B,NH,NC,DQK,DV", [(2, 3, 5, 33, 70), (1, 8, 64, 256, 512), (3, 2, 1, 64, 64)])
def test_chunk_recurrence_kernel_matches_reference(B, NH, NC, DQK, DV):
    rng = np.random.default_rng(B + NH + NC + DQK)
    arr = lambda *shape, s=1.0, mu=0.0: mx.array(rng.normal(mu, s, shape).astype(np.float32))
    C_loc, n_loc = arr(B, NH, NC, DQK, DV), arr(B, NH, NC, DQK)
    g, a_max = arr(B, NH, NC, s=2.0, mu=-1.0), arr(B, NH, NC, s=3.0)
    state = (arr(B, NH, DQK, DV), arr(B, NH, DQK), arr(B, NH, s=2.0))
    got = chunk_recurrence_device(C_loc, n_loc, g, a_max, state, backend=GPU, poison=float("nan"))
    with mx.stream(mx.cpu):
        want = chunk_recurrence(C_loc, n_loc, g, a_max, state)
        mx.eval(want)
    for got_part, want_part in zip(got, want):
        for a, b in zip(got_part, want_part):
            assert a.shape == b.shape and rel_err(a, b) < 1e-5


@needs_gpu
@pytest.mark.parametrize("T,chunk", [(200, 64), (77, 16), (128, 128)])
@pytest.mark.parametrize("dtype,i_std", [(mx.float32, 3.0), (mx.bfloat16, 1.0)])
def test_chunkwise_on_gpu_matches_cpu_reference(T, chunk, dtype, i_std):
    """Float32 with large, spread input gates (h is a ratio of sums that nearly cancel at some
    positions, so any error shows), held element by element to the float64 recurrence with the error
    scale of tests/test_mlstm_kernels.py (the bound the CPU cell meets): at chunk 128 the CPU's own
    float32 is 5.7e-5 from float64 (norm-wise), so the GPU's is compared with the truth rather than with
    the CPU's. bf16 with milder gates, against the CPU's float32 within 1e-2 (bf16 products)."""
    rng = np.random.default_rng(T + chunk)
    B, NH, DQK, DV = 2, 4, 64, 96
    qkv, _, state = step_inputs(rng, B, NH, DQK, DV, dtype)
    q, k, v = (mx.array(rng.normal(0, s, (B, NH, T, d)).astype(np.float32)).astype(dtype)
               for s, d in ((1.0, DQK), (0.7, DQK), (0.5, DV)))
    i = mx.array(rng.normal(0, i_std, (B, NH, T)).astype(np.float32))
    f = mx.array(rng.normal(2, 2, (B, NH, T)).astype(np.float32))
    for given in (state, None):
        h, final = mlstm_sequence(q, k, v, i, f, given, chunk_size=chunk)
        if dtype == mx.float32:
            h64, final64, scale = reference(tuple(to_np(x) for x in (q, k, v, i, f)),
                                            None if given is None else tuple(to_np(x) for x in given))
            assert_h_close(h, h64, scale)
            assert_state_close(final, final64)
            continue
        with mx.stream(mx.cpu):
            h_ref, final_ref = mlstm_sequence(*(x.astype(mx.float32) for x in (q, k, v)), i, f, given, chunk_size=chunk)
            mx.eval(h_ref, final_ref)
        assert rel_err(h, h_ref) < 1e-2
        for a, b in zip(final, final_ref):
            assert rel_err(a, b) < 1e-2


def chunk_gates(rng, shape, i_std):
    """Within-chunk gates as the chunk kernels take them: the cumsum b of logsigmoid(f~) with f~ ~ N(2, 2),
    and i~ ~ N(0, i_std), float32 of `shape` (B, NH, NC, L)."""
    lf = -np.logaddexp(0, -rng.normal(2, 2, shape))
    return (mx.array(np.cumsum(lf, axis=-1).astype(np.float32)),
            mx.array(rng.normal(0, i_std, shape).astype(np.float32)))


@pytest.mark.skipif(GPU != "cuda", reason="needs MLX with a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(mx.bfloat16, 1e-2), (mx.float32, 1e-5)])
@pytest.mark.parametrize("B,NH,NC,L,DQK,DV", [(1, 8, 4, 64, 256, 512), (2, 3, 5, 64, 64, 96), (1, 2, 3, 128, 32, 256),
                                              (2, 1, 2, 5, 16, 40), (1, 2, 2, 77, 48, 136)])
def test_chunk_outputs_kernel_matches_reference(B, NH, NC, L, DQK, DV, dtype, tol, monkeypatch):
    """The tensor-core intra-chunk kernel against the pure-MLX form on the same inputs (computed in float32
    on the CPU): chunk lengths 5 to 128 (one or two row tiles), column tails, spread gates and a given
    entering state per chunk. With bf16 inputs the kernel rounds C and the gated S to bf16 (the reference
    rounds C the same way and q k^T more), so they agree to bf16 rounding; float32 inputs go through three
    TF32 products each and agree to float32 accuracy (they run while MLX takes float32 products in TF32, its
    default, which the tests turn off for MLX: the kernel is told it is on)."""
    monkeypatch.setenv("MLX_ENABLE_TF32", "1")
    from mad.kernels.mlstm import chunk_outputs
    from mad.kernels.mlstm_chunk_device import chunk_outputs_device

    rng = np.random.default_rng(B * 100 + L + DV)
    q, k = (mx.array(rng.normal(0, s, (B, NH, NC, L, DQK)).astype(np.float32)).astype(dtype)
            for s in (DQK ** -0.5, 0.7))
    v = mx.array(rng.normal(0, 0.5, (B, NH, NC, L, DV)).astype(np.float32)).astype(dtype)
    b, ic = chunk_gates(rng, (B, NH, NC, L), i_std=1)
    state = (mx.array(rng.normal(0, 1, (B, NH, NC, DQK, DV)).astype(np.float32)),
             mx.array(rng.normal(0, 1, (B, NH, NC, DQK)).astype(np.float32)),
             mx.array(rng.normal(0, 2, (B, NH, NC)).astype(np.float32)))
    h = chunk_outputs_device(q, k, v, b, ic, state, 1e-6, poison=float("nan"))
    with mx.stream(mx.cpu):
        want = chunk_outputs(*(x.astype(mx.float32) for x in (q, k, v)), b, ic, state, 1e-6)
        mx.eval(want)
    assert h.shape == want.shape and h.dtype == mx.float32
    assert rel_err(h, want) < tol


@pytest.mark.skipif(GPU != "cuda", reason="needs MLX with a CUDA GPU")
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("B,NH,NC,L,DQK,DV", [(1, 8, 3, 64, 256, 512), (2, 3, 5, 64, 64, 96), (1, 2, 3, 128, 32, 256),
                                              (2, 1, 2, 5, 16, 40), (1, 2, 2, 77, 48, 136)])
def test_chunk_states_kernel_matches_reference(B, NH, NC, L, DQK, DV, dtype, monkeypatch):
    """The tensor-core chunk-states kernel (chunk sums and the recurrence in one launch) against the pure-MLX
    form on the same k/v (computed in float32 on the CPU): chunk lengths 5 to 128, row and column tails,
    spread gates, a random entering state. The gated keys keep float32 accuracy on the tensor cores (bf16: as
    two bf16 halves; float32: three TF32 products), so the states agree to float32 accuracy for both."""
    monkeypatch.setenv("MLX_ENABLE_TF32", "1")
    from mad.kernels.mlstm import chunk_states
    from mad.kernels.mlstm_chunk_device import chunk_states_device

    rng = np.random.default_rng(B * 100 + L + DV + 1)
    k = mx.array(rng.normal(0, 0.7, (B, NH, NC, L, DQK)).astype(np.float32)).astype(dtype)
    v = mx.array(rng.normal(0, 0.5, (B, NH, NC, L, DV)).astype(np.float32)).astype(dtype)
    b, ic = chunk_gates(rng, (B, NH, NC, L), i_std=3)
    state = (mx.array(rng.normal(0, 1, (B, NH, DQK, DV)).astype(np.float32)),
             mx.array(rng.normal(0, 1, (B, NH, DQK)).astype(np.float32)),
             mx.array(rng.normal(0, 2, (B, NH)).astype(np.float32)))
    got = chunk_states_device(k, v, b, ic, state, poison=float("nan"))
    with mx.stream(mx.cpu):
        want = chunk_states(k.astype(mx.float32), v.astype(mx.float32), b, ic, state)
        mx.eval(want)
    for got_part, want_part in zip(got, want):
        for x, y in zip(got_part, want_part):
            assert x.shape == y.shape and x.dtype == mx.float32 and rel_err(x, y) < 1e-5


@pytest.mark.skipif(GPU != "cuda", reason="needs MLX with a CUDA GPU")
@pytest.mark.parametrize("B,NH,NC,L,DQK,DV", [(1, 8, 3, 64, 256, 512), (2, 1, 2, 5, 16, 40), (1, 2, 2, 77, 48, 136)])
def test_chunk_kernels_write_bf16_as_rounding_their_float32(B, NH, NC, L, DQK, DV):
    """The kernels' bf16 outputs (entering C's, h) are their float32 results rounded once, bit for bit, and
    the outputs kernel gives the same h from bf16 entering C's as from the float32 ones it rounds itself:
    the chunkwise form's half-size path changes no number."""
    from mad.kernels.mlstm_chunk_device import chunk_outputs_device, chunk_states_device

    rng = np.random.default_rng(B * 100 + L + DV + 2)
    q, k = (mx.array(rng.normal(0, s, (B, NH, NC, L, DQK)).astype(np.float32)).astype(mx.bfloat16)
            for s in (DQK ** -0.5, 0.7))
    v = mx.array(rng.normal(0, 0.5, (B, NH, NC, L, DV)).astype(np.float32)).astype(mx.bfloat16)
    b, ic = chunk_gates(rng, (B, NH, NC, L), i_std=2)
    state = (mx.array(rng.normal(0, 1, (B, NH, DQK, DV)).astype(np.float32)),
             mx.array(rng.normal(0, 1, (B, NH, DQK)).astype(np.float32)),
             mx.array(rng.normal(0, 2, (B, NH)).astype(np.float32)))
    (C32, n_in, m_in), out32 = chunk_states_device(k, v, b, ic, state, poison=float("nan"))
    (C16, n16, m16), out16 = chunk_states_device(k, v, b, ic, state, mx.bfloat16, poison=float("nan"))
    assert C16.dtype == mx.bfloat16 and bool(mx.array_equal(C16, C32.astype(mx.bfloat16)))
    for x, y in zip((n16, m16, *out16), (n_in, m_in, *out32)):
        assert x.dtype == mx.float32 and bool(mx.array_equal(x, y))
    h32 = chunk_outputs_device(q, k, v, b, ic, (C32, n_in, m_in), 1e-6, poison=float("nan"))
    h16 = chunk_outputs_device(q, k, v, b, ic, (C16, n_in, m_in), 1e-6, mx.bfloat16, poison=float("nan"))
    assert h16.dtype == mx.bfloat16 and bool(mx.array_equal(h16, h32.astype(mx.bfloat16)))
    h = chunk_outputs_device(q, k, v, b, ic, (C16, n_in, m_in), 1e-6, poison=float("nan"))
    assert h.dtype == mx.float32 and bool(mx.array_equal(h, h32))


@pytest.mark.skipif(GPU != "cuda", reason="needs MLX with a CUDA GPU")
@pytest.mark.parametrize("layout", ["fused", "misaligned", "strided_last"])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
def test_chunk_kernels_read_views_as_they_lie(layout, dtype, monkeypatch):
    """The chunk kernels read q, k, v through their strides: head-major views of one token-major fused
    projection (16-byte loads), views whose rows are not 16-byte aligned and a last axis that is not
    unit-stride (element loads) give bit for bit what the same values give as contiguous copies."""
    from mad.kernels.mlstm_chunk_device import chunk_outputs_device, chunk_states_device

    monkeypatch.setenv("MLX_ENABLE_TF32", "1")   # float32 operands run the kernels only with TF32 on

    B, NH, NC, L, DQK, DV = 2, 2, 3, 16, 32, 48
    T = NC * L
    rng = np.random.default_rng(11)
    lead = 1 if layout == "misaligned" else 0                  # an odd column offset misaligns every row
    W = lead + NH * (2 * DQK + DV) + 8
    fused = mx.array(rng.normal(0, 0.4, (B, T, W)).astype(np.float32)).astype(dtype)

    def heads(start, d):  # (B, T, NH * d) columns -> (B, NH, NC, L, d) view
        x = fused[:, :, start:start + NH * d].reshape(B, T, NH, d).transpose(0, 2, 1, 3)
        return x.reshape(B, NH, NC, L, d)

    q, k, v = heads(lead, DQK), heads(lead + NH * DQK, DQK), heads(lead + 2 * NH * DQK, DV)
    if layout == "strided_last":  # k's last axis L elements apart
        k = mx.array(np.asarray(k.astype(mx.float32)).swapaxes(-1, -2).copy()).astype(dtype).swapaxes(-1, -2)
    b, ic = chunk_gates(rng, (B, NH, NC, L), i_std=2)
    state = (mx.array(rng.normal(0, 1, (B, NH, DQK, DV)).astype(np.float32)),
             mx.array(rng.normal(0, 1, (B, NH, DQK)).astype(np.float32)),
             mx.array(rng.normal(0, 2, (B, NH)).astype(np.float32)))
    copies = [mx.array(np.asarray(x.astype(mx.float32))).astype(dtype) for x in (q, k, v)]
    got_in, got_out = chunk_states_device(k, v, b, ic, state, dtype, poison=float("nan"))
    want_in, want_out = chunk_states_device(*copies[1:], b, ic, state, dtype, poison=float("nan"))
    for x, y in zip((*got_in, *got_out), (*want_in, *want_out)):
        assert bool(mx.array_equal(x, y))
    h = chunk_outputs_device(q, k, v, b, ic, got_in, 1e-6, dtype, poison=float("nan"))
    want = chunk_outputs_device(*copies, b, ic, want_in, 1e-6, dtype, poison=float("nan"))
    assert h.shape == want.shape == (B, NH, NC, L, DV) and bool(mx.array_equal(h, want))
    assert not bool(mx.isnan(h.astype(mx.float32)).any())


def test_chunk_references_round_where_asked():
    """The references' entering_dtype / out_dtype round their float32 results once, and the chunkwise form
    (which asks for q's and v's types) equals the float32 path rounded by its consumer."""
    from mad.kernels.mlstm import chunk_outputs, chunk_states, mlstm_chunkwise

    rng = np.random.default_rng(7)
    B, NH, NC, L, DQK, DV = 1, 2, 3, 8, 16, 24
    q, k = (mx.array(rng.normal(0, s, (B, NH, NC, L, DQK)).astype(np.float32)).astype(mx.bfloat16) for s in (0.25, 0.7))
    v = mx.array(rng.normal(0, 0.5, (B, NH, NC, L, DV)).astype(np.float32)).astype(mx.bfloat16)
    b, ic = chunk_gates(rng, (B, NH, NC, L), i_std=2)
    state = (mx.array(rng.normal(0, 1, (B, NH, DQK, DV)).astype(np.float32)),
             mx.array(rng.normal(0, 1, (B, NH, DQK)).astype(np.float32)),
             mx.array(rng.normal(0, 2, (B, NH)).astype(np.float32)))
    with registry.use_reference():
        (C32, n, m), _ = chunk_states(k, v, b, ic, state)
        (C16, n16, m16), _ = chunk_states(k, v, b, ic, state, mx.bfloat16)
        assert C16.dtype == mx.bfloat16 and bool(mx.array_equal(C16, C32.astype(mx.bfloat16)))
        h32 = chunk_outputs(q, k, v, b, ic, (C32, n, m), 1e-6)
        h16 = chunk_outputs(q, k, v, b, ic, (C16, n, m), 1e-6, mx.bfloat16)
        assert h32.dtype == mx.float32 and bool(mx.array_equal(h16, h32.astype(mx.bfloat16)))
        T = NC * L
        qs, ks, vs = (x.reshape(B, NH, T, x.shape[-1]) for x in (q, k, v))
        i_pre, f_pre = (mx.array(rng.normal(0, 1, (B, NH, T)).astype(np.float32)) for _ in range(2))
        h, _ = mlstm_chunkwise(qs, ks, vs, i_pre, f_pre, state, chunk_size=L, scale="none")
        assert h.dtype == mx.bfloat16
        from mad.kernels.mlstm import _split_chunks
        qc, kc, vc, icc, bc = _split_chunks(qs, ks, vs, i_pre, f_pre, L)
        s_in, _ = chunk_states(kc, vc, bc, icc, state)
        want = chunk_outputs(qc, kc, vc, bc, icc, s_in, 1e-6).reshape(B, NH, T, DV).astype(mx.bfloat16)
        assert bool(mx.array_equal(h, want))


def test_chunk_kernels_decline_what_they_do_not_handle():
    from mad.kernels.mlstm_chunk_device import chunk_outputs_device

    def call(L=64, DQK=64, q_dtype=mx.bfloat16, given=True, backend="cuda"):
        q = mx.zeros((1, 1, 2, L, DQK), q_dtype)
        k, v = mx.zeros((1, 1, 2, L, DQK), mx.bfloat16), mx.zeros((1, 1, 2, L, 64), mx.bfloat16)
        gates = mx.zeros((1, 1, 2, L))
        state = (mx.zeros((1, 1, 2, DQK, 64)), mx.zeros((1, 1, 2, DQK)), mx.zeros((1, 1, 2))) if given else None
        return chunk_outputs_device(q, k, v, gates, gates, state, 1e-6, backend=backend)

    for case in (dict(backend="metal"), dict(given=False), dict(q_dtype=mx.float32), dict(q_dtype=mx.float16),
                 dict(DQK=40), dict(L=160)):
        with pytest.raises(registry.Unsupported):
            call(**case)
    q = mx.zeros((1, 1, 2, 8, 64), mx.bfloat16)
    with pytest.raises(registry.Unsupported, match="h in float32 or bf16"):
        chunk_outputs_device(q, q, q, mx.zeros((1, 1, 2, 8)), mx.zeros((1, 1, 2, 8)),
                             (mx.zeros((1, 1, 2, 64, 64)), mx.zeros((1, 1, 2, 64)), mx.zeros((1, 1, 2))), 1e-6,
                             mx.float16)
    from mad.kernels.mlstm_chunk_device import chunk_states_device

    state = (mx.zeros((1, 1, 64, 64)), mx.zeros((1, 1, 64)), mx.zeros((1, 1)))
    gates = mx.zeros((1, 1, 2, 8))
    for dtype, DQK, backend in ((mx.bfloat16, 64, "metal"), (mx.float16, 64, "cuda"), (mx.bfloat16, 40, "cuda")):
        kv = mx.zeros((1, 1, 2, 8, DQK), dtype)
        with pytest.raises(registry.Unsupported):
            chunk_states_device(kv, kv, gates, gates, state, backend=backend)
    kv = mx.zeros((1, 1, 2, 8, 64), mx.bfloat16)
    with pytest.raises(registry.Unsupported, match="entering C's in float32 or bf16"):
        chunk_states_device(kv, kv, gates, gates, state, mx.float16)


def test_float32_chunk_kernels_follow_mlx_tf32_setting(monkeypatch):
    """float32 operands go to the tensor-core kernels only while MLX would take float32 products in TF32;
    with MLX_ENABLE_TF32=0 (full float32 asked for) both decline and the reference runs."""
    from mad.kernels.mlstm_chunk_device import _float32_operands, mlx_uses_tf32

    x = mx.zeros((1, 1, 1, 8, 16))
    monkeypatch.setenv("MLX_ENABLE_TF32", "0")
    assert not mlx_uses_tf32()
    with pytest.raises(registry.Unsupported, match="MLX_ENABLE_TF32=0"):
        _float32_operands("mlstm_chunk_states", "cuda", x, x)
    assert _float32_operands("mlstm_chunk_states", "cuda", x.astype(mx.bfloat16), x.astype(mx.bfloat16)) is False
    monkeypatch.delenv("MLX_ENABLE_TF32")
    assert mlx_uses_tf32() and _float32_operands("mlstm_chunk_outputs", "cuda", x, x, x) is True


# ------------------------------------------------------------------------------------ sLSTM sequence kernel
def test_slstm_plan_keeps_weights_in_registers_and_blocks_resident():
    from mad.kernels.slstm_device import MAX_CPT, MAX_STAGED, MAX_THREADS, REGISTERS, RESERVED, plan

    p = plan(4, 512, 132)        # the ~1.3B stack: 4 heads of 512 on an H200
    assert (p.G, p.U, p.RP, p.RPT, p.CG, p.CPT, p.THREADS, p.BT) == (32, 16, 64, 2, 8, 64, 256, 8)
    for heads, dh in ((4, 192), (4, 16), (2, 20), (1, 1024), (8, 64), (3, 36), (1, 128)):
        p = plan(heads, dh, 132)
        assert heads * p.G <= 132 and p.G * p.U == dh and p.CG * p.CPT == dh
        assert p.RP % (32 * p.RPT) == 0 and 4 * p.U <= p.RP and p.THREADS == p.RP // p.RPT * p.CG <= MAX_THREADS
        assert p.CPT <= MAX_CPT and p.CPT % 4 == 0
        assert p.THREADS * (p.RPT * p.CPT + RESERVED) <= REGISTERS   # the weights stay in registers
        assert p.BT * p.U <= p.THREADS                  # one thread per (batch row, unit) in the gate math
        assert p.BT * dh <= MAX_STAGED * p.THREADS
    with pytest.raises(registry.Unsupported):
        plan(4, 6, 132)                                 # not float4 chunks: the reference runs
    with pytest.raises(registry.Unsupported):
        plan(16, 512, 132)                              # 16 * 32 blocks cannot all be resident


def test_slstm_dispatch_on_cpu_is_the_native_loop():
    """On the CPU the sLSTM loop is the native primitive's (kernels/slstm_native.py), on CUDA one kernel
    launch (in-kernel barrier: CUDA only); Metal runs the reference."""
    with mx.stream(mx.cpu):
        saved = mx.default_device()
        mx.set_default_device(mx.cpu)
        try:
            assert registry.dispatch("slstm_sequence").__name__ == "slstm_sequence[cpu]"
        finally:
            mx.set_default_device(saved)
    assert set(registry.kernels()["slstm_sequence"].variants) == {"cpu", "cuda"}


def slstm_inputs(rng, B, NH, T, DH, dtype, w_dtype):
    gates = [mx.array(rng.normal(mu, s, (B, NH, T, DH)).astype(np.float32)).astype(dtype)
             for mu, s in ((0, 2), (1, 2), (0, 1), (0, 1))]
    R = mx.array(rng.normal(0, 1 / np.sqrt(DH), (NH, 4 * DH, DH)).astype(np.float32)).astype(w_dtype)
    b = mx.array(rng.normal(0, 1, (4 * NH * DH,)).astype(np.float32))
    y, c = (mx.array(rng.normal(0, 1, (B, NH, DH)).astype(np.float32)) for _ in range(2))
    n = mx.array(rng.uniform(0.5, 3, (B, NH, DH)).astype(np.float32))
    m = mx.array(rng.normal(0, 2, (B, NH, DH)).astype(np.float32))
    return gates, R, b, (y, c, n, m)


@pytest.mark.skipif(GPU != "cuda", reason="needs MLX with a CUDA GPU")
@pytest.mark.parametrize("B,NH,T,DH", [(3, 2, 33, 16), (2, 4, 51, 192), (8, 4, 40, 512), (1, 1, 1, 20),
                                       (20, 2, 9, 64), (17, 4, 12, 512), (1, 4, 7, 36)])
@pytest.mark.parametrize("dtype,w_dtype", [(mx.float32, mx.float32), (mx.bfloat16, mx.bfloat16)])
def test_slstm_sequence_kernel_matches_reference(B, NH, T, DH, dtype, w_dtype):
    """Odd lengths, 1..4 heads, head dims 16..512 (1 to 32 blocks per head), batch tiles (B > BT for the
    20 x 64 and 17 x 512 cases: several tiles in one launch), zero and given initial state. The math is float32 in both (bf16 only
    rounds the inputs, the same for both, and the output h), so h and the state agree to float32 rounding."""
    from mad.kernels.slstm import slstm_sequence
    from mad.kernels.slstm_device import slstm_sequence_device

    rng = np.random.default_rng(B * 1000 + T + DH)
    gates, R, b, state = slstm_inputs(rng, B, NH, T, DH, dtype, w_dtype)
    for given in (state, None):
        h, final = slstm_sequence_device(*gates, R, b, given, poison=float("nan"))
        with mx.stream(mx.cpu):
            h_ref, final_ref = slstm_sequence(*gates, R, b, given)
            mx.eval(h_ref, final_ref)
        assert h.shape == h_ref.shape and h.dtype == h_ref.dtype
        assert rel_err(h, h_ref) < (1e-5 if dtype == mx.float32 else 1e-2)
        for a, ref in zip(final, final_ref):
            assert a.dtype == mx.float32 and rel_err(a, ref) < 1e-5


@pytest.mark.skipif(GPU != "cuda", reason="needs MLX with a CUDA GPU")
def test_slstm_prefill_then_steps_equals_one_launch():
    """Decoding reuses the kernel with T = 1; a prefill followed by single steps gives the full run.
    Head dim 512: 32 blocks per head exchange y every step, in every one of the launches."""
    from mad.kernels.slstm_device import slstm_sequence_device

    rng = np.random.default_rng(7)
    gates, R, b, _ = slstm_inputs(rng, 2, 4, 24, 512, mx.float32, mx.float32)
    h_full, s_full = slstm_sequence_device(*gates, R, b)
    h, state = slstm_sequence_device(*(g[:, :, :20] for g in gates), R, b)
    hs = [h]
    for t in range(20, 24):
        h, state = slstm_sequence_device(*(g[:, :, t:t + 1] for g in gates), R, b, state)
        hs.append(h)
    assert rel_err(mx.concatenate(hs, axis=2), h_full) < 1e-6
    for a, ref in zip(state, s_full):
        assert rel_err(a, ref) < 1e-6


@pytest.mark.skipif(GPU != "cuda", reason="needs MLX with a CUDA GPU")
def test_slstm_kernel_twice_in_one_compiled_graph():
    """Two launches of one shape in one compiled graph (mx.compile merges equal constants, so each launch
    must own its exchange buffer): the second layer reads the first one's output, single steps and a
    sequence, against the reference."""
    from mad.kernels.slstm import slstm_sequence
    from mad.kernels.slstm_device import slstm_sequence_device

    rng = np.random.default_rng(11)
    for T in (1, 9):
        gates, R, b, state = slstm_inputs(rng, 3, 4, T, 512, mx.float32, mx.float32)

        def two_layers(fn, gates, state):
            h1, s1 = fn(*gates, R, b, state)
            h2, s2 = fn(h1, *gates[1:], R, b, s1)
            return h2, s2

        got = mx.compile(lambda *g: two_layers(slstm_sequence_device, g, state))(*gates)
        with mx.stream(mx.cpu):
            want = two_layers(slstm_sequence, gates, state)
            mx.eval(want)
        assert rel_err(got[0], want[0]) < 1e-5
        for a, ref in zip(got[1], want[1]):
            assert rel_err(a, ref) < 1e-5


@pytest.mark.skipif(GPU != "cuda", reason="needs MLX with a CUDA GPU")
def test_v1_model_with_slstm_kernel_matches_the_cpu():
    """The tiny mLSTM/sLSTM stack (sLSTM heads of 16) on the GPU, sLSTM kernel dispatched, vs the CPU
    references, with re-randomised weights (the fresh recurrent kernel is zero, which would hide bugs)."""
    from mlx.utils import tree_map

    from mad import load

    assert registry.dispatch("slstm_sequence").__name__ == "slstm_sequence[cuda]"
    weights, logits = None, {}
    for name, device in (("gpu", mx.gpu), ("cpu", mx.cpu)):
        mx.set_default_device(device)
        try:
            model, _ = load("topologies/xlstm-v1-tiny.yaml")
            if weights is None:
                rng = np.random.default_rng(3)
                weights = tree_map(lambda p: mx.array(rng.normal(0, 0.2, p.shape).astype(np.float32)),
                                   model.program.parameters())
            model.program.load_weights(weights)
            tokens = mx.array(np.random.default_rng(0).integers(0, model.vocab_size, (2, 9)), dtype=mx.int32)
            _, state = model(tokens[:, :7])
            step, _ = model(tokens[:, 7:8], state)
            full, _ = model(tokens[:, :8])
            logits[name] = mx.concatenate([step, full[:, -1:]], axis=1)
            mx.eval(logits[name])
        finally:
            mx.set_default_device(mx.gpu)
    assert rel_err(logits["gpu"], logits["cpu"]) < 1e-5
    assert rel_err(logits["gpu"][:, 0], logits["gpu"][:, 1]) < 1e-5      # prefill + step == one pass
