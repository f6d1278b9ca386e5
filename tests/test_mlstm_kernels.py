"""Tests of the pure-MLX mLSTM cell (kernels/mlstm.py) against an independent float64 numpy loop.

The reference below is a straight transcription of the recurrent step of
docs/xlstm-reference.md ("The mLSTM cell", "Recurrent step"); it shares no code with the module under test.
Inputs are drawn so that the gates really move: i ~ N(0, 3), f ~ N(2, 2).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

try:  # repository checkout, run from the repo root (does not import the rest of mad)
    from kernels.mlstm import mlstm_chunkwise, mlstm_parallel, mlstm_sequence, mlstm_step
except ImportError:  # installed package layout
    from mad.kernels.mlstm import mlstm_chunkwise, mlstm_parallel, mlstm_sequence, mlstm_step

B, NH, DQK, DV = 2, 3, 8, 16
EPS = 1e-6
# Tolerances. h_j = num_j / den_j is a ratio of sums whose terms can cancel (the gates are large
# here, so |h| reaches ~100 where den nearly cancels). Rounding errors are relative to the
# magnitudes of the summed terms, so h is compared elementwise against
#     scale = (sum |terms of num| + |h| sum |terms of den|) / den,
# computed in float64 for both the recurrent products (q^.C, q^.n) and the sums over time steps of
# the chunkwise/parallel forms (the larger is used). Float32: |err| <= 1e-5 * scale, about n * u
# with n ~ 140 summed terms and u = 2^-24 (observed <= ~3e-6 * scale; the median scale is ~2, so
# the typical allowance is ~2e-5 absolute). The state is a sum of terms with weights <= 1: 1e-5.
F32_REL = 1e-5
STATE_TOL = 1e-5


# ----------------------------------------------------------------------------- numpy reference
def np_logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def ref_recurrent(q, k, v, i, f, state=None, eps=EPS):
    """float64 recurrent mLSTM, one step at a time (the step formulas of the doc).

    Also returns, per output element, the magnitude |q^|^T |C_t| + |h_t| (|q^| . |n_t|) over the
    denominator: the scale that rounding errors of the products q^.C and q^.n are relative to.
    """
    Bq, H, T, dqk = q.shape
    if state is None:
        C = np.zeros((Bq, H, dqk, v.shape[-1]))
        n = np.zeros((Bq, H, dqk))
        m = np.zeros((Bq, H))
    else:
        C, n, m = (np.asarray(s, dtype=np.float64) for s in state)
    hs, scales = [], []
    for t in range(T):
        lf = np_logsigmoid(f[:, :, t])
        m_new = np.maximum(lf + m, i[:, :, t])
        fa = np.exp(lf + m - m_new)
        ia = np.exp(i[:, :, t] - m_new)
        kt, vt = k[:, :, t], v[:, :, t]
        C = fa[..., None, None] * C + ia[..., None, None] * kt[..., :, None] * vt[..., None, :]
        n = fa[..., None] * n + ia[..., None] * kt
        m = m_new
        qh = q[:, :, t] / np.sqrt(dqk)
        num = np.einsum("bhd,bhde->bhe", qh, C)
        qn = np.einsum("bhd,bhd->bh", qh, n)
        den = np.maximum(np.abs(qn), np.exp(-m)) + eps
        h = num / den[..., None]
        abs_num = np.einsum("bhd,bhde->bhe", np.abs(qh), np.abs(C))
        abs_den = np.einsum("bhd,bhd->bh", np.abs(qh), np.abs(n))
        hs.append(h)
        scales.append((abs_num + np.abs(h) * abs_den[..., None]) / den[..., None])
    return np.stack(hs, axis=2), (C, n, m), np.stack(scales, axis=2)


def parallel_scale(q, k, v, i, f, h, state=None, eps=EPS):
    """The same error scale for the sums over time steps of the chunkwise/parallel forms:
    (sum_l |q^_j.k_l| w_jl |v_l| + |h_j| sum_l |q^_j.k_l| w_jl) / den_j, initial-state term included."""
    Bq, H, T, dqk = q.shape
    if state is None:
        state = (np.zeros((Bq, H, dqk, v.shape[-1])), np.zeros((Bq, H, dqk)), np.zeros((Bq, H)))
    C0, n0, m0 = state
    qh = q / np.sqrt(dqk)
    b = np.cumsum(np_logsigmoid(f), axis=-1)
    log_d = b[..., :, None] - b[..., None, :] + i[..., None, :]
    log_d = np.where(np.tril(np.ones((T, T), dtype=bool)), log_d, -np.inf)
    m = np.maximum(log_d.max(-1), b + m0[..., None])  # the recurrent stabiliser
    w0 = np.exp(b + m0[..., None] - m)  # weight of the initial state
    s = (qh @ k.swapaxes(-1, -2)) * np.exp(log_d - m[..., None])
    den = np.abs(s.sum(-1) + w0 * (qh @ n0[..., None])[..., 0])
    den = np.maximum(den, np.exp(-m)) + eps
    abs_num = np.abs(s) @ np.abs(v) + w0[..., None] * (np.abs(qh) @ np.abs(C0))
    abs_den = np.abs(s).sum(-1) + w0 * (np.abs(qh) @ np.abs(n0)[..., None])[..., 0]
    return (abs_num + np.abs(h) * abs_den[..., None]) / den[..., None]


def ref_parallel(q, k, v, i, f, eps=EPS):
    """float64 fully parallel form (stabiliser max_l logD_jl, no m_0 = 0 term)."""
    T, dqk = q.shape[2], q.shape[3]
    b = np.cumsum(np_logsigmoid(f), axis=-1)
    log_d = b[..., :, None] - b[..., None, :] + i[..., None, :]
    log_d = np.where(np.tril(np.ones((T, T), dtype=bool)), log_d, -np.inf)
    m = log_d.max(-1)
    s = np.einsum("bhjd,bhld->bhjl", q / np.sqrt(dqk), k) * np.exp(log_d - m[..., None])
    den = np.maximum(np.abs(s.sum(-1)), np.exp(-m)) + eps
    return np.einsum("bhjl,bhle->bhje", s, v) / den[..., None]


# ----------------------------------------------------------------------------- helpers
def f32_exact(x):
    """float64 values exactly representable in float32: the reference sees the kernel's inputs."""
    return x.astype(np.float32).astype(np.float64)


