"""Pure-MLX mLSTM cell: the reference implementation of the xLSTM matrix-memory cell.

Every GPU kernel of this project is tested against these functions, so they are written
for clarity and numerical faithfulness to NX-AI ``mlstm_kernels`` rather than for speed.
The math is that of ``docs/xlstm-reference.md`` ("The mLSTM cell"); per head, with
``lf_t = logsigmoid(f~_t)`` and ``q^_t = q_t / sqrt(DQK)`` (k is not scaled; with ``scale="k"``,
as in NX-AI's original mLSTM layer, k is scaled instead and q^_t = q_t: h is the same function,
the state C, n differs by the factor 1/sqrt(DQK)):

    m_t = max(lf_t + m_{t-1}, i~_t)
    C_t = exp(lf_t + m_{t-1} - m_t) C_{t-1} + exp(i~_t - m_t) k_t v_t^T
    n_t = exp(lf_t + m_{t-1} - m_t) n_{t-1} + exp(i~_t - m_t) k_t
    h_t = (q^_t^T C_t) / (max(|q^_t . n_t|, exp(-m_t)) + eps)

Layout: q, k (B, NH, T, DQK); v (B, NH, T, DV); gates i, f (B, NH, T) raw pre-activations.
State ``(C, n, m)``: C (B, NH, DQK, DV), n (B, NH, DQK), m (B, NH), always float32;
``None`` means the zero state (C = 0, n = 0, m = 0).

Dtypes (as NX-AI): gates, their cumulative sums, m, C, n and the denominator are float32.
Only the products with q run in q's dtype (C and n are cast to it); all other sums,
including the state updates k v^T, are accumulated in float32. h is returned in v's dtype. On the CPU,
`mlstm_sequence` takes 16-bit q, k, v of several positions in float32 (MLX's CPU has no 16-bit BLAS) and
rounds h once; a single step keeps their dtype, as the decode step's `linear` does.
No function syncs with the host: control flow depends on shapes only.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import mlx.core as mx

from .linear import HALF
from .registry import dispatch, register_kernel

State = Tuple[mx.array, mx.array, mx.array]

__all__ = ["State", "float32_products", "inert_gates", "mlstm_step", "mlstm_chunkwise", "mlstm_parallel", "mlstm_sequence"]

_F32 = mx.float32


def _log_sigmoid(x: mx.array) -> mx.array:
    """logsigmoid(x) = -log(1 + exp(-x)), stable for large |x|."""
    return -mx.logaddexp(0.0, -x)


def _zero_state(batch: int, heads: int, dqk: int, dv: int) -> State:
    return (
        mx.zeros((batch, heads, dqk, dv), dtype=_F32),
        mx.zeros((batch, heads, dqk), dtype=_F32),
        mx.zeros((batch, heads), dtype=_F32),
    )


def _check_shapes(q: mx.array, k: mx.array, v: mx.array, i: mx.array, f: mx.array) -> None:
    if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k (B, NH, T, DQK) and v (B, NH, T, DV); got {q.shape}, {k.shape}, {v.shape}")
    if i.shape != q.shape[:3] or f.shape != q.shape[:3]:
        raise ValueError(f"expected gates of shape {q.shape[:3]}; got i {i.shape}, f {f.shape}")


def _check_layer_shapes(q: mx.array, k: mx.array, v: mx.array, i: mx.array, f: mx.array, heads: int) -> None:
    """The layer's layout of one step: q, k (B, 1, NH*DQK), v (B, 1, NH*DV), i, f (B, 1, NH)."""
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be a positive integer, got {heads!r}")
    if (q.ndim != 3 or q.shape[1] != 1 or k.shape != q.shape or v.shape[:2] != q.shape[:2]
            or q.shape[-1] % heads or v.shape[-1] % heads):
        raise ValueError(f"expected q, k (B, 1, NH*DQK) and v (B, 1, NH*DV) with NH = {heads}; got {q.shape}, "
                         f"{k.shape}, {v.shape}")
    if i.shape != (q.shape[0], 1, heads) or f.shape != i.shape:
        raise ValueError(f"expected gates of shape {(q.shape[0], 1, heads)}; got i {i.shape}, f {f.shape}")


