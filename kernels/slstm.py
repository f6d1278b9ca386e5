"""Pure-MLX sLSTM cell: the reference implementation of the xLSTM scalar-memory cell.

Device kernels of this project are tested against these functions. The math is NX-AI's vanilla backend
(``xlstm/blocks/slstm/src/vanilla/slstm.py``, ``slstm_forward_pointwise``; ``docs/xlstm-reference.md``,
"The sLSTM cell"), per head h and unit o:

    raw_g = Wx_g + (R_g y_{t-1}) + b_g              g in (i, f, z, o), in this order (NX-AI's gate order)
    lfm   = m_{t-1} + logsigmoid(f_raw)
    m_t   = i_raw                  where n_{t-1} == 0 (the zero state)
            max(i_raw, lfm)        elsewhere
    i = min(exp(i_raw - m_t), 1);  f = min(exp(lfm - m_t), 1);  o = sigmoid(o_raw)
    c_t = f c_{t-1} + i tanh(z_raw);  n_t = f n_{t-1} + i;  y_t = o c_t / n_t

y_t is both the cell output h_t and the recurrent input of the next step. The recurrent weights are
block-diagonal: each head mixes only its own DH units.

Layouts (head-major, like ``mad.kernels.mlstm``):
  Wx: the input-side pre-activations ``i, f, z, o``, each (B, NH, T, DH), without the bias.
  R:  (NH, 4*DH, DH), NX-AI's vanilla ``slstm_cell._recurrent_kernel_``:
      ``R[h, g*DH + o, j]`` is the weight from y[h, j] (previous step) to gate g, unit o of head h.
      (NX-AI's external ``recurrent_kernel`` is (NH, DH_in, 4, DH_out) with ext[h, j, g, o] = R[h, g*DH+o, j];
      its CUDA backend stores (NH, DH_in, 4*DH_out) = R.transpose(0, 2, 1).)
  b:  (4*NH*DH,), NX-AI's vanilla ``slstm_cell._bias_``, gate-major: ``b[g*NH*DH + h*DH + o]``
      (the CUDA backend stores it head-major, (NH, 4, DH) flattened).
  State ``(y, c, n, m)``: each (B, NH, DH), always float32; ``None`` is the zero state.

The zero-state rule: NX-AI takes ``m_t = i_raw`` when ``n == 0`` everywhere in the batch
(``torch.all(n == 0)``, a host-side branch). Here the test is elementwise (``mx.where``), with no host
sync. n is 0 only in the zero state (after any step n >= min(1, n_{t-1}) > 0), so both agree whenever the
batch rows are all fresh or all continued; for a batch mixing fresh and continued rows the elementwise rule
gives every row what it would get alone. The min(., 1) clamps only act in the zero state.

Dtypes: the recurrence (R y, gates, state) runs in float32 whatever the input dtype; the output h is
returned in the dtype of ``i``. No function syncs with the host; control flow depends on shapes only.

Speed: the sequence is a loop over time of one small batched matmul (R y) and one compiled elementwise
step (``mx.compile``). The input-side projections are done for the whole sequence before the loop, by the
caller. On CUDA GPUs `dispatch("slstm_sequence")` runs the whole loop in one kernel launch instead
(``kernels/slstm_device.py``), tested against this function. The gradient of the loop is written by hand
(``_sequence_backward``, an ``mx.custom_function`` VJP): backpropagation through time with one R^T product
and one compiled elementwise step per time step, and the weight gradients summed over all steps at the
end; it is the gradient MLX's autodiff takes of the loop, to float32 rounding (tests/test_grad.py), in a
fraction of its time.
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx

from .registry import register_kernel

State = Tuple[mx.array, mx.array, mx.array, mx.array]

__all__ = ["State", "slstm_step", "slstm_sequence", "zero_state", "recurrent_to_matmul", "bias_to_heads"]

_F32 = mx.float32
GATES = ("i", "f", "z", "o")


def zero_state(batch: int, heads: int, head_dim: int) -> State:
    """The zero state (y, c, n, m), float32, each (B, NH, DH)."""
    return tuple(mx.zeros((batch, heads, head_dim), dtype=_F32) for _ in range(4))  # type: ignore[return-value]


def recurrent_to_matmul(R: mx.array) -> mx.array:
    """(NH, 4*DH, DH) vanilla layout -> (NH, DH, 4*DH) float32, so that y (B, NH, 1, DH) @ it = R y."""
    return R.astype(_F32).transpose(0, 2, 1)


def bias_to_heads(b: mx.array, heads: int) -> mx.array:
    """(4*NH*DH,) gate-major -> (NH, 4, DH) float32."""
    return b.astype(_F32).reshape(4, heads, -1).transpose(1, 0, 2)


def _log_sigmoid(x: mx.array) -> mx.array:
    return -mx.logaddexp(0.0, -x)


def _recurrent(y: mx.array, Rt: mx.array) -> mx.array:
    """R y per head (block-diagonal): y (B, NH, DH) @ Rt (NH, DH, 4*DH) -> (B, NH, 4, DH)."""
    B, NH, DH = y.shape
    return (y[:, :, None, :] @ Rt).reshape(B, NH, 4, DH)


def _cell(wx: mx.array, ry: mx.array, bh: mx.array, c: mx.array, n: mx.array, m: mx.array) -> State:
    """One step's elementwise part, given R y: wx, ry (B, NH, 4, DH), bh (NH, 4, DH), all float32."""
    raw = (wx + ry) + bh                                        # NX-AI: Wx + Ry + b
    i_raw, f_raw, z_raw, o_raw = raw[:, :, 0], raw[:, :, 1], raw[:, :, 2], raw[:, :, 3]
    lfm = m + _log_sigmoid(f_raw)
    m_new = mx.where(n == 0.0, i_raw, mx.maximum(i_raw, lfm))
    i_act = mx.minimum(mx.exp(i_raw - m_new), 1.0)
    f_act = mx.minimum(mx.exp(lfm - m_new), 1.0)
    c_new = f_act * c + i_act * mx.tanh(z_raw)
    n_new = f_act * n + i_act
    y_new = mx.sigmoid(o_raw) * c_new / n_new
    return y_new, c_new, n_new, m_new