def make_inputs(T, seed, i_std=3.0, f_mean=2.0, f_std=2.0):
    rng = np.random.default_rng(seed)
    return tuple(f32_exact(x) for x in (
        rng.normal(0.0, 1.0, (B, NH, T, DQK)),
        rng.normal(0.0, 0.7, (B, NH, T, DQK)),
        rng.normal(0.0, 0.5, (B, NH, T, DV)),
        rng.normal(0.0, i_std, (B, NH, T)),
        rng.normal(f_mean, f_std, (B, NH, T)),
    ))


def make_state(seed):
    """An arbitrary (not necessarily reachable) state: the formulas must hold for any state."""
    rng = np.random.default_rng(seed)
    return tuple(f32_exact(x) for x in (rng.normal(0.0, 1.0, (B, NH, DQK, DV)),
                                        rng.normal(0.0, 1.0, (B, NH, DQK)),
                                        rng.normal(0.0, 2.0, (B, NH))))


def reference(arrs, state=None):
    """h, final state and per-element error scale (the larger of the two forms' scales)."""
    h, s, rec_scale = ref_recurrent(*arrs, state=state)
    return h, s, np.maximum(rec_scale, parallel_scale(*arrs, h, state=state))


def to_mx(arrs, qkv_dtype=mx.float32):
    q, k, v, i, f = arrs
    return tuple(mx.array(x.astype(np.float32)).astype(qkv_dtype) for x in (q, k, v)) + (
        mx.array(i.astype(np.float32)), mx.array(f.astype(np.float32)))


