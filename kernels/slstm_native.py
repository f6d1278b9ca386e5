"""The sLSTM recurrence on MLX's CPU as one native primitive: the "cpu" variant of kernel
"slstm_sequence" (kernels/slstm.py is its reference).

The pure-MLX loop (`slstm._loop_fn`) is, per time step, a batched product R y and the cell's few compiled
elementwise kernels, each paying MLX's per-kernel dispatch; kernels/cpp/slstm_cpu.cpp runs the whole
loop in one task instead (built by kernels/native.py). It takes the loop's inputs and gives its outputs
(every step's y, c, n, m and R y), so the gradient is the reference's hand-written backpropagation through
time (`slstm._sequence_backward`) as it is. Its heads run on separate threads (`native.threads()`): R is
block-diagonal, so a head's recurrence never reads another's.

Numbers: the cell follows `_cell`'s order of operations with its transcendentals as polynomials in
arithmetic (within 3 ulp, so that the compiler vectorises the cell), and R y is summed in an order of its
own (16 partial sums, then pairwise), not the BLAS's: results agree with the reference to float32 rounding
(tests/test_native.py).

Where the native module is not available (`native.load()` is None: not Linux, no compiler, `MAD_NATIVE=0`)
the variant declines (`Unsupported`) and the reference runs.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from . import native
from .registry import Unsupported, gradients, register_variant
from .slstm import State, _sequence_backward, check_sequence, run_loop

__all__ = ["slstm_sequence_native"]


def _forward(wx: mx.array, Rt: mx.array, bh: mx.array, y: mx.array, c: mx.array, n: mx.array,
             m: mx.array) -> list:
    """`slstm._sequence`'s forward, natively. Rt is R transposed (`recurrent_to_matmul`): its transpose is R's
    own row-major layout again, which the primitive reads without a copy."""
    return native.load().slstm_loop(wx, Rt.transpose(0, 2, 1), bh, y, c, n, m, threads=native.threads())


_sequence = mx.custom_function(_forward)
_sequence.vjp(_sequence_backward)


def slstm_sequence_native(
    i: mx.array, f: mx.array, z: mx.array, o: mx.array, R: mx.array, b: mx.array,
    state: Optional[State] = None,
) -> tuple:
    """`slstm.slstm_sequence`, same arguments and results (T >= 1), with the loop in one native primitive."""
    if native.load() is None:
        raise Unsupported(native.reason())
    check_sequence(i, f, z, o, R, b)
    return run_loop(_sequence if gradients() else _forward, i, f, z, o, R, b, state)


register_variant("slstm_sequence", "cpu", slstm_sequence_native, own_gradient=True)