def _apply_scale(q: mx.array, k: mx.array, scale: str) -> Tuple[mx.array, mx.array]:
    """Apply 1/sqrt(DQK) to q ("q"), to k ("k") or to neither ("none": already applied),
    in the input's dtype (the products with q and k run in that dtype)."""
    factor = 1.0 / math.sqrt(q.shape[-1])
    if scale == "q":
        return q * factor, k
    if scale == "k":
        return q, k * factor
    if scale == "none":
        return q, k
    raise ValueError(f"unknown scale {scale!r}; expected 'q', 'k' or 'none'")


EXP_NEG_MAX = 80.0  # exp(80) = 5.5e34: far above any |q . n|, still finite in float32 (its max is 3.4e38)


def _exp_neg(m: mx.array) -> mx.array:
    """exp(-m), the denominator's floor, with the exponent capped at EXP_NEG_MAX. Uncapped, m below -88
    (input gates without a soft-cap can drive it there) gives exp(-m) = inf: the forward still gives h = 0,
    but the backward multiplies that inf by 0 and every gradient becomes NaN. Capped, h = num / 5.5e34
    instead of num / inf, and the gradients stay finite."""
    return mx.exp(mx.minimum(-m, EXP_NEG_MAX))


def mlstm_step(
    q: mx.array, k: mx.array, v: mx.array, i: mx.array, f: mx.array,
    state: Optional[State] = None, eps: float = 1e-6, scale: str = "q", heads: Optional[int] = None,
) -> Tuple[mx.array, State]:
    """One recurrent step of the mLSTM cell (the step formulas of the module docstring).

    Args:
        q: Queries (B, NH, 1, DQK).
        k: Keys (B, NH, 1, DQK).
        v: Values (B, NH, 1, DV).
        i: Input-gate pre-activations i~ (B, NH, 1).
        f: Forget-gate pre-activations f~ (B, NH, 1), not yet log-sigmoided.
        state: (C, n, m) before the step, or None for the zero state.
        eps: Added to the denominator.
        scale: Which of q, k takes the 1/sqrt(DQK) factor ("q", "k", or "none" if applied).
        heads: None for the shapes above. NH for the layer's layout, the same values in the same memory
            order: q, k (B, 1, NH*DQK), v (B, 1, NH*DV), i, f (B, 1, NH), and h (B, 1, NH*DV) returned
            (a decode step's device kernel reads and writes these as they are: no reshape nodes).

    Returns:
        h (B, NH, 1, DV) in v's dtype, and the float32 state (C_t, n_t, m_t).
    """
    if heads is not None:
        _check_layer_shapes(q, k, v, i, f, heads)
        b = q.shape[0]
        h, new = mlstm_step(*(x.reshape(b, heads, 1, -1) for x in (q, k, v)), i.reshape(b, heads, 1),
                            f.reshape(b, heads, 1), state, eps, scale)
        return h.reshape(b, 1, -1), new
    _check_shapes(q, k, v, i, f)
    q_hat, k = _apply_scale(q, k, scale)
    B, NH, T, DQK = q.shape
    if T != 1:
        raise ValueError(f"mlstm_step needs T == 1, got T = {T}")
    C, n, m = state if state is not None else _zero_state(B, NH, DQK, v.shape[-1])

    lf = _log_sigmoid(f[..., 0].astype(_F32))                  # (B, NH)
    it = i[..., 0].astype(_F32)
    m_new = mx.maximum(lf + m, it)                              # stabiliser m_t
    f_act = mx.exp(lf + m - m_new)                              # f' <= 1
    i_act = mx.exp(it - m_new)                                  # i' <= 1

    k32, v32 = k.astype(_F32), v.astype(_F32)                   # state update in float32
    C_new = f_act[..., None, None] * C + i_act[..., None, None] * (k32.swapaxes(-1, -2) @ v32)
    n_new = f_act[..., None] * n + i_act[..., None] * k32[..., 0, :]

    num = (q_hat @ C_new.astype(q.dtype)).astype(_F32)          # q^T C_t   (B, NH, 1, DV)
    qn = (q_hat @ n_new.astype(q.dtype)[..., None]).astype(_F32)  # q^ . n_t (B, NH, 1, 1)
    den = mx.maximum(mx.abs(qn), _exp_neg(m_new)[..., None, None]) + eps
    return (num / den).astype(v.dtype), (C_new, n_new, m_new)