def state_to_mx(state):
    return tuple(mx.array(s.astype(np.float32)) for s in state)


def to_np(x):
    return np.array(x.astype(mx.float32), dtype=np.float64)


def assert_h_close(h, h_ref, scale, rel=F32_REL, extra=0.0):
    """|h - h_ref| <= rel * scale + extra, elementwise (scale from `reference`)."""
    err = np.abs((to_np(h) if isinstance(h, mx.array) else h) - h_ref)
    ok = err <= rel * scale + extra
    assert ok.all(), (f"{(~ok).sum()} / {ok.size} elements off: max err {err.max():.3g}, "
                      f"max err/scale {(err / scale).max():.3g} (allowed {rel:.3g})")


def assert_state_close(actual, expected, atol=STATE_TOL, rtol=STATE_TOL):
    for a, e, name in zip(actual, expected, "Cnm"):
        assert a.dtype == mx.float32, name
        np.testing.assert_allclose(to_np(a), e, atol=atol, rtol=rtol, err_msg=f"state {name}")


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("T", [1, 7, 37, 130])
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_auto_and_step_match_numpy(T, chunk_size):
    arrs = make_inputs(T, seed=T * 100 + chunk_size)
    h_ref, s_ref, scale = reference(arrs)
    args = to_mx(arrs)
    h_auto, s_auto = mlstm_sequence(*args, chunk_size=chunk_size)
    assert h_auto.shape == (B, NH, T, DV) and h_auto.dtype == mx.float32
    assert_h_close(h_auto, h_ref, scale)
    assert_state_close(s_auto, s_ref)
    if chunk_size == 16:  # the step loop does not depend on chunk_size: run it once per T
        h_step, s_step = mlstm_sequence(*args, mode="step")
        assert_h_close(h_step, h_ref, scale)
        assert_state_close(s_step, s_ref)
        assert_h_close(h_step, to_np(h_auto), scale, rel=2 * F32_REL)


@pytest.mark.parametrize("T,chunk_size", [(128, 16), (128, 64), (64, 64)])
def test_chunkwise_direct(T, chunk_size):
    arrs = make_inputs(T, seed=7 + T + chunk_size)
    h_ref, s_ref, scale = reference(arrs)
    h, s = mlstm_chunkwise(*to_mx(arrs), None, chunk_size=chunk_size)
    assert_h_close(h, h_ref, scale)
    assert_state_close(s, s_ref)


@pytest.mark.parametrize("T,chunk_size", [(1, 16), (37, 16), (64, 16)])
def test_initial_state(T, chunk_size):
    arrs = make_inputs(T, seed=11 + T)
    state = make_state(seed=12 + T)
    h_ref, s_ref, scale = reference(arrs, state)
    args = to_mx(arrs)
    for mode in ("auto", "step"):
        h, s = mlstm_sequence(*args, state=state_to_mx(state), chunk_size=chunk_size, mode=mode)
        assert_h_close(h, h_ref, scale)
        assert_state_close(s, s_ref)
    if T % chunk_size == 0:
        h, s = mlstm_chunkwise(*args, state_to_mx(state), chunk_size=chunk_size)
        assert_h_close(h, h_ref, scale)
        assert_state_close(s, s_ref)


