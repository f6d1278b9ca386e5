"""Does MAD's CPU BLAS slow PyTorch in the same process? NX-AI's xLSTM[7:1] prefill, before and after MLX
has run one product with the BLAS `import mad` picked (mad/blas.py), in one process.

    /tmp/ref/bin/python benchmarks/probe_mkl_torch.py                 # MKL (MAD_BLAS=auto)
    MAD_BLAS=mlx /tmp/ref/bin/python benchmarks/probe_mkl_torch.py    # MLX's own BLAS, for comparison

This is why bench_hf.py and bench_nxai.py time MAD in a process of its own (mad_worker.py).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch  # first, as in the comparison scripts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "reference"))
from make_nxai_fixtures import build_model, randomise_  # noqa: E402

import mad  # noqa: E402
import mlx.core as mx  # noqa: E402

from bench_nxai import CONFIG  # noqa: E402


def prefill_s(model, tokens, trials: int = 3) -> float:
    times = []
    with torch.no_grad():
        for _ in range(trials):
            t = time.perf_counter()
            model(tokens)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    model = build_model(dict(CONFIG, context_length=256)).eval()
    randomise_(model, seed=0, width_scale=(24 / 768) ** 0.5)
    tokens = torch.randint(0, CONFIG["vocab_size"], (1, 256))
    prefill_s(model, tokens, 1)  # warm-up
    print(f"CPU BLAS of MAD: {mad.blas.LOADED or 'bundled with MLX'}")
    print(f"NX-AI prefill of 256 tokens, before any MLX product: {prefill_s(model, tokens):.2f} s")
    a = mx.random.normal((1024, 1024))
    mx.eval(a @ a)
    time.sleep(0.5)
    print(f"NX-AI prefill of 256 tokens, after one MLX product:  {prefill_s(model, tokens):.2f} s")


if __name__ == "__main__":
    main()