PAD_INPUT_GATE, PAD_FORGET_GATE = -1e30, 1e30  # inert positions' gate pre-activations (`inert_gates`)


def inert_gates(i: mx.array, f: mx.array, valid: mx.array) -> Tuple[mx.array, mx.array]:
    """Gate pre-activations (..., T) whose positions from `valid` (an int32 array of one element) on are
    inert: exp(i~ - m) is 0 there and logsigmoid(f~) exactly 0, so those positions add nothing to C and n,
    keep m (m = max(lf + m, i~)) and leave every decay sum as it was: the state after the call is the one
    the first `valid` positions leave. Finite values, not infinities: a chunk of padding alone would meet
    -inf - (-inf)."""
    pad = mx.arange(i.shape[-1]) >= valid
    return mx.where(pad, PAD_INPUT_GATE, i), mx.where(pad, PAD_FORGET_GATE, f)


def float32_products(v: mx.array, positions: int) -> bool:
    """Whether 16-bit q, k, v over `positions` take their products in float32: on the CPU, which has no
    16-bit BLAS, for several positions (module docstring)."""
    return v.dtype in HALF and positions > 1 and mx.default_device() == mx.cpu


def chunk_log_weights(b: mx.array, ic: mx.array) -> Tuple[mx.array, mx.array, mx.array]:
    """Per chunk: the total log decay g = b_L (B, NH, NC), the log weight a_j = g - b_j + i~_j of each step
    in the chunk's end state (B, NH, NC, L) and its chunk maximum a_max (B, NH, NC)."""
    g = b[..., -1]
    a = g[..., None] - b + ic
    return g, a, mx.max(a, axis=-1)


def chunk_states(
    kc: mx.array, vc: mx.array, b: mx.array, ic: mx.array, state: State, entering_dtype: Optional[mx.Dtype] = None,
) -> Tuple[State, State]:
    """Inter-chunk recurrence (kernel "mlstm_chunk_states"; reference): the state at the end of every chunk.

    Within chunk c (length L), with b the inclusive cumsum of lf and g = b_L:
        a_j = g - b_j + i~_j                      (log weight of step j in the chunk's end state)
        m_c = max(g + m_{c-1}, max_j a_j)
        C_c = exp(g + m_{c-1} - m_c) C_{c-1} + sum_j exp(a_j - m_c) k_j v_j^T   (n_c likewise)
    The chunk sums depend on m_c only through a scalar factor, so they are computed for all
    chunks at once with the chunk-local stabiliser max_j a_j, and the loop over chunks is
    elementwise: exp(a_j - m_c) = exp(a_j - max a) * exp(max a - m_c).

    Args:
        kc: Keys (B, NH, NC, L, DQK).
        vc: Values (B, NH, NC, L, DV).
        b: Within-chunk inclusive cumsum of logsigmoid(f~), float32 (B, NH, NC, L).
        ic: Input-gate pre-activations, float32 (B, NH, NC, L).
        state: (C, n, m) before the first chunk.
        entering_dtype: The type of the entering C's (float32 if None): `chunk_outputs` rounds C to q's
            type before its product, so a caller passing q's type gets the same numbers from half the bytes.

    Returns:
        The states entering each chunk, stacked on axis 2 (C (B, NH, NC, DQK, DV),
        n (B, NH, NC, DQK), m (B, NH, NC)), and the state after the last chunk (float32).
    """
    g, a, a_max = chunk_log_weights(b, ic)
    k_gated = kc.astype(_F32) * mx.exp(a - a_max[..., None])[..., None]
    C_loc = k_gated.swapaxes(-1, -2) @ vc.astype(_F32)          # (B, NH, NC, DQK, DV)
    n_loc = mx.sum(k_gated, axis=-2)                            # (B, NH, NC, DQK)

    (C_in, n_in, m_in), state_out = dispatch("mlstm_chunk_recurrence")(C_loc, n_loc, g, a_max, state)
    return (C_in if entering_dtype is None else C_in.astype(entering_dtype), n_in, m_in), state_out


