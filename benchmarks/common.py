"""What the benchmark scripts share: interleaved trials, throughput figures and the JSON output."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable


def interleave(fns: dict[str, Callable[[], float]], trials: int) -> dict[str, list[float]]:
    """Run each function `trials` times, alternating which goes first (ABBA...).

    Each function returns the seconds it measured itself (so it can leave set-up out of the clock).
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for t in range(trials):
        for name in (names if t % 2 == 0 else names[::-1]):
            times[name].append(fns[name]())
    return times


def throughput(times: list[float], tokens: int) -> dict:
    """Figures of `tokens` tokens timed `len(times)` times (seconds): median, tokens/s, ms/token."""
    med = statistics.median(times)
    return {"median_s": med, "tokens_per_s": tokens / med, "ms_per_token": med / tokens * 1e3,
            "trials": len(times), "tokens_per_trial": tokens, "times_s": times}


def timed(fn: Callable, trials: int) -> tuple[object, list[float]]:
    """MLX work timed on the device: `fn()` once untimed (warm-up: traces and compiles), then `trials`
    times, each evaluated and clocked from a synchronised start. Returns the last result and the seconds."""
    import mlx.core as mx

    out = fn()
    mx.eval(out)
    times = []
    for _ in range(trials):
        mx.synchronize()
        t = time.perf_counter()
        out = fn()
        mx.eval(out)
        times.append(time.perf_counter() - t)
    return out, times


def write_json(results: dict, dest: str | None) -> None:
    """`--json -` prints the results; `--json PATH` writes them; no `--json`, nothing."""
    if not dest:
        return
    text = json.dumps(results, indent=2)
    if dest == "-":
        print(text)
    else:
        Path(dest).write_text(text + "\n")
