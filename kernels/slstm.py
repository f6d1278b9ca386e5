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

Speed: the input-side projections are done for the whole sequence before the loop, by the caller; a step
of the loop is one batched product R y (a product per head: few BLAS calls, as each call of a
multithreaded BLAS costs a synchronisation), the four gates' slices of it and the compiled elementwise
step (``mx.compile``). The loop works head-major, with the batch inside the heads: the state as
(1, NH, B, DH), R y as (1, NH, B, 4 DH), the inputs as (T, 4, NH, B, DH) split once into contiguous
per-step, per-gate blocks, so a step copies nothing. The loop itself is compiled per shape
(`_loop`), so a call outside a compiled program does not pay Python's per-step cost.
On CUDA GPUs `dispatch("slstm_sequence")` runs the whole loop in one kernel launch instead
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

__all__ = ["State", "slstm_step", "slstm_sequence", "check_sequence", "run_loop", "zero_state", "recurrent_to_matmul",
           "bias_to_heads"]

_F32 = mx.float32
GATES = ("i", "f", "z", "o")


def zero_state(batch: int, heads: int, head_dim: int) -> State:
    """The zero state (y, c, n, m), float32, each (B, NH, DH)."""
    return tuple(mx.zeros((batch, heads, head_dim), dtype=_F32) for _ in range(4))  # type: ignore[return-value]


def recurrent_to_matmul(R: mx.array) -> mx.array:
    """(NH, 4*DH, DH) vanilla layout -> (NH, DH, 4*DH) float32 (a transposed view: BLAS reads R's rows), so
    that y (1, NH, B, DH) @ it = R y as (1, NH, B, 4*DH), gate-major in the last dim."""
    return R.astype(_F32).transpose(0, 2, 1)


def bias_to_heads(b: mx.array, heads: int) -> mx.array:
    """(4*NH*DH,) gate-major -> (4, NH, 1, DH) float32."""
    return b.astype(_F32).reshape(4, heads, 1, -1)


def _log_sigmoid(x: mx.array) -> mx.array:
    return -mx.logaddexp(0.0, -x)


def _gate_exps(i_raw: mx.array, lfm: mx.array, fresh: mx.array) -> Tuple[mx.array, mx.array]:
    """exp(i_raw - m_new) and exp(lfm - m_new) with one exp: m_new is i_raw (a fresh state, or i_raw >= lfm)
    or else lfm, so one argument is 0 (exp 1) and the other is +-(lfm - i_raw), the same float32 number
    (a - b = -(b - a) exactly) as each difference computed on its own."""
    i_wins = fresh | (i_raw >= lfm)
    d = lfm - i_raw
    e = mx.exp(mx.where(i_wins, d, -d))
    return mx.where(i_wins, 1.0, e), mx.where(i_wins, e, 1.0)


def _cell(wi: mx.array, wf: mx.array, wz: mx.array, wo: mx.array, ri: mx.array, rf: mx.array, rz: mx.array,
          ro: mx.array, bi: mx.array, bf: mx.array, bz: mx.array, bo: mx.array, c: mx.array, n: mx.array,
          m: mx.array) -> State:
    """One step's elementwise part, given R y, gate by gate: W x, R y, b of gates i, f, z, o and the state
    c, n, m, all float32 of one shape."""
    i_raw, f_raw, z_raw, o_raw = (wi + ri) + bi, (wf + rf) + bf, (wz + rz) + bz, (wo + ro) + bo  # NX-AI: Wx + Ry + b
    lfm = m + _log_sigmoid(f_raw)
    fresh = n == 0.0
    m_new = mx.where(fresh, i_raw, mx.maximum(i_raw, lfm))
    i_exp, f_exp = _gate_exps(i_raw, lfm, fresh)                # exp(i_raw - m_new), exp(lfm - m_new)
    i_act, f_act = mx.minimum(i_exp, 1.0), mx.minimum(f_exp, 1.0)
    c_new = f_act * c + i_act * mx.tanh(z_raw)
    n_new = f_act * n + i_act
    y_new = mx.sigmoid(o_raw) * c_new / n_new
    return y_new, c_new, n_new, m_new


