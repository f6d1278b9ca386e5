"""Does queueing the next prompt segment before waiting for the last one speed up reading a long prompt?

`LanguageModel.prefill` queues each segment (`mx.async_eval`) and waits for the one before, so the host
builds segment k + 1 while the device runs segment k. Against it, the same segments each evaluated before
the next is built (the device idles while the host builds). Same model, same prompt, interleaved rounds:

    python benchmarks/probes/gpu_prefill_overlap.py [--prompt 65536] [--step 4096] [--rounds 3] [--set dims.L=8]

Prints tokens/s and peak memory of both per round, and the medians (xLSTM-7B shape, bf16 random weights, float32 state).
"""

from __future__ import annotations

import argparse
import statistics
import time

import mad  # noqa: I001 (before mlx.core: selects the CPU BLAS)
import mlx.core as mx


def waited(model, tokens: mx.array, step: int):
    """Each segment evaluated before the next is built."""
    state = None
    with mad.inference():
        for start in range(0, tokens.shape[1], step):
            logits, state = model(tokens[:, start:start + step], state, last_only=True, check_tokens=False)
            mx.eval(logits, state)
    return logits


def queued(model, tokens: mx.array, step: int):
    logits, state = model.prefill(tokens, step_size=step, check_tokens=False)
    mx.eval(logits, state)
    return logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--topology", default="topologies/xlstm-7b.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--prompt", type=int, default=65536)
    ap.add_argument("--step", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    if min(a.prompt, a.step, a.rounds) < 1:
        ap.error("--prompt, --step and --rounds must be positive")
    model, _ = mad.load(a.topology, dtype="bfloat16", overrides=a.overrides)
    tokens = mx.random.randint(0, model.vocab_size, (1, a.prompt)).astype(mx.int32)
    same = mx.abs(waited(model, tokens, a.step)[:, -1] - queued(model, tokens, a.step)).max().item()
    print(f"{a.topology} {a.overrides}, prompt {a.prompt} in segments of {a.step}, device {mx.default_device()}; "
          f"last logits' largest difference between the two: {same}")
    rates: dict[str, list[float]] = {"waited": [], "queued": []}
    for r in range(a.rounds):
        for name, fn in (("waited", waited), ("queued", queued)) if r % 2 == 0 else (("queued", queued),
                                                                                      ("waited", waited)):
            mx.reset_peak_memory()
            t = time.perf_counter()
            fn(model, tokens, a.step)
            rates[name].append(a.prompt / (time.perf_counter() - t))
            print(f"round {r + 1} {name}: {rates[name][-1]:,.0f} tokens/s, peak memory "
                  f"{mx.get_peak_memory() / 1e9:.2f} GB", flush=True)
    w, q = statistics.median(rates["waited"]), statistics.median(rates["queued"])
    print(f"median: waited {w:,.0f}, queued {q:,.0f} tokens/s ({q / w:.3f}x)")


if __name__ == "__main__":
    main()