@pytest.mark.parametrize("t_prefill", [1, 37])
def test_prefill_then_steps(t_prefill):
    n_steps = 6
    arrs = make_inputs(t_prefill + n_steps, seed=21 + t_prefill)
    q, k, v, i, f = to_mx(arrs)
    h_full, s_full = mlstm_sequence(q, k, v, i, f, chunk_size=16)
    h_pre, state = mlstm_sequence(q[:, :, :t_prefill], k[:, :, :t_prefill], v[:, :, :t_prefill],
                                  i[:, :, :t_prefill], f[:, :, :t_prefill], chunk_size=16)
    hs = [h_pre]
    for t in range(t_prefill, t_prefill + n_steps):
        h_t, state = mlstm_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                i[:, :, t:t + 1], f[:, :, t:t + 1], state)
        hs.append(h_t)
    h_split = mx.concatenate(hs, axis=2)
    h_ref, s_ref, scale = reference(arrs)
    assert_h_close(h_split, to_np(h_full), scale, rel=2 * F32_REL)
    assert_state_close(state, [to_np(s) for s in s_full])
    assert_h_close(h_split, h_ref, scale)
    assert_state_close(state, s_ref)


def test_step_in_the_layers_layout():
    """`heads=NH`: q, k, v, i, f as a layer holds them, (B, 1, NH*D) and (B, 1, NH), give the head-major step's
    values, h as (B, 1, NH*DV); shapes that do not fit that layout are refused by name."""
    q, k, v, i, f = (x[:, :, 3:4] for x in to_mx(make_inputs(6, seed=71)))
    state = state_to_mx(make_state(seed=72))
    flat = [x.transpose(0, 2, 1, 3).reshape(B, 1, -1) for x in (q, k, v)] + [g.reshape(B, 1, NH) for g in (i, f)]
    h, new = mlstm_step(*flat, state, heads=NH)
    want_h, want = mlstm_step(q, k, v, i, f, state)
    assert h.shape == (B, 1, NH * DV)
    assert np.array_equal(to_np(h), to_np(want_h.reshape(B, 1, -1)))
    for a, b in zip(new, want):
        assert np.array_equal(to_np(a), to_np(b))
    for bad, match in (((flat[0][..., :-1], *flat[1:]), "q, k"), ((*flat[:3], flat[3][..., :1], flat[4]), "gates"),
                       (tuple(flat), "heads")):
        with pytest.raises(ValueError, match=match):
            mlstm_step(*bad, state, heads=0 if match == "heads" else NH)


@pytest.mark.parametrize("T", [7, 37, 130])
def test_parallel_vs_recurrent(T):
    # Tolerance: writing Num, Den for the unstabilised sums, h_j = Num / (max(|Den|, 1) + eps e^{m_j}).
    # The parallel stabiliser max_l logD_jl differs from the recurrent one only when the m_0 = 0 path
    # b_j (<= 0) wins, so both e^{m_j} are <= 1 there and |h_par - h_rec| <= eps |h_rec| exactly.
    # Checked in float64 first; the float32 check adds that bound to the float32 tolerance.
    arrs = make_inputs(T, seed=31 + T)
    h_rec, s_ref, scale = reference(arrs)
    h_par64 = ref_parallel(*arrs)
    assert np.all(np.abs(h_par64 - h_rec) <= EPS * np.abs(h_rec) + 1e-12 * scale)
    h, s = mlstm_parallel(*to_mx(arrs))
    assert_h_close(h, h_rec, scale, extra=EPS * np.abs(h_rec))
    assert_h_close(h, h_par64, scale)
    assert_state_close(s, s_ref)  # the final state is the one-chunk update from m_0 = 0
    h_seq, _ = mlstm_sequence(*to_mx(arrs), mode="parallel")
    assert_h_close(h_seq, to_np(h), scale, rel=0.0, extra=1e-7 * scale)


