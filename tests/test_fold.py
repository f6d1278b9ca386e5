"""Folding a linear's neighbours into its kernel (mad.passes.find_folds, kernels/fold.py).

Everywhere: which folds the pass finds; that a Program runs its nodes unchanged where no kernel takes a fold
(the CPU); the plumbing (raw inputs, residuals, pairs, last-position reads), by standing the reference in
as a CPU variant; the reference against the unfused operations. With MLX's CUDA backend: the kernels
against the reference in float32 on the CPU stream, their gradients, and a model's decode with and without
folds.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mad
from mad.errors import MadError
from mad.kernels import registry
from mad.kernels.fold import apply, apply_head_norm_gate, folded_linear, head_norm_gate
from mad.kernels import linear_device, qlinear_device
from mad.kernels.linear import linear
from mad.kernels.qlinear import QuantizedMatrix
from mad.passes import find_folds, find_norm_gates

CUDA = mx.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs MLX with a CUDA GPU")
SMALL_7B = ["dims.L=2", "dims.D=128", "dims.V=256", "dims.NH=2"]


def rand(shape, seed, scale=1.0, dtype=mx.float32) -> mx.array:
    return mx.array(np.random.default_rng(seed).normal(0, scale, shape).astype(np.float32)).astype(dtype)


def rel_err(out: mx.array, ref: mx.array) -> float:
    out, ref = (np.array(a.astype(mx.float32), dtype=np.float64) for a in (out, ref))
    assert np.isfinite(out).all(), "NaN/Inf in the output (unwritten or overflowed elements)"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


# ------------------------------------------------------------------------------------------ the pass
def test_the_pass_folds_the_7b_blocks_norms_residuals_and_gated_pair():
    program = mad.build("topologies/xlstm-7b.yaml", SMALL_7B)
    folds = {f.unit: f.describe() for f in program.folds}
    b = "backbone.blocks.0"
    assert folds[f"{b}.mlstm_layer.q"] == {"linear": f"{b}.mlstm_layer.q", "into": f"{b}.mlstm_layer.q",
                                           "norm": f"{b}.norm_mlstm"}
    assert folds[f"{b}.mlstm_layer.out_proj"] == {"linear": f"{b}.mlstm_layer.out_proj", "into": f"{b}.mlstm_residual",
                                                  "residual": "backbone.embeddings"}
    assert folds[f"{b}.ffn.proj_up_gate"] == {"linear": f"{b}.ffn.proj_up_gate", "into": f"{b}.ffn.swiglu",
                                              "norm": f"{b}.norm_ffn", "pair": "silu"}
    assert folds[f"{b}.ffn.proj_down"] == {"linear": f"{b}.ffn.proj_down", "into": f"{b}.ffn_residual",
                                           "residual": f"{b}.mlstm_residual"}
    assert folds["lm_head"] == {"linear": "lm_head", "into": "lm_head", "norm": "backbone.out_norm"}
    assert len(folds) == 9
    assert program.plan()["folds"] == [f.describe() for f in program.folds] + [g.describe() for g in program.norm_gates]


def test_the_pass_finds_each_mlstm_layers_norm_and_output_gate():
    program = mad.build("topologies/xlstm-7b.yaml", SMALL_7B)
    layer = "backbone.blocks.{}.mlstm_layer"
    assert [g.describe() for g in program.norm_gates] == [
        {"norm": f"{layer.format(i)}.multihead_norm", "into": f"{layer.format(i)}.output_gate",
         "gate": f"{layer.format(i)}.ogate_preact", "act": "sigmoid"} for i in range(2)]
    form = program.norm_gates[0].norm_form
    assert (form.kind, form.heads, form.eps, form.offset, form.bias) == ("head_norm", 2, 1e-6, 0.0, None)
    # the original stack's norm feeds a skip connection, not a gate: nothing to fold
    assert find_norm_gates(mad.build("topologies/xlstm-v1-125m.yaml", ["dims.L=2"]).graph) == []


def test_no_norm_gate_where_the_norm_has_another_reader(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("""
mad: 1
name: m
dims: {B: batch, T: seq, D: 64}
inputs:
  x: {shape: [B, T, D], dtype: float32}
