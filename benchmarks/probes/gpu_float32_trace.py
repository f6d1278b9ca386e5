"""Where does a float32 forward on the GPU part from the CPU? Node by node, on the HF test fixture.

Loads `tests/fixtures/hf-tiny` (float32, re-randomised weights, ill-conditioned gates) once per device
with the same weights, traces every node on the golden tokens (batch 2, 37 tokens) and prints, per node,
the largest absolute difference GPU - CPU and its size relative to the CPU value's largest magnitude, and
the logits' distance to HF's float64 logits for both devices (the tests hold MAD to 2e-4 there). Run with
`--kernels reference` to leave MAD's device kernels out, and with MLX_ENABLE_TF32=0 for full float32
products (MLX reads it once, at its first float32 product).

    MLX_ENABLE_TF32=0 python benchmarks/probes/gpu_float32_trace.py [--kernels auto|reference] [--fuse 0|1]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
from safetensors.numpy import load_file

FIX = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "hf-tiny"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", default="auto")
    ap.add_argument("--fuse", default="1")
    a = ap.parse_args()
    os.environ["MAD_FUSE"] = a.fuse
    from mad import load
    from mad.kernels.registry import set_policy

    set_policy(a.kernels)
    golden = load_file(str(FIX / "golden.safetensors"))
    tokens = mx.array(golden["tokens"])
    out, weights = {}, None
    for name, device in (("cpu", mx.cpu), ("gpu", mx.gpu)):
        mx.set_default_device(device)
        model, _ = load(FIX)
        if weights is None:
            weights = model.program.parameters()
        else:
            model.program.load_weights(weights)
        trace = model.program.trace({"tokens": tokens})
        mx.eval(trace)
        out[name] = {k: np.array(v.astype(mx.float32)) for k, v in trace.items()}
    print(f"MLX_ENABLE_TF32={os.environ.get('MLX_ENABLE_TF32')} kernels={a.kernels} fuse={a.fuse}")
    print(f"{'node':58s} {'max |gpu-cpu|':>14s} {'relative':>10s}")
    for node, cpu in out["cpu"].items():
        diff = float(np.abs(out["gpu"][node] - cpu).max())
        print(f"{node:58s} {diff:14.3e} {diff / max(float(np.abs(cpu).max()), 1e-30):10.3e}")
    logits = [n for n in out["cpu"] if n.endswith("lm_head")][0]
    for name in ("cpu", "gpu"):
        print(f"{name}: logits vs HF float64 max |diff| {np.abs(out[name][logits] - golden['logits64']).max():.3e}")


if __name__ == "__main__":
    main()
