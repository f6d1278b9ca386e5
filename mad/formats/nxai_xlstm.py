"""Checkpoint format of the original xLSTM stack: NX-AI `xLSTMLMModel` folders (no `model_type`: found by `detect`).

A folder holds the `xLSTMLMModelConfig` mapping (`config.yaml`, `config.yml` or `config.json`; in
NX-AI's experiment-file layout the mapping sits under `model:`, with OmegaConf `${...}` references
resolved) and `model.safetensors` with the model's `state_dict()`. The config picks the dims and the
sLSTM placement of `xlstm-v1-125m.yaml` (as `--set` overrides); the weights keep NX-AI's names except:

  ...xlstm.learnable_skip                 -> ...xlstm.learnable_skip.weight  (a parameter, not a module)
  ...slstm_cell._recurrent_kernel_        -> ...slstm_cell.recurrent_kernel  (MLX skips `_` names)
  ...slstm_cell._bias_                    -> ...slstm_cell.bias
  lm_head.weight                          dropped when tie_weights (the head reads token_embedding)

The sLSTM weights are NX-AI's internal layouts: vanilla (NH, 4*DH, DH) recurrent kernel and gate-major
bias are used as they are; the CUDA backend's (NH, DH, 4*DH) kernel and head-major bias are recognised
by the kernel's shape and converted.

`unsanitize` is the inverse (what `mad.save(model, DIR, format="source")` writes): NX-AI's names, the sLSTM
weights in the layout of the config's backend, `lm_head.weight` restored when tied.

Config keys are NX-AI's dataclass fields; a key NX-AI does not have is an error (with a hint), and so is
an option MAD cannot run. Training-only fields (dropout, init schemes, dtypes, clip values) are accepted
and have no effect at inference (`mad` runs NX-AI's vanilla sLSTM math in float32 state).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx

from ..errors import Diagnostic, MadError, did_you_mean
from ..tokenizers import eos_token_ids as _eos_ids
from . import shipped_topology

NAME = "xLSTMLMModel (NX-AI original xLSTM stack)"
CONFIG_FILES = ("config.json", "config.yaml", "config.yml")
TOPOLOGY = "xlstm-v1-125m.yaml"

# the fields of NX-AI's dataclasses (xlstm 2.0.6); values of derived fields (_proj_up_dim, ...) are recomputed
FIELDS = {
    "model": ["mlstm_block", "slstm_block", "context_length", "num_blocks", "embedding_dim", "add_post_blocks_norm",
              "bias", "dropout", "slstm_at", "_block_map", "vocab_size", "tie_weights", "weight_decay_on_embedding",
              "add_embedding_dropout"],
    "mlstm_block": ["mlstm", "_num_blocks", "_block_idx"],
    "mlstm": ["proj_factor", "round_proj_up_dim_up", "round_proj_up_to_multiple_of", "_proj_up_dim",
              "conv1d_kernel_size", "qkv_proj_blocksize", "num_heads", "embedding_dim", "bias", "dropout",
              "context_length", "_num_blocks", "_inner_embedding_dim"],
    "slstm_block": ["slstm", "feedforward", "_num_blocks", "_block_idx"],
    "slstm": ["hidden_size", "num_heads", "num_states", "backend", "function", "bias_init", "recurrent_weight_init",
              "_block_idx", "_num_blocks", "num_gates", "gradient_recurrent_cut", "gradient_recurrent_clipval",
              "forward_clipval", "batch_size", "input_shape", "internal_input_shape", "output_shape", "constants",
              "dtype", "dtype_b", "dtype_r", "dtype_w", "dtype_g", "dtype_s", "dtype_a",
              "enable_automatic_mixed_precision", "initial_val", "embedding_dim", "conv1d_kernel_size",
              "group_norm_weight", "dropout"],
    "feedforward": ["proj_factor", "round_proj_up_dim_up", "round_proj_up_to_multiple_of", "_proj_up_dim", "act_fn",
                    "embedding_dim", "dropout", "bias", "ff_type", "_num_blocks"],
}
FFN_ACTS = {"gelu": "gelu", "relu": "relu", "sigmoid": "sigmoid", "swish": "silu"}  # NX-AI name -> MAD `gate` act
LN = "{type: layernorm, eps: 1.0e-5, bias: false, weight_offset: 1.0}"
STACK = "templates.xlstm_block_stack.nodes.blocks"


# ----------------------------------------------------------------------------------------- config
def model_mapping(config: dict) -> dict:
    """The xLSTMLMModelConfig mapping: the file itself, or its `model:` entry (NX-AI experiment files)."""
    inner = config.get("model")
    if isinstance(inner, dict) and ("mlstm_block" in inner or "slstm_block" in inner):
        return inner
    return config


def detect(config: dict) -> bool:
    """An xLSTMLMModelConfig mapping (it has mLSTM or sLSTM block settings) in a config without a model_type."""
    m = model_mapping(config)
    return "model_type" not in config and ("mlstm_block" in m or "slstm_block" in m)


_REF = re.compile(r"^\$\{([^${}]+)\}$")


def _resolve(value: Any, root: dict, parents: list, path: str, depth: int = 0) -> Any:
    """OmegaConf-style `${a.b}` (from the root) and `${.x}` / `${..x}` (relative) references, whole values only."""
    if isinstance(value, dict):
        return {k: _resolve(v, root, parents + [value], f"{path}.{k}" if path else str(k), depth) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, root, parents, f"{path}[{i}]", depth) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value
    match = _REF.match(value.strip())
    if not match or depth > 16:
        raise MadError(f"{path}: cannot resolve '{value}' (MAD resolves whole-value ${{a.b}} and ${{.x}} references)")
    ref = match.group(1).strip()
    dots = len(ref) - len(ref.lstrip("."))
    node: Any = root if dots == 0 else (parents[-dots] if dots <= len(parents) else None)
    trail = []
    for part in ref.lstrip(".").split("."):
        if not isinstance(node, dict) or part not in node:
            raise MadError(f"{path}: reference '{value}' names nothing in the file")
        trail.append(node)
        node = node[part]
    return _resolve(node, root, parents if dots else trail, path, depth + 1)


def _check_keys(section: str, mapping: Any, where: str) -> dict:
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise MadError(f"{where}: expected a mapping, got {type(mapping).__name__}")
    errors = [Diagnostic(f"{where + '.' if where else ''}{k}: not a field of NX-AI's {section} config"
                         + (f"; {hint}" if (hint := did_you_mean(k, FIELDS[section])) else ""))
              for k in mapping if k not in FIELDS[section]]
    if errors:
        raise MadError(errors)
    return mapping


def _num(mapping: dict, key: str, where: str, default: Any, kind: type = int) -> Any:
    import math

    value = mapping.get(key, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) if kind is float \
        else isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise MadError(f"{where}.{key}: expected {kind.__name__}, got {value!r}".lstrip("."))
    return value


def _positive(mapping: dict, key: str, where: str, default: int) -> int:
    value = _num(mapping, key, where, default)
    if value < 1:
        raise MadError(f"{where}.{key}: must be >= 1, got {value}".lstrip("."))
    return value


def _flag(mapping: dict, key: str, where: str, default: bool) -> bool:
    return _num(mapping, key, where, default, bool)


def proj_up_dim(factor: float, dim: int, round_up: bool, multiple: int) -> int:
    """NX-AI's UpProjConfigMixin._set_proj_up_dim, operation for operation."""
    import math

    if multiple < 1:
        raise MadError(f"round_proj_up_to_multiple_of: must be >= 1, got {multiple}")
    x = factor * dim / multiple
    return int((math.ceil(x) if round_up else math.floor(x)) * multiple)


