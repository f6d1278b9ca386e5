"""Long prompts on the xLSTM-7B shape (issue figures for the GPU).

1. bf16 weights: read a `--tokens`-long random prompt (batch 1) in segments of `--step` tokens;
   report time, tokens/s and peak memory, and check that logits and the whole state are finite.
2. float32 weights (full float32 products: MLX_ENABLE_TF32=0): the state after a chunkwise prefill of
   `--prefix` tokens against the state after stepping the same tokens one at a time, and the last
   logits of both; ||a - b|| / ||b|| per state array, the largest over the layers and C layer by layer
   (in block order: whether a difference starts in the first layer or grows through the stack).

    MLX_ENABLE_TF32=0 python benchmarks/gpu_long_context.py [--tokens 65536] [--prefix 257] [--set dims.L=4]
                                                            [--skip-long] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

import mad  # noqa: E402


def rel(a: mx.array, b: mx.array) -> float:
    a, b = np.array(a.astype(mx.float32), dtype=np.float64), np.array(b.astype(mx.float32), dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def finite(tree) -> bool:
    arrays = [tree] if isinstance(tree, mx.array) else [a for n in tree.values() for a in n.values()]
    return all(bool(mx.all(mx.isfinite(a)).item()) for a in arrays)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--topology", default="topologies/xlstm-7b.yaml")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--step", type=int, default=4096)
    ap.add_argument("--prefix", type=int, default=257)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="topology override, as in mad")
    ap.add_argument("--skip-long", action="store_true", help="only the prefill-against-steps check")
    ap.add_argument("--json")
    args = ap.parse_args()
    out: dict = {}
    prompt = mx.random.randint(0, 50000, (1, args.tokens)).astype(mx.int32)
    if not args.skip_long:
        out["long"] = long_prompt(args, prompt)
    model, _ = mad.load(args.topology, dtype="float32", overrides=args.overrides)
    tokens = prompt[:, :args.prefix] % model.vocab_size
    logits_p, state_p = model(tokens)
    mx.eval(logits_p, state_p)
    state_s, logits_s = None, None
    for t in range(args.prefix):
        logits_s, state_s = model(tokens[:, t:t + 1], state_s, check_tokens=False)
        mx.eval(state_s)
    worst = {name: max(rel(state_p[n][name], state_s[n][name]) for n in state_p) for name in ("C", "n", "m")}
    out["prefill_vs_steps"] = {"prefix": args.prefix, "overrides": args.overrides, "state_rel_max": worst,
                               "C_rel_by_layer": [rel(state_p[n]["C"], state_s[n]["C"]) for n in state_p],
                               "last_logits_rel": rel(logits_p[:, -1], logits_s[:, -1])}
    print(json.dumps(out["prefill_vs_steps"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


def long_prompt(args, prompt: mx.array) -> dict:
    """Part 1: the long bf16 prefill in segments; time, peak memory, finiteness."""
    model, _ = mad.load(args.topology, dtype="bfloat16", overrides=args.overrides)
    prompt = prompt % model.vocab_size
    model.prefill(prompt[:, :args.step], step_size=args.step)  # warm-up: traces and compiles
    mx.eval(prompt)
    mx.reset_peak_memory()
    start = time.perf_counter()
    logits, state = model.prefill(prompt, step_size=args.step, check_tokens=False)
    mx.eval(logits, state)
    seconds = time.perf_counter() - start
    result = {"tokens": args.tokens, "seconds": seconds, "tokens_per_s": args.tokens / seconds,
              "peak_memory_GB": mx.get_peak_memory() / 1e9, "finite": finite(logits) and finite(state)}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
