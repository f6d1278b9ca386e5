"""The two chunk kernels at the xLSTM-7B head shapes (8 heads, q/k 256, v 512, 8,192 tokens, bf16) for
chunk lengths 64 and 128, the states kernel with C tiles 64 or 32 columns wide
(`kernels.mlstm_chunk_device.STATES_CT`): median milliseconds of 15 launches each, and, per chunk
length, the largest difference of the states to the first tile width (the tile must not change them).
Picks `STATES_CT` and shows what the chunk length costs each kernel.

    python benchmarks/probes/sweep_chunk_states.py [--tokens 8192] [--widths 64,32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

import mad.kernels.mlstm_chunk_device as d
# benchmarks/common.py, one level up from benchmarks/probes/
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import timed

B, NH, DQK, DV = 1, 8, 256, 512


def inputs(T: int, L: int, rng: np.random.Generator):
    NC = T // L
    q, k = (mx.array(rng.normal(0, .1, (B, NH, NC, L, DQK)).astype(np.float32)).astype(mx.bfloat16) for _ in range(2))
    v = mx.array(rng.normal(0, 1, (B, NH, NC, L, DV)).astype(np.float32)).astype(mx.bfloat16)
    b = mx.array(np.cumsum(-np.logaddexp(0, -rng.normal(3, 2, (B, NH, NC, L))), -1).astype(np.float32))
    ic = mx.array(rng.normal(0, 1, (B, NH, NC, L)).astype(np.float32))
    state = (mx.zeros((B, NH, DQK, DV)), mx.zeros((B, NH, DQK)), mx.zeros((B, NH)))
    return q, k, v, b, ic, state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--widths", default="64,32", help="STATES_CT values to try")
    args = ap.parse_args()
    if args.tokens < 128 or args.tokens % 128:
        ap.error(f"--tokens {args.tokens}: a positive multiple of 128 (whole chunks of 64 and 128)")
    widths = args.widths.split(",")
    if any(w not in ("32", "64") for w in widths):
        ap.error(f"--widths {args.widths!r}: a comma-separated list of 32 and 64 (the widths the kernel takes)")
    rng = np.random.default_rng(0)
    for L in (64, 128):
        q, k, v, b, ic, state = inputs(args.tokens, L, rng)
        first = None
        for ct in map(int, widths):
            d.STATES_CT = ct
            (entering, _), times = timed(lambda: d.chunk_states_device(k, v, b, ic, state, mx.bfloat16), 15)
            C = entering[0].astype(mx.float32)
            first = C if first is None else first
            diff = float(mx.abs(C - first).max())
            print(f"chunk {L}: states, C tiles 64 x {ct}: {statistics.median(times) * 1e3:.3f} ms "
                  f"(max difference to the first width {diff:.1e})", flush=True)
        h, times = timed(lambda: d.chunk_outputs_device(q, k, v, b, ic, entering, 1e-6, mx.bfloat16), 15)
        print(f"chunk {L}: outputs: {statistics.median(times) * 1e3:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
