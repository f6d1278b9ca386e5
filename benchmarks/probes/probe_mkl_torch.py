"""Does MAD's CPU BLAS slow PyTorch in the same process? NX-AI's xLSTM[7:1] prefill, before and after MLX
has run one product with the BLAS `import mad` picked (backends/cpu.py), in one process.

    /tmp/ref/bin/python benchmarks/probes/probe_mkl_torch.py                 # MKL (MAD_BLAS=auto)
    MAD_BLAS=mlx /tmp/ref/bin/python benchmarks/probes/probe_mkl_torch.py    # MLX's own BLAS, for comparison
    python benchmarks/probes/probe_mkl_torch.py --quick    # bench_nxai's --quick model, 16 tokens: a smoke run (CI)

This is why bench_hf.py and bench_nxai.py time MAD in a process of its own (mad_worker.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch  # first, as in the comparison scripts

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "reference"))
# benchmarks/ (bench_nxai.py, and the common.py it imports), one level up from benchmarks/probes/
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from make_nxai_fixtures import build_model, randomise_  # noqa: E402

import mad  # noqa: E402
import mlx.core as mx  # noqa: E402

from bench_nxai import CONFIG, QUICK_CONFIG  # noqa: E402


def prefill_s(model, tokens, trials: int = 3) -> float:
    times = []
    with torch.no_grad():
        for _ in range(trials):
            t = time.perf_counter()
            model(tokens)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run, timings meaningless: bench_nxai's --quick "
                                                         "model, 16 tokens, one trial, a 128 x 128 product")
    quick = ap.parse_args().quick
    config, n, trials, size = (QUICK_CONFIG, 16, 1, 128) if quick else (CONFIG, 256, 3, 1024)
    torch.manual_seed(0)
    model = build_model(dict(config, context_length=n)).eval()
    randomise_(model, seed=0, width_scale=(24 / config["embedding_dim"]) ** 0.5)
    tokens = torch.randint(0, config["vocab_size"], (1, n))
    prefill_s(model, tokens, 1)  # warm-up
    print(f"CPU BLAS of MAD: {mad.backends.cpu.BLAS or 'bundled with MLX'}")
    print(f"NX-AI prefill of {n} tokens, before any MLX product: {prefill_s(model, tokens, trials):.2f} s")
    a = mx.random.normal((size, size))
    mx.eval(a @ a)
    time.sleep(0 if quick else 0.5)
    print(f"NX-AI prefill of {n} tokens, after one MLX product:  {prefill_s(model, tokens, trials):.2f} s")


if __name__ == "__main__":
    main()
