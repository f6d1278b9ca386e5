"""Decode-sized products y = x W^T on the GPU: MLX's matmul against MAD's `linear` kernel.

For the weight shapes of one xLSTM-7B block (and the head), M = 1..8 rows of x, bf16: checks the
kernel against a float32 CPU product (||y - ref|| / ||ref||, outputs poisoned with NaN first), then
times each (median of 50 runs of a chain of 20 products over rotating weights, so that the weights
do not sit in L2) and reports the achieved weight bandwidth.

    python benchmarks/probes/gpu_gemv.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx
import numpy as np

from mad.kernels.linear_device import linear_device

SHAPES = {  # (N, K)
    "q|k|v|o|i|f": (12304, 4096), "q": (2048, 4096), "v": (4096, 4096), "out_proj": (4096, 4096),
    "up|gate": (21888, 4096), "down": (4096, 10944), "lm_head": (50304, 4096),
}
CHAIN = 20


def time_chain(fn, ws, x) -> float:
    def run():
        acc = x
        for w in ws:
            acc = x + (fn(acc, w)[..., :1] * 0).astype(x.dtype)  # dependent, like a real step
        return acc
    compiled = mx.compile(run)
    mx.eval(compiled())
    times = []
    for _ in range(50):
        start = time.perf_counter()
        mx.eval(compiled())
        times.append(time.perf_counter() - start)
    return statistics.median(times) / CHAIN


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for name, (N, K) in SHAPES.items():
        ws = [(mx.random.normal((N, K)) * 0.02).astype(mx.bfloat16) for _ in range(CHAIN)]
        mx.eval(ws)
        for M in (1, 4, 8):
            x = mx.random.normal((M, K)).astype(mx.bfloat16)
            (y,) = linear_device(x, ws[0], poison=float("nan"))
            with mx.stream(mx.cpu):
                ref = x.astype(mx.float32) @ ws[0].astype(mx.float32).T
            a, b = np.array(y.astype(mx.float32)), np.array(ref)
            err = float(np.linalg.norm(a - b) / np.linalg.norm(b)) if np.isfinite(a).all() else float("nan")
            t_mlx = time_chain(lambda x, w: x @ w.T, ws, x)
            t_mad = time_chain(lambda x, w: linear_device(x, w)[0], ws, x)
            gb = N * K * 2 / 1e9
            rows.append(dict(shape=name, N=N, K=K, M=M, rel_err=err, mlx_us=t_mlx * 1e6, mad_us=t_mad * 1e6,
                             mlx_TBps=gb / t_mlx / 1e3, mad_TBps=gb / t_mad / 1e3))
            r = rows[-1]
            print(f"{name:12s} N={N:6d} K={K:6d} M={M}  err={err:.2e}  mlx {r['mlx_us']:7.1f} us "
                  f"{r['mlx_TBps']:.2f} TB/s   mad {r['mad_us']:7.1f} us {r['mad_TBps']:.2f} TB/s", flush=True)
        del ws
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
