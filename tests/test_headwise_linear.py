"""The block-diagonal (headwise) linear of blocks/core.py: its three forms (multiply and sum for a few rows,
grouped block-diagonal products for many, per-head products for large blocks) against numpy, and the
grouped form's gradient against autodiff of the multiply-and-sum form."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mad.blocks.core import HeadwiseLinear


def reference(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    heads = w.shape[0]
    xh = x.reshape(*x.shape[:-1], heads, -1).astype(np.float64)
    return np.einsum("...hd,hod->...ho", xh, w.astype(np.float64)).reshape(*x.shape[:-1], -1) + b


@pytest.mark.parametrize("heads, din, dout, group", [(384, 4, 4, 8), (16, 4, 4, 8), (6, 4, 4, 6), (5, 4, 4, 5),
                                                     (12, 2, 8, 12), (3, 3, 1, 3), (4, 8, 8, 4),
                                                     (4, 16, 16, 2)])
@pytest.mark.parametrize("rows", [1, 64, 130])
def test_every_form_matches_numpy(heads, din, dout, group, rows):
    mod = HeadwiseLinear(heads, heads * din, heads * dout, bias=True)
    rng = np.random.default_rng(heads * 1000 + rows)
    mod.bias = mx.array(rng.normal(size=(heads * dout,)).astype(np.float32))
    x = rng.normal(size=(2, rows, heads * din)).astype(np.float32)
    assert mod._group == group                                   # heads per block-diagonal product
    want = reference(x, np.array(mod.weight), np.array(mod.bias))
    got = np.array(mod(mx.array(x)))
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_grouped_form_is_the_multiply_and_sum_form_with_its_gradient():
    """Many rows take the grouped products; they equal the multiply-and-sum form to float32 rounding, and so
    do the gradients of the input and the weight (autodiff of each)."""
    heads, din = 384, 4
    mod = HeadwiseLinear(heads, heads * din, heads * din, bias=False)
    keys = mx.random.split(mx.random.key(0), 2)
    x = mx.random.normal((2, 80, heads * din), key=keys[0])
    g = mx.random.normal((2, 80, heads * din), key=keys[1])
    xh = x.reshape(-1, heads, din)
    assert xh.shape[0] >= HeadwiseLinear.MIN_ROWS

    def small(xh, w):
        return (xh[:, :, None, :] * w).sum(-1)

    def grouped(xh, w):
        mod.weight = w
        return mod._grouped(xh)

    w = mod.weight
    for fn in (grouped, mx.compile(grouped)):
        y, (dx, dw) = mx.vjp(fn, [xh, w], [g.reshape(-1, heads, din)])
        y_ref, (dx_ref, dw_ref) = mx.vjp(small, [xh, w], [g.reshape(-1, heads, din)])
        for a, b in ((y[0], y_ref[0]), (dx, dx_ref), (dw, dw_ref)):
            assert np.abs(np.array(a) - np.array(b)).max() <= 1e-5 * np.abs(np.array(b)).max()
    mod.weight = w