nodes:
  o: {type: linear, out: D, in: x}
  norm: {type: multihead_layernorm, heads: 4, in: x}
  gated: {type: gate, act: sigmoid, in: [o, norm]}
  both: {type: add, in: [gated, norm]}
outputs: {y: both}
""")
    assert find_norm_gates(mad.build(str(path)).graph) == []
    path.write_text(path.read_text().replace("in: [gated, norm]}", "in: [gated, o]}"))
    assert [g.norm for g in find_norm_gates(mad.build(str(path)).graph)] == ["norm"]


def test_no_fold_where_a_linear_has_other_readers_or_is_an_output(tmp_path):
    """out_proj read by the add and by an output: not folded into the add; a gate over a group of three,
    or over members in the other order: no pair."""
    path = tmp_path / "m.yaml"
    path.write_text("""
mad: 1
name: folds
dims: {B: batch, T: seq, D: 32}
inputs: {x: {shape: [B, T, D], dtype: float32}}
nodes:
  norm: {type: rmsnorm, in: x}
  a: {type: linear, out: D, in: norm}
  b: {type: linear, out: D, in: norm}
  c: {type: linear, out: D, in: norm}
  g1: {type: gate, act: silu, in: [b, a]}
  g2: {type: gate, act: silu, in: [c, g1]}
  proj: {type: linear, out: D, in: g2}
  res: {type: add, in: [x, proj]}
outputs: {y: res, p: proj}
""")
    program = mad.build(str(path))
    assert [f.describe() for f in program.folds] == [{"linear": "a", "into": "a", "norm": "norm"}]


def test_mad_fold_turns_folding_off(monkeypatch):
    monkeypatch.setenv("MAD_FOLD", "0")
    assert mad.build("topologies/xlstm-7b.yaml", SMALL_7B).folds == []
    monkeypatch.setenv("MAD_FOLD", "yes")
    with pytest.raises(MadError, match="MAD_FOLD must be 0 or 1"):
        mad.build("topologies/xlstm-7b.yaml", SMALL_7B)
    monkeypatch.delenv("MAD_FOLD")
    assert mad.build("topologies/xlstm-7b.yaml", SMALL_7B, compile="stage").folds == []  # a stage sees its own values
    assert mad.build("topologies/xlstm-7b.yaml", SMALL_7B, fuse=False).folds == []  # folding goes with fusion


# ------------------------------------------------------------------------------------------ the Program
def _decode(program, tokens, steps=3):
    """Logits of a prompt read at once and of `steps` steps after it, and the last state."""
    out, state = program(tokens)
    logits = [out["logits"]]
    for t in range(steps):
        o, state = program(tokens[:, t:t + 1], state)
        logits.append(o["logits"])
    o, _ = program(tokens, last_only=True)
    logits.append(o["logits"])
    return logits, state


def test_without_a_kernel_the_folded_program_runs_the_nodes_as_they_are(monkeypatch):
    """On the CPU no variant takes a fold: outputs and state equal an unfolded program's, bit for bit."""
    tokens = mx.array(np.random.default_rng(0).integers(0, 256, (2, 5)), mx.int32)
    mx.random.seed(0)
    with mx.stream(mx.cpu):
        folded = mad.build("topologies/xlstm-7b.yaml", SMALL_7B)
        monkeypatch.setenv("MAD_FOLD", "0")
        plain = mad.build("topologies/xlstm-7b.yaml", SMALL_7B)
        plain.load_weights(folded.parameters())
        assert folded.folds and not plain.folds
        (a, sa), (b, sb) = _decode(folded, tokens), _decode(plain, tokens)
        for x, y in zip(a, b):
            assert mx.array_equal(x, y).item()
        for n in sa:
            for k in sa[n]:
                assert mx.array_equal(sa[n][k], sb[n][k]).item()


