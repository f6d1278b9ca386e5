"""The tensor-core 4-bit kernel (kernels/qlinear_mma.py).

Everywhere: a numpy emulation of the kernel's fragments (which nibbles a lane unpacks, into which register,
which values of x it pairs with them, placed where the PTX ISA's m16n8k16 layout puts them) computes the
product of a packed matrix in float64 and must give x dequantize(W)^T: it checks the index arithmetic and
the unpacking without a GPU. On CUDA: the kernel against `mx.dequantize` + a float32 product on the CPU, for
every group size, bf16 and f16, 1 to 8 rows, forced splits over k, partial tiles and groups, the bias and
soft-caps, the folds, batch invariance, and what it declines.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mad.kernels import qlinear_device, registry
from mad.kernels.fold import folded_linear
from mad.kernels.qlinear import QuantizedMatrix
from mad.kernels.qlinear_device import quantized_linear_device
from mad.kernels.qlinear_mma import GROUP_SIZES, MAX_ROWS, launch_mma, split_for

from test_qlinear_kernel import dequantized, packed_matrix, reference, rel_err

CUDA = mx.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs MLX with a CUDA GPU")


@pytest.fixture(autouse=True)
def tensor_cores(monkeypatch):
    """The variant offers all its calls to the tensor-core kernel (kernels/qlinear_device.py)."""
    monkeypatch.setattr(qlinear_device, "TENSOR_CORES", "all")


# ------------------------------------------------------------------------------- the fragments (numpy)
def _halves(reg: int, half: bool) -> tuple[float, float]:
    """The two 16-bit floats of a 32-bit register (low half first), as float64."""
    bits = np.array([reg & 0xFFFF, reg >> 16], np.uint16)
    if half:
        return tuple(float(v) for v in bits.view(np.float16))  # type: ignore[return-value]
    return tuple(float(v) for v in (bits.astype(np.uint32) << 16).view(np.float32))  # type: ignore[return-value]


def _nib(word: int, s: int, half: bool) -> int:
    """QMMA_BODY's unpacking of nibbles s and s + 4: rotate right by (4 s - QBIT) mod 32, mask, OR 1.0's exponent."""
    qbit = 6 if half else 3
    rot = (4 * s - qbit) & 31
    rotated = ((word >> rot) | (word << (32 - rot))) & 0xFFFFFFFF
    mask = (0xF << qbit) | (0xF << (qbit + 16))
    return (rotated & mask) | (0x3C003C00 if half else 0x3F803F80)


def emulate(m: QuantizedMatrix, x_bits: np.ndarray, half: bool) -> np.ndarray:
    """The kernel's product for one tile of 16 rows at a time, in float64, from its fragments: x_bits (M, K)
    uint16 (bf16 or f16 patterns), M <= 8. Returns (M, N)."""
    words = np.array(m.weight).astype(np.int64)
    scales, biases = (np.array(a.astype(mx.float32), np.float64) for a in (m.scales, m.biases))
    N, K = words.shape[0], words.shape[1] * 8
    M, gs = x_bits.shape[0], m.group_size
    wpl = gs // 32                                                     # words a lane holds per row and group
    x = (np.array(x_bits, np.uint16).view(np.float16).astype(np.float64) if half
         else (x_bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64))
    out = np.zeros((M, N))
    for r0 in range(0, N, 16):
        rows = [min(r0 + i, N - 1) for i in range(16)]
        acc = np.zeros((16, 8))
        for grp in range(K // gs):
            D, E = np.zeros((16, 8)), np.zeros((16, 8))
            for j in range(2 * wpl):
                wi, s = j >> 1, 2 * (j & 1)
                A, B = np.zeros((16, 16)), np.zeros((16, 8))
                for lane in range(32):
                    gid, tig = lane >> 2, lane & 3
                    word = grp * gs // 8 + tig * wpl + wi                  # the lane's word of its rows
                    k0 = 8 * word                                         # its first value
                    regs = {(gid, 0): _nib(int(words[rows[gid], word]), s, half),            # a0
                            (gid + 8, 0): _nib(int(words[rows[gid + 8], word]), s, half),    # a1
                            (gid, 8): _nib(int(words[rows[gid], word]), s + 1, half),        # a2
                            (gid + 8, 8): _nib(int(words[rows[gid + 8], word]), s + 1, half)}  # a3
                    for (row, c0), reg in regs.items():
                        A[row, c0 + 2 * tig], A[row, c0 + 2 * tig + 1] = _halves(reg, half)
                    if gid < M:                                           # b0: x[k0+s], x[k0+s+4]; b1: +1
                        for c0, kk in ((0, k0 + s), (8, k0 + s + 1)):
                            B[c0 + 2 * tig, gid], B[c0 + 2 * tig + 1, gid] = x[gid, kk], x[gid, kk + 4]
                D += A @ B
                E += np.ones((16, 16)) @ B
            s16 = 16 * scales[rows, grp][:, None]
            acc += s16 * D + (biases[rows, grp][:, None] - s16) * E
        for i, n in enumerate(range(r0, min(r0 + 16, N))):
            out[:, n] = acc[i, :M]
    return out


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_the_fragments_compute_the_dequantized_product(group_size, half):
    """The emulation of the kernel's fragments (two tiles' worth of rows, 3 rows of x, 2 groups) gives
    x dequantize(W)^T to float64 rounding: every nibble lands on its k, with the x it multiplies."""
    dtype = mx.float16 if half else mx.bfloat16
    N, K, M = 19, 2 * group_size, 3
    m = packed_matrix(N, K, 4, group_size, dtype, seed=group_size)
    xv = mx.array(np.random.default_rng(group_size).normal(0, 1, (M, K)).astype(np.float32)).astype(dtype)
    x_bits = np.array(xv.view(mx.uint16))
    want = np.array(xv.astype(mx.float32), np.float64) @ np.array(dequantized(m), np.float64).T
    got = emulate(m, x_bits, half)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())


def test_the_split_depends_on_the_matrix_alone():
    assert split_for(385, 64) == 8          # q|k|v|o of xLSTM-7B: 12304 rows / 32
    assert split_for(1572, 64) == 2         # lm_head
    assert split_for(10, 3) == 3            # no more warps than groups
    assert split_for(100_000, 64) == 1


@pytest.mark.parametrize("bad", [{"split": 0}, {"split": 33}, {"split": 2.0}, {"split": True}, {"ahead": -1},
                                 {"ahead": 5}, {"ahead": "1"}])
def test_launch_settings_out_of_range_are_refused(bad):
    """The benchmarks' knobs (warps per block, groups ahead) are checked before anything is launched."""
    m = packed_matrix(8, 128, 4, 64)
    with pytest.raises(ValueError, match="must be an integer"):
        launch_mma(mx.zeros((1, 128), mx.bfloat16), m, None, (), (None,), "cuda", None, **bad)


