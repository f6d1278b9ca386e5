"""`mad bench`: prompt and generation throughput of any language-model topology or checkpoint.

Like `mlx_lm.benchmark`: random prompt tokens (batch B, P tokens), a warm-up run, then N trials, each
reporting prompt_tps (B * P / time to the first sampled token), generation_tps (B * G tokens over the
time of the G decode steps that follow) and peak_memory (GB). Generation is greedy and double-buffered
(the next step is queued before the current token is read), as in `mad.generate`. Without a
checkpoint the weights are random, so a 7B benchmark needs no download.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import mlx.core as mx

from . import blas
from .errors import MadError
from .generate import PREFILL_STEP, LanguageModel

KEYS = ("prompt_tps", "generation_tps", "peak_memory")


@dataclass
class Trial:
    prompt_tps: float
    generation_tps: float
    peak_memory: float  # GB


def _trial(model: LanguageModel, prompt: mx.array, generation_tokens: int, prefill_step: int) -> Trial:
    mx.reset_peak_memory()
    batch, prompt_tokens = prompt.shape
    start = time.perf_counter()
    logits, state = model.prefill(prompt, step_size=prefill_step, check_tokens=False)  # random ids in range
    token = mx.argmax(logits, axis=-1)
    mx.eval(token, state)
    prompt_time = time.perf_counter() - start

    start = time.perf_counter()
    for _ in range(generation_tokens):
        logits, state = model(token[:, None], state, check_tokens=False)  # no sync between steps
        token = mx.argmax(logits[:, -1], axis=-1)
        mx.async_eval(token, state)
    mx.eval(token, state)
    generation_time = time.perf_counter() - start
    return Trial(batch * prompt_tokens / prompt_time,
                 batch * generation_tokens / generation_time if generation_tokens else 0.0,
                 mx.get_peak_memory() / 1e9)


def bench(model: LanguageModel, prompt_tokens: int = 512, generation_tokens: int = 128, batch: int = 1,
          trials: int = 5, prefill_step: int = PREFILL_STEP, seed: int = 0, echo=print) -> dict:
    """Run the benchmark; `echo` receives the mlx_lm-style lines. Returns the figures as a dict."""
    for name, value, least in (("prompt_tokens", prompt_tokens, 1), ("generation_tokens", generation_tokens, 0),
                               ("batch", batch, 1), ("trials", trials, 1), ("prefill_step", prefill_step, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise MadError(f"{name} must be an integer >= {least}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise MadError(f"seed must be an integer in 0..2**64-1, got {seed!r}")
    mx.random.seed(seed)
    prompt = mx.random.randint(0, model.vocab_size, (batch, prompt_tokens)).astype(mx.int32)
    echo("Running warmup..")
    _trial(model, prompt, min(generation_tokens, 8), prefill_step)
    echo(f"Timing with prompt_tokens={prompt_tokens}, generation_tokens={generation_tokens}, batch_size={batch}.")
    results = []
    for i in range(trials):
        r = _trial(model, prompt, generation_tokens, prefill_step)
        results.append(r)
        echo(f"Trial {i + 1}:  " + ", ".join(f"{k}={getattr(r, k):.3f}" for k in KEYS))
    mean = {k: statistics.fmean(getattr(r, k) for r in results) for k in KEYS}
    median = {k: statistics.median(getattr(r, k) for r in results) for k in KEYS}
    echo("Averages: " + ", ".join(f"{k}={mean[k]:.3f}" for k in KEYS))
    echo("Medians:  " + ", ".join(f"{k}={median[k]:.3f}" for k in KEYS))
    return {"prompt_tokens": prompt_tokens, "generation_tokens": generation_tokens, "batch_size": batch,
            "prefill_step": prefill_step,
            "trials": [asdict(r) for r in results], "averages": mean, "medians": median,
            "mlx": mx.__version__, "device": str(mx.default_device()), "cpu_blas": blas.LOADED}