_cell_compiled = mx.compile(_cell)


def _pointwise(wx: mx.array, Rt: mx.array, bh: mx.array, y: mx.array, c: mx.array, n: mx.array,
               m: mx.array) -> State:
    """One step. wx (B, NH, 4, DH) float32; Rt (NH, DH, 4*DH) float32; bh (NH, 4, DH) float32."""
    return _cell_compiled(wx, _recurrent(y, Rt), bh, c, n, m)


def _cell_derivatives(wx: mx.array, ry: mx.array, bh: mx.array, c: mx.array, n: mx.array, m: mx.array,
                      c_new: mx.array, n_new: mx.array) -> Tuple[mx.array, ...]:
    """What the backward of `_cell` needs from the forward, for any number of steps at once (leading dims
    (..., B, NH)): the step's values recomputed from its inputs with `_cell`'s operations (c_new, n_new are the
    forward's own) and the masks of its min/max/where. With them the backward of a step is linear in the
    cotangents of its new state (`_cell_backward`)."""
    raw = (wx + ry) + bh
    i_raw, f_raw, z_raw, o_raw = raw[..., 0, :], raw[..., 1, :], raw[..., 2, :], raw[..., 3, :]
    lfm = m + _log_sigmoid(f_raw)
    fresh = n == 0.0
    m_new = mx.where(fresh, i_raw, mx.maximum(i_raw, lfm))
    i_exp, f_exp = mx.exp(i_raw - m_new), mx.exp(lfm - m_new)
    s_o = mx.sigmoid(o_raw)
    return (s_o, s_o * c_new, s_o * (1.0 - s_o), mx.square(n_new), c_new, n_new, c, n, mx.tanh(z_raw),
            mx.minimum(i_exp, 1.0), mx.minimum(f_exp, 1.0), mx.square(mx.cosh(z_raw)),
            mx.where(i_exp < 1.0, i_exp, 0.0), mx.where(f_exp < 1.0, f_exp, 0.0),
            fresh | (i_raw > lfm), 1.0 - mx.sigmoid(f_raw))