@dataclass
class NXAIConfig:
    vocab: int
    dim: int
    blocks: int
    slstm_at: list[int]
    tie: bool
    post_norm: bool
    bias: bool
    mlstm: Optional[dict]         # heads, inner, qkv_block, conv
    slstm: Optional[dict]         # heads, conv
    ffn: Optional[dict]           # hidden, act, bias


def parse_config(config: dict) -> NXAIConfig:
    """Validate an xLSTMLMModelConfig mapping with NX-AI's defaults and __post_init__ rules."""
    m = _check_keys("model", _resolve(model_mapping(config), config, [], ""), "")
    vocab = _num(m, "vocab_size", "", -1)
    if vocab < 1:
        raise MadError("vocab_size: not set (NX-AI's experiment files take it from the dataset; write the number)")
    dim, blocks = _num(m, "embedding_dim", "", 128), _num(m, "num_blocks", "", 1)
    if dim < 1 or blocks < 1:
        raise MadError(f"embedding_dim and num_blocks must be positive, got {dim} and {blocks}")
    bias = _flag(m, "bias", "", False)
    mb, sb = m.get("mlstm_block"), m.get("slstm_block")

    mlstm = None
    if mb is not None:
        layer = _check_keys("mlstm", _check_keys("mlstm_block", mb, "mlstm_block").get("mlstm"), "mlstm_block.mlstm")
        w = "mlstm_block.mlstm"
        inner = proj_up_dim(_num(layer, "proj_factor", w, 2.0, float), dim, _flag(layer, "round_proj_up_dim_up", w, True),
                            _positive(layer, "round_proj_up_to_multiple_of", w, 64))
        mlstm = dict(heads=_num(layer, "num_heads", w, 4), inner=inner, qkv_block=_num(layer, "qkv_proj_blocksize", w, 4),
                     conv=_num(layer, "conv1d_kernel_size", w, 4))
        if inner < 1:
            raise MadError(f"{w}.proj_factor: the inner dim rounds to {inner} (embedding_dim {dim}); NX-AI cannot "
                           "build it either")
        if mlstm["conv"] < 1:
            raise MadError(f"{w}.conv1d_kernel_size: {mlstm['conv']} is not supported (NX-AI's mLSTM layer cannot "
                           "build it either)")
        for key in ("heads", "qkv_block"):
            if mlstm[key] < 1 or inner % mlstm[key]:
                name = "num_heads" if key == "heads" else "qkv_proj_blocksize"
                raise MadError(f"{w}.{name}: {mlstm[key]} does not divide the inner dim {inner}")

    slstm = ffn = None
    if sb is not None:
        sbm = _check_keys("slstm_block", sb, "slstm_block")
        layer = _check_keys("slstm", sbm.get("slstm"), "slstm_block.slstm")
        w = "slstm_block.slstm"
        slstm = dict(heads=_num(layer, "num_heads", w, 4), conv=_num(layer, "conv1d_kernel_size", w, 4))
        slstm["heads"] = max(slstm["heads"], 1)  # NX-AI: num_heads <= 0 means 1
        if dim % slstm["heads"]:
            raise MadError(f"{w}.num_heads: {slstm['heads']} does not divide embedding_dim {dim}")
        if slstm["conv"] < 0:
            raise MadError(f"{w}.conv1d_kernel_size: must be >= 0, got {slstm['conv']}")
        for key, allowed in (("function", ("slstm",)), ("backend", ("vanilla", "cuda")), ("num_gates", (4,))):
            if key in layer and layer[key] not in allowed:
                raise MadError(f"{w}.{key}: {layer[key]!r} is not supported (MAD runs: {', '.join(map(str, allowed))})")
        if not _flag(layer, "group_norm_weight", w, True):
            raise MadError(f"{w}.group_norm_weight: false is not supported (MAD's group norm has a weight)")
        if "feedforward" not in sbm or sbm["feedforward"] is not None:
            f = _check_keys("feedforward", sbm.get("feedforward"), "slstm_block.feedforward")
            w = "slstm_block.feedforward"
            act = f.get("act_fn", "gelu")
            if act not in FFN_ACTS:
                raise MadError(f"{w}.act_fn: {act!r} is not supported (MAD runs: {', '.join(FFN_ACTS)})")
            if f.get("ff_type", "ffn_gated") != "ffn_gated":
                raise MadError(f"{w}.ff_type: {f['ff_type']!r} is not supported (NX-AI knows only 'ffn_gated')")
            hidden = proj_up_dim(_num(f, "proj_factor", w, 1.3, float), dim, _flag(f, "round_proj_up_dim_up", w, True),
                                 _positive(f, "round_proj_up_to_multiple_of", w, 64))
            if hidden < 1:
                raise MadError(f"{w}.proj_factor: the hidden dim rounds to {hidden} (embedding_dim {dim})")
            ffn = dict(hidden=hidden, act=FFN_ACTS[act], bias=_flag(f, "bias", w, False))

    at = m.get("slstm_at", [])
    if mb is None or at == "all":
        at = list(range(blocks))
    if not isinstance(at, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in at):
        raise MadError(f"slstm_at: expected a list of block indices or 'all', got {at!r}")
    bad = [i for i in at if not -blocks <= i < blocks]
    if bad:
        raise MadError(f"slstm_at: index {bad[0]} is outside 0..{blocks - 1} (num_blocks {blocks})")
    at = sorted({i % blocks for i in at})
    if at and slstm is None:
        raise MadError(f"slstm_at: sLSTM blocks at {at} but slstm_block is not set")
    if len(at) < blocks and mlstm is None:
        raise MadError("mlstm_block: not set, but not every block is an sLSTM block")
    return NXAIConfig(vocab, dim, blocks, at, _flag(m, "tie_weights", "", False),
                      _flag(m, "add_post_blocks_norm", "", True), bias, mlstm, slstm, ffn)