@pytest.mark.parametrize("quantized", [False, True])
def test_folds_hand_the_right_ingredients(monkeypatch, quantized):
    """The reference (the unfused operations, from the ingredients the Program hands over) stands in as a
    CPU variant: a decode step, a prompt read and a last-position read agree with the unfolded program to
    float32 rounding. A wrong input, residual or pair order would be off by O(1)."""
    tokens = mx.array(np.random.default_rng(1).integers(0, 256, (1, 4)), mx.int32)
    mx.random.seed(0)  # the same weights in every run (MLX seeds its generator from the clock)
    with mx.stream(mx.cpu):
        model, _ = mad.load("topologies/xlstm-7b.yaml", overrides=SMALL_7B)
        if quantized:
            mad.quantize.quantize_model(model, bits=8, group_size=32)
        reference_logits, reference_state = _decode(model.program, tokens)  # no variant: the nodes' values
        calls = []

        def variant(*args, **kwargs):
            calls.append(kwargs)
            return folded_linear(*args, **kwargs)

        monkeypatch.setitem(registry.get("folded_linear").variants, "cpu", variant)
        model.program.clear_compiled()  # traced again: the variant is chosen while tracing
        assert model.program.folds
        logits, state = _decode(model.program, tokens)
    assert len(calls) >= 9 and any(c.get("pair") == "silu" for c in calls)
    assert any(c.get("residual") is not None and c.get("norm") is None for c in calls)
    for got, want in zip(logits, reference_logits):
        assert got.shape == want.shape and rel_err(got, want) < 1e-5
    for n in state:
        for k in state[n]:
            assert rel_err(state[n][k], reference_state[n][k]) < 1e-5


def test_the_reference_is_the_unfused_operations():
    x, r = rand((3, 64), 0), rand((3, 16), 1)
    w, g, b = rand((32, 64), 2, 0.1), rand((64,), 3), rand((32,), 4)
    with mx.stream(mx.cpu):
        h = mx.fast.rms_norm(x, g, 1e-5)
        up, gate = linear(h, w, b, [16], (None, 5.0))
        got = folded_linear(x, w, b, [16], (None, 5.0), norm=(g, 1e-5), pair="silu", residual=r)
        assert mx.allclose(got, r + up * mx.sigmoid(up) * gate, rtol=1e-6, atol=1e-6).item()
        parts = folded_linear(x, w, b, [16], (None, 5.0), norm=(g, 1e-5))
        assert all(mx.array_equal(p, q).item() for p, q in zip(parts, (up, gate)))
        assert mx.array_equal(folded_linear(h, w[:16], None, residual=r), r + h @ w[:16].T).item()
        value = [mx.zeros((3, 16))]
        with registry.use_reference():
            assert apply(value, x, w) is value  # no variant under the reference policy: the nodes' value


@pytest.mark.parametrize("offset,bias,act", [(0.0, False, "sigmoid"), (1.0, True, "silu")])
def test_head_norm_gate_reference_is_the_unfused_nodes(offset, bias, act):
    """The reference computes what the multi-head norm's module and the gate compute (blocks/mlstm.py)."""
    from mad.blocks.mlstm import MultiHeadNorm
    from mad.blocks.wiring import gated

    x, o = rand((2, 3, 64), 0), rand((2, 3, 64), 1)
    norm = MultiHeadNorm(4, 64, 1e-5, bias, offset)
    norm.weight = rand((64,), 2)
    if bias:
        norm.bias = rand((64,), 3)
    with mx.stream(mx.cpu):
        want = gated(act)(o, norm(x))
        got = head_norm_gate(o, x, norm.weight, norm.bias if bias else None, eps=1e-5, heads=4, offset=offset, act=act)
        assert mx.allclose(got, want, rtol=1e-6, atol=1e-6).item()
        value = mx.zeros((2, 3, 64))
        with registry.use_reference():
            assert apply_head_norm_gate(value, o, x, norm.weight, heads=4) is value
        with pytest.raises(ValueError, match="act must be one of"):
            head_norm_gate(o, x, norm.weight, heads=4, act="gelu")


