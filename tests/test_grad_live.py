"""Gradients against PyTorch's autograd: MAD (float32) vs the original implementations (float64, CPU).

Issue "Train what you wire", item 4. Small models of both families with re-randomised weights; the loss is
the mean next-token cross-entropy; every parameter's MAD gradient (`nn.value_and_grad`, modes "chunkwise"
and "parallel", a sequence length that is not a multiple of the chunk size, the default kernels and the
pure-MLX references) is held to max|g_mad - g_ref| / max|g_ref| <= 1e-4 per parameter, g_ref from
`loss.backward()` in float64:

- original stack: NX-AI `xLSTMLMModel` (xlstm package, vanilla sLSTM backend), `.double()`. Every module's
  outputs are float64 (checked with forward hooks: the vanilla sLSTM and the parallel mLSTM follow the
  input dtype; nothing is forced to float32). Its grads are renamed/reshaped by the format's own
  `nxai_xlstm.sanitize`, as the weights are on load.
- xLSTM-7B family: NX-AI's `xLSTMLarge` (what transformers wraps; its backward does not run on the CPU) with
  the native PyTorch kernels, mode "train" (chunkwise--native_autograd), `norm_reduction_force_float32`
  off, `.double()`; MAD reads the same weights from transformers' `save_pretrained` folder; grads go through
  `mad.formats.xlstm.sanitize`. The native chunkwise kernel needs a multiple of its chunk size, so the
  reference reads the T tokens followed by padding tokens up to that multiple, and its loss covers the first
  T positions only (causal: exactly the loss of the T tokens).

The draw. Each case first checks that the reference itself in float32 is within the bound of its float64
on every parameter (the bound must be measurable in float32; this draw: NX-AI 7.5e-6, xLSTMLarge 4.9e-5 on
block 1's igate_preact.bias, where MAD lands at up to 6.4e-5). With the fixtures' default input-gate biases
(U(-3, 3)) that fails on the mLSTM `igate.bias`: where |q.n| wins the normaliser max(|q.n|, exp(-m)), the
cell's output is invariant under a common shift of a head's input-gate pre-activations, so that bias's exact
gradient is a near-total cancellation (NX-AI, seed 11: block 1's igate.bias gradient is ~1e-5, from per-
position terms summing to 0.5-0.9 in absolute value, a factor ~1e5), and NX-AI's own float32 is 4e-3 from
its float64 there (MAD: 1.6e-2 chunkwise, 6.5e-3 parallel); none of seeds 0-15 of the default draw keeps
the reference's float32 under 1e-4 on every parameter. Input-gate biases drawn from U(-8, -4) let exp(-m) win
often enough that the gradient is not a cancellation; every other weight keeps the fixtures' draw
(`randomise_`, width-scaled projections, spread forget gates).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

torch = pytest.importorskip("torch")
pytest.importorskip("xlstm")
yaml = pytest.importorskip("yaml")
pytest.importorskip("safetensors")
pytestmark = [pytest.mark.reference]

sys.path.insert(0, str(Path(__file__).parent / "reference"))
import make_hf_fixtures  # noqa: E402
import make_nxai_fixtures  # noqa: E402

import mad  # noqa: E402
from mad.formats import nxai_xlstm  # noqa: E402
from mad.formats import xlstm as xlstm_format  # noqa: E402
from mad.kernels.registry import use_reference  # noqa: E402

TOL = 1e-4            # max|g_mad - g_ref| / max|g_ref|, per parameter
# A draw counts when the reference's own float32 gradients are within CONDITIONING of its float64 ones: a
# draw where float32 itself cannot come near the truth would test rounding, not MAD. The reference's float32
# path sums in an order that depends on the CPU (PyTorch's kernels on AVX2 or AVX-512): on xlstm-7b's
# input-gate bias it is 1.5e-4 from float64 on an AVX-512 Xeon, and was within 1e-4 on the AMD EPYC where
# earlier runs passed. The guard only admits draws; MAD itself is held to TOL on every admitted draw (its
# worst on that Xeon: 6.4e-5).
CONDITIONING = 4 * TOL
IGATE_BIAS = (-8.0, -4.0)
B, T, CHUNK = 2, 29, 8  # 29: not a multiple of the chunk size

# NX-AI xLSTMLMModel: 6 blocks, sLSTM at 0, 2, 5 (tests/test_reference_nxai_live.py's BASE)
NXAI = {
    "vocab_size": 211, "embedding_dim": 40, "num_blocks": 6, "context_length": 32, "slstm_at": [0, 2, 5],
    "mlstm_block": {"mlstm": {"num_heads": 2, "conv1d_kernel_size": 3, "qkv_proj_blocksize": 8}},
    "slstm_block": {"slstm": {"backend": "vanilla", "num_heads": 2, "conv1d_kernel_size": 2},
                    "feedforward": {"proj_factor": 1.3, "act_fn": "gelu"}},
}
NXAI_SEED = 3
# xLSTM-7B family (tests/test_reference_live.py's model)
HF = dict(vocab_size=211, hidden_size=128, num_hidden_layers=3, num_heads=4, qk_dim_factor=0.5, v_dim_factor=1.0,
          chunk_size=CHUNK, ffn_proj_factor=1.5, ffn_round_up_to_multiple_of=16)

SUMMARY: dict = {}


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def worst(got: dict, want: dict) -> tuple[float, str]:
    return max((rel(got[k], want[k]), k) for k in want)


def spread_igates_(model, suffix: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(suffix):
                p.copy_(torch.rand(p.shape, generator=g) * (IGATE_BIAS[1] - IGATE_BIAS[0]) + IGATE_BIAS[0])


def torch_grads(model, ids, dtype, sanitize, n=T) -> tuple[float, dict, set]:
    """Mean cross-entropy of the first n next-token predictions, its float64/float32 autograd gradients by
    MAD name (through the format's sanitize), and the dtypes of every module output seen."""
    model = copy.deepcopy(model).to(dtype)
    seen: set = set()

    def hook(mod, args, out):
        seen.update(x.dtype for x in (out if isinstance(out, tuple) else (out,)) if torch.is_tensor(x))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    out = model(ids[:, :-1])
    logits = (out[0] if isinstance(out, tuple) else out)[:, :n]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:n + 1].reshape(-1))
    loss.backward()
    for h in handles:
        h.remove()
    grads = sanitize({k: mx.array(p.grad.double().numpy()) for k, p in model.named_parameters()})
    return loss.item(), {k: np.array(v, dtype=np.float64) for k, v in grads.items()}, seen


