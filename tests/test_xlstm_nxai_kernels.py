"""The sLSTM kernel (`mad.kernels.slstm`) and the v1 blocks against plain numpy float64 references.

The numpy reference spells out the documented layouts (R[h, g*DH + o, j], gate-major bias; docs/xlstm-reference.md,
"The sLSTM cell"), so a device kernel tested against `slstm_sequence` inherits them.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mad.kernels.slstm import slstm_sequence, slstm_step, zero_state

RNG = np.random.default_rng(7)


def slstm_numpy(wx: np.ndarray, R: np.ndarray, b: np.ndarray, state=None):
    """wx (4, B, NH, T, DH) gates i, f, z, o; R (NH, 4*DH, DH); b (4*NH*DH,). float64, NX-AI's vanilla math."""
    _, B, NH, T, DH = wx.shape
    y, c, n, m = state if state is not None else [np.zeros((B, NH, DH)) for _ in range(4)]
    bias = b.reshape(4, NH, DH)
    hs = []
    for t in range(T):
        ry = np.einsum("hrj,bhj->bhr", R, y).reshape(B, NH, 4, DH)      # R[h, g*DH + o, j] y[h, j]
        raw = [wx[g, :, :, t] + ry[:, :, g] + bias[g] for g in range(4)]
        i_raw, f_raw, z_raw, o_raw = raw
        lfm = m + -np.logaddexp(0.0, -f_raw)
        m_new = np.where(n == 0, i_raw, np.maximum(i_raw, lfm))
        i = np.minimum(np.exp(i_raw - m_new), 1.0)
        f = np.minimum(np.exp(lfm - m_new), 1.0)
        c = f * c + i * np.tanh(z_raw)
        n = f * n + i
        y = 1 / (1 + np.exp(-o_raw)) * c / n
        m = m_new
        hs.append(y)
    return np.stack(hs, axis=2), (y, c, n, m)


def draw(B, NH, T, DH):
    wx = RNG.normal(size=(4, B, NH, T, DH))
    wx[0] += RNG.uniform(-3, 3, size=(1, NH, 1, DH))             # spread input gates
    R = RNG.normal(size=(NH, 4 * DH, DH)) * 0.4
    b = RNG.normal(size=(4 * NH * DH,))
    return wx, R, b


def to_mx(*arrays, dtype=mx.float32):
    return [mx.array(a.astype(np.float32)).astype(dtype) for a in arrays]