def chunk_recurrence(
    C_loc: mx.array, n_loc: mx.array, g: mx.array, a_max: mx.array, state: State,
) -> Tuple[State, State]:
    """The elementwise recurrence over chunks (kernel "mlstm_chunk_recurrence"; reference).

        m_c = max(g_c + m_{c-1}, a_max_c)
        C_c = exp(g_c + m_{c-1} - m_c) C_{c-1} + exp(a_max_c - m_c) C_loc_c      (n_c likewise)

    Its gradient is written by hand (`_recurrence_backward`); the forward is this loop.

    Args:
        C_loc: Chunk sums (B, NH, NC, DQK, DV) float32, stabilised by a_max.
        n_loc: Chunk sums (B, NH, NC, DQK) float32.
        g: Total log decay of each chunk (B, NH, NC).
        a_max: Chunk-local stabilisers (B, NH, NC).
        state: (C, n, m) before the first chunk.

    Returns:
        The states entering each chunk, stacked on axis 2, and the state after the last chunk.
    """
    C_in, n_in, m_in, C, n, m = _recurrence(C_loc, n_loc, g, a_max, *state)
    return (C_in, n_in, m_in), (C, n, m)


@mx.custom_function
def _recurrence(C_loc: mx.array, n_loc: mx.array, g: mx.array, a_max: mx.array, C: mx.array, n: mx.array,
                m: mx.array) -> Tuple[mx.array, ...]:
    C_in, n_in, m_in = [], [], []
    for c in range(g.shape[2]):                                 # short loop, elementwise only
        C_in.append(C)
        n_in.append(n)
        m_in.append(m)
        m_new = mx.maximum(g[..., c] + m, a_max[..., c])
        decay = mx.exp(g[..., c] + m - m_new)                   # <= 1
        gain = mx.exp(a_max[..., c] - m_new)                    # <= 1
        C = decay[..., None, None] * C + gain[..., None, None] * C_loc[:, :, c]
        n = decay[..., None] * n + gain[..., None] * n_loc[:, :, c]
        m = m_new
    return mx.stack(C_in, axis=2), mx.stack(n_in, axis=2), mx.stack(m_in, axis=2), C, n, m


def _inner(a: mx.array, b: mx.array, dims: int) -> mx.array:
    """sum(a * b) over the last `dims` axes, as one BLAS dot product per leading index (no product array)."""
    lead = a.shape[:a.ndim - dims]
    return (a.reshape(*lead, 1, -1) @ b.reshape(*lead, -1, 1)).reshape(lead)


def _recurrence_backward(primals: list, cotangents: list, outputs: list) -> Tuple[mx.array, ...]:
    """The gradient of `_recurrence`, chunk by chunk in reverse. Per chunk, the cotangent of the new C (n)
    gives those of decay and gain as inner products with C_{c-1} and C_loc_c (dot products, where autodiff
    would form the products and sum them), of C_loc_c and C_{c-1} as scalings; decay and gain pass theirs to
    g, a_max and the m's by the derivatives of exp and of max(g_c + m_{c-1}, a_max_c), whose tie goes to
    a_max as in MLX's autodiff. The entering states' own cotangents (the stacked outputs) join at each step."""
    C_loc, n_loc, g, a_max = primals[:4]
    gC_in, gn_in, gm_in, gC, gn, gm = cotangents
    C_in, n_in, m_in = outputs[:3]
    gC_loc, gn_loc, gg, ga = [], [], [], []
    for c in range(g.shape[2] - 1, -1, -1):
        C_prev, n_prev, m_prev = C_in[:, :, c], n_in[:, :, c], m_in[:, :, c]
        m_new = mx.maximum(g[..., c] + m_prev, a_max[..., c])
        decay = mx.exp(g[..., c] + m_prev - m_new)
        gain = mx.exp(a_max[..., c] - m_new)
        g_decay = (_inner(gC, C_prev, 2) + _inner(gn, n_prev, 1)) * decay   # d(g_c + m_{c-1} - m_c)
        g_gain = (_inner(gC, C_loc[:, :, c], 2) + _inner(gn, n_loc[:, :, c], 1)) * gain  # d(a_max_c - m_c)
        gC_loc.append(gain[..., None, None] * gC)
        gn_loc.append(gain[..., None] * gn)
        g_m = (gm - g_decay) - g_gain                           # the cotangent of m_c = max(g_c + m_{c-1}, a_max_c)
        first = (g[..., c] + m_prev) > a_max[..., c]
        g_first = mx.where(first, g_m, 0.0)
        gg.append(g_decay + g_first)
        ga.append(g_gain + mx.where(first, 0.0, g_m))
        gC = decay[..., None, None] * gC + gC_in[:, :, c]
        gn = decay[..., None] * gn + gn_in[:, :, c]
        gm = (g_decay + g_first) + gm_in[:, :, c]
    return (mx.stack(gC_loc[::-1], axis=2), mx.stack(gn_loc[::-1], axis=2), mx.stack(gg[::-1], axis=-1),
            mx.stack(ga[::-1], axis=-1), gC, gn, gm)