_cell_compiled = mx.compile(_cell)


def _step(wx: list, Rt: mx.array, bh: list, y: mx.array, c: mx.array, n: mx.array, m: mx.array
          ) -> Tuple[State, mx.array]:
    """One step in the loop's layout: wx and bh the four gates' (1, NH, B, DH) blocks, Rt (NH, DH, 4 DH),
    the state (1, NH, B, DH). Returns the new state and R y (1, NH, B, 4 DH)."""
    ry = y @ Rt
    DH = y.shape[-1]
    return _cell_compiled(*wx, *(ry[..., g * DH:(g + 1) * DH] for g in range(4)), *bh, c, n, m), ry


def _bias_blocks(bh: mx.array, batch: int) -> list:
    """(4, NH, 1, DH) -> the four gates' biases as contiguous (1, NH, B, DH) blocks."""
    _, NH, _, DH = bh.shape
    return [mx.contiguous(mx.broadcast_to(bh[g:g + 1], (1, NH, batch, DH))) for g in range(4)]


def _loop_fn(wx: mx.array, Rt: mx.array, bh: mx.array, y: mx.array, c: mx.array, n: mx.array,
             m: mx.array) -> Tuple[mx.array, ...]:
    T, _, NH, B, DH = wx.shape
    blocks = mx.split(wx.reshape(T * 4, NH, B, DH), T * 4)     # contiguous (1, NH, B, DH) blocks, step-major
    bias = _bias_blocks(bh, B)
    seqs: Tuple[list, ...] = ([], [], [], [], [])
    for t in range(T):                                          # shape-only loop
        (y, c, n, m), ry = _step(blocks[4 * t:4 * t + 4], Rt, bias, y, c, n, m)
        for seq, v in zip(seqs, (y, c, n, m, ry)):
            seq.append(v)
    return tuple(mx.concatenate(seq) for seq in seqs)


_loop = mx.compile(_loop_fn)


@mx.custom_function
def _sequence(wx: mx.array, Rt: mx.array, bh: mx.array, y: mx.array, c: mx.array, n: mx.array,
              m: mx.array) -> Tuple[mx.array, ...]:
    """The loop over time: wx (T, 4, NH, B, DH) float32, the state (1, NH, B, DH) -> every step's y, c, n, m
    (T, NH, B, DH) and R y (T, NH, B, 4 DH), the last kept for the backward."""
    return _loop(wx, Rt, bh, y, c, n, m)


def _cell_derivatives(wx: mx.array, ry: mx.array, bh: mx.array, c: mx.array, n: mx.array, m: mx.array,
                      c_new: mx.array, n_new: mx.array) -> Tuple[mx.array, ...]:
    """What the backward of `_cell` needs from the forward, for all steps at once (wx (T, 4, NH, B, DH),
    ry (T, NH, B, 4 DH), bh (4, NH, 1, DH), the states (T, NH, B, DH)): the step's values recomputed from its
    inputs with `_cell`'s operations (c_new, n_new are the forward's own) and the masks of its min/max/where.
    With them the backward of a step is linear in the cotangents of its new state (`_cell_backward`)."""
    DH = wx.shape[-1]
    i_raw, f_raw, z_raw, o_raw = ((wx[:, g] + ry[..., g * DH:(g + 1) * DH]) + bh[g] for g in range(4))
    lfm = m + _log_sigmoid(f_raw)
    fresh = n == 0.0
    i_exp, f_exp = _gate_exps(i_raw, lfm, fresh)
    s_o = mx.sigmoid(o_raw)
    return (s_o, s_o * c_new, s_o * (1.0 - s_o), mx.square(n_new), c_new, n_new, c, n, mx.tanh(z_raw),
            mx.minimum(i_exp, 1.0), mx.minimum(f_exp, 1.0), mx.square(mx.cosh(z_raw)),
            mx.where(i_exp < 1.0, i_exp, 0.0), mx.where(f_exp < 1.0, f_exp, 0.0),
            fresh | (i_raw > lfm), 1.0 - mx.sigmoid(f_raw))


