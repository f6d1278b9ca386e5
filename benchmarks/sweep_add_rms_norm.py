"""The residual add + RMS norm at decode (xLSTM-7B width 4096, bf16): MLX's two kernels (an add, then
`mx.fast.rms_norm`) against MAD's `add_rms_norm` kernel at several elements-per-thread settings
(`kernels.norm_device.PER_THREAD`). Microseconds per call from a compiled chain of `--chain` dependent
calls (median of `--trials`), and the largest difference of one call's results to MLX's.

    python benchmarks/sweep_add_rms_norm.py [--rows 1,32] [--chain 50] [--trials 20] [--per 16,8,4,2]
"""

from __future__ import annotations

import argparse
import statistics

import mlx.core as mx

import mad.kernels.norm_device as nd
from common import timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=lambda v: [int(x) for x in v.split(",")], default=[1, 32])
    ap.add_argument("--chain", type=int, default=50)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--per", type=lambda v: [int(x) for x in v.split(",")], default=[16, 8, 4, 2])
    a = ap.parse_args()
    D = 4096
    for rows in a.rows:
        x, r = (mx.random.normal((rows, D)).astype(mx.bfloat16) for _ in range(2))
        w = (1 + 0.1 * mx.random.normal((D,))).astype(mx.bfloat16)
        mx.eval(x, r, w)

        def chain(step, x, r):
            for _ in range(a.chain):
                r, x = step(x, r)
            return r, x

        variants = {"mlx add + rms_norm": lambda x, r: (x + r, mx.fast.rms_norm(x + r, w, 1e-6))}
        for per in a.per:
            variants[f"add_rms_norm, {per}/thread"] = (
                lambda per: lambda x, r: (setattr(nd, "PER_THREAD", per), nd.add_rms_norm_device(x, r, w, 1e-6))[1])(per)
        want = variants["mlx add + rms_norm"](x, r)
        for name, step in variants.items():
            fn = mx.compile(lambda x, r, step=step: chain(step, x, r))
            _, times = timed(lambda: fn(x, r), a.trials)
            diff = max(float(mx.abs(o.astype(mx.float32) - f.astype(mx.float32)).max()) for o, f in zip(step(x, r), want))
            print(f"rows {rows:3d} {name:28s}: {statistics.median(times) / a.chain * 1e6:7.2f} us/call, "
                  f"max diff {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