_recurrence.vjp(_recurrence_backward)


def chunk_outputs(
    qc: mx.array, kc: mx.array, vc: mx.array, b: mx.array, ic: mx.array,
    state_in: Optional[State], eps: float, out_dtype: Optional[mx.Dtype] = None,
) -> mx.array:
    """Intra-chunk parallel part (kernel "mlstm_chunk_outputs"; reference): h for every position of every
    chunk, all chunks at once.

    With logD_jl = b_j - b_l + i~_l (l <= j) and the entering state (C, n, m) of the chunk:
        mi_j = b_j + m;   m_j = max(mi_j, max_l logD_jl)
        num_j = exp(mi_j - m_j) q^_j^T C + sum_l (q^_j . k_l) exp(logD_jl - m_j) v_l
        den_j = exp(mi_j - m_j) q^_j . n + sum_l (q^_j . k_l) exp(logD_jl - m_j)
        h_j = num_j / (max(|den_j|, exp(-m_j)) + eps)
    ``state_in=None`` drops the inter-chunk terms entirely (the fully parallel form, whose
    stabiliser is then max_l logD_jl alone: it has no m_0 = 0 term).

    Args:
        qc: Queries (B, NH, NC, L, DQK), already scaled (q^).
        kc: Keys (B, NH, NC, L, DQK).
        vc: Values (B, NH, NC, L, DV).
        b: Within-chunk inclusive cumsum of logsigmoid(f~), float32 (B, NH, NC, L).
        ic: Input-gate pre-activations, float32 (B, NH, NC, L).
        state_in: States entering each chunk as returned by ``chunk_states``, or None.
        eps: Added to the denominator.
        out_dtype: The type of h (float32 if None), rounded once from float32.

    Returns:
        h (B, NH, NC, L, DV).
    """
    L = b.shape[-1]
    causal = mx.tril(mx.ones((L, L), dtype=mx.bool_))
    log_D = mx.where(causal, b[..., :, None] - b[..., None, :] + ic[..., None, :], -mx.inf)
    m_comb = mx.max(log_D, axis=-1)                             # diagonal i~_j keeps it finite
    if state_in is not None:
        C, n, m = state_in
        m_inter = b + m[..., None]                              # mi_j
        m_comb = mx.maximum(m_comb, m_inter)
    # (B, NH, NC, L, L), masked -> 0; "exp": MLX's, or its polynomial in fused arithmetic on the CPU
    # (kernels/activations.py), which clips arguments below -88, hence the mask applied again
    D = mx.where(causal, dispatch("exp")(log_D - m_comb[..., None]), 0.0)

    q_hat = qc                                                  # scaled by the caller
    S = (q_hat @ kc.swapaxes(-1, -2)).astype(_F32) * D          # (q^_j . k_l) exp(logD_jl - m_j)
    num = S @ vc.astype(_F32)
    den = mx.sum(S, axis=-1)
    if state_in is not None:
        w = mx.exp(m_inter - m_comb)                            # exp(mi_j - m_j) <= 1
        num = num + w[..., None] * (q_hat @ C.astype(qc.dtype)).astype(_F32)
        den = den + w * (q_hat @ n.astype(qc.dtype)[..., None])[..., 0].astype(_F32)
    den = mx.maximum(mx.abs(den), _exp_neg(m_comb)) + eps
    h = num / den[..., None]
    return h if out_dtype is None else h.astype(out_dtype)


