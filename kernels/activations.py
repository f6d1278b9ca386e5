"""exp, sigmoid and SiLU, alone and as gates (kernels "exp", "sigmoid", "silu", "sigmoid_mul",
"silu_mul"), with CPU variants built from arithmetic that `mx.compile` fuses.

MLX's CPU `exp` (behind `mx.sigmoid` and `nn.silu`) is slow in the Linux wheel, whose kernels are built
for the baseline x86-64 (its polynomial's `floor` and `fma` become library calls), while a compiled chain
of adds and multiplies is cheap: MLX writes it as one C++ loop that the compiler vectorises (for
contiguous inputs; see kernels/linear.py for why the blocks' inputs are contiguous). The timings are in
benchmarks/RESULTS.md (`python benchmarks/cpu_parts.py`).

`exp_parts` is MLX's own float32 exp (`mlx/backend/common/simd/math.h`): y = x log2(e) split into an
integer n and a fraction f in [-1/2, 1/2], Cephes' degree-6 polynomial for 2^f, 2^n put into the
exponent bits. It is shaped for MLX's CPU fusion (`mlx/compile.cpp`), which fuses elementwise
operations up to 11 levels deep, never fuses the bit cast (`view`) and materialises any array whose
consumers fall in two fused kernels. So the work falls into three kernels per call:
  1. y = clip(scale * x, +-88 log2(e))                        (x -> y)
  2. 2^n from round(y), in the exponent bits                  (y -> 2^n, an int kernel, then the bit cast)
  3. n = round(y), f = y - n, 2^f - 1 by Estrin's scheme, and the caller's arithmetic with it and 2^n
Each kernel rounds y on its own ((y - c) + c in 2, (y + c) - c in 3, c = 1.5 * 2^23: the same integer,
tested), since a shared n would be materialised as a fourth array; Estrin's scheme (depth 5, Horner's
12) keeps kernel 3 within the depth limit, as does adding the polynomial's 1 last (see the callers).
Selects are avoided (MLX compiles `where` to a branch, which the compiler does not vectorise and the
CPU mispredicts on random signs), and the clip's `minimum`/`maximum`, branches too, sit in kernel 1
alone, where they are rarely taken.

The results are within 1 ulp of `mx.exp` on [-88, 88] (arguments outside are clipped) and within a few
ulp of the references for the others (tests/test_kernels.py). The CPU variants compute in float32: a
bfloat16/float16 call is converted, computed and rounded once (MLX's CPU evaluates 16-bit transcendentals
about 20x slower, rounding after each operation); float64 goes to the reference. The gate forms compute act(g) * x with one division: x / (1 + e^-g)
and g x / (1 + e^-g) (the blocks' output gates and gated feed-forwards).
The mLSTM cell's chunkwise form takes "exp" for its L x L decay matrix (kernels/mlstm.py).

Not done: tanh (the soft-caps). A tanh built from this exp is faster than MLX's (see
benchmarks/RESULTS.md), but its ulp differences on the gates' soft-caps move the ill-conditioned logits
of the HF fixture, which tests/test_blas.py holds to a bound, and the soft-cap's cost falls mostly on
all-position logits, which reading a prompt does not compute (`last_only`).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .linear import HALF
from .registry import Unsupported, gradients, register_kernel, register_variant

__all__ = ["exp_cpu", "exp_parts", "exp_poly", "sigmoid_cpu", "silu_cpu", "sigmoid_mul_cpu", "silu_mul_cpu"]

_LOG2E = 1.4426950408889634
_Y_MAX = 126.95716094970703  # float32(88 * float32(log2(e))): y of exp(88), so clipping y clips x at +-88
_ROUND = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds a float32 of magnitude < 2^22 to an integer
# 2^f = 1 + C1 f + C2 f^2 + ... + C6 f^6 on [-1/2, 1/2] (Cephes)
_C1, _C2, _C3, _C4, _C5, _C6 = (6.931472028550421e-1, 2.402264791363012e-1, 5.550332471162809e-2,
                                9.618437357674640e-3, 1.339887440266574e-3, 1.535336188319500e-4)


def _exp2_fraction_minus_one(f: mx.array) -> mx.array:
    """2^f - 1 for f in [-1/2, 1/2]: Cephes' polynomial less its constant term, by Estrin's scheme. The
    caller adds the 1 last (one rounding, which keeps the result within 1 ulp of MLX's Horner form)."""
    f2 = f * f
    return (_C1 * f + f2 * (_C2 + _C3 * f)) + (f2 * f2) * ((_C4 + _C5 * f) + f2 * _C6)


def round_down_up(y: mx.array) -> mx.array:
    """round(y) (to nearest, ties to even) as (y - c) + c; `round_up_down` is (y + c) - c. For |y| < 2^22
    both give the same integer: c is even and both sums fall where float32's spacing is 1."""
    return (y - _ROUND) + _ROUND


def round_up_down(y: mx.array) -> mx.array:
    return (y + _ROUND) - _ROUND


def exp_parts(x: mx.array, scale: float = 1.0) -> tuple[mx.array, mx.array]:
    """(s, 2^n) with exp(scale * x) = 2^n + s * 2^n, s = 2^f - 1 in [-0.3, 0.42], for float32 x (see the
    module's doc); s * 2^n is exact (a power-of-2 scaling, for normal results), so the sum rounds once.
    scale is +-1. The argument is clipped to [-88, 88]: below -87.7 the result is 0 as MLX's (2^-127 is
    not a normal float32), above 88 it stays at exp(88) = 1.65e38 (MLX: inf), so the callers below err
    by less than the smallest normal float32 there (SiLU: times |x|). NaN gives NaN."""
    y = mx.clip(x * (scale * _LOG2E), -_Y_MAX, _Y_MAX)
    pow2 = mx.left_shift(round_down_up(y).astype(mx.int32) + 127, 23).view(mx.float32)
    return _exp2_fraction_minus_one(y - round_up_down(y)), pow2


def exp_poly(x: mx.array) -> mx.array:
    """exp(x) for float32 x, in arithmetic only (see `exp_parts`)."""
    s, pow2 = exp_parts(x)
    return pow2 + s * pow2


def _float32(*xs: mx.array) -> None:
    for x in xs:
        if x.dtype != mx.float32:
            raise Unsupported(f"the CPU variant computes in float32, got {x.dtype}")


def _exp_cpu(x: mx.array) -> mx.array:
    return exp_poly(x)


def _one_plus_exp_neg(g: mx.array) -> mx.array:
    """1 + exp(-g), as (1 + 2^n) + s 2^n: a level less than 1 + (2^n + s 2^n) for kernel 3's depth."""
    s, pow2 = exp_parts(g, -1.0)
    return (1.0 + pow2) + s * pow2


def _sigmoid_cpu(x: mx.array) -> mx.array:
    return 1.0 / _one_plus_exp_neg(x)


def _silu_cpu(x: mx.array) -> mx.array:
    return x / _one_plus_exp_neg(x)


def _sigmoid_mul_cpu(g: mx.array, x: mx.array) -> mx.array:
    return x / _one_plus_exp_neg(g)


def _silu_mul_cpu(g: mx.array, x: mx.array) -> mx.array:
    return g * x / _one_plus_exp_neg(g)


# The VJPs: the references' (MLX's Exp and Sigmoid VJPs, the product rule of x * sigmoid(x) and of the
# gates' products) in the same order of operations, with sigmoid(g) as 1 / (1 + exp(-g)) from the arithmetic
# exp (recomputed: the forward keeps no second array) or the kernel's own output. The reference's VJP (the
# registry's default) would run the reference's forward again in the backward: MLX's CPU exp.
def _exp_vjp(primals, cotangent, y):
    return cotangent * y


def _sigmoid_vjp(primals, cotangent, s):
    return cotangent * (s * (1.0 - s))


def _silu_vjp(x, cotangent, y):
    s = 1.0 / _one_plus_exp_neg(x)
    return cotangent * s + (cotangent * x) * (s * (1.0 - s))


def _sigmoid_mul_vjp(primals, cotangent, y):
    g, x = primals
    s = 1.0 / _one_plus_exp_neg(g)
    return (cotangent * x) * (s * (1.0 - s)), cotangent * s


def _silu_mul_vjp(primals, cotangent, y):
    g, x = primals
    s = 1.0 / _one_plus_exp_neg(g)
    cx = cotangent * x
    return cx * s + (cx * g) * (s * (1.0 - s)), cotangent * (g * s)


def _cpu_kernel(forward, vjp, doc: str):
    """`forward` as a differentiable float32 kernel with `vjp` (other dtypes: `Unsupported`)."""
    fn = mx.custom_function(forward)
    fn.vjp(vjp)

    def kernel(*xs: mx.array) -> mx.array:
        dtype = xs[0].dtype
        if dtype in HALF and all(x.dtype == dtype for x in xs):
            wide = [x.astype(mx.float32) for x in xs]  # computed in float32, rounded once
            return (fn(*wide) if gradients() else forward(*wide)).astype(dtype)
        _float32(*xs)
        return fn(*xs) if gradients() else forward(*xs)  # `inference()`: no custom function's node

    kernel.__name__, kernel.__doc__ = forward.__name__.lstrip("_"), doc
    return kernel


exp_cpu = _cpu_kernel(_exp_cpu, _exp_vjp, "exp(x) (see `exp_parts`).")
sigmoid_cpu = _cpu_kernel(_sigmoid_cpu, _sigmoid_vjp, "sigmoid(x) = 1 / (1 + exp(-x)).")
silu_cpu = _cpu_kernel(_silu_cpu, _silu_vjp, "silu(x) = x / (1 + exp(-x)).")
sigmoid_mul_cpu = _cpu_kernel(_sigmoid_mul_cpu, _sigmoid_mul_vjp, "sigmoid(g) * x.")
silu_mul_cpu = _cpu_kernel(_silu_mul_cpu, _silu_mul_vjp, "silu(g) * x.")


register_kernel("exp", mx.exp)
register_variant("exp", "cpu", exp_cpu, own_gradient=True)
register_kernel("sigmoid", mx.sigmoid)
register_variant("sigmoid", "cpu", sigmoid_cpu, own_gradient=True)
register_kernel("silu", nn.silu)
register_variant("silu", "cpu", silu_cpu, own_gradient=True)
register_kernel("sigmoid_mul", lambda g, x: mx.sigmoid(g) * x)
register_variant("sigmoid_mul", "cpu", sigmoid_mul_cpu, own_gradient=True)
register_kernel("silu_mul", lambda g, x: nn.silu(g) * x)
register_variant("silu_mul", "cpu", silu_mul_cpu, own_gradient=True)
