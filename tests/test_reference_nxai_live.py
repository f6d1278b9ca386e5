"""Live comparison with NX-AI's `xLSTMLMModel` (xlstm package, vanilla sLSTM backend, PyTorch CPU; CI installs it).

Fresh tiny models with other sizes, heads, kernel sizes, placements and seeds than the golden fixture,
every weight re-randomised (`make_nxai_fixtures.randomise_`), saved as an NX-AI checkpoint folder and read
back unchanged by `mad.load`. NX-AI runs float32, as MAD does, and MAD is held to it at the issue's 2e-4.

That bound needs a draw on which float32 itself is accurate to well below 2e-4: each case first checks that
NX-AI's float32 logits are within 1e-4 of the same model in float64. The weights are scaled with the width
(`randomise_(width_scale=sqrt(24 / embedding_dim))`) to keep activations at the golden fixture's scale, where
that holds. Without it, some draws are ill-conditioned (the mLSTM cell's normaliser max(|q.n|, exp(-m))
amplifies rounding): with `bias: true`, seed 3 and width_scale 1, NX-AI's float32 is 5.4e-4 from its float64
and moves by up to 1.6e-3 when its own weights are perturbed by one ulp, and MAD lands 1.0e-3 from it, inside
that noise.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("xlstm")
yaml = pytest.importorskip("yaml")
pytestmark = pytest.mark.reference

sys.path.insert(0, str(Path(__file__).parent / "reference"))
from make_nxai_fixtures import build_model, cuda_layout, randomise_, run_reference, state_dict  # noqa: E402

from mad.loading import load  # noqa: E402

TOL, STATE_TOL = 2e-4, 1e-4
# 6 blocks, sLSTM at 0, 2, 5; width 40 (mLSTM inner 80 -> 128 after NX-AI's round-up), 2 mLSTM heads of 64,
# 2 sLSTM heads of 20, conv kernels 3 (mLSTM) and 2 (sLSTM), qkv blocks of 8, FFN 52 -> 64
BASE = {
    "vocab_size": 211, "embedding_dim": 40, "num_blocks": 6, "context_length": 32, "slstm_at": [0, 2, 5],
    "mlstm_block": {"mlstm": {"num_heads": 2, "conv1d_kernel_size": 3, "qkv_proj_blocksize": 8}},
    "slstm_block": {"slstm": {"backend": "vanilla", "num_heads": 2, "conv1d_kernel_size": 2},
                    "feedforward": {"proj_factor": 1.3, "act_fn": "gelu"}},
}


def save(folder: Path, config: dict, sd: dict, name: str = "config.yaml") -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    text = json.dumps(config) if name.endswith(".json") else yaml.safe_dump(config)
    (folder / name).write_text(text)
    save_file(sd, str(folder / "model.safetensors"))
    return folder


def maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def mad_steps(model, tokens, state=None, start=0):
    out = []
    for t in range(start, tokens.shape[1]):
        lg, state = model(tokens[:, t:t + 1], state=state)
        out.append(np.array(lg))
    return np.concatenate(out, 1), state


def reference(cfg: dict, seed: int, ids):
    """A re-randomised NX-AI model and its outputs, after checking the draw is well conditioned in float32."""
    nx = build_model(cfg)
    randomise_(nx, seed=seed, width_scale=(24 / cfg["embedding_dim"]) ** 0.5)
    ref = run_reference(nx, ids)
    with torch.no_grad():
        exact = copy.deepcopy(nx).double()(ids)
    conditioning = maxdiff(ref["logits"].numpy(), exact.numpy())
    assert conditioning <= 1e-4, f"ill-conditioned draw: NX-AI float32 is {conditioning:.1e} from float64"
    return nx, ref


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    ids = torch.randint(0, BASE["vocab_size"], (2, 29), generator=torch.Generator().manual_seed(5))
    nx, ref = reference(BASE, 11, ids)
    folder = save(tmp_path_factory.mktemp("nxai-live") / "ckpt", BASE, state_dict(nx))
    model, _ = load(folder)
    return nx, model, mx.array(ids.numpy().astype(np.int32)), ref


def test_full_forward_matches_nxai(case):
    _, model, tokens, ref = case
    assert maxdiff(model(tokens)[0], ref["logits"].numpy()) <= TOL


def test_steps_and_state_match_nxai_step(case):
    _, model, tokens, ref = case
    out, state = mad_steps(model, tokens)
    assert maxdiff(out, ref["step_logits"].numpy()) <= TOL
    for key, value in ref["state"].items():
        node, name = key.rsplit("/", 1)
        assert maxdiff(np.array(state[node][name]).reshape(value.shape), value.numpy()) <= STATE_TOL, key


def test_prefill_then_steps_equals_nxai_forward(case):
    _, model, tokens, ref = case
    pre, state = model(tokens[:, :17])
    out, state = mad_steps(model, tokens, state, start=17)
    assert maxdiff(np.concatenate([np.array(pre), out], 1), ref["logits"].numpy()) <= TOL
    for key, value in ref["state"].items():  # the state after prefill + steps is NX-AI's after 29 steps
        node, name = key.rsplit("/", 1)
        assert maxdiff(np.array(state[node][name]).reshape(value.shape), value.numpy()) <= STATE_TOL, key


def test_cuda_layout_checkpoint(case, tmp_path):
    nx, model, tokens, _ = case
    cfg = copy.deepcopy(BASE)
    cfg["slstm_block"]["slstm"]["backend"] = "cuda"
    folder = save(tmp_path / "cuda", cfg, cuda_layout(nx, state_dict(nx)))
    assert maxdiff(load(folder)[0](tokens)[0], model(tokens)[0]) == 0.0


def variant(**changes) -> dict:
    cfg = copy.deepcopy(BASE)
    for key, value in changes.items():
        node, path = cfg, key.split("__")
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
    return cfg


@pytest.mark.parametrize("changes", [
    {"tie_weights": True, "bias": True},
    {"slstm_at": "all", "slstm_block__feedforward": None, "add_post_blocks_norm": False},
    {"mlstm_block": None, "slstm_block__slstm__conv1d_kernel_size": 0},
    {"slstm_at": [], "embedding_dim": 72, "mlstm_block__mlstm__proj_factor": 1.5,  # 108 -> rounded down to 64
     "mlstm_block__mlstm__round_proj_up_dim_up": False},
    {"slstm_block__feedforward__act_fn": "swish", "slstm_block__feedforward__bias": True,
     "slstm_block__feedforward__proj_factor": 2.0, "slstm_block__slstm__num_heads": 4},
], ids=["tie-bias", "all-slstm-no-ffn-no-post-norm", "no-mlstm-conv0", "mlstm-only-floor", "ffn-swish-bias"])
def test_config_variants_match_nxai(tmp_path, changes):
    cfg = variant(**changes)
    ids = torch.randint(0, cfg["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(9))
    nx, ref = reference(cfg, 3, ids)
    sd = state_dict(nx)
    if cfg.get("tie_weights"):
        assert torch.equal(sd["lm_head.weight"], sd["token_embedding.weight"])
    folder = save(tmp_path / "ckpt", cfg, sd, name="config.json")
    model, _ = load(folder)
    tokens = mx.array(ids.numpy().astype(np.int32))
    assert maxdiff(model(tokens)[0], ref["logits"].numpy()) <= TOL
    out, _ = mad_steps(model, tokens)
    assert maxdiff(out, ref["step_logits"].numpy()) <= TOL
