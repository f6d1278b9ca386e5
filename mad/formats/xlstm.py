"""Checkpoint format of the xLSTM-7B family: HF `model_type: xlstm` folders, also NX-AI `xlstm_large` folders.

The config picks dims and options of `xlstm-7b.yaml`; weights keep their names except NX-AI's
`embedding.weight` and the fused projections of `weight_mode: fused`, which are split into the
single-mode weights. `unsanitize` is the inverse (what `mad.save(model, DIR, format="source")` writes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Collection, Optional

import mlx.core as mx

from ..errors import MadError
from ..tokenizers import eos_token_ids as _eos_ids
from . import shipped_topology

NAME = "xlstm (xLSTM-7B family)"
CONFIG_FILES = ("config.json",)


def detect(config: dict) -> bool:
    """An HF xlstm config, or an NX-AI xlstm_large one (no model_type, the xLSTMForCausalLM architecture)."""
    return config.get("model_type", "xlstm") == "xlstm" and (
        "model_type" in config
        or (isinstance(config.get("architectures"), list) and "xLSTMForCausalLM" in config["architectures"]))


def eos_token_ids(config: dict) -> list[int]:
    return _eos_ids(config.get("eos_token_id"))


_MISSING = object()


def _get(config: dict, *names: str, default: Any = None) -> Any:
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return default


def _int(config: dict, *names: str, default: Any = _MISSING, least: int = 1) -> int:
    """An integer field (the first of `names` that is set), >= `least`; else a MadError naming the field."""
    value = _get(config, *names, default=default)
    if value is _MISSING:
        raise MadError(f"'{names[0]}' is missing (an integer >= {least})")
    name = next((n for n in names if config.get(n) is not None), names[0])
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise MadError(f"'{name}' must be an integer >= {least}, got {value!r}")
    return value


def _real(config: dict, name: str, default: Any, positive: bool = True, nullable: bool = False) -> Any:
    """A number field (finite; > 0 when `positive`); None allowed when `nullable`."""
    import math

    value = config.get(name, default)
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            (positive and value <= 0):
        what = "a number > 0" if positive else "a finite number"
        raise MadError(f"'{name}' must be {what}{' or null' if nullable else ''}, got {value!r}")
    return value


def _flag(config: dict, name: str, default: bool) -> bool:
    value = config.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise MadError(f"'{name}' must be true or false, got {value!r}")
    return value


def _hf_round_up(x: float, multiple: int) -> int:
    return int(((x + multiple - 1) // multiple) * multiple)


class XLSTMDims:
    """The sizes an HF xlstm config.json describes, each field checked (type, range) with its name."""

    def __init__(self, config: dict):
        unsupported = {"use_bias": True, "add_out_norm": False, "norm_reduction_force_float32": False}
        for key, bad in unsupported.items():
            if _flag(config, key, not bad) == bad:
                raise MadError(f"config.json: {key}={bad} is not supported by the shipped xlstm topology")
        self.vocab = _int(config, "vocab_size")
        self.d = _int(config, "hidden_size", "embedding_dim")
        self.layers = _int(config, "num_hidden_layers", "num_blocks")
        self.heads = _int(config, "num_heads", default=8)
        self.qk = int(self.d * _real(config, "qk_dim_factor", 0.5))
        self.v = int(self.d * _real(config, "v_dim_factor", 1.0))
        for name, size, factor in (("qk_dim_factor", self.qk, "QK"), ("v_dim_factor", self.v, "V")):
            if size < 1:
                raise MadError(f"'{name}' makes the {factor} dim {size} (hidden_size {self.d})")
        self.ffn = _hf_round_up(self.d * _real(config, "ffn_proj_factor", 2.667),
                                _int(config, "ffn_round_up_to_multiple_of", default=64))
        self.chunk = _int(config, "chunk_size", default=64)
        self.gate_cap = _real(config, "gate_soft_cap", 15.0, nullable=True)
        self.eps = _real(config, "eps", 1e-6)
        self.norm_eps = _real(config, "norm_eps", 1e-6)
        self.logit_cap = _real(config, "output_logit_soft_cap", None, nullable=True) or None  # 0: none
        self.tie = _flag(config, "tie_word_embeddings", False)


def topology(config: dict) -> tuple[Path, list[str]]:
    """`xlstm-7b.yaml` with the dims and options this config describes."""
    c = XLSTMDims(config)
    mlstm = "templates.mlstm_layer.nodes"
    block = "templates.mlstm_block.nodes"
    overrides = [
        f"dims.V={c.vocab}",
        f"dims.D={c.d}",
        f"dims.L={c.layers}",
        f"dims.NH={c.heads}",
        f"dims.QK={c.qk}",
        f"dims.VD={c.v}",
        f"dims.F={c.ffn}",
        f"dims.CHUNK={c.chunk}",
        f"{mlstm}.igate_preact.softcap={c.gate_cap if c.gate_cap is not None else 'null'}",
        f"{mlstm}.fgate_preact.softcap={c.gate_cap if c.gate_cap is not None else 'null'}",
        f"{mlstm}.cell.eps={c.eps}",
        f"{mlstm}.multihead_norm.eps={c.norm_eps}",
        f"{block}.norm_mlstm.eps={c.norm_eps}",
        f"{block}.norm_ffn.eps={c.norm_eps}",
        f"nodes.backbone.out_norm.eps={c.norm_eps}",
        f"nodes.lm_head.softcap={c.logit_cap if c.logit_cap is not None else 'null'}",
    ]
    if c.tie:
        overrides.append("nodes.lm_head.tie=backbone.embeddings")
    return shipped_topology("xlstm-7b.yaml"), overrides


def _split(weights: dict, key: str, names: list[str], sizes: list[int]) -> None:
    w = weights.pop(key)
    if w.ndim < 1 or w.shape[0] != sum(sizes):
        raise MadError(f"checkpoint: fused weight '{key}' has shape {tuple(w.shape)}, expected {sum(sizes)} rows")
    offsets = [sum(sizes[:i]) for i in range(1, len(sizes))]
    for name, part in zip(names, mx.split(w, offsets, axis=0)):
        weights[name] = part


def sanitize(weights: dict, config: dict) -> dict:
    """NX-AI key names and fused projections -> the names of `xlstm-7b.yaml`'s nodes."""
    weights = dict(weights)
    if "embedding.weight" in weights:  # NX-AI xlstm_large naming
        weights["backbone.embeddings.weight"] = weights.pop("embedding.weight")
    c = XLSTMDims(config)
    heads, qk, v = c.heads, c.qk, c.v
    for key in [k for k in weights if k.endswith(".qkv_opreact.weight")]:
        p = key[: -len("qkv_opreact.weight")]
        _split(weights, key, [p + n + ".weight" for n in ("q", "k", "v", "ogate_preact")], [qk, qk, v, v])
    for key in [k for k in weights if ".ifgate_preact." in k]:
        p, _, leaf = key.rpartition(".ifgate_preact.")
        _split(weights, key, [f"{p}.igate_preact.{leaf}", f"{p}.fgate_preact.{leaf}"], [heads, heads])
    for key in [k for k in weights if k.endswith(".proj_up_gate_z.weight")]:
        p = key[: -len("proj_up_gate_z.weight")]
        half = weights[key].shape[0] // 2 if weights[key].ndim else 0
        _split(weights, key, [p + "proj_up_gate.weight", p + "proj_up.weight"], [half, half])
    return weights


