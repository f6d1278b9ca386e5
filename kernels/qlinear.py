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

The CPU variant (`quantized_linear_cpu`) reads a prompt differently: MLX's CPU `quantized_matmul` takes
50-70x the float32 product's time at 256 rows (it unpacks every weight once per row), so a prompt-shaped
call (a sequence of at least `PROMPT_ROWS` positions) unpacks the matrix once into float32 (shifts and
masks in one compiled elementwise pass, bit-equal to `mx.dequantize`, twice its speed) and runs the BLAS
product; the float matrix lives for that product only. Decode-shaped calls (one position per sequence)
keep `quantized_matmul`, which reads a quarter of the bytes (and gives a row the same bits whatever the
batch).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import mlx.core as mx

from .linear import capped_parts, check_parts, linear_cpu, softcap
from .registry import Unsupported, register_kernel, register_variant

PROMPT_ROWS = 8  # prompt rows from which the CPU unpacks the matrix (below, quantized_matmul is about as fast)


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


def affine_layout(x: mx.array, packed: QuantizedMatrix, bias: Optional[mx.array] = None,
                  norm: Optional[tuple] = None) -> bool:
    """Whether a call's arrays are laid out as the device kernels read an affine matrix (x (..., K)): the
    packed rows, scales and biases of `mx.quantize`'s shapes with float scales and biases, a bias of N,
    a folded norm's weight of K."""
    K, (N, words) = x.shape[-1], packed.weight.shape
    groups = (N, K // packed.group_size)
    return (packed.mode == "affine" and packed.biases is not None and K % packed.group_size == 0
            and packed.weight.dtype == mx.uint32 and words == K * packed.bits // 32
            and packed.scales.shape == groups and packed.biases.shape == groups
            and mx.issubdtype(packed.scales.dtype, mx.floating) and mx.issubdtype(packed.biases.dtype, mx.floating)
            and (bias is None or bias.shape == (N,))
            and (norm is None or (norm[0] is not None and norm[0].shape == (K,))))


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
        parts = [softcap(p, c) if c else p for p, c in zip(parts, caps)]
    else:
        parts = capped_parts(product(packed, bias), splits, caps)
    return [p.astype(dtype) for p in parts] if parts[0].dtype != dtype else parts


register_kernel("quantized_linear", quantized_linear)


@functools.lru_cache(maxsize=None)
def _unpacker(bits: int, group_size: int) -> Callable:
    """A compiled float32 unpacking of an affine matrix of `bits` (a divisor of 32) in groups of
    `group_size`: value j of a uint32 word is (word >> bits * j) & (2^bits - 1), then scale * q + bias."""
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
    mask = (1 << bits) - 1

    @mx.compile
    def unpack(w: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
        n = w.shape[0]
        q = ((w[..., None] >> shifts) & mask).reshape(n, -1, group_size).astype(mx.float32)
        return (q * scales[..., None] + biases[..., None]).reshape(n, -1)

    return unpack


def dequantized(packed: QuantizedMatrix) -> mx.array:
    """The float32 matrix [N, K] of `packed`: `_unpacker` for affine 2-, 4- and 8-bit, else `mx.dequantize`."""
    if packed.mode != "affine":  # floating-point modes: integer scales, no biases
        return mx.dequantize(packed.weight, packed.scales, packed.biases, group_size=packed.group_size,
                             bits=packed.bits, mode=packed.mode).astype(mx.float32)
    scales, biases = packed.scales.astype(mx.float32), packed.biases.astype(mx.float32)
    if 32 % packed.bits == 0:
        return _unpacker(packed.bits, packed.group_size)(packed.weight, scales, biases)
    return mx.dequantize(packed.weight, scales, biases, group_size=packed.group_size, bits=packed.bits)


def quantized_linear_cpu(x: mx.array, packed: QuantizedMatrix, bias: Optional[mx.array] = None,
                         splits: Sequence[int] = (), caps: Sequence[Optional[float]] = (None,)) -> list[mx.array]:
    """`quantized_linear` for prompt-shaped calls on the CPU: the unpacked float32 matrix through the CPU
    `linear` (one product per part); `Unsupported` for decode-shaped ones (module docstring)."""
    check_parts(splits, caps)
    if x.ndim < 3 or x.shape[-2] < PROMPT_ROWS:
        raise Unsupported("quantized_linear: a decode-shaped call keeps quantized_matmul")
    dtype = x.dtype
    parts = linear_cpu(x.astype(mx.float32), dequantized(packed), None if bias is None else bias.astype(mx.float32),
                       splits, caps)
    return [p.astype(dtype) for p in parts] if dtype != mx.float32 else parts


register_variant("quantized_linear", "cpu", quantized_linear_cpu)
