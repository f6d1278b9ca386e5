"""The `quantized_linear` kernel: the packed layout its CUDA kernel reads (everywhere, in numpy), and the
kernel itself against `mx.dequantize` + a float32 matmul on the CPU stream (where MLX has CUDA).

The GPU cases cover every supported bits / group size / dtype, 1 to 8 rows, K not a multiple of the 256
or 512 values a warp reads per step, N not a multiple of the warps per block, the bias, soft-caps and the
parts of a fused group; outputs are poisoned (NaN) before the launch so that an unwritten one fails.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mad.kernels import registry
from mad.kernels.qlinear import QuantizedMatrix, affine_layout, quantized_linear
from mad.kernels.qlinear_device import (BITS, GROUP_SIZES, MAX_ROWS, SHARED_X_BYTES, WARPS, _launch, emulate_product,
                                        quantized_linear_device, staged_bytes, unpack_row)
from mad.quantize import QuantSettings, quantized_linear as module_product

CUDA = mx.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs MLX with a CUDA GPU")
DTYPES = [(mx.float32, 1e-5), (mx.bfloat16, 1e-2), (mx.float16, 1e-2)]


def packed_matrix(N: int, K: int, bits: int, group_size: int, dtype=mx.bfloat16, seed: int = 0) -> QuantizedMatrix:
    """A random [N, K] matrix (scale 0.05, with a per-row offset so that the biases matter) as mx.quantize packs it."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.05, (N, K)) + rng.normal(0, 0.05, (N, 1))
    with mx.stream(mx.cpu):
        wq, scales, biases = mx.quantize(mx.array(w.astype(np.float32)).astype(dtype), group_size, bits)
        mx.eval(wq, scales, biases)
    return QuantizedMatrix(wq, scales, biases, group_size, bits)


def dequantized(m: QuantizedMatrix) -> mx.array:
    """MLX's own dequantization of `m`, in float32 (the reference the kernel is held to)."""
    with mx.stream(mx.cpu):
        return mx.dequantize(m.weight, m.scales.astype(mx.float32), m.biases.astype(mx.float32), m.group_size, m.bits)


def rel_err(out: mx.array, ref: mx.array) -> float:
    out, ref = (np.array(a.astype(mx.float32), dtype=np.float64) for a in (out, ref))
    assert np.isfinite(out).all(), "NaN/Inf in the output (unwritten or overflowed elements)"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


# ------------------------------------------------------------------------------------ the layout (CPU)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("split", [False, True])
def test_the_kernels_unpacking_is_mlx_layout(bits, group_size, split):
    """`unpack_row` (the kernel's index arithmetic in numpy) gives the integers `mx.dequantize` reads: every
    value scale * q + bias of its group equals MLX's dequantized value. K covers a partial last warp step;
    `split`: the two offsets of 4-bit values with 16-bit rows of x."""
    K = group_size * 11
    m = packed_matrix(5, K, bits, group_size, mx.float32, seed=bits + group_size)
    words = np.array(m.weight)
    scales, biases = np.array(m.scales), np.array(m.biases)
    want = np.array(dequantized(m))
    for n in range(m.weight.shape[0]):
        q = unpack_row(words[n], bits, K, split)
        assert q.max() < 2 ** bits
        g = np.arange(K) // group_size
        # the integers MLX dequantized, recovered from its values
        np.testing.assert_array_equal(q, np.rint((want[n] - biases[n, g]) / scales[n, g]).astype(np.uint32))
        np.testing.assert_allclose(scales[n, g] * q.astype(np.float32) + biases[n, g], want[n], rtol=1e-6,
                                   atol=1e-7)


