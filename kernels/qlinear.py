"""Linear layers with quantized weights, as one kernel: parts of y = softcap(x W^T + b), W stored as
`mx.quantize` packs it (pure MLX reference).

    quantized_linear(x, packed, bias=None, splits=(), caps=(None,)) -> [part_0, ..., part_n]

`packed` is a `QuantizedMatrix`: the packed uint32 `weight` [N, K * bits / 32], its `scales` and (affine)
`biases` [N, K / group_size] with the settings `mx.quantize` used. Splits and caps as the `linear` kernel
(kernels/linear.py): a quantized linear node is one part, a fused group of them a part per member. The
result has x's dtype. Device variants (kernels/qlinear_device.py) take the same arguments.

The packed matrix travels as one object, not as arrays of the call: `dispatch` differentiates a variant
through the reference with respect to every array argument, and MLX has no gradient with respect to
packed weights. So the matrix is fixed for the call (MLX's quantized layers are frozen too) and a
gradient reaches x and the bias.

On the CPU a bfloat16/float16 product runs in float32: MLX's CPU `quantized_matmul` (0.32) accumulates
in the input's dtype, which on a 4096-wide row of bfloat16 is off by about a tenth of the result. Each
part of a multi-row call on the CPU is a product of its own (contiguous outputs, as the `linear` kernel's
CPU variant). On a GPU `mx.quantized_matmul` runs as it is. Both are decided while tracing, from the
device and the dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import mlx.core as mx

from .linear import check_parts, softcap, split_parts
from .registry import register_kernel


@dataclass(frozen=True, eq=False)
class QuantizedMatrix:
    """A matrix [N, K] as `mx.quantize(w, group_size, bits, mode=mode)` returns it."""

    weight: mx.array
    scales: mx.array
    biases: Optional[mx.array]
    group_size: int
    bits: int
    mode: str = "affine"

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the float matrix."""
        return self.weight.shape[0], self.weight.shape[1] * 32 // self.bits

    def rows(self, start: int, stop: Optional[int]) -> "QuantizedMatrix":
        """Rows start:stop (views)."""
        take = slice(start, stop)
        return QuantizedMatrix(self.weight[take], self.scales[take],
                               None if self.biases is None else self.biases[take], self.group_size, self.bits,
                               self.mode)


def quantized_linear(x: mx.array, packed: QuantizedMatrix, bias: Optional[mx.array] = None,
                     splits: Sequence[int] = (), caps: Sequence[Optional[float]] = (None,)) -> list[mx.array]:
    """The parts of softcap(x @ dequantize(packed).T + bias); see the module docstring."""
    check_parts(splits, caps)
    dtype = x.dtype
    on_cpu = mx.default_device() != mx.gpu
    scales, biases = packed.scales, packed.biases
    if on_cpu and dtype != mx.float32:
        x = x.astype(mx.float32)
        scales = scales.astype(mx.float32) if mx.issubdtype(scales.dtype, mx.floating) else scales
        biases = biases.astype(mx.float32) if biases is not None else None
        bias = bias.astype(mx.float32) if bias is not None else None
    packed = QuantizedMatrix(packed.weight, scales, biases, packed.group_size, packed.bits, packed.mode)

    def product(m: QuantizedMatrix, b: Optional[mx.array]) -> mx.array:
        y = mx.quantized_matmul(x, m.weight, m.scales, m.biases, transpose=True, group_size=m.group_size,
                                bits=m.bits, mode=m.mode)
        return y if b is None else y + b

    if splits and on_cpu and x.size != x.shape[-1]:
        bounds = list(zip((0, *splits), (*splits, None)))
        parts = [product(packed.rows(a, b), None if bias is None else bias[a:b]) for a, b in bounds]
    else:
        parts = split_parts(product(packed, bias), splits)
    parts = [softcap(p, c) if c else p for p, c in zip(parts, caps)]
    return [p.astype(dtype) for p in parts] if parts[0].dtype != dtype else parts


register_kernel("quantized_linear", quantized_linear)