def topology(config: dict) -> tuple[Path, list[str]]:
    """`xlstm-v1-125m.yaml` with the dims, sLSTM placement and options this config describes."""
    c = parse_config(config)
    o = [f"dims.V={c.vocab}", f"dims.D={c.dim}", f"dims.L={c.blocks}", f"{STACK}.every={{}}"]
    if not c.mlstm:  # the unused template's dims must still meet the file's constraints
        o += ["dims.NHM=1", "dims.QB=1"]
    if not c.slstm:
        o += ["dims.NHS=1"]
    if c.mlstm:
        o += [f"dims.NHM={c.mlstm['heads']}", f"dims.I={c.mlstm['inner']}", f"dims.QB={c.mlstm['qkv_block']}",
              f"dims.KM={c.mlstm['conv']}"]
        if c.bias:  # NX-AI: the top-level bias reaches the mLSTM layer's projections only
            o += [f"templates.mlstm_layer.nodes.{n}.bias=true" for n in ("proj_up", "q_proj", "k_proj", "v_proj",
                                                                             "proj_down")]
    if c.slstm:
        o += [f"dims.NHS={c.slstm['heads']}", f"dims.KS={max(c.slstm['conv'], 1)}"]
        if c.slstm["conv"] == 0:  # NX-AI: no conv and no activation, the gates read x
            o += ["templates.slstm_layer.nodes.conv1d={type: activation, act: identity, in: x}",
                  "templates.slstm_layer.nodes.conv_act_fn={type: activation, act: identity}"]
        if c.ffn:
            o += [f"dims.F={c.ffn['hidden']}", f"templates.feedforward.nodes.act_fn.act={c.ffn['act']}"]
            if c.ffn["bias"]:
                o += ["templates.feedforward.nodes.proj_up.bias=true", "templates.feedforward.nodes.proj_down.bias=true"]
        else:  # sLSTM block without the feed-forward
            o.append(f"templates.slstm_block={{nodes: {{xlstm_norm: {LN}, xlstm: {{type: slstm_layer}}, "
                     "xlstm_residual: {type: add, in: [x, xlstm]}}}")
    if len(c.slstm_at) == c.blocks:
        o.append(f"{STACK}.body=slstm_block")
    elif c.slstm_at:
        o.append(f"{STACK}.at={{slstm_block: {c.slstm_at}}}")
    if not c.post_norm:
        o.append("templates.xlstm_block_stack.nodes.post_blocks_norm={type: activation, act: identity}")
    if c.tie:
        o.append("nodes.lm_head.tie=token_embedding")
    return shipped_topology(TOPOLOGY), o


