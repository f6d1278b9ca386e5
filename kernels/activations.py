"""exp, sigmoid and SiLU (kernels "exp", "sigmoid", "silu"), with CPU variants built from arithmetic.

MLX's CPU `exp` (behind `mx.sigmoid` and `nn.silu`) is slow in the Linux wheel, whose kernels are built
for the baseline x86-64 (its polynomial's `floor` and `fma` become library calls), while a compiled chain
of multiplies and adds is cheap. In a feed-forward of the xLSTM-7B family the SiLU took 53-57 ms per
1024-token block against 73-79 ms for all of the block's matrix products (benchmarks/cpu_parts.py).

`exp_poly` is MLX's own float32 exp (`mlx/backend/common/simd/math.h`: x log2(e) split into an integer n
and a fraction f in [-1/2, 1/2], Cephes' degree-6 polynomial for 2^f, 2^n put into the exponent bits),
written in MLX operations that `mx.compile` fuses; n is rounded with the 1.5 * 2^23 trick
(no `floor`). It is within 1 ulp of `mx.exp` (tests/test_kernels.py). The CPU variants take float32
arrays and hand other dtypes to the reference. The mLSTM cell's chunkwise form takes "exp" for its
L x L decay matrix (kernels/mlstm.py).

Not done: tanh (the soft-caps). A Cephes-style tanhf from `exp_poly` measured 26.7 against MLX's 40.3 ns
per element, and its 1-2 ulp differences on the gates' soft-caps moved the HF fixture's ill-conditioned
logits from 3.3e-4 to 6.1e-4 (tests/test_blas.py holds that path to 4e-4); the soft-cap's cost falls on
all-position logits, which reading a prompt no longer computes (`last_only`).

    python benchmarks/cpu_parts.py          # 1024 tokens of the ~160M model, one block's parts, 2-core Xeon:
      SiLU(gate) * up                auto  35.9-38.5 ms   reference  53.2-57.4 ms
      sigmoid(o) * h (output gate)   auto   6.6-7.4 ms    reference  18.3-18.9 ms
      mLSTM cell (chunk 64)          auto  16.6-21.6 ms   reference  19.9-25.3 ms
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