@pytest.mark.parametrize("dtype,unit", [(mx.bfloat16, 2.0**-8), (mx.float16, 2.0**-11)])
def test_low_precision_qkv(dtype, unit):
    # The reference runs on the rounded q/k/v, so only the in-kernel low-precision work is tested:
    # C, n rounded to `dtype` for the products with q (1 unit), the products' outputs (1 unit, MLX
    # returns them in `dtype`), and h itself (1 unit of |h|). Allowed: 4 units of the scale plus
    # 1 unit of |h|; observed up to ~1.5 units.
    T = 37
    arrs = make_inputs(T, seed=41)
    args = to_mx(arrs, qkv_dtype=dtype)
    rounded = tuple(to_np(a) for a in args[:3]) + arrs[3:]
    h_ref, s_ref, scale = reference(rounded)
    for mode in ("auto", "step", "parallel"):
        h, s = mlstm_sequence(*args, chunk_size=16, mode=mode)
        assert h.dtype == dtype and all(x.dtype == mx.float32 for x in s), mode
        assert_h_close(h, h_ref, scale, rel=4 * unit, extra=unit * np.abs(h_ref))
        # the state update is float32 on the rounded inputs: as accurate as the float32 path
        assert_state_close(s, s_ref)


def test_large_gates_no_nan():
    # Gates far outside the soft-capped range (|i~|, |f~| up to ~300): no exp may turn into NaN.
    # exp(-m) overflows to inf for m < -88 in float32; h -> 0 then, which is also what the math
    # gives (h = Num / max(|Den|, 1) with Num ~ e^{m}): hence the 1e-30 absolute floor.
    # Tolerance 1e-4 * scale: the log-gate sums reach |b| ~ 1000 here, and their float32 rounding
    # (|b| * 2^-24 ~ 6e-5) goes straight into the exponents (observed up to ~2e-5 * scale).
    T = 37
    q, k, v, i, f = make_inputs(T, seed=51, i_std=60.0, f_mean=0.0, f_std=60.0)
    i[0, 0, :5] = [300.0, -300.0, 250.0, -250.0, 0.0]
    f[0, 1, :5] = [300.0, -300.0, -300.0, 300.0, -300.0]
    i[1, 2, :] = -300.0  # a head that never writes
    arrs = (q, k, v, i, f)
    h_ref, s_ref, scale = reference(arrs)
    # The state's terms are exponentials of those sums too: relative errors up to ~|b| 2^-24 each (1.0e-4
    # here; a GPU's float32 was seen at 9.2e-5 in n, a CPU's under 1e-5), twice that allowed.
    state_rtol = max(STATE_TOL, 2 * np.abs(np.cumsum(np_logsigmoid(f), -1)).max() * 2.0 ** -24)
    args = to_mx(arrs)
    for mode in ("auto", "step", "parallel"):
        h, s = mlstm_sequence(*args, chunk_size=16, mode=mode)
        assert np.all(np.isfinite(to_np(h))), mode
        assert all(np.all(np.isfinite(to_np(x))) for x in s), mode
        assert_h_close(h, h_ref, scale, rel=1e-4, extra=EPS * np.abs(h_ref) + 1e-30)
        if mode != "parallel":
            assert_state_close(s, s_ref, rtol=state_rtol)


@pytest.mark.parametrize("T", [1, 37])
@pytest.mark.parametrize("eps", [1e-6, 1e-4])
def test_denominator_clamp_and_eps(eps, T):
    # A regime where |q^.n|, exp(-m) and eps are all comparable (tiny q, m ~ 12 > 0 from large
    # input gates, forget gates ~ 1), so h depends on the clamp max(|q^.n|, exp(-m)) and on eps
    # being added outside it: a misplaced or ignored eps changes h by ~10%, far above tolerance.
    q, k, v, i, f = make_inputs(T, seed=71)
    q = f32_exact(q * 1e-6)
    i = f32_exact(12.0 + 0.5 * i / 3.0)
    f = f32_exact(10.0 + f)
    arrs = (q, k, v, i, f)
    h_ref, s_ref, scale = ref_recurrent(*arrs, eps=eps)
    for mode in ("auto", "step", "parallel"):
        h, _ = mlstm_sequence(*to_mx(arrs), chunk_size=16, eps=eps, mode=mode)
        assert_h_close(h, h_ref, np.maximum(scale, np.abs(h_ref)), extra=1e-30)