def test_a_prompts_residual_fold_is_one_addmm_where_asked(monkeypatch):
    """PROMPT_ADDMM: a residual fold of more rows than the decode kernel takes runs as mx.addmm inside
    inference() (no launch: the call never reaches the kernel, so this runs on the CPU); outside it, with a
    bias, a pair or with the setting off, the variant declines and the nodes run."""
    from mad.kernels.linear_device import folded_linear_device

    x, w = rand((2, 40, 64), 0, dtype=mx.bfloat16), rand((48, 64), 1, 0.1, mx.bfloat16)
    r = rand((2, 40, 48), 2, dtype=mx.bfloat16)
    with mx.stream(mx.cpu):
        want = folded_linear(x.astype(mx.float32), w.astype(mx.float32), residual=r.astype(mx.float32))
        with pytest.raises(registry.Unsupported):
            folded_linear_device(x, w, residual=r)
        monkeypatch.setattr(linear_device, "PROMPT_ADDMM", True)
        with registry.inference():
            got = folded_linear_device(x, w, residual=r)
            assert got.dtype == mx.bfloat16 and got.shape == r.shape and rel_err(got, want) < 1e-2
            for declined in ({"bias": rand((48,), 3, dtype=mx.bfloat16), "residual": r},
                             {"pair": "silu", "splits": [24], "residual": mx.contiguous(r[..., :24])}):
                with pytest.raises(registry.Unsupported):
                    folded_linear_device(x, w, **declined)
        with pytest.raises(registry.Unsupported):  # gradients may be taken here: the nodes run
            folded_linear_device(x, w, residual=r)


# ------------------------------------------------------------------------------------------ the kernels (CUDA)
def _weight(N, K, quantized, dtype, seed):
    w = rand((N, K), seed, 0.05, dtype)
    if not quantized:
        return w
    with mx.stream(mx.cpu):
        wq, scales, biases = mx.quantize(w, 64, quantized)
        mx.eval(wq, scales, biases)
    return QuantizedMatrix(wq, scales, biases, 64, quantized)


def _float32_reference(x, weight, bias, splits, caps, **fold):
    """The reference in float32 on the CPU stream (a quantized weight dequantized first)."""
    with mx.stream(mx.cpu):
        if isinstance(weight, QuantizedMatrix):
            weight = mx.dequantize(weight.weight, weight.scales.astype(mx.float32),
                                   weight.biases.astype(mx.float32), weight.group_size, weight.bits)
        f32 = lambda a: None if a is None else a.astype(mx.float32)  # noqa: E731
        if fold.get("norm") is not None:
            fold["norm"] = (f32(fold["norm"][0]), fold["norm"][1])
        if fold.get("residual") is not None:
            fold["residual"] = f32(fold["residual"])
        return folded_linear(f32(x), f32(weight), f32(bias), splits, caps, **fold)


CASES = [(q, M, dtype, tol) for q in (None, 4, 8) for M in (1, 3) for dtype, tol in
         ((mx.bfloat16, 1e-2), (mx.float32, 2e-5))]


@needs_cuda
@pytest.mark.parametrize("quantized,M,dtype,tol", CASES)
@pytest.mark.parametrize("fold", ["norm", "pair", "norm+pair", "residual", "pair+residual", "norm+residual"])
@pytest.mark.parametrize("shared_x", [False, True])
def test_kernel_matches_the_reference(monkeypatch, quantized, M, dtype, tol, fold, shared_x):
    """Rows 1 and 3, bf16 and float32 (4-/8-bit weights: x's dtype), a bias, a soft-cap on one part, K = 11
    groups of 64 (not a multiple of a warp's step), widths not a multiple of the warps per block; x read
    by each warp, or staged once a block (`SHARED_X` of both kernels)."""
    monkeypatch.setattr(linear_device, "SHARED_X", shared_x)
    monkeypatch.setattr(qlinear_device, "SHARED_X", shared_x)
    K, width = 64 * 11, 37
    pair = "silu" if "pair" in fold else None
    N = 2 * width if pair else width
    splits, caps = ((width,), (None, 3.0)) if pair else ((), (2.0,))
    weight = _weight(N, K, quantized, dtype, seed=M)
    x, bias = rand((M, 1, K), 10 + M, dtype=dtype), rand((N,), 20, dtype=dtype)
    kw = {"pair": pair}
    if "norm" in fold:
        kw["norm"] = (rand((K,), 30, dtype=dtype), 1e-6)
    if "residual" in fold:
        kw["residual"] = rand((M, 1, width), 40, dtype=dtype)
    want = _float32_reference(x, weight, bias, splits, caps, **kw)
    value = object()
    monkeypatch.setattr(linear_device, "FOLD_NORM", True)  # off by default (speed), held to the reference all the same
    got = apply(value, x, weight, bias, splits, caps, **kw)
    assert got is not value, "no kernel took the call"
    if isinstance(want, list):
        assert len(got) == len(want) == 1
        got, want = got[0], want[0]
    assert got.dtype == dtype and got.shape == want.shape and rel_err(got, want) < tol