def _cell_backward(gy: mx.array, gc: mx.array, gn: mx.array, gm: mx.array, s_o: mx.array, num: mx.array,
                   ds_o: mx.array, n_sq: mx.array, c_new: mx.array, n_new: mx.array, c: mx.array, n: mx.array,
                   tz: mx.array, i_act: mx.array, f_act: mx.array, cosh_sq: mx.array, i_exp: mx.array,
                   f_exp: mx.array, i_wins: mx.array, dlogsig_f: mx.array) -> Tuple[mx.array, ...]:
    """The backward of one `_cell` step: from the cotangents (gy, gc, gn, gm) of its new state to those of
    the raw gates Wx + Ry + b (i, f, z, o) and of the previous c, n, m, with `_cell_derivatives`' values.
    Each derivative is the one MLX's autodiff takes of `_cell`'s operation, ties included: min(u, 1) and
    max(a, b) pass the cotangent to their second argument on a tie (i_exp, f_exp hold 0 where their min
    took the 1, i_wins where i_raw is the new m), d tanh(x) = 1 / cosh(x)^2, d logsigmoid(x) = 1 - sigmoid(x)."""
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
    return gi, gf, gz, go, gc * f_act, gn * f_act, g_lfm


def _backward_step(g_out: list, g_carried: list, derivatives: list) -> Tuple[mx.array, ...]:
    """A step of the reverse loop: the cotangents of the step's outputs (y, c, n, m: those of the stacked
    outputs plus those carried from the step after) through `_cell_backward`. Returns the raw gates'
    cotangents as one (1, NH, B, 4 DH) block (gate-major, for the R^T product) and the carried c, n, m."""
    gi, gf, gz, go, gc, gn, gm = _cell_backward(*(a + b for a, b in zip(g_out, g_carried)), *derivatives)
    return mx.concatenate([gi, gf, gz, go], axis=-1), gc, gn, gm


_cell_derivatives_compiled = mx.compile(_cell_derivatives)
_backward_step_compiled = mx.compile(_backward_step)


def _sequence_backward(primals: list, cotangents: list, outputs: list) -> Tuple[mx.array, ...]:
    """Backpropagation through time, by hand. What the backward of each step takes from the forward is computed
    for all steps at once (`_cell_derivatives`) and split into per-step blocks; the reverse loop then runs one
    small elementwise kernel (`_backward_step`) and one R^T product per step; the weight gradients are two
    reductions over all steps at the end (sum_t y_{t-1}^T g_raw_t as one product per head, sum_t g_raw_t).
    Autodiff of the loop instead builds a (B, NH, DH, 4*DH) product per step and sums the 2T of them:
    several times slower. (R y's own cotangent is ignored: R y leaves `_sequence` only for this backward.)"""
    wx, Rt, bh, y0, c0, n0, m0 = primals
    Y, C, N, M, RY = outputs
    T, _, NH, B, DH = wx.shape
    prev = [mx.concatenate([s0, S[:-1]]) for s0, S in ((y0, Y), (c0, C), (n0, N), (m0, M))]  # (T, NH, B, DH)
    derivatives = _cell_derivatives_compiled(wx, RY, bh, *prev[1:], C, N)
    steps = [mx.split(a, T) for a in (*cotangents[:4], *derivatives)]  # per array, T blocks (1, NH, B, DH)
    R = Rt.transpose(0, 2, 1)                                   # (NH, 4 DH, DH): g_raw @ R = R^T g_raw per head
    carried = [mx.zeros_like(y0) for _ in range(4)]
    graws = []
    for t in range(T - 1, -1, -1):
        graw, *carried[1:] = _backward_step_compiled([s[t] for s in steps[:4]], carried,
                                                     [s[t] for s in steps[4:]])
        carried[0] = graw @ R                                   # the cotangent of y_{t-1}
        graws.append(graw)
    G = mx.concatenate(graws[::-1])                             # (T, NH, B, 4 DH)
    y_prev = prev[0].transpose(1, 3, 0, 2).reshape(NH, DH, T * B)
    g_Rt = y_prev @ G.transpose(1, 0, 2, 3).reshape(NH, T * B, 4 * DH)
    G = G.reshape(T, NH, B, 4, DH)
    g_bh = G.sum(axis=(0, 2)).transpose(1, 0, 2)[:, :, None, :]
    return (G.transpose(0, 3, 1, 2, 4), g_Rt, g_bh, *carried)


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
    """(B, NH, T, DH) x 4 -> (T, 4, NH, B, DH) float32, contiguous: the loop's per-step, per-gate blocks."""
    return mx.stack([g.astype(_F32).transpose(2, 1, 0, 3) for g in (i, f, z, o)], axis=1)