def test_bad_arguments():
    q, k, v, i, f = to_mx(make_inputs(20, seed=61))
    with pytest.raises(ValueError):
        mlstm_chunkwise(q, k, v, i, f, None, chunk_size=16)  # 20 is not a multiple of 16
    with pytest.raises(ValueError):
        mlstm_step(q, k, v, i, f, None)  # T != 1
    with pytest.raises(ValueError):
        mlstm_sequence(q, k, v, i, f, mode="nope")
    _, state = mlstm_sequence(q, k, v, i, f)
    with pytest.raises(ValueError):
        mlstm_sequence(q, k, v, i, f, state=state, mode="parallel")


@pytest.mark.parametrize("mode", ["step", "chunkwise", "parallel"])
def test_scale_on_k(mode):
    """scale="k" (NX-AI's original layer): the same h; C and n carry the 1/sqrt(DQK) factor."""
    arrs = make_inputs(37, seed=11)
    h_ref, (C, n, m), scale = reference(arrs)
    h, (c_k, n_k, m_k) = mlstm_sequence(*to_mx(arrs), chunk_size=16, mode=mode, scale="k")
    assert_h_close(h, h_ref, scale, extra=EPS * np.abs(h_ref) if mode == "parallel" else 0.0)
    factor = 1.0 / np.sqrt(DQK)
    assert_state_close((c_k, n_k, m_k), (C * factor, n * factor, m))


@pytest.mark.parametrize("mode", ["step", "chunkwise", "parallel"])
def test_very_negative_input_gates_give_finite_gradients(mode):
    """Input gates without a soft-cap can reach -115 (seen training the original stack). The parallel form's
    stabiliser has no m_0 = 0 term, so m reaches -115 and exp(-m) overflowed: h was 0 but every gradient NaN.
    With the capped floor h stays ~0 and the gradients finite, in every mode."""
    import mlx.nn as nn  # noqa: F401

    from mad.kernels.mlstm import mlstm_chunkwise, mlstm_parallel, mlstm_step

    B, NH, T, D = 1, 2, 8, 4
    keys = mx.random.split(mx.random.key(5), 4)
    q, k, v = (mx.random.normal((B, NH, T, D), key=keys[j]) for j in range(3))
    i = mx.full((B, NH, T), -115.0)
    f = mx.random.normal((B, NH, T), key=keys[3]) + 3.0

    def run(q, k, v, i, f):
        if mode == "step":
            state, hs = None, []
            for t in range(T):
                h, state = mlstm_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], i[:, :, t:t + 1],
                                      f[:, :, t:t + 1], state)
                hs.append(h)
            return mx.concatenate(hs, axis=2)
        if mode == "chunkwise":
            return mlstm_chunkwise(q, k, v, i, f, chunk_size=4)[0]
        return mlstm_parallel(q, k, v, i, f)[0]

    h = run(q, k, v, i, f)
    assert mx.all(mx.isfinite(h)).item() and mx.abs(h).max().item() < 1e-20
    grads = mx.grad(lambda *a: run(*a).sum(), argnums=(0, 1, 2, 3, 4))(q, k, v, i, f)
    for name, g in zip("qkvif", grads):
        assert mx.all(mx.isfinite(g)).item(), name


def _recurrence_by_autodiff(C_loc, n_loc, g, a_max, state):
    """The chunk recurrence written out plainly (the formulas of kernels.mlstm.chunk_recurrence), for MLX's
    autodiff to differentiate."""
    C, n, m = state
    ins = []
    for c in range(g.shape[2]):
        ins.append((C, n, m))
        m_new = mx.maximum(g[..., c] + m, a_max[..., c])
        decay, gain = mx.exp(g[..., c] + m - m_new), mx.exp(a_max[..., c] - m_new)
        C = decay[..., None, None] * C + gain[..., None, None] * C_loc[:, :, c]
        n = decay[..., None] * n + gain[..., None] * n_loc[:, :, c]
        m = m_new
    return tuple(mx.stack(x, axis=2) for x in zip(*ins)), (C, n, m)