def _split_chunks(
    q: mx.array, k: mx.array, v: mx.array, i: mx.array, f: mx.array, L: int,
) -> Tuple[mx.array, ...]:
    """Reshape to (B, NH, NC, L, ...) and compute the float32 within-chunk cumsum b of lf."""
    B, NH, T, DQK = q.shape
    NC = T // L
    qc = q.reshape(B, NH, NC, L, DQK)
    kc = k.reshape(B, NH, NC, L, DQK)
    vc = v.reshape(B, NH, NC, L, v.shape[-1])
    ic = i.astype(_F32).reshape(B, NH, NC, L)
    b = mx.cumsum(_log_sigmoid(f.astype(_F32)).reshape(B, NH, NC, L), axis=-1)
    return qc, kc, vc, ic, b


def mlstm_chunkwise(
    q: mx.array, k: mx.array, v: mx.array, i: mx.array, f: mx.array,
    state: Optional[State] = None, chunk_size: int = 64, eps: float = 1e-6, scale: str = "q",
) -> Tuple[mx.array, State]:
    """Chunkwise mLSTM: inter-chunk state recurrence plus intra-chunk parallel outputs.

    Equal to stepping the recurrence T times (to float32 rounding), final state included.
    See ``chunk_states`` and ``chunk_outputs`` for the formulas.

    Args:
        q: Queries (B, NH, T, DQK), T a multiple of chunk_size.
        k: Keys (B, NH, T, DQK).
        v: Values (B, NH, T, DV).
        i: Input-gate pre-activations i~ (B, NH, T).
        f: Forget-gate pre-activations f~ (B, NH, T), not yet log-sigmoided.
        state: (C, n, m) before the first step, or None for the zero state.
        chunk_size: Chunk length L.
        eps: Added to the denominator.
        scale: Which of q, k takes the 1/sqrt(DQK) factor ("q", "k", or "none" if applied).

    Returns:
        h (B, NH, T, DV) in v's dtype, and the float32 state after the last step.
    """
    _check_shapes(q, k, v, i, f)
    q, k = _apply_scale(q, k, scale)
    B, NH, T, DQK = q.shape
    DV = v.shape[-1]
    if chunk_size < 1 or T % chunk_size != 0:
        raise ValueError(f"T = {T} is not a positive multiple of chunk_size = {chunk_size}")
    if state is None:
        state = _zero_state(B, NH, DQK, DV)
    qc, kc, vc, ic, b = _split_chunks(q, k, v, i, f, chunk_size)
    # the entering states in q's type and h in v's: what the outputs round them to anyway, written once
    state_in, state_out = dispatch("mlstm_chunk_states")(kc, vc, b, ic, state, entering_dtype=qc.dtype)
    h = dispatch("mlstm_chunk_outputs")(qc, kc, vc, b, ic, state_in, eps, out_dtype=v.dtype)
    return h.reshape(B, NH, T, DV), state_out


def mlstm_parallel(
    q: mx.array, k: mx.array, v: mx.array, i: mx.array, f: mx.array, eps: float = 1e-6,
    scale: str = "q",
) -> Tuple[mx.array, State]:
    """Fully parallel (quadratic in T) mLSTM from the zero state.

    h uses the stabiliser m_j = max_l logD_jl of the parallel form (no m_0 = 0 term), so it
    differs from the recurrent h only through eps: with unstabilised sums Num, Den,
    h = Num / (max(|Den|, 1) + eps exp(m_j)), and the two m_j differ only when both are <= 0,
    hence |h_par - h_rec| <= eps |h_rec|. The final state is the one-chunk state update from the
    zero state (m_0 = 0), identical to the recurrent final state.

    Args:
        q: Queries (B, NH, T, DQK).
        k: Keys (B, NH, T, DQK).
        v: Values (B, NH, T, DV).
        i: Input-gate pre-activations i~ (B, NH, T).
        f: Forget-gate pre-activations f~ (B, NH, T), not yet log-sigmoided.
        eps: Added to the denominator.
        scale: Which of q, k takes the 1/sqrt(DQK) factor ("q", "k", or "none" if applied).

    Returns:
        h (B, NH, T, DV) in v's dtype, and the float32 state after the last step.
    """
    _check_shapes(q, k, v, i, f)
    q, k = _apply_scale(q, k, scale)
    B, NH, T, DQK = q.shape
    DV = v.shape[-1]
    qc, kc, vc, ic, b = _split_chunks(q, k, v, i, f, T)        # one chunk of length T
    _, state_out = dispatch("mlstm_chunk_states")(kc, vc, b, ic, _zero_state(B, NH, DQK, DV))
    h = chunk_outputs(qc, kc, vc, b, ic, None, eps)
    return h.reshape(B, NH, T, DV).astype(v.dtype), state_out