# ----------------------------------------------------------------------------------------- weights
def sanitize(weights: dict, config: dict) -> dict:
    """NX-AI state-dict names -> node weight names; CUDA-layout sLSTM weights -> vanilla layout."""
    c = parse_config(config)
    out = {}
    for key, w in weights.items():
        if key.endswith(".xlstm.learnable_skip"):
            key += ".weight"
        out[key] = w
    if c.tie:
        out.pop("lm_head.weight", None)
    for key in [k for k in out if k.endswith(".slstm_cell._recurrent_kernel_")]:
        prefix = key[: -len("_recurrent_kernel_")]
        kernel, bias = out.pop(key), out.pop(prefix + "_bias_", None)
        nh = c.slstm["heads"] if c.slstm else 0
        dh = c.dim // nh if nh else 0
        if tuple(kernel.shape) == (nh, dh, 4 * dh) and dh > 0:  # CUDA: (NH, DH_in, 4*DH_out), bias head-major
            # stored row-major like a vanilla-layout weight (a transposed view would run other kernels)
            kernel = mx.contiguous(kernel.transpose(0, 2, 1))
            if bias is not None and bias.size == 4 * nh * dh:
                bias = bias.reshape(nh, 4, dh).transpose(1, 0, 2).reshape(-1)
        out[prefix + "recurrent_kernel"] = kernel
        if bias is not None:
            out[prefix + "bias"] = bias
    for key in [k for k in out if k.endswith(".slstm_cell._bias_")]:  # a bias without its kernel
        out[key[: -len("_bias_")] + "bias"] = out.pop(key)
    return out


