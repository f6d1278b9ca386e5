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

Speed: the sequence is a loop over time of one compiled step (``mx.compile``): one small batched matmul
(R y) and one fused elementwise kernel per step. The input-side projections are done for the whole
sequence before the loop, by the caller. On CUDA GPUs `dispatch("slstm_sequence")` runs the whole loop
in one kernel launch instead (``kernels/slstm_device.py``), tested against this function.
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


def _pointwise(wx: mx.array, Rt: mx.array, bh: mx.array, y: mx.array, c: mx.array, n: mx.array,
               m: mx.array) -> State:
    """One step. wx (B, NH, 4, DH) float32; Rt (NH, DH, 4*DH) float32; bh (NH, 4, DH) float32."""
    B, NH, _, DH = wx.shape
    ry = (y[:, :, None, :] @ Rt).reshape(B, NH, 4, DH)        # R y, per head (block-diagonal)
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


_pointwise_compiled = mx.compile(_pointwise)


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
    new = _pointwise_compiled(_stack_inputs(i, f, z, o)[0], recurrent_to_matmul(R), bias_to_heads(b, NH), *state)
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
    state = state if state is not None else zero_state(B, NH, DH)
    wx = _stack_inputs(i, f, z, o)                              # (T, B, NH, 4, DH)
    Rt, bh = recurrent_to_matmul(R), bias_to_heads(b, NH)
    hs = []
    for t in range(T):                                          # shape-only loop
        state = _pointwise_compiled(wx[t], Rt, bh, *state)
        hs.append(state[0])
    h = hs[0][:, :, None, :] if T == 1 else mx.stack(hs, axis=2)
    return h.astype(i.dtype), state


register_kernel("slstm_sequence", slstm_sequence)
