"""How far float32 summation order alone moves MAD's logits on the HF test fixture (tests/fixtures/hf-tiny).

Every contraction of the model is evaluated in a random order: each `linear` kernel call multiplies
x[..., p] @ W[:, p]^T for a random permutation p of the input features, and the chunkwise mLSTM cell
runs on q, k permuted along their head dim and v along its own (its outputs and final state permuted
back). These are the same sums of the same float32 products, so any BLAS on any CPU computes one such
order; the spread of |logits - HF's float64 logits| over many draws is the fixture's float32 spread,
which tests/test_blas.py's bounds are derived from. Each draw loads the model afresh (new traces).

    python benchmarks/probes/probe_float32_orders.py [--orders 150] [--seed 0] [--kernels auto|reference]
    MAD_BLAS=mlx python benchmarks/probes/probe_float32_orders.py     # MLX's own BLAS (sequential sums)
    python benchmarks/probes/probe_float32_orders.py --quick          # 2 orders: a smoke run (CI)

`--kernels auto` keeps the CPU variants of exp / sigmoid / SiLU and the gates (kernels/activations.py);
`reference` takes MLX's own functions for them. The run with the unpermuted model is printed first.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import mad  # before mlx.core: selects the CPU BLAS, see backends/cpu.py
import mlx.core as mx
import numpy as np
from safetensors.numpy import load_file

from mad.kernels.linear import linear
from mad.kernels.registry import kernels

FIXTURE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "hf-tiny"
ACTIVATIONS = ("exp", "sigmoid", "silu", "sigmoid_mul", "silu_mul")


def errors(golden: dict) -> tuple[float, float]:
    """(max, mean) |logits - float64 logits| of a freshly loaded model on the golden tokens."""
    model, _ = mad.load(FIXTURE)
    logits, _ = model(mx.array(golden["tokens"]))
    e = np.abs(np.array(logits).astype(np.float64) - golden["logits64"])
    return float(e.max()), float(e.mean())


def permute_orders(rng: np.random.Generator) -> dict:
    """Register CPU variants of `linear` and the chunkwise cell's two kernels that permute their
    contractions; returns the per-draw permutations of the cell (clear it before each draw)."""
    ks = kernels()
    perms: dict = {}

    def perm(n: int, key: str):
        if (n, key) not in perms:
            p = rng.permutation(n).astype(np.int32)
            perms[(n, key)] = (mx.array(p), mx.array(np.argsort(p).astype(np.int32)))
        return perms[(n, key)]

    def linear_permuted(x, w, bias=None, splits=(), caps=(None,)):
        p = mx.array(rng.permutation(x.shape[-1]).astype(np.int32))
        return linear(mx.take(x, p, axis=-1), mx.take(w, p, axis=-1), bias, splits, caps)

    states_ref, outputs_ref = ks["mlstm_chunk_states"].reference, ks["mlstm_chunk_outputs"].reference

    def states(kc, vc, b, ic, state, **kw):
        (pk, ik), (pv, iv) = perm(kc.shape[-1], "k"), perm(vc.shape[-1], "v")
        C, n, m = state
        C, n = mx.take(mx.take(C, pk, axis=-2), pv, axis=-1), mx.take(n, pk, axis=-1)
        s_in, (C, n, m) = states_ref(mx.take(kc, pk, axis=-1), mx.take(vc, pv, axis=-1), b, ic, (C, n, m), **kw)
        return s_in, (mx.take(mx.take(C, ik, axis=-2), iv, axis=-1), mx.take(n, ik, axis=-1), m)

    def outputs(qc, kc, vc, b, ic, s_in, eps, **kw):
        (pk, _), (pv, iv) = perm(kc.shape[-1], "k"), perm(vc.shape[-1], "v")
        h = outputs_ref(mx.take(qc, pk, axis=-1), mx.take(kc, pk, axis=-1), mx.take(vc, pv, axis=-1), b, ic, s_in, eps, **kw)
        return mx.take(h, iv, axis=-1)

    ks["linear"].variants["cpu"] = linear_permuted
    ks["mlstm_chunk_states"].variants["cpu"] = states
    ks["mlstm_chunk_outputs"].variants["cpu"] = outputs
    return perms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--orders", type=int, default=150, help="random summation orders drawn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kernels", default="auto", choices=["auto", "reference"],
                    help="the activations' CPU variants (auto) or MLX's functions (reference)")
    ap.add_argument("--quick", action="store_true", help="2 orders")
    a = ap.parse_args()
    n = 2 if a.quick else a.orders
    mx.set_default_device(mx.cpu)
    golden = load_file(str(FIXTURE / "golden.safetensors"))
    if a.kernels == "reference":
        for name in ACTIVATIONS:
            kernels()[name].variants.pop("cpu", None)
    hf32 = np.abs(golden["logits"].astype(np.float64) - golden["logits64"])
    print(f"mlx {mx.__version__}, CPU BLAS: {mad.backends.cpu.BLAS or 'bundled with MLX'}, activations: {a.kernels}")
    print(f"HF's own float32: max {hf32.max():.2e}, mean {hf32.mean():.2e}")
    print("MAD, the model's own order: max {:.2e}, mean {:.2e}".format(*errors(golden)))
    perms = permute_orders(np.random.default_rng(a.seed))
    draws = []
    for _ in range(n):
        perms.clear()
        draws.append(errors(golden))
    d = np.array(draws)
    for i, what in enumerate(("max", "mean")):
        e = d[:, i]
        print(f"{n} random orders, {what} |diff|: min {e.min():.2e}, median {np.median(e):.2e}, "
              f"90% {np.quantile(e, 0.9):.2e}, max {e.max():.2e}")


if __name__ == "__main__":
    main()
