"""float32 means float32 on every device, as a user gets it (no test-wide environment).

MLX runs float32 matrix products in TF32 on GPUs that have it unless MLX_ENABLE_TF32=0; `import mad`
sets that default (`--tf32` or MLX_ENABLE_TF32=1 opt in). These tests run MAD in a subprocess with a
clean environment, on the default device (the GPU where there is one) with the default kernels and BLAS,
so they check what `mad run` and `mad.load` give a user. On a CPU-only machine they hold too; they can
only fail on a GPU where the default is wrong (the TF32 check shows that they would).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

MATMUL = """
import json, sys
import numpy as np
import mad, mlx.core as mx
rng = np.random.default_rng(0)
a, b = rng.standard_normal((512, 1024)), rng.standard_normal((1024, 512))
out = np.array(mx.array(a.astype(np.float32)) @ mx.array(b.astype(np.float32)))
ref = a.astype(np.float32).astype(np.float64) @ b.astype(np.float32).astype(np.float64)
print(json.dumps({"rel": float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
                  "gpu": bool(mx.default_device() == mx.gpu)}))
"""

LOGITS = """
import json, sys
import numpy as np
import mad, mlx.core as mx
from mad.loading import load
model, _ = load(sys.argv[1])
tokens = mx.array(np.load(sys.argv[2]))
logits, _ = model(tokens)
np.save(sys.argv[3], np.array(logits.astype(mx.float32)))
print(json.dumps({"gpu": bool(mx.default_device() == mx.gpu)}))
"""


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLX_ENABLE_TF32", "MAD_BLAS", "MAD_KERNELS")}
    env.update(extra)
    return env


def _run(code: str, *args: str, **env: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                          env=_clean_env(**env), timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_float32_products_are_float32_by_default():
    """A float32 product through `import mad` is float32-accurate (TF32 would be ~3e-4 from float64)."""
    got = _run(MATMUL)
    assert got["rel"] < 1e-5, got


def test_tf32_is_an_opt_in():
    got = _run(MATMUL, MLX_ENABLE_TF32="1")
    if not got["gpu"]:
        pytest.skip("no GPU: TF32 does not apply")
    assert got["rel"] > 1e-4, f"TF32 asked for, but the product looks float32: {got}"


@pytest.mark.reference
def test_float32_logits_match_transformers_float64(tmp_path):
    """An xLSTM-7B-family model, 3 blocks, hidden 768, 6 heads, 777 tokens (not a multiple of
    the chunk size), re-randomised weights; MAD float32 on the default device against HF in float64."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "tests" / "reference"))
    from make_hf_fixtures import randomise_

    torch.manual_seed(11)
    cfg = transformers.xLSTMConfig(vocab_size=512, hidden_size=768, num_hidden_layers=3, num_heads=6)
    model = transformers.xLSTMForCausalLM(cfg).eval()
    randomise_(model, width_scale=(64 / 768) ** 0.5)
    model.save_pretrained(str(tmp_path / "ckpt"))
    ids = torch.randint(0, 512, (1, 777), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        hf32 = model(ids).logits.double().numpy()
        ref = model.double()(ids).logits.double().numpy()
    np.save(tmp_path / "tokens.npy", ids.numpy().astype(np.int32))
    got = _run(LOGITS, str(tmp_path / "ckpt"), str(tmp_path / "tokens.npy"), str(tmp_path / "logits.npy"))
    ours = np.load(tmp_path / "logits.npy")
    scale = np.abs(ref).max()
    err, hf_err = float(np.abs(ours - ref).max() / scale), float(np.abs(hf32 - ref).max() / scale)
    print(f"max |MAD - HF float64| / max |HF| = {err:.2e} (gpu: {got['gpu']}); HF float32 on the CPU: {hf_err:.2e}")
    # float32 summation orders decide the last digits here (HF's own float32 is ~1e-4 from its float64 on
    # this input), so the bound is a small multiple of the reference's own float32 error; TF32 is ~1e-2
    assert err <= 3 * hf_err, (err, hf_err)
