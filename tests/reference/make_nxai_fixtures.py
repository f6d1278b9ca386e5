#!/usr/bin/env python
"""Build tiny NX-AI `xLSTMLMModel` (the original xLSTM stack, xlstm 2.0.6) reference fixtures for MAD.

Rerun (from the repository root; rewrites both fixture folders, byte-identical on rerun):

    /tmp/ref/bin/python tests/reference/make_nxai_fixtures.py

Reference venv (CPU only): python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch==2.13.0 xlstm safetensors
pyyaml (plus mlx and MAD itself for the check at the end). Generated with torch 2.13.0+cpu, xlstm 2.0.6.

The model: vocab 101, embedding_dim 24, 5 blocks with sLSTM at 1 and 3 (`slstm_at: [1, 3]`), mLSTM v1 layers
(4 heads, proj_factor 2.0 -> inner dim 64 after NX-AI's round-up to 64, qkv blocks of 4, conv kernel 4),
sLSTM layers (4 heads of 6, conv kernel 4, backend "vanilla") with the gated gelu FFN (1.3 -> 64). Every
parameter is re-randomised (NX-AI's init zeroes the gate weights and the recurrent kernel, which hides bugs):
see `randomise_`.

Written files:
  tests/fixtures/nxai-tiny/       config.yaml (the xLSTMLMModelConfig mapping), model.safetensors (the
                                  vanilla state dict), golden.safetensors
  tests/fixtures/nxai-tiny-cuda/  the same model as NX-AI's experiment-file layout (mapping under `model:`,
                                  with OmegaConf `${...}` references) and the sLSTM weights in NX-AI's CUDA
                                  layout (converted with NX-AI's own sLSTMCell_cuda ext2int); no golden

golden.safetensors (float32; B = 2, T = 23, V = 101):
  tokens              int32 (2, 23), random ids
  logits              (2, 23, V)  model(tokens), the full forward (vanilla backend, float32)
  logits64            (2, 23, V)  the same model and tokens in float64 (the reference math without rounding)
  step_logits         (2, 23, V)  model.step(tokens[:, t:t+1], state) for t = 0..22 from state None
  state/<node>/<name>             NX-AI's step state after the 23 steps, in MAD's names and layouts:
      <block>.xlstm.mlstm_cell.cell/{C (B, NH, DH, DH), n (B, NH, DH), m (B, NH)}   mlstm_state (c, n, m)
      <block>.xlstm.conv1d/x (B, 3, F)     conv_state minus its oldest row (NX-AI keeps the last 4 inputs,
                                           MAD the last kernel_size - 1 = 3; the oldest is never used again)
      <block>.xlstm.slstm_cell/{y, c, n, m} (B, NH, DH)   slstm_state (4, B, H) split and reshaped
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
TINY, TINY_CUDA = FIX / "nxai-tiny", FIX / "nxai-tiny-cuda"

SEED = 20250612
B, T = 2, 23
CFG = {
    "vocab_size": 101,
    "embedding_dim": 24,
    "num_blocks": 5,
    "context_length": 64,
    "slstm_at": [1, 3],
    "mlstm_block": {"mlstm": {"num_heads": 4, "conv1d_kernel_size": 4, "qkv_proj_blocksize": 4, "proj_factor": 2.0}},
    "slstm_block": {
        "slstm": {"backend": "vanilla", "num_heads": 4, "conv1d_kernel_size": 4, "bias_init": "powerlaw_blockdependent"},
        "feedforward": {"proj_factor": 1.3, "act_fn": "gelu"},
    },
}
STACK = "xlstm_block_stack.blocks"


# ----------------------------------------------------------------------------------------------- model
def make_config(mapping: dict):
    """xLSTMLMModelConfig from a mapping, as NX-AI's experiments do with dacite (not installed with xlstm)."""
    from xlstm import (FeedForwardConfig, mLSTMBlockConfig, mLSTMLayerConfig, sLSTMBlockConfig, sLSTMLayerConfig,
                       xLSTMLMModelConfig)

    m = copy.deepcopy(mapping)
    if m.get("mlstm_block") is not None:
        m["mlstm_block"] = mLSTMBlockConfig(mlstm=mLSTMLayerConfig(**m["mlstm_block"].get("mlstm", {})))
    if m.get("slstm_block") is not None:
        sb = m["slstm_block"]
        ff = sb.get("feedforward", {})
        m["slstm_block"] = sLSTMBlockConfig(slstm=sLSTMLayerConfig(**sb.get("slstm", {})),
                                            feedforward=None if ff is None else FeedForwardConfig(**ff))
    return xLSTMLMModelConfig(**m)


def build_model(mapping: dict):
    from xlstm import xLSTMLMModel

    return xLSTMLMModel(make_config(mapping)).eval()