@needs_cuda
@pytest.mark.parametrize("M,dtype,tol", [(1, mx.bfloat16, 1e-2), (3, mx.float32, 2e-5)])
@pytest.mark.parametrize("fold", ["norm+pair", "norm+residual", "norm+pair+residual"])
def test_float_kernel_without_its_norm_still_folds_the_pair_and_residual(M, dtype, tol, fold):
    """FOLD_NORM off (the default): a wide unit's norm runs as MLX's kernel and the float kernel takes the rest."""
    assert not linear_device.FOLD_NORM
    K, width = 64 * 11, linear_device.NORM_FOLD_WIDTH + 37
    pair = "silu" if "pair" in fold else None
    N = 2 * width if pair else width
    splits, caps = ((width,), (None, None)) if pair else ((), (None,))
    weight = _weight(N, K, None, dtype, seed=M)
    x = rand((M, 1, K), 10 + M, dtype=dtype)
    kw = {"pair": pair, "norm": (rand((K,), 30, dtype=dtype), 1e-6)}
    if "residual" in fold:
        kw["residual"] = rand((M, 1, width), 40, dtype=dtype)
    want = _float32_reference(x, weight, None, splits, caps, **kw)
    value = object()
    got = apply(value, x, weight, None, splits, caps, **kw)
    assert got is not value, "no kernel took the call"
    assert got.dtype == dtype and got.shape == want.shape and rel_err(got, want) < tol


@needs_cuda
@pytest.mark.parametrize("M,dtype,tol", [(1, mx.bfloat16, 1e-2), (3, mx.float32, 2e-5)])
def test_float_kernel_takes_a_narrow_units_norm(M, dtype, tol):
    """FOLD_NORM off (the default): a unit of up to NORM_FOLD_WIDTH features (a 4-bit model's bf16 input and
    forget gates, with their soft-cap and bias) takes its norm in the float kernel."""
    assert not linear_device.FOLD_NORM
    K, N = 64 * 11, 16
    splits, caps = (8,), (15.0, 15.0)
    weight = _weight(N, K, None, dtype, seed=M)
    x, bias = rand((M, 1, K), 10 + M, dtype=dtype), rand((N,), 20, dtype=dtype)
    kw = {"norm": (rand((K,), 30, dtype=dtype), 1e-6)}
    want = _float32_reference(x, weight, bias, splits, caps, **kw)
    value = object()
    got = apply(value, x, weight, bias, splits, caps, **kw)
    assert got is not value, "no kernel took the call"
    for a, b in zip(got, want):
        assert a.dtype == dtype and a.shape == b.shape and rel_err(a, b) < tol


@needs_cuda
@pytest.mark.parametrize("rows,DH,dtype,tol", [(1, 512, mx.bfloat16, 1e-2), (3, 96, mx.float32, 2e-6),
                                               (2, 1024, mx.float32, 2e-6)])