@pytest.mark.parametrize("B, NH, T, DH", [(1, 1, 1, 3), (2, 3, 17, 5), (3, 4, 9, 8)])
def test_sequence_matches_numpy(B, NH, T, DH):
    wx, R, b = draw(B, NH, T, DH)
    h_ref, s_ref = slstm_numpy(wx, R, b)
    h, s = slstm_sequence(*to_mx(*wx), *to_mx(R, b))
    assert h.shape == (B, NH, T, DH) and all(x.dtype == mx.float32 and x.shape == (B, NH, DH) for x in s)
    assert np.abs(np.array(h) - h_ref).max() < 1e-5
    for got, ref in zip(s, s_ref):
        assert np.abs(np.array(got) - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


def test_steps_and_split_sequences_equal_one_sequence():
    wx, R, b = draw(2, 2, 13, 4)
    args = to_mx(R, b)
    h, s = slstm_sequence(*to_mx(*wx), *args)
    state, hs = None, []
    for t in range(13):
        h_t, state = slstm_step(*to_mx(*wx[:, :, :, t:t + 1]), *args, state)
        hs.append(np.array(h_t))
    assert np.abs(np.concatenate(hs, axis=2) - np.array(h)).max() < 1e-6
    h1, s1 = slstm_sequence(*to_mx(*wx[:, :, :, :6]), *args)
    h2, s2 = slstm_sequence(*to_mx(*wx[:, :, :, 6:]), *args, s1)
    assert np.abs(np.concatenate([np.array(h1), np.array(h2)], axis=2) - np.array(h)).max() < 1e-6
    for a, c, d in zip(state, s2, s):
        assert np.abs(np.array(a) - np.array(d)).max() < 1e-5 and np.abs(np.array(c) - np.array(d)).max() < 1e-5


def test_zero_state_rule_is_per_sequence():
    """A batch mixing a fresh row and a continued row gives each row what it gets alone."""
    wx, R, b = draw(2, 2, 5, 3)
    args = to_mx(R, b)
    _, warm = slstm_sequence(*to_mx(*wx[:, 1:2]), *args)              # row 1 has read 5 steps
    mixed = tuple(mx.concatenate([z, w], axis=0) for z, w in zip(zero_state(1, 2, 3), warm))
    h, _ = slstm_sequence(*to_mx(*wx), *args, mixed)
    alone0, _ = slstm_sequence(*to_mx(*wx[:, 0:1]), *args)
    alone1, _ = slstm_sequence(*to_mx(*wx[:, 1:2]), *args, warm)
    assert np.abs(np.array(h[0:1]) - np.array(alone0)).max() < 1e-6
    assert np.abs(np.array(h[1:2]) - np.array(alone1)).max() < 1e-6


def test_bfloat16_inputs_keep_a_float32_recurrence():
    wx, R, b = draw(1, 2, 7, 4)
    args = to_mx(*wx, R, b, dtype=mx.bfloat16)
    h, s = slstm_sequence(*args)
    assert h.dtype == mx.bfloat16 and all(x.dtype == mx.float32 for x in s)
    rounded = [np.array(a.astype(mx.float32), dtype=np.float64) for a in args]   # the bf16 inputs, exactly
    ref, s_ref = slstm_numpy(np.stack(rounded[:4]), rounded[4], rounded[5])
    assert np.abs(np.array(s[1]) - s_ref[1]).max() < 1e-4                         # float32 recurrence
    assert np.abs(np.array(h.astype(mx.float32)) - ref).max() < 1e-2              # h rounded to bf16 at the end


def test_bad_shapes_raise():
    wx, R, b = draw(1, 2, 3, 4)
    i, f, z, o = to_mx(*wx)
    with pytest.raises(ValueError, match="R of shape"):
        slstm_sequence(i, f, z, o, mx.zeros((2, 4, 16)), mx.array(b.astype(np.float32)))
    with pytest.raises(ValueError, match="b of shape"):
        slstm_sequence(i, f, z, o, mx.array(R.astype(np.float32)), mx.zeros((8,)))
    with pytest.raises(ValueError, match="T == 1"):
        slstm_step(i, f, z, o, *to_mx(R, b))


# ----------------------------------------------------------------------------------------- blocks
@pytest.fixture(scope="module")
def blocks():
    from types import SimpleNamespace

    from mad.blocks import conv, core

    return SimpleNamespace(CausalConv1d=conv.CausalConv1d, _PointwiseConv=conv._PointwiseConv,
                           HeadwiseLinear=core.HeadwiseLinear)


@pytest.mark.parametrize("kernel", [1, 2, 4])
def test_causal_conv1d(blocks, kernel):
    F, T = 6, 9
    mod = (blocks._PointwiseConv if kernel == 1 else blocks.CausalConv1d)(F, kernel, True)
    x = RNG.normal(size=(2, T, F)).astype(np.float32)
    w = np.array(mod.conv.weight)[:, 0, :]                            # (F, K)
    xp = np.concatenate([np.zeros((2, kernel - 1, F)), x], axis=1)
    ref = sum(xp[:, j:j + T] * w[:, j] for j in range(kernel)) + np.array(mod.conv.bias)
    if kernel == 1:
        assert np.abs(np.array(mod(mx.array(x))) - ref).max() < 1e-5
        return
    y, state = mod(mx.array(x))
    assert np.abs(np.array(y) - ref).max() < 1e-5
    assert state["x"].shape == (2, kernel - 1, F) and state["x"].dtype == mx.float32
    assert np.abs(np.array(state["x"]) - x[:, T - kernel + 1:]).max() == 0.0
    ys, st = [], None                                                 # prefill 4, then single steps
    y0, st = mod(mx.array(x[:, :4]), state=st)
    ys.append(np.array(y0))
    for t in range(4, T):
        yt, st = mod(mx.array(x[:, t:t + 1]), state=st)
        ys.append(np.array(yt))
    assert np.abs(np.concatenate(ys, axis=1) - ref).max() < 1e-5


@pytest.mark.parametrize("heads, d_in, d_out", [(16, 64, 64), (2, 24, 48), (3, 9, 3)])
def test_headwise_linear(blocks, heads, d_in, d_out):
    mod = blocks.HeadwiseLinear(heads, d_in, d_out, bias=True)
    mod.bias = mx.array(RNG.normal(size=(d_out,)).astype(np.float32))
    x = RNG.normal(size=(2, 5, d_in)).astype(np.float32)
    w = np.array(mod.weight)                                          # (heads, out/heads, in/heads)
    ref = np.einsum("bthd,hod->btho", x.reshape(2, 5, heads, -1), w).reshape(2, 5, d_out) + np.array(mod.bias)
    assert np.abs(np.array(mod(mx.array(x))) - ref).max() < 1e-5
    mod._small = not mod._small                                       # the other code path, same result
    assert np.abs(np.array(mod(mx.array(x))) - ref).max() < 1e-5