def randomise_(model, seed: int = SEED, width_scale: float = 1.0) -> None:
    """Re-randomise every parameter: std 0.1-0.5 weights, norms 1 +- 0.3 (stored w +- 0.3), spread gate biases.

    `width_scale` multiplies the std of the wide projections (proj_up, proj_down, the FFN, the mLSTM gates); use
    sqrt(24 / embedding_dim) to keep activations at this fixture's scale in wider models."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=g) * std

    def uniform(shape, lo, hi):
        return torch.rand(shape, generator=g) * (hi - lo) + lo

    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = tuple(p.shape)
            if name.endswith("norm.weight"):                     # xlstm_norm, ffn_norm, outnorm, group_norm, post
                val = uniform(shape, -0.3, 0.3)                   # (1 + w) in [0.7, 1.3]
            elif name.endswith("mlstm_cell.igate.bias"):
                val = uniform(shape, -3.0, 3.0)
            elif name.endswith("mlstm_cell.fgate.bias"):
                val = uniform(shape, 0.0, 5.0)
            elif name.endswith(("mlstm_cell.igate.weight", "mlstm_cell.fgate.weight")):
                val = normal(shape, 0.1 * width_scale)
            elif name.endswith("slstm_cell._bias_"):              # vanilla layout: gate-major (i, f, z, o)
                nh, dh = model.config.slstm_block.slstm.num_heads, model.config.embedding_dim // \
                    model.config.slstm_block.slstm.num_heads
                i = uniform((nh, dh), -3.0, 3.0)
                f = uniform((nh, dh), -1.0, 5.0)
                z, o = normal((nh, dh), 0.5), normal((nh, dh), 0.5)
                val = torch.stack([i, f, z, o]).reshape(shape)
            elif name.endswith("slstm_cell._recurrent_kernel_"):
                val = normal(shape, 0.3)
            elif name.endswith("learnable_skip"):
                val = 1.0 + normal(shape, 0.5)
            elif name.endswith("conv.weight"):
                val = normal(shape, 0.5)
            elif name.endswith("conv.bias"):
                val = normal(shape, 0.3)
            elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
                val = normal(shape, 0.5)
            elif name.endswith(("fgate.weight", "igate.weight", "zgate.weight", "ogate.weight")):  # sLSTM headwise
                val = normal(shape, 0.3)
            elif name.startswith(("token_embedding", "lm_head")):
                val = normal(shape, 0.5)
            elif name.endswith(".bias"):
                val = normal(shape, 0.1)
            else:                                                 # proj_up, proj_down, ffn
                val = normal(shape, 0.2 * width_scale)
            p.copy_(val)


def state_dict(model) -> dict:
    """The state dict as safetensors can store it (contiguous, no shared tensors)."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def cuda_layout(model, sd: dict) -> dict:
    """The same weights as NX-AI's CUDA backend stores them, converted with NX-AI's own ext2int maps."""
    from xlstm.blocks.slstm.cell import sLSTMCell_cuda

    out = dict(sd)
    for i, block in enumerate(model.xlstm_block_stack.blocks):
        cell = getattr(block.xlstm, "slstm_cell", None)
        if cell is None:
            continue
        cuda = sLSTMCell_cuda(copy.deepcopy(cell.config), skip_backend_init=True)
        p = f"{STACK}.{i}.xlstm.slstm_cell."
        out[p + "_recurrent_kernel_"] = cuda._recurrent_kernel_ext2int(cell.recurrent_kernel.clone()).contiguous()
        out[p + "_bias_"] = cuda._bias_ext2int(cell.bias.clone()).contiguous()
        assert out[p + "_recurrent_kernel_"].shape != sd[p + "_recurrent_kernel_"].shape
    return out


# ----------------------------------------------------------------------------------------------- reference
def nxai_state_to_mad(model, state: dict) -> dict:
    """NX-AI's step state {block_i: {...}} -> {"<node>/<name>": array} in MAD's names and layouts."""
    out = {}
    for i, block in enumerate(model.xlstm_block_stack.blocks):
        st = state[f"block_{i}"]
        p = f"{STACK}.{i}.xlstm."
        if st.get("conv_state") is not None:  # None: conv1d_kernel_size 0
            out[p + "conv1d/x"] = st["conv_state"][0][:, 1:]
        if "mlstm_state" in st:
            c, n, m = st["mlstm_state"]
            out[p + "mlstm_cell.cell/C"], out[p + "mlstm_cell.cell/n"] = c, n[..., 0]
            out[p + "mlstm_cell.cell/m"] = m[..., 0, 0]
        else:
            cell = block.xlstm.slstm_cell
            nh, dh = cell.config.num_heads, cell.config.head_dim
            for j, name in enumerate("ycnm"):
                out[p + f"slstm_cell/{name}"] = st["slstm_state"][j].reshape(-1, nh, dh)
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def run_reference(model, ids) -> dict:
    """Full forward, and single steps from state None over the whole sequence."""
    import torch

    with torch.no_grad():
        logits = model(ids)
        state, steps = None, []
        for t in range(ids.shape[1]):
            lg, state = model.step(ids[:, t:t + 1], state)
            steps.append(lg)
        return {"logits": logits, "step_logits": torch.cat(steps, 1), "state": nxai_state_to_mad(model, state)}


