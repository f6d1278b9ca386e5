"""A residual add followed by an RMS norm, as one kernel (pure MLX reference).

    add_rms_norm(a, b, weight, eps) -> (s, y):  s = a + b,  y = rms_norm(s) * weight

Pre-norm blocks do this at every boundary: the residual stream s goes on to the next residual add, and
its normalised copy y into the next layer. `mad.passes.find_add_norms` finds such pairs in any graph;
the Program then runs them through this kernel (the device variant, `kernels/norm_device.py`, reads a
and b once and writes s and y in one launch instead of two).
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .registry import register_kernel


def add_rms_norm(a: mx.array, b: mx.array, weight: Optional[mx.array], eps: float) -> tuple[mx.array, mx.array]:
    """(a + b, rms_norm(a + b) * weight) over the last dim; the add rounded to the inputs' dtype first."""
    s = a + b
    return s, mx.fast.rms_norm(s, weight, eps)


register_kernel("add_rms_norm", add_rms_norm)