# ------------------------------------------------------------------------------------ the kernel (CUDA)
def _x(M, K, dtype, seed):
    return mx.array(np.random.default_rng(seed).normal(0, 1, (M, K)).astype(np.float32)).astype(dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("M", [1, 3, MAX_ROWS])
def test_kernel_matches_dequantized_float32(M, group_size, dtype):
    """K = 11 groups (not a multiple of any split), N = 37 (the second tile partly past the end)."""
    K, N = group_size * 11, 37
    m = packed_matrix(N, K, 4, group_size, dtype, seed=M + group_size)
    x = _x(M, K, dtype, M)
    want = reference(x, m)[0]
    for split, ahead in ((None, None), (1, 0), (3, 1), (8, 2)):
        y = launch_mma(x, m, None, (), (None,), "cuda", float("nan"), split=split, ahead=ahead)
        assert y.dtype == dtype and y.shape == (M, N)
        assert rel_err(y, want) < 1e-2, (split, ahead)


@needs_cuda
@pytest.mark.parametrize("M", [1, MAX_ROWS])
def test_kernel_adds_the_bias_and_caps_each_part(M):
    K, splits, caps = 320, (16, 24, 32), (None, 15.0, None, 0.5)
    m = packed_matrix(41, K, 4, 32, mx.bfloat16, seed=M)
    x = _x(M, K, mx.bfloat16, M).reshape(M, 1, K)
    b = mx.array(np.random.default_rng(9).normal(0, 3, (41,)).astype(np.float32)).astype(mx.bfloat16)
    parts = quantized_linear_device(x, m, b, splits, caps, poison=float("nan"))
    assert [p.shape for p in parts] == [(M, 1, 16), (M, 1, 8), (M, 1, 8), (M, 1, 9)]
    for p, r in zip(parts, reference(x, m, b, splits, caps)):
        assert rel_err(p, r) < 1e-2


@needs_cuda
@pytest.mark.parametrize("fold", ["norm", "pair", "norm+pair", "residual", "pair+residual"])
def test_kernel_folds(fold):
    """The folds against the unfused operations in float32 (N = 2 x 37: a pair's tile partly past the end)."""
    K, width, M = 64 * 11, 37, 3
    pair = "silu" if "pair" in fold else None
    N = 2 * width if pair else width
    m = packed_matrix(N, K, 4, 64, mx.bfloat16, seed=5)
    x = _x(M, K, mx.bfloat16, 6)
    kw = {"pair": pair}
    if "norm" in fold:
        kw["norm"] = (_x(1, K, mx.bfloat16, 7)[0], 1e-6)
    if "residual" in fold:
        kw["residual"] = _x(M, width, mx.bfloat16, 8)
    splits = (width,) if pair else ()
    caps = (None, None) if pair else (None,)
    got = launch_mma(x, m, None, splits, caps, "cuda", float("nan"), kw.get("norm"), pair, kw.get("residual"),
                     width if (pair or "residual" in fold) else None)
    with mx.stream(mx.cpu):
        f32 = lambda a: None if a is None else a.astype(mx.float32)  # noqa: E731
        fkw = dict(kw, norm=(f32(kw["norm"][0]), 1e-6) if "norm" in kw else None, residual=f32(kw.get("residual")))
        want = folded_linear(f32(x), dequantized(m), None, splits, caps, **fkw)
    want = want[0] if isinstance(want, list) else want
    assert got.shape == want.shape and rel_err(got, want) < 1e-2


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_a_row_gets_the_same_bits_alone_and_in_a_batch(dtype):
    m = packed_matrix(300, 4096, 4, 64, dtype, seed=1)
    x = _x(MAX_ROWS, 4096, dtype, 2)
    (batch,) = quantized_linear_device(x, m)
    for r in (0, 5, MAX_ROWS - 1):
        (alone,) = quantized_linear_device(x[r:r + 1], m)
        assert mx.array_equal(alone[0], batch[r])


@needs_cuda
def test_kernel_declines_what_it_does_not_handle():
    """8 bits, float32 rows, more than 8 rows: Unsupported from the tensor-core kernel; the variant then runs
    the per-value kernel (8 bits, float32) or the reference."""
    for x, m in [(_x(1, 128, mx.bfloat16, 0), packed_matrix(8, 128, 8, 64)),
                 (_x(1, 128, mx.float32, 0), packed_matrix(8, 128, 4, 64, mx.float32)),
                 (_x(MAX_ROWS + 1, 128, mx.bfloat16, 0), packed_matrix(8, 128, 4, 64))]:
        with pytest.raises(registry.Unsupported):
            launch_mma(x, m, None, (), (None,), "cuda", None)
    x, m = _x(1, 128, mx.float32, 0), packed_matrix(8, 128, 4, 64, mx.float32)
    assert rel_err(quantized_linear_device(x, m)[0], reference(x, m)[0]) < 1e-5  # the per-value kernel


@needs_cuda
def test_decode_shape_against_the_per_value_kernel(monkeypatch):
    """A 7B-wide product: the two kernels agree (each within bf16 rounding of the float32 product)."""
    m = packed_matrix(1000, 4096, 4, 64, seed=3)
    x = _x(1, 4096, mx.bfloat16, 4)
    (mma,) = quantized_linear_device(x, m)
    monkeypatch.setattr(qlinear_device, "TENSOR_CORES", "none")
    (fma,) = quantized_linear_device(x, m)
    want = reference(x, m)[0]
    assert rel_err(mma, want) < 1e-2 and rel_err(fma, want) < 1e-2 and rel_err(mma, fma) < 1e-2


def test_tensor_core_settings_choose_the_products(monkeypatch):
    """"all" offers every product, "long" those with K >= 2 N (the down projection), "none" none; anything
    else is refused with the setting's name."""
    cases = {(10944, 4096): {"all", "long"}, (4096, 4096): {"all"}, (4096, 50304): {"all"}}
    for setting in qlinear_device.TENSOR_CORE_SETTINGS:
        monkeypatch.setattr(qlinear_device, "TENSOR_CORES", setting)
        for (K, N), offered in cases.items():
            assert qlinear_device.takes_tensor_cores(K, N) == (setting in offered)
    monkeypatch.setattr(qlinear_device, "TENSOR_CORES", True)
    with pytest.raises(ValueError, match="TENSOR_CORES"):
        qlinear_device.takes_tensor_cores(4096, 4096)