@pytest.mark.parametrize("case", ["plain", "large", "tie", "one-chunk"])
def test_chunk_recurrence_gradient_is_autodiff_of_the_loop(case):
    """chunk_recurrence's hand-written VJP against MLX's autodiff of the same loop: every input (chunk sums,
    log decays, stabilisers, the entering state) for cotangents on every output (the stacked entering states
    and the final state), compiled or not; "tie" makes max(g_0 + m_0, a_max_0) an exact tie, whose cotangent
    goes to a_max in MLX's autodiff (g and m are multiples of 2^-8, so the tie holds in float64 too).

    Both sum the same products in different orders, so they are held to the exact derivatives (the loop's
    autodiff in float64 on the CPU): the hand VJP in float32 within 1e-6 of each input's largest entry, or
    within twice float32 autodiff's own distance from them where that is larger (a stabiliser's cotangent
    sums DQK x DV products, and a GPU sums them in its own order)."""
    from mad.kernels.mlstm import chunk_recurrence

    nc = 1 if case == "one-chunk" else 5
    spread = 20.0 if case == "large" else 3.0
    keys = mx.random.split(mx.random.key(90), 7)
    C_loc = mx.random.normal((B, NH, nc, DQK, DV), key=keys[0])
    n_loc = mx.random.normal((B, NH, nc, DQK), key=keys[1])
    g = -mx.abs(mx.random.normal((B, NH, nc), key=keys[2])) * spread
    a_max = mx.random.normal((B, NH, nc), key=keys[3]) * spread
    state = (mx.random.normal((B, NH, DQK, DV), key=keys[4]), mx.random.normal((B, NH, DQK), key=keys[5]),
             mx.random.normal((B, NH), key=keys[6]))
    if case == "tie":
        g, state = mx.round(g * 256) / 256, (*state[:2], mx.round(state[2] * 256) / 256)
        a_max = mx.concatenate([(g[..., 0] + state[2])[..., None], a_max[..., 1:]], axis=-1)
    got_out, want_out = chunk_recurrence(C_loc, n_loc, g, a_max, state), _recurrence_by_autodiff(C_loc, n_loc, g, a_max, state)
    flat = lambda out: [*out[0], *out[1]]  # noqa: E731
    for a, b in zip(flat(got_out), flat(want_out)):
        assert np.array_equal(to_np(a), to_np(b))  # the forward is the loop itself
    weights = [mx.random.normal(x.shape, key=mx.random.key(100 + j)) for j, x in enumerate(flat(want_out))]

    def loss(fn, weights=weights):
        return lambda *p: sum((w * x).sum() for w, x in zip(weights, flat(fn(*p[:4], tuple(p[4:])))))

    primals = (C_loc, n_loc, g, a_max, *state)
    argnums = tuple(range(len(primals)))
    want = mx.grad(loss(_recurrence_by_autodiff), argnums=argnums)(*primals)
    with mx.stream(mx.cpu):
        wide = [w.astype(mx.float64) for w in weights]
        exact = mx.grad(loss(_recurrence_by_autodiff, wide), argnums=argnums)(*(p.astype(mx.float64) for p in primals))
        mx.eval(exact)
    for fn in (mx.grad(loss(chunk_recurrence), argnums=argnums), mx.compile(mx.grad(loss(chunk_recurrence), argnums=argnums))):
        for k, (a, b, e) in enumerate(zip(fn(*primals), want, exact)):
            e = np.array(e, dtype=np.float64)
            scale = max(np.abs(e).max(), 1e-30)
            err, autodiff_err = (np.abs(to_np(x) - e).max() / scale for x in (a, b))
            assert err <= max(1e-6, 2 * autodiff_err), (k, err, autodiff_err)