def _cell_backward(gy: mx.array, gc: mx.array, gn: mx.array, gm: mx.array, s_o: mx.array, num: mx.array,
                   ds_o: mx.array, n_sq: mx.array, c_new: mx.array, n_new: mx.array, c: mx.array, n: mx.array,
                   tz: mx.array, i_act: mx.array, f_act: mx.array, cosh_sq: mx.array, i_exp: mx.array,
                   f_exp: mx.array, i_wins: mx.array, dlogsig_f: mx.array) -> Tuple[mx.array, ...]:
    """The backward of one `_cell` step: from the cotangents (gy, gc, gn, gm) of its new state to those of raw
    = Wx + Ry + b (B, NH, 4, DH) and of the previous c, n, m, with `_cell_derivatives`' values. Each derivative
    is the one MLX's autodiff takes of `_cell`'s operation, ties included: min(u, 1) and max(a, b) pass the
    cotangent to their second argument on a tie (i_exp, f_exp hold 0 where their min took the 1, i_wins where
    i_raw is the new m), d tanh(x) = 1 / cosh(x)^2, d logsigmoid(x) = 1 - sigmoid(x)."""
    # y_new = num / n_new with num = s_o c_new
    g_num = gy / n_new
    gn = gn - (gy * num) / n_sq
    go = (g_num * c_new) * ds_o
    gc = gc + g_num * s_o
    # c_new = f_act c + i_act tanh(z);  n_new = f_act n + i_act
    g_f = (gc * c + gn * n) * f_exp
    g_i = (gc * tz + gn) * i_exp
    gz = (gc * i_act) / cosh_sq
    # f_act = min(exp(lfm - m_new), 1), i_act likewise; m_new = the fresh rule or max(i_raw, lfm)
    g_m = (gm - g_f) - g_i
    gi = g_i + mx.where(i_wins, g_m, 0.0)
    g_lfm = g_f + mx.where(i_wins, 0.0, g_m)
    gf = g_lfm * dlogsig_f
    return mx.stack([gi, gf, gz, go], axis=-2), gc * f_act, gn * f_act, g_lfm


_cell_derivatives_compiled = mx.compile(_cell_derivatives)
_cell_backward_compiled = mx.compile(_cell_backward)


@mx.custom_function
def _sequence(wx: mx.array, Rt: mx.array, bh: mx.array, y: mx.array, c: mx.array, n: mx.array,
              m: mx.array) -> Tuple[mx.array, ...]:
    """The loop over time: wx (T, B, NH, 4, DH) float32 -> every step's y, c, n, m (T, B, NH, DH) and R y
    (T, B, NH, 4, DH), the last kept for the backward."""
    ys, cs, ns, ms, rys = [], [], [], [], []
    for t in range(wx.shape[0]):                                # shape-only loop
        ry = _recurrent(y, Rt)
        y, c, n, m = _cell_compiled(wx[t], ry, bh, c, n, m)
        for seq, v in zip((ys, cs, ns, ms, rys), (y, c, n, m, ry)):
            seq.append(v)
    return tuple(mx.stack(seq) for seq in (ys, cs, ns, ms, rys))


def _sequence_backward(primals: list, cotangents: list, outputs: list) -> Tuple[mx.array, ...]:
    """Backpropagation through time, by hand. What the backward of each step takes from the forward is computed
    for all steps at once (`_cell_derivatives`); the reverse loop then runs one small elementwise kernel
    (`_cell_backward`) and one R^T product per step; the weight gradients are two reductions over all steps
    at the end (sum_t y_{t-1}^T g_raw_t as one product per head, sum_t g_raw_t). Autodiff of the loop instead
    builds a (B, NH, DH, 4*DH) product per step and sums the 2T of them: several times slower."""
    wx, Rt, bh, y0, c0, n0, m0 = primals
    gY, gC, gN, gM = cotangents[:4]
    Y, C, N, M, RY = outputs
    T, B, NH, _, DH = wx.shape
    prev = [mx.concatenate([s0[None], S[:-1]]) for s0, S in ((y0, Y), (c0, C), (n0, N), (m0, M))]
    derivatives = _cell_derivatives_compiled(wx, RY, bh, *prev[1:], C, N)
    arrays = (gY, gC, gN, gM, *derivatives)
    Rt_T = Rt.swapaxes(-1, -2)                                  # (NH, 4*DH, DH)
    gy, gc, gn, gm = (mx.zeros_like(y0) for _ in range(4))
    graws = []
    for t in range(T - 1, -1, -1):
        step = [a[t:t + 1] for a in arrays]                     # step t, its leading 1 kept
        g_new, ds = step[:4], step[4:]
        graw, gc, gn, gm = _cell_backward_compiled(g_new[0] + gy, g_new[1] + gc, g_new[2] + gn, g_new[3] + gm, *ds)
        gy = (graw.reshape(B, NH, 1, 4 * DH) @ Rt_T).reshape(B, NH, DH)  # R^T g_raw per head: the cotangent of y_{t-1}
        graws.append(graw)
    G = mx.concatenate(graws[::-1])                             # (T, B, NH, 4, DH)
    g_Rt = prev[0].transpose(2, 3, 0, 1).reshape(NH, DH, T * B) @ G.transpose(2, 0, 1, 3, 4).reshape(NH, T * B, 4 * DH)
    gc, gn, gm = (g.reshape(B, NH, DH) for g in (gc, gn, gm))
    return G, g_Rt, G.sum(axis=(0, 1)), gy, gc, gn, gm


