"""The intra-chunk kernel (`mlstm_chunk_outputs`) at the xLSTM-7B head shapes (8 heads, q/k 256, v 512,
128 chunks of 64, bf16), built with launch bounds for 0 (the compiler's choice), 2, 3 and 4 blocks per
multiprocessor: median milliseconds of 15 launches each, and the largest difference to the first build
(the outputs must not change). Picks `kernels.mlstm_chunk_device.MIN_BLOCKS`.

    python benchmarks/probes/sweep_chunk_outputs.py
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

import mad.kernels.mlstm_chunk_device as d
# benchmarks/common.py, one level up from benchmarks/probes/
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import timed

B, NH, NC, L, DQK, DV = 1, 8, 128, 64, 256, 512


def main() -> None:
    rng = np.random.default_rng(0)
    q, k = (mx.array(rng.normal(0, .1, (B, NH, NC, L, DQK)).astype(np.float32)).astype(mx.bfloat16) for _ in range(2))
    v = mx.array(rng.normal(0, 1, (B, NH, NC, L, DV)).astype(np.float32)).astype(mx.bfloat16)
    b = mx.array(np.cumsum(-np.logaddexp(0, -rng.normal(3, 2, (B, NH, NC, L))), -1).astype(np.float32))
    ic = mx.array(rng.normal(0, 1, (B, NH, NC, L)).astype(np.float32))
    state = (mx.array(rng.normal(0, 1, (B, NH, NC, DQK, DV)).astype(np.float32)),
             mx.array(rng.normal(0, 1, (B, NH, NC, DQK)).astype(np.float32)),
             mx.array(rng.normal(0, 1, (B, NH, NC)).astype(np.float32)))
    first = None
    for min_blocks in (0, 2, 3, 4):
        d.MIN_BLOCKS = min_blocks
        h, times = timed(lambda: d.chunk_outputs_device(q, k, v, b, ic, state, 1e-6), 15)
        first = h if first is None else first
        print(min_blocks, f"{statistics.median(times) * 1e3:.3f} ms", float(mx.abs(h - first).max()))


if __name__ == "__main__":
    main()
