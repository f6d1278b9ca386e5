"""mLSTM blocks: the cell and the multi-head layer norm around it.

Both xLSTM families wire the layer around the cell in the topology from `linear`, `gate` and wiring
nodes, with the checkpoint's own names, so their weights load by name. xLSTM-7B (HF `xlstm`,
`topologies/xlstm-7b.yaml`):

    q, k, v, o = Wq h, Wk h, Wv h, Wo h;  i~, f~ = 15 tanh((W h + b) / 15)      (linear, softcap)
    h_cell = mLSTM cell(q, k, v, i~, f~)                                          (mlstm_cell)
    y = W_out(sigmoid(o) * LayerNorm_per_head(h_cell))                            (multihead_layernorm, gate)

The original mLSTM layer (NX-AI `xLSTMLMModel`, `topologies/xlstm-v1-125m.yaml`):

    x_mlstm, z = split(proj_up(h));  x_c = silu(conv1d(x_mlstm))
    q, k = q_proj(x_c), k_proj(x_c);  v = v_proj(x_mlstm)                         (headwise_linear)
    i, f = igate([q k v]), fgate([q k v])                                         (concat, linear)
    h_cell = outnorm(mLSTM cell(q, k, v, i, f)), 1/sqrt(DH) on k                  (mlstm_cell scale: k)
    y = proj_down((h_cell + learnable_skip * x_c) * silu(z))                      (channel_scale, add, gate)

The cell's math lives in `mad.kernels.mlstm` (pure MLX; device kernels are tested against it).
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import mlx.core as mx
import mlx.nn as nn

from mad.block import (Block, Cut, Dim, FiniteFloat, FoldForm, PositiveFloat, ShapeError, SplitHeads, TensorType,
                       expect_float, register)
from mad.kernels.fold import head_norm
from mad.kernels.mlstm import float32_products, inert_gates, mlstm_sequence
from mad.kernels.registry import chosen_variant, dispatch


class MLSTMCell(nn.Module):
    """(B, T, NH*DQK) x2, (B, T, NH*DV), gates (B, T, NH) x2 -> (B, T, NH*DV), with state (C, n, m).
    `valid`: the positions from it on are padding, made inert through their gates (`inert_gates`)."""

    inert_padding = True

    def __init__(self, heads: int, chunk_size: int, eps: float, mode: str, scale: str = "q"):
        super().__init__()
        self.heads, self.chunk_size, self.eps, self.mode, self.scale = heads, chunk_size, eps, mode, scale

    def _heads(self, x: mx.array) -> mx.array:
        b, t, _ = x.shape
        return x.reshape(b, t, self.heads, -1).transpose(0, 2, 1, 3)

    def __call__(self, q, k, v, i, f, state: Optional[dict], mode: str = "auto", valid: Optional[mx.array] = None):
        mode = self.mode if self.mode != "auto" else mode
        cell_state = None if state is None else (state["C"], state["n"], state["m"])
        b, t, _ = q.shape
        if t == 1 and mode != "parallel":  # decode: the fused step kernel where the device has one
            # in the layer's layout (gates in any float dtype, read as float32): the kernel reads the
            # projections and writes h as they lie, with no reshape nodes in a decode step's graph
            h, (c, n, m) = dispatch("mlstm_step")(q, k, v, i, f, cell_state, eps=self.eps, scale=self.scale,
                                                  heads=self.heads)
            return h, {"C": c, "n": n, "m": m}
        gates = [g.astype(mx.float32).transpose(0, 2, 1) for g in (i, f)]
        if valid is not None:
            gates = inert_gates(*gates, valid)
        dtype = v.dtype
        if float32_products(v, t):  # as `mlstm_sequence` would, before the 1/sqrt(DQK) scale; h rounded once
            q, k, v = (a.astype(mx.float32) for a in (q, k, v))
        factor = 1.0 / math.sqrt(q.shape[-1] // self.heads)
        if mode != "parallel" and chosen_variant("mlstm_chunk_outputs")[1] == "cuda":
            # the CUDA chunk kernels read head-major views of the projections as they lie (no copies)
            q, k = (x * factor if self.scale == name else x for x, name in ((q, "q"), (k, "k")))
            qh, kh, vh = (self._heads(x) for x in (q, k, v))
        else:
            # head-major copies made once (the scaled one by its product): every product of the cell
            # reads them, and a product of a transposed view would copy it again
            qh = self._heads(q) * factor if self.scale == "q" else mx.contiguous(self._heads(q))
            kh = self._heads(k) * factor if self.scale == "k" else mx.contiguous(self._heads(k))
            vh = mx.contiguous(self._heads(v))
        h, (c, n, m) = mlstm_sequence(qh, kh, vh, *gates, cell_state,
                                      chunk_size=self.chunk_size, eps=self.eps, mode=mode, scale="none")
        b, _, t, _ = h.shape
        return h.transpose(0, 2, 1, 3).reshape(b, t, -1).astype(dtype), {"C": c, "n": n, "m": m}


@register("mlstm_cell")
class MLSTMCellBlock(Block):
    """The mLSTM matrix-memory cell over NH heads. Inputs are head-interleaved projections:
    q, k (B, T, NH*DQK), v (B, T, NH*DV), i, f (B, T, NH). State per sequence: C (NH, DQK, DV),
    n (NH, DQK), m (NH), float32. `scale: k` puts the 1/sqrt(DQK) factor on k instead of q (NX-AI's
    original mLSTM layer): the same outputs, with C and n scaled by that factor."""

    ports = ("q", "k", "v", "i", "f")
    heads: Dim
    chunk_size: Dim = 64
    eps: PositiveFloat = 1e-6
    mode: Literal["auto", "step", "chunkwise", "parallel"] = "auto"
    scale: Literal["q", "k"] = "q"

    def _split(self, x: TensorType, what: str) -> int:
        expect_float(x, what)
        if len(x.shape) != 3 or int(x.shape[-1]) % self.heads:
            raise ShapeError(f"{what}: expected (B, T, heads*dim) with heads={int(self.heads)}, got {x}")
        return int(x.shape[-1]) // self.heads

    def infer(self, q, k, v, i, f) -> TensorType:
        if q.shape != k.shape:
            raise ShapeError(f"q and k differ: {q} vs {k}")
        self._split(q, "q"), self._split(v, "v")
        if q.shape[:2] != v.shape[:2]:
            raise ShapeError(f"q and v differ in (B, T): {q} vs {v}")
        for name, g in (("i", i), ("f", f)):
            if g.shape != (*q.shape[:2], self.heads):
                raise ShapeError(f"gate {name}: expected (B, T, heads={int(self.heads)}), got {g}")
        return v

    def state(self, q, k, v, i, f) -> dict[str, TensorType]:
        batch, nh = q.shape[0], self.heads
        dqk, dv = self._split(q, "q"), self._split(v, "v")
        return {"C": TensorType((batch, nh, dqk, dv), "float32"), "n": TensorType((batch, nh, dqk), "float32"),
                "m": TensorType((batch, nh), "float32")}

    def build(self, *inputs: TensorType) -> nn.Module:
        return MLSTMCell(int(self.heads), int(self.chunk_size), self.eps, self.mode, self.scale)

    def shard_rule(self, *inputs: TensorType) -> SplitHeads:
        heads = int(self.heads)  # heads are independent: each member owns some, with their state
        return SplitHeads(heads, state={"C": Cut(1), "n": Cut(1), "m": Cut(1)}, local=lambda n: {"heads": heads // n})


class MultiHeadNorm(nn.Module):
    """Per-head LayerNorm of (B, T, NH*DH) computed in float32, then an elementwise (offset +) weight."""

    def __init__(self, heads: int, dim: int, eps: float, bias: bool, weight_offset: float):
        super().__init__()
        self.weight = mx.full((dim,), 1.0 - weight_offset)
        if bias:
            self.bias = mx.zeros((dim,))
        self.heads, self.eps, self.offset = heads, eps, weight_offset

    def __call__(self, x: mx.array) -> mx.array:
        return head_norm(x, self.weight, self.bias if "bias" in self else None, self.eps, self.heads, self.offset)


@register("multihead_layernorm")
class MultiHeadLayerNormBlock(Block):
    """LayerNorm over each head's slice of the last dim (mean-centred, biased variance, float32),
    times a weight over the whole dim. With `weight_offset: 1` the scale is (1 + weight) (NX-AI)."""

    positionwise = True

    heads: Dim
    eps: PositiveFloat = 1e-6
    bias: bool = False
    weight_offset: FiniteFloat = 0.0

    def infer(self, x: TensorType) -> TensorType:
        expect_float(x)
        if int(x.shape[-1]) % self.heads:
            raise ShapeError(f"last dim {x.shape[-1]} is not divisible by heads={int(self.heads)}")
        return x

    def build(self, x: TensorType) -> nn.Module:
        return MultiHeadNorm(int(self.heads), int(x.shape[-1]), self.eps, self.bias, self.weight_offset)

    def fold_form(self, x: TensorType) -> Optional[FoldForm]:
        return FoldForm("head_norm", eps=float(self.eps), weight="weight", heads=int(self.heads),
                        offset=float(self.weight_offset), bias="bias" if self.bias else None)

    def shard_rule(self, x: TensorType) -> SplitHeads:
        heads = int(self.heads)
        weights = {"weight": Cut(0), **({"bias": Cut(0)} if self.bias else {})}
        return SplitHeads(heads, weights, local=lambda n: {"heads": heads // n})