def mlstm_sequence(
    q: mx.array, k: mx.array, v: mx.array, i: mx.array, f: mx.array,
    state: Optional[State] = None, chunk_size: int = 64, eps: float = 1e-6, mode: str = "auto",
    scale: str = "q",
) -> Tuple[mx.array, State]:
    """Run the mLSTM cell over a sequence of any length (the entry point of the model layer).

    Args:
        q: Queries (B, NH, T, DQK).
        k: Keys (B, NH, T, DQK).
        v: Values (B, NH, T, DV).
        i: Input-gate pre-activations i~ (B, NH, T).
        f: Forget-gate pre-activations f~ (B, NH, T), not yet log-sigmoided.
        state: (C, n, m) before the first step, or None for the zero state.
        chunk_size: Chunk length for the chunkwise form.
        eps: Added to the denominator.
        mode: "auto" / "chunkwise": T == 1 takes the step; otherwise chunkwise over the largest
            multiple of chunk_size, then the remainder as one shorter chunk, carrying the state.
            "step": loop the recurrent step over T (slow; for tests). "parallel": the quadratic
            form from the zero state (a given state raises ValueError).
        scale: Which of q, k takes the 1/sqrt(DQK) factor ("q", "k", or "none" if applied).

    Returns:
        h (B, NH, T, DV) in v's dtype, and the float32 state after the last step.
    """
    _check_shapes(q, k, v, i, f)
    dtype = v.dtype
    if q.dtype == dtype and float32_products(v, q.shape[2]):  # h rounded to v's dtype once, at the end
        h, state = mlstm_sequence(q.astype(_F32), k.astype(_F32), v.astype(_F32), i, f, state, chunk_size, eps,
                                  mode, scale)
        return h.astype(dtype), state
    q, k = _apply_scale(q, k, scale)                            # once; the calls below take "none"
    T = q.shape[2]
    if T < 1:
        raise ValueError("mlstm_sequence needs T >= 1")
    if mode == "parallel":
        if state is not None:
            raise ValueError("mode='parallel' starts from the zero state; got an initial state")
        return mlstm_parallel(q, k, v, i, f, eps=eps, scale="none")
    if mode == "step":
        hs = []
        for t in range(T):
            h_t, state = mlstm_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                    i[:, :, t:t + 1], f[:, :, t:t + 1], state, eps=eps, scale="none")
            hs.append(h_t)
        return mx.concatenate(hs, axis=2), state
    if mode not in ("auto", "chunkwise"):
        raise ValueError(f"unknown mode {mode!r}; expected auto, chunkwise, step or parallel")
    if T == 1:
        return mlstm_step(q, k, v, i, f, state, eps=eps, scale="none")
    t_main = (T // chunk_size) * chunk_size
    hs = []
    for start, stop, L in ((0, t_main, chunk_size), (t_main, T, T - t_main)):
        if stop > start:                                        # shape-only branch
            h, state = mlstm_chunkwise(q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop],
                                       i[:, :, start:stop], f[:, :, start:stop], state,
                                       chunk_size=L, eps=eps, scale="none")
            hs.append(h)
    return (hs[0] if len(hs) == 1 else mx.concatenate(hs, axis=2)), state


register_kernel("mlstm_step", mlstm_step)
register_kernel("mlstm_chunk_states", chunk_states)
register_kernel("mlstm_chunk_recurrence", chunk_recurrence)
register_kernel("mlstm_chunk_outputs", chunk_outputs)
