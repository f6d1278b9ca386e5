"""The sLSTM kernel's CPU layout (kernels/slstm.py): the one-exp gate activations, and the compiled loop against
stepping, eagerly and inside a compiled program, for batches and single steps."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mad.kernels import slstm


def test_gate_exps_are_the_two_exps_bit_for_bit():
    """exp(i - m_new) and exp(lfm - m_new) from one exp: random, tied, fresh and large arguments."""
    keys = mx.random.split(mx.random.key(0), 3)
    i_raw = mx.concatenate([mx.random.normal((4096,), key=keys[0]) * 10, mx.array([0.0, 1.0, -3.0, 80.0, -80.0])])
    lfm = mx.concatenate([mx.random.normal((4096,), key=keys[1]) * 10, mx.array([0.0, 1.0, 2.0, -80.0, 80.0])])
    for fresh in (mx.zeros(i_raw.shape, dtype=mx.bool_), mx.random.bernoulli(0.3, i_raw.shape, key=keys[2])):
        m_new = mx.where(fresh, i_raw, mx.maximum(i_raw, lfm))
        i_exp, f_exp = slstm._gate_exps(i_raw, lfm, fresh)
        assert mx.array_equal(i_exp, mx.exp(i_raw - m_new))
        assert mx.array_equal(f_exp, mx.exp(lfm - m_new))


def _inputs(B, NH, T, DH, seed):
    keys = mx.random.split(mx.random.key(seed), 10)
    gates = [mx.random.normal((B, NH, T, DH), key=keys[j]) * 2 for j in range(4)]
    R = mx.random.normal((NH, 4 * DH, DH), key=keys[4]) * 0.3
    b = mx.random.normal((4 * NH * DH,), key=keys[5])
    y, c, m = (mx.random.normal((B, NH, DH), key=keys[k]) for k in (6, 7, 8))
    n = mx.abs(mx.random.normal((B, NH, DH), key=keys[9])) + 0.5
    return gates, R, b, (y, c, n, m)


@pytest.mark.parametrize("B, NH, T, DH", [(3, 2, 11, 8), (1, 4, 9, 16), (2, 1, 2, 5)])
def test_sequence_is_its_steps_eager_and_compiled(B, NH, T, DH):
    gates, R, b, state = _inputs(B, NH, T, DH, B + T)
    for given in (None, state):
        st, hs = given, []
        for t in range(T):
            h, st = slstm.slstm_step(*(g[:, :, t:t + 1] for g in gates), R, b, st)
            hs.append(h)
        h_steps = mx.concatenate(hs, axis=2)
        eager = slstm.slstm_sequence(*gates, R, b, given)
        compiled = mx.compile(lambda *a: slstm.slstm_sequence(*a[:6], given))(*gates, R, b)
        for h, final in (eager, compiled):
            assert mx.array_equal(h, h_steps)
            for a, want in zip(final, st):
                assert a.shape == (B, NH, DH) and a.dtype == mx.float32 and mx.array_equal(a, want)


def test_single_step_sequence_is_the_step():
    gates, R, b, state = _inputs(2, 3, 1, 6, 5)
    h, final = slstm.slstm_sequence(*gates, R, b, state)
    h_step, final_step = slstm.slstm_step(*gates, R, b, state)
    assert mx.array_equal(h, h_step) and all(mx.array_equal(a, c) for a, c in zip(final, final_step))


def test_low_precision_inputs_run_in_float32():
    gates, R, b, _ = _inputs(2, 2, 6, 8, 9)
    h32, s32 = slstm.slstm_sequence(*gates, R, b)
    h16, s16 = slstm.slstm_sequence(*(g.astype(mx.bfloat16) for g in gates), R, b)
    assert h16.dtype == mx.bfloat16 and all(s.dtype == mx.float32 for s in s16)
    assert np.abs(np.array(h16.astype(mx.float32)) - np.array(h32)).max() < 0.1
