"""Time to the first token after a long system message, its state cached or not, at the server's generator
(no HTTP): what `bench_serve.py`'s chat rows measure, for machines without the `openai` client.

`BatchGenerator` with the server's prompt cache, its batch-invariance switch (`batch_invariant(32)` on a GPU,
as `mad serve`'s engine sets it) and a cut at the end of the system message. First token = from `insert`
to the first `step()` that returns a token. A warm-up request reads the cached system message once; then
`--rounds` rounds of a miss (a new system message + a question) and a hit (the warm system message + a new
question), the first round dropped; medians. With and without padded prompt calls (`pad_prompts`).

    python benchmarks/probes/ttft_cache.py [--topology topologies/xlstm-7b.yaml] [--set dims.L=4]
        [--system 4000] [--question 32] [--rounds 4] [--dtype bfloat16] [--device gpu|cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import mad  # noqa: F401  (before mlx.core: the CPU BLAS)
import mlx.core as mx

from mad.generate import BatchGenerator
from mad.prompt_cache import PromptCache


def first_token_s(gen: BatchGenerator, prompt: list[int], cut: int) -> float:
    start = time.perf_counter()
    gen.insert(prompt, max_tokens=1, cuts=(cut,))
    while not gen.step():
        pass
    seconds = time.perf_counter() - start
    while gen.busy:
        gen.step()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--topology", default="topologies/xlstm-7b.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--system", type=int, default=4000, help="tokens of the system message")
    ap.add_argument("--question", type=int, default=32, help="tokens of the question after it")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", choices=["cpu", "gpu"], default=None)
    a = ap.parse_args()
    if a.device:
        mx.set_default_device(mx.gpu if a.device == "gpu" else mx.cpu)
    if mx.default_device() == mx.gpu and mx.cuda.is_available():
        from mad.kernels.linear_device import batch_invariant

        batch_invariant(32)  # as the server's engine (mad/serve.py)
    model, _ = mad.load(a.topology, dtype=a.dtype, overrides=a.overrides)
    mx.eval(model.parameters())
    rng = np.random.default_rng(0)

    def ids(n: int) -> list[int]:
        return rng.integers(0, model.vocab_size, n).tolist()

    out = {"device": str(mx.default_device()), "system": a.system, "question": a.question}
    for pad in (True, False):
        gen = BatchGenerator(model, prompt_cache=PromptCache(8 << 30), max_batch=32, pad_prompts=pad)
        system = ids(a.system)
        first_token_s(gen, system + ids(a.question), a.system)
        miss, hit = [], []
        for _ in range(a.rounds):
            miss.append(first_token_s(gen, ids(a.system) + ids(a.question), a.system))
            hit.append(first_token_s(gen, system + ids(a.question), a.system))
        m, h = statistics.median(miss[1:] or miss), statistics.median(hit[1:] or hit)
        out[f"pad={pad}"] = {"miss_ms": round(m * 1e3, 1), "hit_ms": round(h * 1e3, 1), "ratio": round(m / h, 1)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