def save(folder: Path, config: dict, sd: dict) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    save_file(sd, str(folder / "model.safetensors"))
    return folder


def nxai_case(tmp: Path) -> dict:
    nx = make_nxai_fixtures.build_model(NXAI)
    make_nxai_fixtures.randomise_(nx, seed=NXAI_SEED, width_scale=(24 / NXAI["embedding_dim"]) ** 0.5)
    spread_igates_(nx, "mlstm_cell.igate.bias", NXAI_SEED)
    folder = save(tmp / "nxai", NXAI, make_nxai_fixtures.state_dict(nx))
    ids = torch.randint(0, NXAI["vocab_size"], (B, T + 1), generator=torch.Generator().manual_seed(5))
    sanitize = lambda g: nxai_xlstm.sanitize(g, NXAI)  # noqa: E731
    loss64, g64, seen = torch_grads(nx, ids, torch.float64, sanitize)
    assert seen == {torch.float64}, f"NX-AI's float64 run computes parts in {seen}"
    _, g32, _ = torch_grads(nx, ids, torch.float32, sanitize)
    model, _ = mad.load(folder, overrides=[f"dims.CHUNK={CHUNK}"])  # NX-AI has no chunk size: MAD's own
    return {"model": model, "ids": ids, "loss": loss64, "g64": g64, "g32": g32}


