"""exp, sigmoid and SiLU (kernels "exp", "sigmoid", "silu"), with CPU variants built from arithmetic.

MLX's CPU `exp` (behind `mx.sigmoid` and `nn.silu`) costs about 26 ns per float32 element in the Linux
wheel, whose kernels are built for the baseline x86-64 (its polynomial's `floor` and `fma` become library
calls), while a compiled chain of multiplies and adds runs at about 0.5 ns per operation. In a feed-forward
of the xLSTM-7B family that made the SiLU cost a third as much as the matrix products around it.

`exp_poly` is MLX's own float32 exp (`mlx/backend/common/simd/math.h`: x log2(e) split into an integer n
and a fraction f in [-1/2, 1/2], Cephes' degree-6 polynomial for 2^f, 2^n put into the exponent bits),
written in MLX operations that `mx.compile` fuses into one loop; n is rounded with the 1.5 * 2^23 trick
(no `floor`). It is within 1 ulp of `mx.exp` (tests/test_kernels.py). The CPU variants take float32
arrays and hand other dtypes to the reference. The mLSTM cell's chunkwise form takes "exp" for its
L x L decay matrix (kernels/mlstm.py; 24 -> 18 ms per 1024-token cell of the ~160M model).

Not done: tanh (the soft-caps). A Cephes-style tanhf from `exp_poly` measured 26.7 against MLX's 40.3 ns
per element, and its 1-2 ulp differences on the gates' soft-caps moved the HF fixture's ill-conditioned
logits from 3.3e-4 to 6.1e-4 (tests/test_blas.py holds that path to 4e-4); the soft-cap's cost falls on
all-position logits, which reading a prompt no longer computes (`last_only`).

    x = mx.random.normal((2**21,)) * 4        # SiLU times an up-projection, compiled, 2-core Xeon:
    nn.silu(x) * y                             # 23.8 ns per element
    silu_cpu(x) * y                            #  7.4 ns per element, max relative error 5.7e-7 (both)
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .registry import Unsupported, register_kernel, register_variant

__all__ = ["exp_cpu", "exp_poly", "sigmoid_cpu", "silu_cpu"]

_LOG2E = 1.4426950408889634
_ROUND = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds a float32 of magnitude < 2^22 to an integer
_EXP2_POLY = (1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2,
              2.402264791363012e-1, 6.931472028550421e-1, 1.0)  # 2^f on [-1/2, 1/2], highest power first


def exp_poly(x: mx.array) -> mx.array:
    """exp(x) for float32 x, in arithmetic only (see the module's doc). The argument is clipped to
    [-88, 88], so values below stand at exp(-88) = 6.1e-39 and above at exp(88) = 1.65e38 (MLX: 0 and
    inf): the callers below then err by less than the smallest normal float32 (SiLU: times |x|). Exact
    0/inf would take two selects, which cost as much again as the rest here (measured)."""
    y = mx.clip(x, -88.0, 88.0) * _LOG2E
    n = (y + _ROUND) - _ROUND
    f = y - n
    p = _EXP2_POLY[0]
    for c in _EXP2_POLY[1:]:
        p = p * f + c
    return p * mx.left_shift(n.astype(mx.int32) + 127, 23).view(mx.float32)


def _float32(x: mx.array) -> None:
    if x.dtype != mx.float32:
        raise Unsupported(f"the CPU variant computes in float32, got {x.dtype}")


def exp_cpu(x: mx.array) -> mx.array:
    _float32(x)
    return exp_poly(x)


def sigmoid_cpu(x: mx.array) -> mx.array:
    _float32(x)
    return 1.0 / (1.0 + exp_poly(-x))


def silu_cpu(x: mx.array) -> mx.array:
    _float32(x)
    return x / (1.0 + exp_poly(-x))


register_kernel("exp", mx.exp)
register_variant("exp", "cpu", exp_cpu)
register_kernel("sigmoid", mx.sigmoid)
register_variant("sigmoid", "cpu", sigmoid_cpu)
register_kernel("silu", nn.silu)
register_variant("silu", "cpu", silu_cpu)
