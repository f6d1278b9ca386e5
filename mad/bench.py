"""`mad bench`: prompt and generation throughput of any language-model topology or checkpoint.

Like `mlx_lm.benchmark`: random prompt tokens (batch B, P tokens), a warm-up run, then N trials, each
reporting prompt_tps (B * P / time to the first sampled token), generation_tps (B * G tokens over the
time of the G decode steps that follow) and peak_memory (GB). Generation is greedy and double-buffered
(the next step is queued before the current token is read), as in `mad.generate`. Without a
checkpoint the weights are random, so a 7B benchmark needs no download.

`limits` (`mad bench --limits`) measures the device's copy rate and matrix-product rate in the same run
and prints each figure as a fraction of its limit: a decode step must read every weight (the embedding's
one row aside) and read and write each sequence's state, so its floor is those bytes over the copy rate; a
prompt token costs two FLOPs per weight of the products, so prompt reading is capped by the product rate.

`profile` (`mad bench --profile`) adds where a prompt's time goes: each stage compiled and timed on its
own (`Program.profile`), and those times summed per block type, beside each stage's parameters and
state bytes, so that a slow stage can be told from a large one.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import mlx.core as mx

from .backends import cpu
from .errors import MadError
from .kernels import native
from .kernels.registry import inference
from .model import PREFILL_STEP, LanguageModel

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
    with inference():  # kernels run bare, as in generation (kernels/registry.py)
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
            "mlx": mx.__version__, "device": str(mx.default_device()), "cpu_blas": cpu.BLAS,
            "cpu_native": native.status()}


def _best_seconds(fn, repeats: int) -> float:
    """The fastest of `repeats` timed runs of `fn` (evaluated), after one untimed run."""
    mx.eval(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - start)
    return best


def device_limits(dtype: mx.Dtype, repeats: int | None = None) -> dict:
    """The copy rate (bytes read + written per second: a compiled `a + 1` over a large float32 array) and the
    matrix-product rate (FLOP/s of an n x n x n product in `dtype`) of the default device, measured now: the
    best of `repeats` runs (default 20 on a GPU, whose clocks take a few runs to rise, 3 on a CPU)."""
    gpu = mx.default_device() == mx.gpu
    repeats = repeats or (20 if gpu else 3)
    copy_elems = (1 << 28) if gpu else (1 << 24)  # 1 GiB on a GPU, 64 MiB on a CPU: past every cache
    a = mx.zeros((copy_elems,), mx.float32)
    add = mx.compile(lambda x: x + 1)
    copy_s = _best_seconds(lambda: add(a), repeats)
    del a
    n = 8192 if gpu else 1024
    x = mx.random.normal((n, n)).astype(dtype)
    y = mx.random.normal((n, n)).astype(dtype)
    mm_s = _best_seconds(lambda: x @ y, repeats)
    return {"copy_bytes_per_s": 2 * 4 * copy_elems / copy_s, "matmul_flops_per_s": 2 * n ** 3 / mm_s,
            "matmul_size": n, "matmul_dtype": str(dtype).split(".")[-1]}


def step_costs(model: LanguageModel) -> dict:
    """What the limits are measured against: the weight bytes a decode step reads (all but the embeddings'
    rows, unless a head reads an embedding's whole matrix), the state bytes per sequence, and the FLOPs of
    the matrix products per prompt token (2 per weight outside the embeddings)."""
    from mlx.utils import tree_flatten

    graph = model.program.graph
    g = graph.g
    tied = {getattr(g.nodes[n]["spec"], "tie", None) for n in graph.blocks()}
    lookup = {n for n in graph.blocks() if g.nodes[n].get("block_type") == "embedding" and n not in tied}
    weight_bytes = lookup_params = 0
    for name, p in tree_flatten(model.program.root.parameters()):
        if name.split(".")[0] in lookup or any(name.startswith(n + ".") for n in lookup):
            lookup_params += p.size
        else:
            weight_bytes += p.nbytes
    return {"weight_bytes": weight_bytes, "state_bytes": graph.state_bytes(),
            "flops_per_token": 2 * (graph.param_count() - lookup_params)}


def limit_fractions(result: dict, limits: dict, costs: dict) -> dict:
    """Each median figure of a `bench` result as a fraction of the device limit it is bound by."""
    med, batch = result["medians"], result["batch_size"]
    out = {}
    if med["generation_tps"] > 0:  # a step reads the weights once and each sequence's state in and out
        step_bytes = costs["weight_bytes"] + 2 * batch * costs["state_bytes"]
        out["decode_bytes_per_step"] = step_bytes
        out["decode_fraction"] = step_bytes * med["generation_tps"] / batch / limits["copy_bytes_per_s"]
    out["prefill_fraction"] = med["prompt_tps"] * costs["flops_per_token"] / limits["matmul_flops_per_s"]
    return out


def profile(model: LanguageModel, prompt_tokens: int = 512, batch: int = 1, repeats: int = 3, seed: int = 0) -> dict:
    """Seconds per stage and per block type for a random prompt of `prompt_tokens` tokens (batch `batch`).

    Returns {"prompt_tokens", "batch_size", "repeats", "stages": [{stage, nodes, block_types, seconds, params,
    state_bytes}], "block_types": {type: {nodes, seconds, params, state_bytes}}, "seconds"}. A block type's
    seconds are its stages' seconds shared by node count (`mad.program.block_type_totals`): exact where a
    stage holds one type. Stage times are each stage run alone, so their sum exceeds the program's time.
    """
    from .program import block_type_totals

    for name, value, least in (("prompt_tokens", prompt_tokens, 1), ("batch", batch, 1), ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise MadError(f"{name} must be an integer >= {least}, got {value!r}")
    graph = model.program.graph
    mx.random.seed(seed)
    prompt = mx.random.randint(0, model.vocab_size, (batch, prompt_tokens)).astype(mx.int32)
    stages = model.program.profile({model.input_name: prompt}, repeats=repeats)
    for entry in stages:
        entry["params"] = sum(graph.param_count(n) for n in entry["nodes"])
        entry["state_bytes"] = sum(graph.state_bytes(n) for n in entry["nodes"])
    types = block_type_totals(stages)
    for kind, total in types.items():
        nodes = [n for n in graph.blocks() if graph.g.nodes[n].get("block_type") == kind]
        total["params"] = sum(graph.param_count(n) for n in nodes)
        total["state_bytes"] = sum(graph.state_bytes(n) for n in nodes)
    return {"prompt_tokens": prompt_tokens, "batch_size": batch, "repeats": repeats, "stages": stages,
            "block_types": types, "seconds": sum(e["seconds"] for e in stages)}


def size_text(n: int) -> str:
    """Bytes as B / KB / MB / GB (decimal, as the peak-memory figures)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def profile_tables(result: dict) -> list[Any]:
    """The rich tables of a `profile` result: one row per stage, then one per block type."""
    from rich.table import Table

    total = result["seconds"] or 1e-12
    title = (f"Time per stage: prompt of {result['prompt_tokens']} tokens, batch {result['batch_size']} "
             f"(each stage compiled and run alone, median of {result['repeats']})")
    stages = Table(title=title, title_justify="left")
    for col, justify in (("stage", "left"), ("block types", "left"), ("params", "right"),
                         ("state / seq", "right"), ("ms", "right"), ("%", "right")):
        stages.add_column(col, justify=justify)
    for e in result["stages"]:
        kinds = ", ".join(f"{k} x{c}" if c > 1 else k for k, c in e["block_types"].items())
        stages.add_row(e["stage"], kinds, f"{e['params']:,}", size_text(e["state_bytes"]) if e["state_bytes"] else "",
                       f"{e['seconds'] * 1e3:.3f}", f"{100 * e['seconds'] / total:.1f}")
    state = sum(e["state_bytes"] for e in result["stages"])
    stages.add_row("total", "", f"{sum(e['params'] for e in result['stages']):,}", size_text(state) if state else "",
                   f"{total * 1e3:.3f}", "100.0", style="bold")
    types = Table(title="Time per block type (sum over stages; a mixed stage's time shared by node count)",
                  title_justify="left")
    for col, justify in (("block type", "left"), ("nodes", "right"), ("params", "right"),
                         ("state / seq", "right"), ("ms", "right"), ("%", "right")):
        types.add_column(col, justify=justify)
    for kind, t in result["block_types"].items():
        types.add_row(kind, str(t["nodes"]), f"{t['params']:,}", size_text(t["state_bytes"]) if t["state_bytes"] else "",
                      f"{t['seconds'] * 1e3:.3f}", f"{100 * t['seconds'] / total:.1f}")
    return [stages, types]