def xlstm7b_case(tmp: Path) -> dict:
    transformers = pytest.importorskip("transformers")
    from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig

    torch.manual_seed(7)
    hf = transformers.xLSTMForCausalLM(transformers.xLSTMConfig(**HF)).eval()
    make_hf_fixtures.randomise_(hf, width_scale=(64 / HF["hidden_size"]) ** 0.5)
    spread_igates_(hf, "igate_preact.bias", 7)
    folder = tmp / "xlstm7b"
    hf.save_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    cfg = xLSTMLargeConfig(
        embedding_dim=HF["hidden_size"], num_heads=HF["num_heads"], num_blocks=HF["num_hidden_layers"],
        vocab_size=HF["vocab_size"], qk_dim_factor=HF["qk_dim_factor"], v_dim_factor=HF["v_dim_factor"],
        ffn_proj_factor=HF["ffn_proj_factor"], ffn_round_up_to_multiple_of=HF["ffn_round_up_to_multiple_of"],
        chunk_size=CHUNK, mode="train", chunkwise_kernel="chunkwise--native_autograd",
        sequence_kernel="native_sequence__native", step_kernel="native", norm_reduction_force_float32=False,
        return_last_states=True)  # without it, the layer unpacks h itself as (h, state)
    assert (cfg.gate_soft_cap, cfg.output_logit_soft_cap) == (config["gate_soft_cap"], config["output_logit_soft_cap"])
    nx = xLSTMLarge(dataclasses.replace(cfg))
    sd = {("embedding.weight" if k == "backbone.embeddings.weight" else k): v for k, v in hf.state_dict().items()}
    nx.load_state_dict(sd, strict=True)
    padded = -(-T // CHUNK) * CHUNK
    ids = torch.randint(0, HF["vocab_size"], (B, padded + 1), generator=torch.Generator().manual_seed(3))
    sanitize = lambda g: xlstm_format.sanitize(g, config)  # noqa: E731
    loss64, g64, seen = torch_grads(nx, ids, torch.float64, sanitize)
    assert seen == {torch.float64}, f"xLSTMLarge's float64 run computes parts in {seen}"
    _, g32, _ = torch_grads(nx, ids, torch.float32, sanitize)
    model, _ = mad.load(folder)
    return {"model": model, "ids": ids[:, :T + 1], "loss": loss64, "g64": g64, "g32": g32}


CASES = {"nxai-xlstm": nxai_case, "xlstm-7b": xlstm7b_case}


@pytest.fixture(scope="module")
def summary():
    yield SUMMARY
    for family, rows in SUMMARY.items():
        r, k, where = max(rows)
        print(f"\n[grad-live {family}] worst parameter {k}: {r:.2e} ({where}); bound {TOL:.0e}")


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    c = CASES[request.param](tmp_path_factory.mktemp(request.param))
    c["family"] = request.param
    r, k = worst(c["g32"], c["g64"])
    print(f"\n[grad-live {request.param}] reference float32 vs float64: worst {k} {r:.2e}")
    assert r <= CONDITIONING, (f"ill-conditioned draw: the reference's own float32 gradient of {k} is {r:.1e} "
                               f"from its float64")
    return c


def loss_fn(model, tokens, targets, mode):
    logits, _ = model(tokens, mode=mode)
    return nn.losses.cross_entropy(logits, targets).mean()


@pytest.mark.parametrize("kernels", ["auto", "reference"])
@pytest.mark.parametrize("mode", ["chunkwise", "parallel"])
def test_gradients_match_pytorch_float64(case, mode, kernels, summary):
    model, ids = case["model"], case["ids"].numpy().astype(np.int32)
    tokens, targets = mx.array(ids[:, :-1]), mx.array(ids[:, 1:])
    assert tokens.shape[1] == T and T % CHUNK
    run = nn.value_and_grad(model, loss_fn)
    if kernels == "reference":
        with use_reference():
            loss, grads = run(model, tokens, targets, mode)
    else:
        loss, grads = run(model, tokens, targets, mode)
    grads = {k: np.array(v, dtype=np.float64) for k, v in tree_flatten(grads)}
    want = case["g64"]
    assert set(grads) == set(want), set(grads) ^ set(want)
    assert abs(loss.item() - case["loss"]) <= 1e-5 * abs(case["loss"])
    assert all(np.abs(g).max() > 0 for g in want.values())
    r, k = worst(grads, want)
    where = f"{mode}, {kernels} kernels"
    print(f"\n[grad-live {case['family']}] {where}: worst {k} {r:.2e}")
    summary.setdefault(case["family"], []).append((r, k, where))
    misses = {k: f"{rel(grads[k], want[k]):.2e}" for k in want if rel(grads[k], want[k]) > TOL}
    assert not misses, misses