@pytest.mark.parametrize("offset,bias,act", [(0.0, False, "sigmoid"), (1.0, True, "silu")])
def test_head_norm_gate_kernel_matches_the_reference(rows, DH, dtype, tol, offset, bias, act):
    """One launch for the multi-head norm and the gate: held to the float32 reference, every element written
    (NaN poison), heads not a multiple of the block's threads, a bias and NX-AI's weight offset."""
    from mad.kernels.norm_device import head_norm_gate_device

    heads = 4
    D = heads * DH
    x, o = rand((rows, 1, D), 0, 3.0, dtype) + 1, rand((rows, 1, D), 1, dtype=dtype)
    w, b = rand((D,), 2, dtype=dtype), rand((D,), 3, dtype=dtype) if bias else None
    f32 = lambda a: None if a is None else a.astype(mx.float32)  # noqa: E731
    with mx.stream(mx.cpu):
        want = head_norm_gate(f32(o), f32(x), f32(w), f32(b), eps=1e-6, heads=heads, offset=offset, act=act)
    got = head_norm_gate_device(o, x, w, b, eps=1e-6, heads=heads, offset=offset, act=act, poison=float("nan"))
    assert got.dtype == dtype and got.shape == x.shape and rel_err(got, want) < tol
    assert apply_head_norm_gate(None, o, x, w, b, eps=1e-6, heads=heads, offset=offset, act=act) is not None
    # the gate as a slice of a fused projection's columns and x as a slice too: read through their strides
    wide = mx.concatenate([rand((rows, 1, 5), 4, dtype=dtype), o, rand((rows, 1, 3), 5, dtype=dtype)], axis=-1)
    wide_x = mx.concatenate([x, rand((rows, 1, 7), 6, dtype=dtype)], axis=-1)
    sliced = head_norm_gate_device(wide[..., 5:5 + D], wide_x[..., :D], w, b, eps=1e-6, heads=heads, offset=offset,
                                   act=act, poison=float("nan"))
    assert mx.array_equal(sliced, got).item()
    # what it does not take: the reference's value stays
    assert apply_head_norm_gate(None, o, x, w, b, heads=heads, act="gelu") is None
    assert apply_head_norm_gate(None, o, x, w, b, heads=3 * D, act=act) is None


@needs_cuda
def test_kernel_declines_what_it_does_not_handle():
    """More rows than the decode kernels take, a norm for the float kernel (FOLD_NORM), or a pair of unequal
    parts: `apply` returns the value."""
    w = rand((32, 64), 0, 0.1, mx.bfloat16)
    value = object()
    assert apply(value, rand((64, 64), 1, dtype=mx.bfloat16), w) is value
    assert apply(value, rand((1, 64), 1, dtype=mx.bfloat16), w, norm=(rand((64,), 2, dtype=mx.bfloat16), 1e-6)) is value
    assert apply(value, rand((1, 64), 1, dtype=mx.bfloat16), w, None, [10], (None, None), pair="silu") is value


@needs_cuda
def test_gradients_through_a_kernel_are_the_references(monkeypatch):
    x, w, g, r = rand((1, 64), 0), rand((32, 64), 1, 0.1), rand((64,), 2), rand((1, 16), 3)
    monkeypatch.setattr(linear_device, "FOLD_NORM", True)  # the float kernel takes the norm (off by default: speed)

    def loss(fn, x, w, g, r):
        return (fn(x, w, None, [16], (None, None), norm=(g, 1e-6), pair="silu", residual=r) ** 2).sum()

    got = mx.grad(lambda *a: loss(lambda *b, **k: apply(None, *b, **k), *a), argnums=(0, 1, 2, 3))(x, w, g, r)
    with mx.stream(mx.cpu):
        want = mx.grad(lambda *a: loss(folded_linear, *a), argnums=(0, 1, 2, 3))(x, w, g, r)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


@needs_cuda
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_decode_with_folds_agrees_with_the_unfolded_program(monkeypatch, dtype, tol):
    """xLSTM-7B's block shape at width 256: prompt, decode steps and a last-position read, folded (the
    kernels) against unfolded, on the GPU."""
    tokens = mx.array(np.random.default_rng(2).integers(0, 256, (1, 6)), mx.int32)
    overrides = ["dims.L=2", "dims.D=256", "dims.V=512"]
    folded = mad.build("topologies/xlstm-7b.yaml", overrides, dtype=dtype)
    monkeypatch.setenv("MAD_FOLD", "0")
    plain = mad.build("topologies/xlstm-7b.yaml", overrides, dtype=dtype)
    plain.load_weights(folded.parameters())
    (a, sa), (b, sb) = _decode(folded, tokens), _decode(plain, tokens)
    for x, y in zip(a, b):
        assert rel_err(x, y) < tol
