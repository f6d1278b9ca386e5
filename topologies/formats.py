"""Checkpoint formats of the shipped model families: config -> topology overrides, weight names.

xLSTM-7B family (HF `model_type: xlstm`, also NX-AI `xlstm_large` folders): the config picks dims and
options of `xlstm-7b.yaml`; weights keep their names except NX-AI's `embedding.weight` and the
fused projections of `weight_mode: fused`, which are split into the single-mode weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx

from mad.errors import MadError
from mad.generate import HFTokenizer
from mad.loading import CheckpointFormat, register_format

HERE = Path(__file__).parent


def _get(config: dict, *names: str, default: Any = None) -> Any:
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return default


def _hf_round_up(x: float, multiple: int) -> int:
    return int(((x + multiple - 1) // multiple) * multiple)


def xlstm_topology(config: dict) -> tuple[Path, list[str]]:
    unsupported = {"use_bias": True, "add_out_norm": False, "norm_reduction_force_float32": False}
    for key, bad in unsupported.items():
        if config.get(key, not bad) == bad:
            raise MadError(f"config.json: {key}={bad} is not supported by the shipped xlstm topology")
    d = int(_get(config, "hidden_size", "embedding_dim"))
    heads = int(config.get("num_heads", 8))
    norm_eps = config.get("norm_eps", 1e-6)
    mlstm = "templates.mlstm_layer.nodes"
    block = "templates.mlstm_block.nodes"
    gate_cap = config.get("gate_soft_cap", 15.0)
    overrides = [
        f"dims.V={int(config['vocab_size'])}",
        f"dims.D={d}",
        f"dims.L={int(_get(config, 'num_hidden_layers', 'num_blocks'))}",
        f"dims.NH={heads}",
        f"dims.QK={int(d * config.get('qk_dim_factor', 0.5))}",
        f"dims.VD={int(d * config.get('v_dim_factor', 1.0))}",
        f"dims.F={_hf_round_up(d * config.get('ffn_proj_factor', 2.667), config.get('ffn_round_up_to_multiple_of', 64))}",
        f"dims.CHUNK={int(config.get('chunk_size', 64))}",
        f"{mlstm}.igate_preact.softcap={gate_cap if gate_cap is not None else 'null'}",
        f"{mlstm}.fgate_preact.softcap={gate_cap if gate_cap is not None else 'null'}",
        f"{mlstm}.cell.eps={config.get('eps', 1e-6)}",
        f"{mlstm}.multihead_norm.eps={norm_eps}",
        f"{block}.norm_mlstm.eps={norm_eps}",
        f"{block}.norm_ffn.eps={norm_eps}",
        f"nodes.backbone.out_norm.eps={norm_eps}",
        f"nodes.lm_head.softcap={config.get('output_logit_soft_cap') or 'null'}",
    ]
    if config.get("tie_word_embeddings"):
        overrides.append("nodes.lm_head.tie=backbone.embeddings")
    return HERE / "xlstm-7b.yaml", overrides


def _split(weights: dict, key: str, names: list[str], sizes: list[int]) -> None:
    w = weights.pop(key)
    if w.shape[0] != sum(sizes):
        raise MadError(f"checkpoint: fused weight '{key}' has {w.shape[0]} rows, expected {sum(sizes)}")
    offsets = [sum(sizes[:i]) for i in range(1, len(sizes))]
    for name, part in zip(names, mx.split(w, offsets, axis=0)):
        weights[name] = part


def xlstm_sanitize(weights: dict, config: dict) -> dict:
    """NX-AI key names and fused projections -> the names of `xlstm-7b.yaml`'s nodes."""
    weights = dict(weights)
    if "embedding.weight" in weights:  # NX-AI xlstm_large naming
        weights["backbone.embeddings.weight"] = weights.pop("embedding.weight")
    d = int(_get(config, "hidden_size", "embedding_dim"))
    heads = int(config.get("num_heads", 8))
    qk, v = int(d * config.get("qk_dim_factor", 0.5)), int(d * config.get("v_dim_factor", 1.0))
    for key in [k for k in weights if k.endswith(".qkv_opreact.weight")]:
        p = key[: -len("qkv_opreact.weight")]
        _split(weights, key, [p + n + ".weight" for n in ("q", "k", "v", "ogate_preact")], [qk, qk, v, v])
    for key in [k for k in weights if ".ifgate_preact." in k]:
        p, _, leaf = key.rpartition(".ifgate_preact.")
        _split(weights, key, [f"{p}.igate_preact.{leaf}", f"{p}.fgate_preact.{leaf}"], [heads, heads])
    for key in [k for k in weights if k.endswith(".proj_up_gate_z.weight")]:
        p = key[: -len("proj_up_gate_z.weight")]
        half = weights[key].shape[0] // 2
        _split(weights, key, [p + "proj_up_gate.weight", p + "proj_up.weight"], [half, half])
    return weights


def hf_tokenizer(folder: Path, config: dict) -> HFTokenizer | None:
    file = folder / "tokenizer.json"
    if not file.is_file():
        return None
    eos = config.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    return HFTokenizer(file, eos_ids)


register_format(CheckpointFormat(
    name="xlstm (xLSTM-7B family)",
    detect=lambda c: c.get("model_type", "xlstm") == "xlstm" and (
        "model_type" in c or "xLSTMForCausalLM" in c.get("architectures", [])),
    topology=xlstm_topology,
    sanitize=xlstm_sanitize,
    tokenizer=hf_tokenizer,
))


# the original xLSTM stack (NX-AI xLSTMLMModel folders) registers its own format
import mad.topologies.nxai_format  # noqa: E402,F401