def _fuse(weights: dict, names: list[str], key: str) -> None:
    parts = [weights.pop(n) for n in names]
    weights[key] = mx.concatenate(parts, axis=0)


def unsanitize(weights: dict, config: dict, names: Optional[Collection[str]] = None) -> dict:
    """Node names -> the checkpoint's names: the inverse of `sanitize`. `weight_mode: fused` re-fuses the
    projections (rows in the order `sanitize` splits them); NX-AI xlstm_large naming gets its
    `embedding.weight` back: when the source checkpoint's tensor `names` had it, else (names unknown) for a
    config without `model_type`. A tied head has no weight of its own (HF's save_pretrained omits it)."""
    nxai_names = "embedding.weight" in names if names is not None else "model_type" not in config
    weights = dict(weights)
    if config.get("weight_mode", "single") == "fused":
        for key in [k for k in weights if k.endswith(".mlstm_layer.q.weight")]:
            p = key[: -len("q.weight")]
            _fuse(weights, [p + n + ".weight" for n in ("q", "k", "v", "ogate_preact")], p + "qkv_opreact.weight")
            for leaf in ("weight", "bias"):
                names = [f"{p}igate_preact.{leaf}", f"{p}fgate_preact.{leaf}"]
                if all(n in weights for n in names):
                    _fuse(weights, names, f"{p}ifgate_preact.{leaf}")
        for key in [k for k in weights if k.endswith(".ffn.proj_up_gate.weight")]:
            p = key[: -len("proj_up_gate.weight")]
            _fuse(weights, [p + "proj_up_gate.weight", p + "proj_up.weight"], p + "proj_up_gate_z.weight")
    if nxai_names and "backbone.embeddings.weight" in weights:  # NX-AI xlstm_large naming
        weights["embedding.weight"] = weights.pop("backbone.embeddings.weight")
    return weights


__all__ = ["NAME", "XLSTMDims", "detect", "eos_token_ids", "sanitize", "topology", "unsanitize"]
