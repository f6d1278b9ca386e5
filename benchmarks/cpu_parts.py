"""Where a 1024-token prompt of the ~160M xLSTM-7B-family model spends its time on the CPU, part by part.

Each part of one block runs alone at the model's shapes (batch 1, 1024 tokens, hidden 768, 4 heads,
feed-forward 2048, vocab 50304), compiled, median of `--trials` evaluated runs; kernels with a CPU variant
(kernels/activations.py) are timed with it ("auto") and with MLX's own function ("reference"). Also the
float32 1024 x 1024 product in GFLOP/s, which shows the BLAS in use (backends/cpu.py; `MAD_BLAS=mlx` for MLX's
own, where the block's products take minutes).

    python benchmarks/cpu_parts.py [--trials 9]
    python benchmarks/cpu_parts.py --quick    # 32 tokens, hidden 64, 256 x 256 product, one trial: a smoke run (CI)
"""

from __future__ import annotations

import argparse
import statistics
import time

import mad  # before mlx.core: selects the CPU BLAS, see backends/cpu.py
import mlx.core as mx

from mad.kernels.mlstm import mlstm_sequence
from mad.kernels.registry import dispatch, use_reference

SIZES = dict(T=1024, D=768, NH=4, F=2048, V=50304, N=1024)  # N: the square product of the GFLOP/s line
QUICK = dict(T=32, D=64, NH=4, F=128, V=256, N=256)


def products(D: int, NH: int, F: int) -> dict[str, tuple[int, int]]:
    """One block's weight products, (in, out), fused siblings as one."""
    return {"q|k|v|o|i|f": (D, 2 * (D // 2) + 2 * D + 2 * NH), "out_proj": (D, D), "up|gate": (D, 2 * F), "down": (F, D)}


def median_s(fn, *args, trials: int) -> float:
    fn = mx.compile(fn)
    mx.eval(fn(*args))
    times = []
    for _ in range(trials):
        t = time.perf_counter()
        mx.eval(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help=f"a smoke run, timings meaningless: {QUICK}, one trial")
    args = ap.parse_args()
    n = 1 if args.quick else args.trials
    T, D, NH, F, V, N = (QUICK if args.quick else SIZES).values()
    mx.set_default_device(mx.cpu)
    print(f"mlx {mx.__version__}, CPU BLAS: {mad.backends.cpu.BLAS or 'bundled with MLX'}")
    a = mx.random.normal((N, N))
    print(f"{N} x {N} float32 product: {2 * N ** 3 / median_s(lambda a: a @ a, a, trials=n) / 1e9:.0f} GFLOP/s")

    total_s = total_flop = 0.0
    for name, (k, m) in products(D, NH, F).items():
        x, w = mx.random.normal((1, T, k)), mx.random.normal((m, k))
        s = median_s(lambda x, w: x @ w.T, x, w, trials=n)
        total_s, total_flop = total_s + s, total_flop + 2 * T * k * m
        print(f"  {name:<12} ({k} -> {m}): {s * 1e3:6.1f} ms")
    print(f"block products: {total_s * 1e3:.1f} ms, {total_flop / 1e9:.1f} GFLOP at {total_flop / total_s / 1e9:.0f} GFLOP/s")

    q, k = mx.random.normal((1, NH, T, D // 2 // NH)), mx.random.normal((1, NH, T, D // 2 // NH))
    v, i, f = mx.random.normal((1, NH, T, D // NH)), mx.random.normal((1, NH, T)), mx.random.normal((1, NH, T)) + 2
    # the feed-forward's gate and up projections: contiguous, as the linear kernel's CPU variant gives them
    # (kernels/linear.py); also timed as the split columns of one product, which it avoids
    g, u, gu = mx.random.normal((1, T, F)), mx.random.normal((1, T, F)), mx.random.normal((1, T, 2 * F))
    h, wn = mx.random.normal((1, T, D)), mx.random.normal((D,))
    logits = mx.random.normal((1, T, V)) * 5
    mx.eval(q, k, v, i, f, g, u, gu, h, wn, logits)
    parts = {
        f"mLSTM cell (chunk {min(64, T)})": (lambda q, k, v, i, f: mlstm_sequence(q, k, v, i, f, chunk_size=min(64, T)),
                                             (q, k, v, i, f)),
        "SiLU(gate) * up": (lambda g, u: dispatch("silu_mul")(g, u), (g, u)),
        "  the same on split columns": (lambda gu: dispatch("silu_mul")(gu[..., :F], gu[..., F:]), (gu,)),
        "sigmoid(o) * h (output gate)": (lambda o, x: dispatch("sigmoid_mul")(o, x), (h, h)),
        "rms_norm": (lambda x, w: mx.fast.rms_norm(x, w, 1e-6), (h, wn)),
        "per-head layer_norm": (lambda x: mx.fast.layer_norm(x.reshape(1, T, NH, D // NH), None, None, 1e-6), (h,)),
        "residual add": (lambda x, y: x + y, (h, h)),
        "head soft-cap 30 tanh(x / 30)": (lambda x: 30 * mx.tanh(x / 30), (logits,)),
    }
    for name, (fn, args) in parts.items():
        auto = median_s(fn, *args, trials=n)
        with use_reference():
            ref = median_s(fn, *args, trials=n)
        print(f"  {name:<30} auto {auto * 1e3:7.1f} ms   reference {ref * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