def maxdiff(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


# ----------------------------------------------------------------------------------------------- files
EXPERIMENT = """\
# NX-AI experiment-file layout (experiments/*.yaml): the model mapping sits under `model:`
training:
  batch_size: 16
  lr: 0.001
  num_steps: 100
  lr_decay_until_steps: ${{.num_steps}}
  weight_precision: float32
model:
{model}
  vocab_size: ${{dataset.kwargs.vocab_size}}
  context_length: ${{dataset.kwargs.context_length}}
dataset:
  name: form_language
  kwargs:
    vocab_size: {vocab}
    context_length: {context}
"""


def write_folder(folder: Path, config_text: str, sd: dict) -> None:
    from safetensors.torch import save_file

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config_text)
    save_file({k: sd[k] for k in sorted(sd)}, str(folder / "model.safetensors"))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def mad_check(ids, gold: dict) -> None:
    """The same comparisons the golden tests make, printed (needs mlx and MAD in this environment)."""
    import mlx.core as mx
    import numpy as np

    from mad.loading import load

    def diff(a, b):
        return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())

    tokens = mx.array(ids.numpy().astype(np.int32))
    for folder in (TINY, TINY_CUDA):
        model, _ = load(folder)
        logits, _ = model(tokens)
        state, steps = None, []
        for t in range(T):
            lg, state = model(tokens[:, t:t + 1], state=state)
            steps.append(np.array(lg))
        sd = max(diff(state[k.split("/")[0]][k.split("/")[1]], v.numpy()) for k, v in gold.items()
                 if k.startswith("state/") for k in [k[len("state/"):]])
        print(f"[MAD {folder.name}] logits vs NX-AI f32 {diff(logits, gold['logits']):.3e}, vs f64 "
              f"{diff(logits, gold['logits64']):.3e}; steps vs NX-AI step {diff(np.concatenate(steps, 1), gold['step_logits']):.3e}; "
              f"state {sd:.3e}")


def main() -> None:
    import torch
    import yaml
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    model = build_model(CFG)
    randomise_(model)
    sd = state_dict(model)
    g = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(0, CFG["vocab_size"], (B, T), generator=g)

    ref = run_reference(model, ids)
    ref64 = run_reference(copy.deepcopy(model).double(), ids)
    print(f"NX-AI float32 vs float64: logits {maxdiff(ref['logits'], ref64['logits']):.3e}, steps "
          f"{maxdiff(ref['step_logits'], ref64['step_logits']):.3e}, max|logit| {float(ref['logits'].abs().max()):.2f}")
    print(f"NX-AI step vs forward (float32): {maxdiff(ref['step_logits'], ref['logits']):.3e}")

    write_folder(TINY, "# NX-AI xLSTMLMModelConfig (xlstm 2.0.6), tiny test model\n"
                 + yaml.safe_dump(CFG, sort_keys=False), sd)
    golden = {"tokens": ids.to(torch.int32), "logits": ref["logits"], "logits64": ref64["logits"].float(),
              "step_logits": ref["step_logits"]}
    golden.update({f"state/{k}": v.float() for k, v in ref["state"].items()})
    save_file({k: v.contiguous() for k, v in sorted(golden.items())}, str(TINY / "golden.safetensors"),
              metadata={"fixture": json.dumps({"config": "config.yaml", "reference": "xlstm 2.0.6 xLSTMLMModel, "
                                               "vanilla sLSTM backend, torch 2.13.0 CPU"}, sort_keys=True)})

    # experiment-file layout and CUDA-layout sLSTM weights
    exp_model = {k: v for k, v in CFG.items() if k not in ("vocab_size", "context_length")}
    exp_model["slstm_block"] = copy.deepcopy(exp_model["slstm_block"])
    exp_model["slstm_block"]["slstm"]["backend"] = "cuda"
    body = "\n".join("  " + line for line in yaml.safe_dump(exp_model, sort_keys=False).splitlines())
    write_folder(TINY_CUDA, EXPERIMENT.format(model=body, vocab=CFG["vocab_size"], context=CFG["context_length"]),
                 cuda_layout(model, sd))

    if "--no-check" not in sys.argv:
        from safetensors.torch import load_file

        mad_check(ids, load_file(str(TINY / "golden.safetensors")))
    total = 0
    for d in (TINY, TINY_CUDA):
        for f in sorted(d.iterdir()):
            total += f.stat().st_size
            print(f"  {str(f.relative_to(ROOT)):48s} {f.stat().st_size:8d}  sha256:{sha(f)}")
    print(f"  total {total} bytes")


if __name__ == "__main__":
    main()
