"""The causal conv1d block's taps and their hand-written gradient (blocks/conv.py `_conv`), against the plain
loop of taps and MLX's autodiff of it."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mad.blocks import conv


def plain(xp: mx.array, w: mx.array, T: int) -> mx.array:
    """y = sum_j xp[:, j:j+T] * w[:, j], w (F, K): the block's definition, autodiff's gradient."""
    y = xp[:, 0:T] * w[:, 0]
    for j in range(1, w.shape[1]):
        y = y + xp[:, j:j + T] * w[:, j]
    return y


def rel(a: mx.array, b: mx.array) -> float:
    a, b = np.array(a, dtype=np.float64), np.array(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("B, T, F, K", [(2, 9, 6, 4), (1, 2, 5, 4), (3, 16, 7, 3), (2, 5, 3, 2), (1, 1, 4, 4)])
def test_conv_vjp_is_autodiff_of_the_taps(B, T, F, K):
    keys = mx.random.split(mx.random.key(B * 100 + T), 3)
    xp = mx.random.normal((B, T + K - 1, F), key=keys[0])
    w = mx.random.normal((F, K), key=keys[1])
    g = mx.random.normal((B, T, F), key=keys[2])
    y, vjp = mx.vjp(lambda xp, wt: conv._conv(xp, wt), [xp, mx.contiguous(w.T)], [g])
    y_ref, vjp_ref = mx.vjp(lambda xp, w: plain(xp, w, T), [xp, w], [g])
    assert mx.array_equal(y[0], y_ref[0])                               # the same taps in the same order
    assert rel(vjp[0], vjp_ref[0]) <= 1e-6                              # d xp: the same sums, another order
    assert rel(vjp[1].T, vjp_ref[1]) <= 1e-6                            # d w


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("T", [1, 7])
def test_block_output_state_and_gradients(with_state, T):
    """The module: output bit for bit the plain taps (plus bias), state the last K-1 inputs, and the
    gradients of the input, the state and the weights those of autodiff through the plain taps."""
    B, F, K = 2, 6, 4
    mod = conv.CausalConv1d(F, K, True)
    keys = mx.random.split(mx.random.key(T + 10 * with_state), 4)
    x = mx.random.normal((B, T, F), key=keys[0])
    state = {"x": mx.random.normal((B, K - 1, F), key=keys[1])} if with_state else None
    gy, gs = mx.random.normal((B, T, F), key=keys[2]), mx.random.normal((B, K - 1, F), key=keys[3])

    def reference(x, st):
        prev = st["x"] if st is not None else mx.zeros((B, K - 1, F))
        xp = mx.concatenate([prev, x], axis=1)
        return plain(xp, mod.conv.weight[:, 0, :], T) + mod.conv.bias, {"x": xp[:, T:]}

    def loss(params, x, st, fn):
        mod.update(params)
        y, new = fn(x, st)
        return (y * gy).sum() + (new["x"] * gs).sum()

    params = mod.parameters()
    y, new = mod(x, state)
    y_ref, new_ref = reference(x, state)
    assert mx.array_equal(y, y_ref) and mx.array_equal(new["x"], new_ref["x"])
    argnums = (0, 1, 2) if with_state else (0, 1)
    got = mx.grad(loss, argnums=argnums)(params, x, state, lambda x, st: mod(x, st))
    want = mx.grad(loss, argnums=argnums)(params, x, state, reference)
    for (k, a), (_, b) in zip(tree_flatten(got), tree_flatten(want)):
        assert rel(a, b) <= 1e-6, k


def test_compiled_gradient_matches():
    B, T, F, K = 2, 33, 8, 4
    mod = conv.CausalConv1d(F, K, True)
    x = mx.random.normal((B, T, F), key=mx.random.key(3))

    def loss(w, x):
        mod.conv.weight = w
        return (mod(x)[0] ** 2).sum()

    w = mod.conv.weight
    eager = mx.grad(loss, argnums=(0, 1))(w, x)
    compiled = mx.compile(mx.grad(loss, argnums=(0, 1)))(w, x)
    mod.conv.weight = w
    for a, b in zip(eager, compiled):
        assert rel(a, b) <= 1e-6
