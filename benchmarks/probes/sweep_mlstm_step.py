"""The fused mLSTM decode-step kernel (`mlstm_step`) at the xLSTM-7B head shapes (8 heads, q/k 256, v 512,
bf16 q/k/v, float32 state) for several thread layouts (TX columns x TY row groups per block, UNROLL rows per
thread in flight): microseconds per step from a chain of `--chain` dependent steps in one evaluation
(compiled, as in the model; median of `--trials`), the bytes a step must move (C read and written) over that time, and the largest
difference of h and C to the first layout after the chain (the results must not change).
Picks `kernels.mlstm_device.TX, TY, UNROLL` (and, with `--splits`, SPLITS).

    python benchmarks/probes/sweep_mlstm_step.py [--batch 1,32] [--chain 20] [--trials 20] [--layouts 64x8x32,16x32x8]
        [--splits 1,2,4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

import mad.kernels.mlstm_device as d
# benchmarks/common.py, one level up from benchmarks/probes/
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import timed

LAYOUTS = [(32, 32, 8), (32, 16, 16), (32, 8, 32), (32, 4, 64), (64, 8, 32), (64, 4, 64), (128, 4, 16), (128, 4, 64),
           (128, 2, 128), (16, 32, 8), (16, 16, 16), (8, 32, 8), (8, 64, 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=lambda v: [int(x) for x in v.split(",")], default=[1, 32])
    ap.add_argument("--chain", type=int, default=20)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--layouts", type=lambda v: [tuple(int(x) for x in t.split("x")) for t in v.split(",")],
                    default=LAYOUTS, help="TXxTYxUNROLL,... (default: all)")
    ap.add_argument("--splits", type=lambda v: [int(x) for x in v.split(",")], default=[1],
                    help="row splits per column tile, each timed with every layout (kernels.mlstm_device.SPLITS)")
    a = ap.parse_args()
    NH, DQK, DV = 8, 256, 512
    rng = np.random.default_rng(0)
    for B in a.batch:
        arr = lambda *shape, s=1.0: mx.array(rng.normal(0, s, shape).astype(np.float32))
        q, k, v = (arr(B, NH, 1, dim).astype(mx.bfloat16) for dim in (DQK, DQK, DV))
        i, f = arr(B, NH, 1), arr(B, NH, 1, s=2.0) + 3
        state0 = (arr(B, NH, DQK, DV), arr(B, NH, DQK), arr(B, NH))
        moved = 2 * B * NH * DQK * DV * 4

        def chain(q, k, v, i, f, C, n, m, splits):
            state = (C, n, m)
            for _ in range(a.chain):
                h, state = d.mlstm_step_device(q, k, v, i, f, state, splits=splits)
            return h, state[0]

        first = None
        for layout, splits in ((lay, s) for s in a.splits for lay in a.layouts):
            d.TX, d.TY, d.UNROLL = layout
            compiled = mx.compile(lambda *xs: chain(*xs, splits))   # as in the model: one graph, constants folded
            (h, C), times = timed(lambda: compiled(q, k, v, i, f, *state0), a.trials)
            us = statistics.median(times) / a.chain * 1e6
            first = (h, C) if first is None else first
            diff = max(float(mx.abs(h.astype(mx.float32) - first[0].astype(mx.float32)).max()),
                       float(mx.abs(C - first[1]).max()))
            print(f"batch {B:3d} TX {layout[0]:3d} TY {layout[1]:3d} UNROLL {layout[2]:3d} splits {splits}: {us:7.2f} us/step, "
                  f"{moved / us / 1e6:5.2f} TB/s, max diff {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