_sequence.vjp(_sequence_backward)


def _check(i: mx.array, f: mx.array, z: mx.array, o: mx.array, R: mx.array, b: mx.array) -> None:
    if i.ndim != 4 or any(g.shape != i.shape for g in (f, z, o)):
        raise ValueError(f"expected i, f, z, o of one shape (B, NH, T, DH); got {i.shape}, {f.shape}, "
                         f"{z.shape}, {o.shape}")
    _, NH, _, DH = i.shape
    if R.shape != (NH, 4 * DH, DH):
        raise ValueError(f"expected R of shape (NH, 4*DH, DH) = {(NH, 4 * DH, DH)}; got {R.shape}")
    if b.shape != (4 * NH * DH,):
        raise ValueError(f"expected b of shape (4*NH*DH,) = {(4 * NH * DH,)}; got {b.shape}")


def _stack_inputs(i, f, z, o) -> mx.array:
    """(B, NH, T, DH) x 4 -> (T, B, NH, 4, DH) float32: one contiguous slab per step."""
    return mx.stack([g.astype(_F32) for g in (i, f, z, o)], axis=3).transpose(2, 0, 1, 3, 4)


def slstm_step(
    i: mx.array, f: mx.array, z: mx.array, o: mx.array, R: mx.array, b: mx.array,
    state: Optional[State] = None,
) -> Tuple[mx.array, State]:
    """One recurrent step of the sLSTM cell.

    Args:
        i, f, z, o: Input-side gate pre-activations W x (no bias), each (B, NH, 1, DH).
        R: Recurrent weights (NH, 4*DH, DH), vanilla layout (module docstring).
        b: Bias (4*NH*DH,), gate-major.
        state: (y, c, n, m) before the step, each (B, NH, DH) float32, or None for the zero state.

    Returns:
        h (B, NH, 1, DH) in i's dtype, and the float32 state (y, c, n, m) after the step.
    """
    _check(i, f, z, o, R, b)
    B, NH, T, DH = i.shape
    if T != 1:
        raise ValueError(f"slstm_step needs T == 1, got T = {T}")
    state = state if state is not None else zero_state(B, NH, DH)
    new = _pointwise(_stack_inputs(i, f, z, o)[0], recurrent_to_matmul(R), bias_to_heads(b, NH), *state)
    return new[0][:, :, None, :].astype(i.dtype), new


def slstm_sequence(
    i: mx.array, f: mx.array, z: mx.array, o: mx.array, R: mx.array, b: mx.array,
    state: Optional[State] = None,
) -> Tuple[mx.array, State]:
    """Run the sLSTM cell over a sequence: a loop over time of the compiled step.

    Args:
        i, f, z, o: Input-side gate pre-activations W x (no bias), each (B, NH, T, DH).
        R: Recurrent weights (NH, 4*DH, DH), vanilla layout (module docstring).
        b: Bias (4*NH*DH,), gate-major.
        state: (y, c, n, m) before the first step, each (B, NH, DH) float32, or None for the zero state.

    Returns:
        h (B, NH, T, DH) in i's dtype (h_t = y_t), and the float32 state after the last step.
    """
    _check(i, f, z, o, R, b)
    B, NH, T, DH = i.shape
    if T < 1:
        raise ValueError("slstm_sequence needs T >= 1")
    y, c, n, m = state if state is not None else zero_state(B, NH, DH)
    if T == 1:                                                  # one step (decoding): nothing to stack
        state = _pointwise(_stack_inputs(i, f, z, o)[0], recurrent_to_matmul(R), bias_to_heads(b, NH), y, c, n, m)
        return state[0][:, :, None, :].astype(i.dtype), state
    Y, C, N, M, _ = _sequence(_stack_inputs(i, f, z, o), recurrent_to_matmul(R), bias_to_heads(b, NH), y, c, n, m)
    h = Y.transpose(1, 2, 0, 3)                                 # (B, NH, T, DH)
    return h.astype(i.dtype), (Y[-1], C[-1], N[-1], M[-1])


register_kernel("slstm_sequence", slstm_sequence)