def slstm_backend(config: dict) -> str:
    """The sLSTM backend the config names (NX-AI's default: cuda), which decides the layout of its weights."""
    m = _resolve(model_mapping(config), config, [], "")
    slstm = (m.get("slstm_block") or {}).get("slstm") or {}
    return slstm.get("backend", "cuda") if isinstance(slstm, dict) else "cuda"


def unsanitize(weights: dict, config: dict) -> dict:
    """Node weight names -> NX-AI state-dict names: the inverse of `sanitize`. The sLSTM weights are written
    in the layout of the config's backend (vanilla, else NX-AI's CUDA layout: its default); a tied head gets
    `lm_head.weight` back as a copy of the embedding (NX-AI's state dict holds both, and loads strictly)."""
    c = parse_config(config)
    cuda = slstm_backend(config) == "cuda"
    out = {}
    for key, w in weights.items():
        if key.endswith(".xlstm.learnable_skip.weight"):
            key = key[: -len(".weight")]
        elif key.endswith(".slstm_cell.recurrent_kernel"):
            if cuda:  # vanilla (NH, 4*DH, DH) -> CUDA (NH, DH, 4*DH)
                w = mx.contiguous(w.transpose(0, 2, 1))
            key = key[: -len("recurrent_kernel")] + "_recurrent_kernel_"
        elif key.endswith(".slstm_cell.bias"):
            if cuda and c.slstm:  # gate-major (4, NH, DH) -> head-major (NH, 4, DH)
                nh = c.slstm["heads"]
                w = mx.contiguous(w.reshape(4, nh, -1).transpose(1, 0, 2).reshape(-1))
            key = key[: -len("bias")] + "_bias_"
        out[key] = w
    if c.tie and "lm_head.weight" not in out and "token_embedding.weight" in out:
        out["lm_head.weight"] = out["token_embedding.weight"]
    return out


def eos_token_ids(config: dict) -> list[int]:
    """The eos ids of the model mapping, else of the file's top level (NX-AI experiment files)."""
    return _eos_ids(model_mapping(config).get("eos_token_id", config.get("eos_token_id")))


__all__ = ["NAME", "detect", "eos_token_ids", "model_mapping", "parse_config", "proj_up_dim", "sanitize",
           "slstm_backend", "topology",
           "unsanitize"]
