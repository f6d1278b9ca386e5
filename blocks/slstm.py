"""The sLSTM cell of the original xLSTM stack (NX-AI `xLSTMLMModel`).

The sLSTM layer is wired around it in `topologies/xlstm-v1-125m.yaml`, with node names that mirror
NX-AI's module names, so its checkpoints load by name:

    x_c = silu(conv1d(x));  i, f = fgate(x_c), igate(x_c);  z, o = zgate(x), ogate(x)
    y = group_norm(sLSTM cell(i, f, z, o))                                        (slstm_cell)

The recurrence lives in `mad.kernels.slstm` (pure MLX; device kernels are tested against it).
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from mad.block import Block, Cut, Dim, ShapeError, SplitHeads, TensorType, expect_float, register, same_types
from mad.kernels.registry import dispatch

class SLSTMCell(nn.Module):
    """Gate pre-activations i, f, z, o (B, T, NH*DH) -> h (B, T, NH*DH), state (y, c, n, m) float32.

    Weights: `recurrent_kernel` (NH, 4*DH, DH) and `bias` (4*NH*DH,), NX-AI's vanilla layouts of
    `_recurrent_kernel_` and `_bias_` (see `mad.kernels.slstm`).
    """

    def __init__(self, heads: int, dim: int):
        super().__init__()
        dh = dim // heads
        self.recurrent_kernel = mx.zeros((heads, 4 * dh, dh))
        # forget-gate bias spread over (3, 6) so fresh models remember; other gates 0
        f_bias = mx.broadcast_to(mx.linspace(3.0, 6.0, dh), (heads, dh)).reshape(-1)
        self.bias = mx.concatenate([mx.zeros((dim,)), f_bias, mx.zeros((2 * dim,))])
        self._heads = heads

    def _heads_first(self, x: mx.array) -> mx.array:
        b, t, _ = x.shape
        return x.reshape(b, t, self._heads, -1).transpose(0, 2, 1, 3)

    def __call__(self, i, f, z, o, state: Optional[dict] = None, mode: str = "auto"):
        cell_state = None if state is None else (state["y"], state["c"], state["n"], state["m"])
        h, (y, c, n, m) = dispatch("slstm_sequence")(*(self._heads_first(g) for g in (i, f, z, o)),
                                         self.recurrent_kernel, self.bias, cell_state)
        b, _, t, _ = h.shape
        return h.transpose(0, 2, 1, 3).reshape(b, t, -1), {"y": y, "c": c, "n": n, "m": m}


@register("slstm_cell")
class SLSTMCellBlock(Block):
    """The sLSTM scalar-memory cell over NH heads with block-diagonal recurrent weights and stabilised
    exponential gating (NX-AI's vanilla backend). Inputs: the gate pre-activations W x of the input gate
    i, forget gate f, cell input z and output gate o, each (B, T, NH*DH), head-interleaved. Weights
    `recurrent_kernel` [NH, 4*DH, DH] (gate-major rows i, f, z, o) and `bias` [4*NH*DH] (gate-major).
    State per sequence: y, c, n, m (NH, DH) float32. Mind NX-AI's wiring: its module `fgate` feeds i."""

    ports = ("i", "f", "z", "o")
    heads: Dim

    def infer(self, i, f, z, o) -> TensorType:
        for name, g in (("i", i), ("f", f), ("z", z), ("o", o)):
            expect_float(g, name)
        same_types((i, f, z, o), "gate inputs i, f, z, o")
        if len(i.shape) != 3 or int(i.shape[-1]) % self.heads:
            raise ShapeError(f"gates: expected (B, T, heads*dim) with heads={int(self.heads)}, got {i}")
        return i

    def state(self, i, f, z, o) -> dict[str, TensorType]:
        shape = (i.shape[0], int(self.heads), int(i.shape[-1]) // int(self.heads))
        return {name: TensorType(shape, "float32") for name in ("y", "c", "n", "m")}

    def build(self, *inputs: TensorType) -> nn.Module:
        return SLSTMCell(int(self.heads), int(inputs[0].shape[-1]))

    def shard_rule(self, *inputs: TensorType) -> SplitHeads:
        # the recurrent weights are block-diagonal over heads, so they split with the heads: a member owns
        # its heads' kernel rows and the gate-major bias's [i | f | z | o] parts of them
        heads = int(self.heads)
        return SplitHeads(heads, weights={"recurrent_kernel": Cut(0), "bias": Cut(0, groups=4)},
                          state={name: Cut(1) for name in ("y", "c", "n", "m")}, local=lambda n: {"heads": heads // n})