def _to_loop(state: State) -> State:
    """(B, NH, DH) -> the loop's (1, NH, B, DH)."""
    return tuple(s.astype(_F32).transpose(1, 0, 2)[None] for s in state)  # type: ignore[return-value]


def _from_loop(state: State) -> State:
    """The loop's (1, NH, B, DH) (or (NH, B, DH)) -> (B, NH, DH)."""
    return tuple(s.reshape(s.shape[-3:]).transpose(1, 0, 2) for s in state)  # type: ignore[return-value]


def _one_step(i, f, z, o, R, b, state: Optional[State]) -> State:
    """A single step from (B, NH, DH) states to the new (B, NH, DH) state: the loop's step, by itself."""
    B, NH, _, DH = i.shape
    state = state if state is not None else zero_state(B, NH, DH)
    blocks = [g.astype(_F32).transpose(2, 1, 0, 3) for g in (i, f, z, o)]  # (1, NH, B, DH) each
    new, _ = _step(blocks, recurrent_to_matmul(R), _bias_blocks(bias_to_heads(b, NH), B), *_to_loop(state))
    return _from_loop(new)


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
    if i.shape[2] != 1:
        raise ValueError(f"slstm_step needs T == 1, got T = {i.shape[2]}")
    new = _one_step(i, f, z, o, R, b, state)
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
    check_sequence(i, f, z, o, R, b)
    if i.shape[2] == 1:                                         # one step (decoding): no loop to differentiate
        new = _one_step(i, f, z, o, R, b, state)
        return new[0][:, :, None, :].astype(i.dtype), new
    return run_loop(_sequence, i, f, z, o, R, b, state)


def check_sequence(i, f, z, o, R, b) -> None:
    """`slstm_sequence`'s argument checks (its variants' too)."""
    _check(i, f, z, o, R, b)
    if i.shape[2] < 1:
        raise ValueError("slstm_sequence needs T >= 1")


def run_loop(sequence, i, f, z, o, R, b, state: Optional[State]) -> Tuple[mx.array, State]:
    """`slstm_sequence`'s results from a loop over time with `_sequence`'s inputs and outputs (`_sequence`
    itself, or a variant's own loop): the inputs put in the loop's layout, h and the last state taken out."""
    B, NH, _, DH = i.shape
    state = state if state is not None else zero_state(B, NH, DH)
    Y, C, N, M, _ = sequence(_stack_inputs(i, f, z, o), recurrent_to_matmul(R), bias_to_heads(b, NH),
                             *_to_loop(state))
    h = Y.transpose(2, 1, 0, 3)                                 # (T, NH, B, DH) -> (B, NH, T, DH)
    return h.astype(i.dtype), _from_loop((Y[-1], C[-1], N[-1], M[-1]))


register_kernel("slstm_sequence", slstm_sequence)