@pytest.mark.parametrize("bits,split", [(4, False), (4, True), (8, False)])
def test_the_kernels_affine_arithmetic(bits, split):
    """`emulate_product` (the kernel's float32 sums and per-chunk affine map in numpy, both offset schemes)
    against the float64 product with MLX's dequantized weights: within float32 rounding (1e-5 relative),
    where a wrong offset correction is off by the size of the result."""
    K, N = 64 * 11, 6
    m = packed_matrix(N, K, bits, 64, mx.float32, seed=bits)
    words, scales, biases = np.array(m.weight), np.array(m.scales), np.array(m.biases)
    w = np.array(dequantized(m)).astype(np.float64)
    rng = np.random.default_rng(bits)
    x = np.array(mx.array(rng.normal(0, 1, K).astype(np.float32)).astype(mx.bfloat16).astype(mx.float32))
    got = np.array([emulate_product(x, words[n], scales[n], biases[n], bits, 64, split) for n in range(N)])
    want = w @ x.astype(np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_quantized_linear_is_registered_for_cuda():
    kernel = registry.get("quantized_linear")
    assert kernel.reference is quantized_linear
    assert set(kernel.variants) == {"cpu", "cuda"}  # the CPU's for prompts (tests/test_qlinear_cpu.py)


def test_affine_layout_accepts_what_mx_quantize_packs_and_nothing_else():
    """The layout check both device kernels make before a launch (everywhere: it reads shapes only)."""
    m = packed_matrix(8, 128, 4, 64)
    x = mx.zeros((2, 128), mx.bfloat16)
    assert affine_layout(x, m) and affine_layout(x, m, mx.zeros((8,)), (mx.ones((128,)), 1e-6))
    wq, scales = mx.quantize(mx.random.normal((8, 128)), 32, 4, mode="mxfp4")
    for call in [(mx.zeros((2, 96), mx.bfloat16), m),                          # K not the packed width
                 (mx.zeros((2, 100), mx.bfloat16), m),                         # K not a multiple of the group
                 (x, QuantizedMatrix(wq, scales, None, 32, 4, "mxfp4")),       # not affine
                 (x, QuantizedMatrix(m.weight, m.scales[:, :1], m.biases, 64, 4)),  # scales of another shape
                 (x, m, mx.zeros((7,))),                                        # a bias of another width
                 (x, m, None, (mx.ones((64,)), 1e-6)),                          # a norm of another width
                 (x, m, None, (None, 1e-6))]:
        assert not affine_layout(*call)


def test_reference_adds_the_bias_and_caps_each_part(on_cpu):
    """The reference (the CPU path) against mx.dequantize + float32 matmul, parts capped separately."""
    m = packed_matrix(41, 256, 4, 64, mx.float32)
    rng = np.random.default_rng(1)
    x = mx.array(rng.normal(0, 1, (3, 256)).astype(np.float32))
    b = mx.array(rng.normal(0, 1, (41,)).astype(np.float32))
    splits, caps = (16, 24), (None, 0.5, 2.0)
    parts = quantized_linear(x, m, b, splits, caps)
    y = x @ dequantized(m).T + b
    refs = [y[:, :16], 0.5 * mx.tanh(y[:, 16:24] / 0.5), 2.0 * mx.tanh(y[:, 24:] / 2.0)]
    for p, r in zip(parts, refs):
        assert p.shape == r.shape and rel_err(p, r) < 1e-5


# ------------------------------------------------------------------------------------ the kernel (CUDA)
def reference(x: mx.array, m: QuantizedMatrix, bias=None, splits=(), caps=(None,)) -> list[mx.array]:
    """softcap(x dequantize(m)^T + bias) in float32 on the CPU stream, split into parts."""
    with mx.stream(mx.cpu):
        y = x.astype(mx.float32) @ dequantized(m).T
        if bias is not None:
            y = y + bias.astype(mx.float32)
        parts = mx.split(y, list(splits), axis=-1) if splits else [y]
        return [c * mx.tanh(p / c) if c else p for p, c in zip(parts, caps)]


CASES = [(bits, group_size, dtype, tol) for bits in BITS for group_size in GROUP_SIZES for dtype, tol in DTYPES]


@needs_cuda
@pytest.mark.parametrize("i", range(len(CASES)))
def test_kernel_matches_dequantized_float32(i):
    """Every bits / group size / dtype, rows cycling through 1, 3 and 8; K = 11 groups (not a multiple of
    a warp's step) and N = 4 * WARPS + 1 (a partly filled last block)."""
    bits, group_size, dtype, tol = CASES[i]
    M, K, N = (1, 3, MAX_ROWS)[i % 3], group_size * 11, 4 * WARPS + 1
    m = packed_matrix(N, K, bits, group_size, dtype, seed=i)
    x = mx.array(np.random.default_rng(100 + i).normal(0, 1, (M, K)).astype(np.float32)).astype(dtype)
    (y,) = quantized_linear_device(x, m, poison=float("nan"))
    assert y.dtype == dtype and y.shape == (M, N)
    assert rel_err(y, reference(x, m)[0]) < tol
    (y3,) = quantized_linear_device(x.reshape(1, M, K), m)  # leading dims are flattened
    assert y3.shape == (1, M, N) and rel_err(y3[0], reference(x, m)[0]) < tol


@needs_cuda
@pytest.mark.parametrize("features,steps_ahead,warps,shared_x", [(1, 0, 4, False), (8, 1, 4, False), (2, 3, 8, True),
                                                                  (4, 2, 2, False), (4, 12, 4, True), (4, 1, 4, True)])
@pytest.mark.parametrize("M", [1, 3])
def test_every_launch_setting_computes_the_same_product(features, steps_ahead, warps, shared_x, M):
    """Features per warp, steps loaded ahead, warps per block and x staged in shared memory change how the
    work is cut, not the product: N = 37 leaves a warp's features partly past the end (with staged x, a
    whole warp past it in the last block), K = 37 groups of 64 three warp steps at 4 bits and five at 8,
    the last partial (12 steps ahead: more than the row has). Loading ahead changes when the bytes
    arrive and staging who sums x, not the arithmetic: the same bits as the plainest setting."""
    N, K = 37, 64 * 37
    for bits in BITS:
        m = packed_matrix(N, K, bits, 64, seed=features + bits)
        x = mx.array(np.random.default_rng(M).normal(0, 1, (M, K)).astype(np.float32)).astype(mx.bfloat16)
        (y,) = quantized_linear_device(x, m, poison=float("nan"), features=features, steps_ahead=steps_ahead,
                                       warps=warps, shared_x=shared_x)
        assert rel_err(y, reference(x, m)[0]) < 1e-2
        (y0,) = quantized_linear_device(x, m, features=features, steps_ahead=0, warps=warps, shared_x=False)
        assert mx.array_equal(y, y0).item()


def test_negative_steps_ahead_is_refused():
    """Checked before any launch (everywhere: the check reads the argument only)."""
    m = packed_matrix(8, 128, 4, 64)
    with pytest.raises(ValueError, match="steps_ahead must be 0 or more, got -1"):
        quantized_linear_device(mx.zeros((1, 128), mx.bfloat16), m, steps_ahead=-1)


def test_staged_x_fits_where_the_kernel_takes_it():
    """The shared memory staged x takes (the figure ptxas reports for the q|k|v|o shape: 17,424 bytes),
    and which decode shapes of xLSTM-7B it fits: one row of the 10,944-wide down projection, not two."""
    assert staged_bytes(1, 4096, 4, WARPS) == 17424
    assert staged_bytes(1, 10944, 4, WARPS) <= SHARED_X_BYTES < staged_bytes(2, 10944, 4, WARPS)


@needs_cuda
@pytest.mark.parametrize("bits", BITS)
def test_staged_x_with_a_folded_norm(bits):
    """With a folded RMS norm, staging sums the squares in another order (per thread, then per warp): the
    result agrees with the unstaged kernel to the rounding of the bf16 output and with the reference."""
    K, N = 64 * 37, 37
    m = packed_matrix(N, K, bits, 64, seed=bits)
    rng = np.random.default_rng(bits)
    x = mx.array(rng.normal(0, 1, (2, K)).astype(np.float32)).astype(mx.bfloat16)
    g = mx.array(rng.normal(1, 0.1, (K,)).astype(np.float32)).astype(mx.bfloat16)
    staged, plain = (_launch(x, m, None, (), (None,), "cuda", float("nan"), norm=(g, 1e-6), shared_x=flag)[0]
                     for flag in (True, False))
    with mx.stream(mx.cpu):
        normed = mx.fast.rms_norm(x.astype(mx.float32), g.astype(mx.float32), 1e-6)
    assert rel_err(staged, reference(normed, m)[0]) < 1e-2
    assert rel_err(staged, plain) < 2e-3


@needs_cuda
@pytest.mark.parametrize("bits", BITS)
def test_scales_keep_their_own_dtype(bits):
    """Scales and biases of another dtype than x (float32 with bf16 rows, as a float32 matrix quantized and
    read by a bf16 model): the kernel reads them as they are, not rounded to x's dtype."""
    m = packed_matrix(37, 64 * 37, bits, 64, mx.float32, seed=bits)
    x = mx.array(np.random.default_rng(bits).normal(0, 1, (1, 64 * 37)).astype(np.float32)).astype(mx.bfloat16)
    (y,) = quantized_linear_device(x, m, poison=float("nan"))
    assert rel_err(y, reference(x, m)[0]) < 1e-2


@needs_cuda
@pytest.mark.parametrize("bits", BITS)
def test_kernel_on_a_decode_shape(bits):
    """A 4096-wide row of xLSTM-7B's shapes, one row of bfloat16 (the decode case)."""
    m = packed_matrix(1000, 4096, bits, 64, seed=bits)
    x = mx.array(np.random.default_rng(bits).normal(0, 1, (1, 4096)).astype(np.float32)).astype(mx.bfloat16)
    (y,) = quantized_linear_device(x, m, poison=float("nan"))
    assert rel_err(y, reference(x, m)[0]) < 1e-2


@needs_cuda
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("M", [1, MAX_ROWS])
@pytest.mark.parametrize("dtype,tol", DTYPES[:2])
def test_kernel_adds_the_bias_and_caps_each_part(bits, M, dtype, tol):
    """A fused group's call: parts of widths 16, 8, 8, 9 with a bias over all of them, caps on two parts
    (one small enough that tanh saturates) and none on the others. (No bias and no cap: the cases above.)"""
    rng = np.random.default_rng(M + bits)
    K, splits, caps = 320, (16, 24, 32), (None, 15.0, None, 0.5)
    m = packed_matrix(41, K, bits, 32, dtype, seed=M)
    x = mx.array(rng.normal(0, 1, (M, 1, K)).astype(np.float32)).astype(dtype)
    b = mx.array(rng.normal(0, 3, (41,)).astype(np.float32)).astype(dtype)
    parts = quantized_linear_device(x, m, b, splits, caps, poison=float("nan"))
    assert [p.shape for p in parts] == [(M, 1, 16), (M, 1, 8), (M, 1, 8), (M, 1, 9)]
    for p, r in zip(parts, reference(x, m, b, splits, caps)):
        assert p.dtype == dtype and rel_err(p, r) < tol


@needs_cuda
def test_kernel_declines_what_it_does_not_handle():
    """Other bits, the floating-point modes (no biases), too many rows: Unsupported, and dispatch runs
    mx.quantized_matmul instead."""
    x = mx.random.normal((2, 128))
    declined = [(x, packed_matrix(8, 128, 3, 64, mx.float32)),          # 3 bits
                (x, packed_matrix(8, 128, 6, 32, mx.float32)),          # 6 bits
                (mx.random.normal((MAX_ROWS + 1, 128)), packed_matrix(8, 128, 4, 64, mx.float32))]
    wq, scales = mx.quantize(mx.random.normal((8, 128)), 32, 4, mode="mxfp4")
    declined.append((x, QuantizedMatrix(wq, scales, None, 32, 4, "mxfp4")))
    for xi, m in declined:
        with pytest.raises(registry.Unsupported):
            quantized_linear_device(xi, m)
    xi, m = declined[2]  # the reference on the GPU: mx.quantized_matmul
    with mx.stream(mx.cpu):
        want = xi @ dequantized(m).T
    assert rel_err(registry.dispatch("quantized_linear")(xi, m)[0], want) < 1e-5


@needs_cuda
def test_the_quantized_modules_run_the_kernel_with_the_reference_gradient():
    """mad.quantize's product dispatches to the kernel (compiled or not); a gradient with respect to x and
    the bias is the reference's (the packed matrix is a constant of the call)."""
    assert registry.dispatch("quantized_linear").__name__ == "quantized_linear[cuda]"
    m = packed_matrix(48, 256, 4, 64, mx.float32)
    rng = np.random.default_rng(7)
    x = mx.array(rng.normal(0, 1, (2, 256)).astype(np.float32))
    b = mx.array(rng.normal(0, 1, (48,)).astype(np.float32))
    q = QuantSettings(m.bits, m.group_size)
    kernel = quantized_linear_device(x, m, b, (16,), (None, 3.0))
    run = lambda x, b: module_product(x, m.weight, m.scales, m.biases, q, b, (16,), (None, 3.0))  # noqa: E731
    for fn in (run, mx.compile(run)):
        got = fn(x, b)
        assert all(mx.array_equal(g, k) for g, k in zip(got, kernel))
    cot = mx.array(rng.normal(0, 1, (2, 48)).astype(np.float32))
    loss = lambda product: lambda x, b: (mx.concatenate(product(x, b), axis=-1) * cot).sum()  # noqa: E731
    got = mx.grad(loss(run), argnums=(0, 1))(x, b)
    want = mx.grad(loss(lambda x, b: quantized_linear(x, m, b, (16,), (None, 3.0))), argnums=(0, 1))(x, b)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5
