#!/usr/bin/env python
"""Build tiny HF xLSTM (``xLSTMForCausalLM``, model_type "xlstm") reference fixtures for MAD.

Rerun (from the repository root; rewrites both fixture folders, byte-identical on rerun):

    /tmp/ref/bin/python tests/reference/make_hf_fixtures.py

Reference venv (CPU only):

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch==2.13.0 transformers xlstm safetensors tokenizers

Generated with torch 2.13.0+cpu, transformers 5.23.0, xlstm 2.0.6, mlstm_kernels 2.0.6, tokenizers 0.23.3.
With the `xlstm` package installed, HF's modeling_xlstm uses NX-AI's mLSTMBlock/mLSTMBackend (mlstm_kernels,
native torch kernels); the goldens come from that path. The script then re-runs everything through HF's
built-in fallback path (xlstm hidden, `--check-fallback`, a subprocess), through the fused-weight checkpoint,
and through NX-AI's own `xLSTMLarge`, and prints the max differences.

Written files (see tests/reference/HF_XLSTM_NOTES.md for layouts):
  tests/fixtures/hf-tiny/        config.json, generation_config.json, model.safetensors (single weight_mode),
                                 tokenizer.json, tokenizer_config.json, golden.safetensors
  tests/fixtures/hf-tiny-fused/  same weights in weight_mode="fused" (no golden: hf-tiny's golden applies)

golden.safetensors (float32 unless noted; V = 300, B = 2, T = 37, T1 = 21, NH = 4, DQK = 16, DV = 32):
  tokens          int32 (2, 37)  row 0 = [bos] + tokenizer(TEXT) truncated, row 1 = random ids
  logits          (2, 37, V)     model(tokens, use_cache=True).logits   (one full forward)
  full_state.{l}.{C,n,m}         cache after that full forward
  prefill_logits  (2, 21, V)     model(tokens[:, :21], use_cache=True).logits
  prefill_state.{l}.{C,n,m}      cache right after the prefill
  step_logits     (2, 16, V)     model(tokens[:, t:t+1], cache_params=cache, use_cache=True), t = 21..36
  state.{l}.{C,n,m}              cache after prefill + 16 steps
  C (2, 4, 16, 32), n (2, 4, 16), m (2, 4, 1)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
SINGLE_DIR = FIX / "hf-tiny"
FUSED_DIR = FIX / "hf-tiny-fused"

SEED = 20250611
B, T, T1 = 2, 37, 21
CFG = dict(
    vocab_size=300,
    hidden_size=64,
    num_hidden_layers=2,
    num_heads=4,
    chunk_size=16,
    # needed: HF's cache uses round_up(D*f, 64) for qk/v dims while the layer uses int(D*f);
    # with D=64 the default qk_dim_factor=0.5 (32 vs 64) crashes. 1.0/2.0 keeps DQK < DV (16 vs 32 per head).
    qk_dim_factor=1.0,
    v_dim_factor=2.0,
    # tiny and distinct: F = round_up(64 * 1.3 = 83.2, 32) = 96
    ffn_proj_factor=1.3,
    ffn_round_up_to_multiple_of=32,
    bos_token_id=0,
    pad_token_id=1,
    eos_token_id=2,
)
SPECIALS = ["<bos>", "<pad>", "<eos>"]  # ids 0, 1, 2 = config bos/pad/eos

TOKENIZER_CORPUS = [
    "The xLSTM is a recurrent language model. Each block keeps a matrix memory per head, "
    "and the memory is updated with exponential input gates and sigmoid forget gates.",
    "A stabiliser state m keeps the exponentials in range: the cell subtracts the running maximum "
    "before it exponentiates, and the normaliser n tracks the weighted sum of the keys.",
    "In the chunkwise form the sequence is split into chunks; inside a chunk the outputs are computed "
    "in parallel, and between chunks the state is carried forward like in a recurrent network.",
    "When a model generates text it first reads the prompt in one pass, then it produces one token at a "
    "time, feeding each new token back together with the cached state of every layer.",
    "Small fixtures make tests fast. A tiny model with random weights is enough to check that two "
    "implementations agree, as long as the gates are spread out and the memory really moves.",
]
TEXT = (
    "The memory of the model is updated one token at a time, and the prompt is read in chunks "
    "so that both paths must agree."
)


# ----------------------------------------------------------------------------------------------- helpers
def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def maxdiff(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def snapshot_cache(cache) -> dict:
    out = {}
    for layer, (c, n, m) in cache.rnn_state.items():
        out[f"{layer}.C"] = c.detach().clone()
        out[f"{layer}.n"] = n.detach().clone()
        out[f"{layer}.m"] = m.detach().clone()
    return out


def run_hf(model, ids):
    """Full forward, then prefill + single steps, exactly as a user would call the HF model."""
    import torch

    with torch.no_grad():
        full = model(ids, use_cache=True)
        res = {"logits": full.logits.float().clone(), "full_state": snapshot_cache(full.cache_params)}
        res["logits_nocache"] = model(ids, use_cache=False).logits.float().clone()
        pre = model(ids[:, :T1], use_cache=True)
        cache = pre.cache_params
        res["prefill_logits"] = pre.logits.float().clone()
        res["prefill_state"] = snapshot_cache(cache)
        steps = []
        for t in range(T1, T):
            out = model(ids[:, t : t + 1], cache_params=cache, use_cache=True)
            cache = out.cache_params
            steps.append(out.logits.float().clone())
        res["step_logits"] = torch.cat(steps, dim=1)
        res["state"] = snapshot_cache(cache)
        res["seqlen_offset"] = int(cache.seqlen_offset.item())
    return res


def compare(tag: str, res: dict, gold: dict) -> None:
    parts = [
        f"logits {maxdiff(res['logits'], gold['logits']):.3e}",
        f"prefill {maxdiff(res['prefill_logits'], gold['prefill_logits']):.3e}",
        f"steps {maxdiff(res['step_logits'], gold['step_logits']):.3e}",
    ]
    for grp in ("full_state", "prefill_state", "state"):
        d = max(maxdiff(res[grp][k], gold[f"{grp}.{k}"]) for k in res[grp])
        parts.append(f"{grp} {d:.3e}")
    print(f"[{tag}] max|diff| vs golden: " + ", ".join(parts))


def self_consistency(res: dict) -> None:
    full, pre, step = res["logits"], res["prefill_logits"], res["step_logits"]
    print("HF self-consistency (same model, float32):")
    print(f"  prefill(21) logits vs full[:, :21]        max|d| = {maxdiff(pre, full[:, :T1]):.3e}")
    print(f"  16 step logits vs full[:, 21:37]          max|d| = {maxdiff(step, full[:, T1:]):.3e}"
          f"   (max|logit| = {float(full.abs().max()):.2f})")
    print(f"  use_cache=False vs use_cache=True logits  max|d| = {maxdiff(res['logits_nocache'], full):.3e}")
    for k in res["state"]:
        a, b = res["state"][k], res["full_state"][k]
        print(f"  state {k:4s} prefill+steps vs full forward  max|d| = {maxdiff(a, b):.3e}"
              f"  (max|x| = {float(b.abs().max()):.3e})")


# ------------------------------------------------------------------------------------------ tokenizer
def build_tokenizer(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=CFG["vocab_size"],
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TOKENIZER_CORPUS, trainer=trainer)
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    assert tok.get_vocab_size() <= CFG["vocab_size"], tok.get_vocab_size()
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": SPECIALS[0],
                "pad_token": SPECIALS[1],
                "eos_token": SPECIALS[2],
                "add_bos_token": False,
                "model_max_length": 2048,
            },
            indent=2,
        )
        + "\n"
    )


# ------------------------------------------------------------------------------------------ weights
def randomise_(model, width_scale: float = 1.0) -> None:
    """Re-randomise every parameter (HF zero-initialises the gates). `width_scale` multiplies the std of
    the projection weights (use sqrt(64 / hidden) to keep activations at this fixture's scale)."""
    import torch

    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = tuple(p.shape)
            if name.endswith("igate_preact.bias"):
                val = torch.rand(shape, generator=g) * 6.0 - 3.0  # U(-3, 3)
            elif name.endswith("fgate_preact.bias"):
                val = torch.rand(shape, generator=g) * 5.0  # U(0, 5)
            elif "norm" in name:  # norm_mlstm, norm_ffn, multihead_norm, out_norm
                val = 1.0 + (torch.rand(shape, generator=g) * 0.6 - 0.3)  # 1 +- 0.3
            elif name.endswith(("igate_preact.weight", "fgate_preact.weight")):
                val = torch.randn(shape, generator=g) * 0.3 * width_scale
            elif "embeddings" in name or name.startswith("lm_head"):
                val = torch.randn(shape, generator=g) * 0.5
            else:  # q, k, v, ogate_preact, out_proj, ffn
                val = torch.randn(shape, generator=g) * 0.2 * width_scale
            p.copy_(val)


def single_to_fused(sd: dict, num_layers: int) -> dict:
    """Concat along dim 0: qkv_opreact = q|k|v|ogate, ifgate_preact = i|f, proj_up_gate_z = gate|up."""
    import torch

    out = dict(sd)
    for i in range(num_layers):
        p = f"backbone.blocks.{i}."
        ml, ff = p + "mlstm_layer.", p + "ffn."
        out[ml + "qkv_opreact.weight"] = torch.cat(
            [out.pop(ml + n + ".weight") for n in ("q", "k", "v", "ogate_preact")], 0)
        for s in ("weight", "bias"):
            out[ml + "ifgate_preact." + s] = torch.cat(
                [out.pop(ml + "igate_preact." + s), out.pop(ml + "fgate_preact." + s)], 0)
        out[ff + "proj_up_gate_z.weight"] = torch.cat(
            [out.pop(ff + "proj_up_gate.weight"), out.pop(ff + "proj_up.weight")], 0)
    return out


def load_hf(path: Path):
    """HF from_pretrained. For fused checkpoints HF 5.23's _init_weights crashes even when every key is present
    (it runs on all modules in _initialize_missing_keys), so it is disabled there; we assert nothing is missing."""
    from transformers import xLSTMForCausalLM
    from transformers.models.xlstm import modeling_xlstm as M

    fused = json.loads((path / "config.json").read_text())["weight_mode"] == "fused"
    orig = M.xLSTMPreTrainedModel._init_weights
    if fused:
        M.xLSTMPreTrainedModel._init_weights = lambda self, module: None
    try:
        model, info = xLSTMForCausalLM.from_pretrained(str(path), output_loading_info=True)
    finally:
        M.xLSTMPreTrainedModel._init_weights = orig
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


# ------------------------------------------------------------------------------------------ diagnostics
def stabiliser_diagnostic(model, ids) -> None:
    """During single steps, how often does exp(-m) win over |q.n| in the denominator?"""
    import torch

    stats = []

    def hook(mod, args, kwargs, output):
        q = kwargs["q"]
        if q.shape[2] != 1:
            return
        _, (c, n, m) = output
        qs = q[:, :, 0, :] * q.shape[-1] ** -0.5
        qn = (qs * n).sum(-1, keepdim=True).abs()
        stats.append((torch.exp(-m) > qn).float().mean().item())

    hs = [blk.mlstm_layer.mlstm_backend.register_forward_hook(hook, with_kwargs=True) for blk in model.backbone.blocks]
    with torch.no_grad():
        out = model(ids[:, :T1], use_cache=True)
        cache = out.cache_params
        for t in range(T1, T):
            cache = model(ids[:, t : t + 1], cache_params=cache, use_cache=True).cache_params
    for h in hs:
        h.remove()
    if stats:
        print(f"stabiliser: exp(-m) > |q.n| in {100 * sum(stats) / len(stats):.1f}% of (batch, head, step) "
              f"during the 16 steps")


def precision_diagnostic(gold: dict) -> None:
    """How far is the float32 golden from the same model run in float64 (norm reductions and state in float64
    too; HF still casts logits to float32)? Tells what tolerance a float32 reimplementation can expect."""
    import dataclasses

    import torch
    from mlstm_kernels.torch.backend_module import mLSTMBackend

    model = load_hf(SINGLE_DIR).to(torch.float64)
    for mod in model.modules():
        if hasattr(mod, "force_float32_reductions"):
            mod.force_float32_reductions = False
    for blk in model.backbone.blocks:  # the backend bakes dtype_state into partials at init
        old = blk.mlstm_layer.mlstm_backend.config
        blk.mlstm_layer.mlstm_backend = mLSTMBackend(dataclasses.replace(old, inference_state_dtype="float64"))
    res = run_hf(model, gold["tokens"].long())
    sd = max(maxdiff(res["state"][k], res["full_state"][k]) for k in res["state"])
    print(f"float64 self-consistency: steps vs full {maxdiff(res['step_logits'], res['logits'][:, T1:]):.3e} "
          f"(logits are cast to float32 by HF), state prefill+steps vs full {sd:.3e}")
    compare("float32 golden vs float64 run of the same model", res, gold)


def check_nxai(sd: dict, ids, gold: dict) -> None:
    """Same weights through NX-AI's own xLSTMLarge (key rename: backbone.embeddings.weight -> embedding.weight)."""
    import torch
    from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig

    cfg = xLSTMLargeConfig(
        embedding_dim=CFG["hidden_size"], num_heads=CFG["num_heads"], num_blocks=CFG["num_hidden_layers"],
        vocab_size=CFG["vocab_size"], qk_dim_factor=CFG["qk_dim_factor"], v_dim_factor=CFG["v_dim_factor"],
        ffn_proj_factor=CFG["ffn_proj_factor"], ffn_round_up_to_multiple_of=CFG["ffn_round_up_to_multiple_of"],
        chunk_size=CFG["chunk_size"], mode="inference", chunkwise_kernel="chunkwise--native_autograd",
        sequence_kernel="native_sequence__native", step_kernel="native", return_last_states=True,
    )
    nx = xLSTMLarge(cfg).eval()
    nsd = {("embedding.weight" if k == "backbone.embeddings.weight" else k): v for k, v in sd.items()}
    assert set(nsd) == set(nx.state_dict()), set(nsd) ^ set(nx.state_dict())
    nx.load_state_dict(nsd, strict=True)
    with torch.no_grad():
        logits, _ = nx(ids)
        plog, state = nx(ids[:, :T1])
        steps = []
        for t in range(T1, T):
            lg, state = nx(ids[:, t : t + 1], state)
            steps.append(lg)
        steps = torch.cat(steps, 1)
    sdiff = max(maxdiff(state[l][j], gold[f"state.{l}.{n}"]) for l in state for j, n in enumerate("Cnm"))
    print(f"[NX-AI xLSTMLarge] max|diff| vs golden: logits {maxdiff(logits, gold['logits']):.3e}, "
          f"prefill {maxdiff(plog, gold['prefill_logits']):.3e}, steps {maxdiff(steps, gold['step_logits']):.3e}, "
          f"state {sdiff:.3e}")


def verify_numpy_load() -> None:
    from safetensors.numpy import load_file

    for d in (SINGLE_DIR, FUSED_DIR):
        for f in sorted(d.glob("*.safetensors")):
            arrs = load_file(str(f))
            print(f"  {f.relative_to(ROOT)}: {len(arrs)} arrays, "
                  f"{sum(a.size for a in arrs.values())} elems, dtypes {sorted({str(a.dtype) for a in arrs.values()})}")


# ------------------------------------------------------------------------------------------ fallback check
def check_fallback() -> None:
    """Runs in a subprocess: hide the xlstm package from transformers and use HF's built-in torch path."""
    import transformers.utils as tu
    import transformers.utils.import_utils as iu

    iu.is_xlstm_available = lambda: False
    tu.is_xlstm_available = lambda: False
    import torch
    from safetensors.torch import load_file
    from transformers.models.xlstm import modeling_xlstm as M

    torch.set_num_threads(1)
    assert not M.external_xlstm
    gold = load_file(str(SINGLE_DIR / "golden.safetensors"))
    ids = gold["tokens"].long()
    for d in (SINGLE_DIR, FUSED_DIR):
        model = load_hf(d)
        compare(f"HF built-in path (no xlstm pkg), {d.name}", run_hf(model, ids), gold)


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, xLSTMConfig, xLSTMForCausalLM
    from transformers.models.xlstm import modeling_xlstm as M

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    print(f"transformers uses the external xlstm package: {M.external_xlstm}")

    for d in (SINGLE_DIR, FUSED_DIR):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)

    # tokenizer
    build_tokenizer(SINGLE_DIR)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(SINGLE_DIR / "tokenizer.json"))
    text_ids = [CFG["bos_token_id"]] + tok.encode(TEXT).ids
    assert len(text_ids) >= T, len(text_ids)
    g = torch.Generator().manual_seed(SEED + 1)
    tokens = torch.stack([torch.tensor(text_ids[:T]), torch.randint(0, CFG["vocab_size"], (T,), generator=g)])
    tokens = tokens.to(torch.int32)
    ids = tokens.long()

    # single-mode model, re-randomised
    cfg = xLSTMConfig(**CFG, weight_mode="single")
    model = xLSTMForCausalLM(cfg).eval()
    randomise_(model)
    model.save_pretrained(str(SINGLE_DIR))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}

    res = run_hf(model, ids)
    assert res["seqlen_offset"] == T, res["seqlen_offset"]
    golden = {"tokens": tokens.contiguous(), "logits": res["logits"], "prefill_logits": res["prefill_logits"],
              "step_logits": res["step_logits"]}
    for grp in ("full_state", "prefill_state", "state"):
        for k, v in res[grp].items():
            assert v.dtype == torch.float32, (grp, k, v.dtype)
            golden[f"{grp}.{k}"] = v.contiguous()
    # The same model in float64: the reference math without float32 rounding. HF's own float32 result is
    # ~3e-4 from it on this fixture, so a float32 port is compared against these ("*64" keys).
    import copy

    res64 = run_hf(copy.deepcopy(model).double(), ids)
    for key in ("logits", "prefill_logits", "step_logits"):
        golden[f"{key}64"] = res64[key]
    for grp in ("full_state", "prefill_state", "state"):
        for k, v in res64[grp].items():
            golden[f"{grp}64.{k}"] = v.contiguous()
    meta = {
        "text": TEXT,
        "prefill_len": str(T1),
        "hf_path": "transformers 5.23.0 modeling_xlstm with xlstm 2.0.6 / mlstm_kernels 2.0.6 native kernels",
        "note": "row 0 of tokens = [bos] + tokenizer(text) truncated to 37; row 1 random",
    }
    # one metadata key only: safetensors writes metadata in hash-map order, which would break byte-determinism
    save_file({k: v.contiguous() for k, v in golden.items()}, str(SINGLE_DIR / "golden.safetensors"),
              metadata={"fixture": json.dumps(meta, sort_keys=True)})
    gold = load_file(str(SINGLE_DIR / "golden.safetensors"))

    self_consistency(res)
    stabiliser_diagnostic(model, ids)

    # reload from disk (as a user would)
    reloaded = load_hf(SINGLE_DIR)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in sd.items())
    compare("HF from_pretrained(hf-tiny)", run_hf(reloaded, ids), gold)

    # fused checkpoint: same weights, concatenated
    from xlstm.xlstm_large.utils import convert_single_weights_to_fused_weights

    fsd = single_to_fused(sd, CFG["num_hidden_layers"])
    ref_fsd = convert_single_weights_to_fused_weights({k: v.clone() for k, v in sd.items()})
    assert set(fsd) == set(ref_fsd) and all(torch.equal(fsd[k], ref_fsd[k]) for k in fsd)
    # HF bug: in fused mode _init_weights crashes (bias slice of NH vs ones_like of 2*NH), so a fresh fused
    # model can only be built with init disabled; from_pretrained of a fused checkpoint works.
    from transformers.initialization import no_init_weights

    with no_init_weights():
        fmodel = xLSTMForCausalLM(xLSTMConfig(**CFG, weight_mode="fused")).eval()
    assert set(fmodel.state_dict()) == set(fsd), set(fmodel.state_dict()) ^ set(fsd)
    fmodel.load_state_dict(fsd, strict=True)
    fmodel.save_pretrained(str(FUSED_DIR))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(SINGLE_DIR / f, FUSED_DIR / f)
    compare("HF fused, in memory", run_hf(fmodel, ids), gold)
    compare("HF from_pretrained(hf-tiny-fused)",
            run_hf(load_hf(FUSED_DIR), ids), gold)

    check_nxai(sd, ids, gold)
    precision_diagnostic(gold)

    # tokenizer loads through transformers too
    at = AutoTokenizer.from_pretrained(str(SINGLE_DIR))
    assert (at.bos_token_id, at.pad_token_id, at.eos_token_id) == (0, 1, 2)
    assert at(TEXT)["input_ids"] == text_ids[1:], "AutoTokenizer must not add specials"

    # HF's built-in (no xlstm package) path, in a subprocess
    subprocess.run([sys.executable, __file__, "--check-fallback"], check=True)

    print("safetensors.numpy load:")
    verify_numpy_load()
    total = 0
    print("files:")
    for d in (SINGLE_DIR, FUSED_DIR):
        for f in sorted(d.iterdir()):
            total += f.stat().st_size
            print(f"  {str(f.relative_to(ROOT)):50s} {f.stat().st_size:9d}  sha256:{sha(f)}")
    print(f"  total {total} bytes")


if __name__ == "__main__":
    if "--check-fallback" in sys.argv:
        check_fallback()
    else:
        main()
