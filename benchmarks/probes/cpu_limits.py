"""What bounds the original xLSTM stack on the CPU against NX-AI's PyTorch model (issue: CPU prompt and sLSTM step)?

Prints, on this machine (MLX's CPU, one process, medians):
  transcendentals  ns per element of MLX's exp, log1p, sigmoid, tanh, logaddexp(0, x) and maximum over 1M
                   float32 values, alone and inside a compiled function (with one add)
  slstm            an sLSTM step of the 125M shape (4 heads of 192, batch 1): the R y product alone (a loop
                   of products with a tanh), the step's elementwise part alone (the compiled cell), the
                   whole `slstm_sequence` and the native loop (kernels/slstm_native.py, 1 thread and all)
  mlstm            the mLSTM cell of the 125M stack (4 heads of 384, 256 tokens): chunkwise (chunk 64) and
                   the parallel form
  prompt           a 256-token prompt of `topologies/xlstm-v1-125m.yaml`, milliseconds per node type
                   (`Program.profile_block_types`: each node compiled and timed alone)
  torch            PyTorch's bmm + tanh loop at the sLSTM shape (its threads, and one thread) and NX-AI's
                   parallel mLSTM cell (needs torch and xlstm), after everything else (`torch_side` says why)

    python benchmarks/probes/cpu_limits.py [--only transcendentals,slstm,mlstm,prompt,torch] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import mad  # before mlx.core: selects the CPU BLAS, see backends/cpu.py
import mlx.core as mx
import numpy as np

from mad.kernels.mlstm import mlstm_sequence
from mad.kernels.slstm import _cell_compiled as slstm_cell, slstm_sequence

ROOT = Path(__file__).resolve().parents[2]


def median_s(fn, repeats: int) -> float:
    """Median seconds of `fn()` (which evaluates what it computes) after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def transcendentals(n: int, repeats: int) -> dict:
    x = mx.array(np.random.default_rng(0).normal(0, 1, (n,)).astype(np.float32))
    mx.eval(x)
    ops = {"exp": mx.exp, "log1p": lambda v: mx.log1p(mx.abs(v)), "sigmoid": mx.sigmoid, "tanh": mx.tanh,
           "logaddexp": lambda v: mx.logaddexp(0.0, v), "maximum": lambda v: mx.maximum(v, 0.3)}
    out = {}
    for name, op in ops.items():
        fused = mx.compile(lambda v, op=op: op(v) + 1.0)
        out[name] = {"alone_ns": 1e9 * median_s(lambda: mx.eval(op(x)), repeats) / n,
                     "compiled_with_an_add_ns": 1e9 * median_s(lambda: mx.eval(fused(x)), repeats) / n}
    return out


def slstm(steps: int, repeats: int) -> dict:
    NH, DH = 4, 192
    rng = np.random.default_rng(0)
    Rt = mx.array(rng.normal(0, 0.05, (NH, DH, 4 * DH)).astype(np.float32))
    y0 = mx.array(rng.normal(0, 1, (1, NH, 1, DH)).astype(np.float32))
    gates = [mx.array(rng.normal(0, 1, (1, NH, steps, DH)).astype(np.float32)) for _ in range(4)]
    R = mx.array(rng.normal(0, 0.05, (NH, 4 * DH, DH)).astype(np.float32))
    b = mx.array(rng.normal(0, 1, (4 * NH * DH,)).astype(np.float32))
    mx.eval(Rt, y0, R, b, *gates)

    def product_loop(y):
        for _ in range(steps):
            y = mx.tanh((y @ Rt)[..., :DH])
        return y

    def cell_loop(y):                                          # the step's elementwise part, no product
        c, n, m = y, mx.abs(y) + 1.0, y
        for t in range(steps):
            wx = [g[:, :, t:t + 1, :].transpose(2, 1, 0, 3) for g in gates]
            y, c, n, m = slstm_cell(*wx, y, y, y, y, *bias, c, n, m)
        return y

    bias = [b.reshape(4, NH, 1, DH)[g:g + 1] for g in range(4)]
    loop, cells = mx.compile(product_loop), mx.compile(cell_loop)
    return {"product_and_tanh_us": 1e6 * median_s(lambda: mx.eval(loop(y0)), repeats) / steps,
            "cell_us": 1e6 * median_s(lambda: mx.eval(cells(y0)), repeats) / steps,
            "slstm_sequence_us": 1e6 * median_s(lambda: mx.eval(slstm_sequence(*gates, R, b)), repeats) / steps,
            **native_slstm(gates, R, b, steps, repeats)}


def native_slstm(gates, R, b, steps: int, repeats: int) -> dict:
    """The native loop (kernels/slstm_native.py) on the same inputs, on one thread and on its default threads,
    or why it is not available."""
    from mad.kernels import native
    from mad.kernels.slstm_native import slstm_sequence_native

    if native.load() is None:
        return {"native_unavailable": native.reason()}
    out = {}
    for label, threads in (("native_1_thread_us", "1"), (f"native_{native.threads()}_threads_us", None)):
        saved = os.environ.pop(native.THREADS_ENV, None)
        if threads:
            os.environ[native.THREADS_ENV] = threads
        try:
            out[label] = 1e6 * median_s(lambda: mx.eval(slstm_sequence_native(*gates, R, b)), repeats) / steps
        finally:
            os.environ.pop(native.THREADS_ENV, None)
            if saved is not None:
                os.environ[native.THREADS_ENV] = saved
    return out


def mlstm(tokens: int, repeats: int) -> dict:
    NH, D = 4, 384
    rng = np.random.default_rng(0)
    q, k, v = (mx.array(rng.normal(0, 1, (1, NH, tokens, D)).astype(np.float32)) for _ in range(3))
    i, f = (mx.array(rng.normal(0, 1, (1, NH, tokens)).astype(np.float32)) for _ in range(2))
    out = {}
    for mode in ("chunkwise", "parallel"):
        fn = mx.compile(lambda mode=mode: mlstm_sequence(q, k, v, i, f, chunk_size=64, mode=mode, scale="k"))
        out[f"{mode}_ms"] = 1e3 * median_s(lambda: mx.eval(fn()), repeats)
    return out


def torch_side(steps: int, tokens: int, repeats: int) -> dict:
    """PyTorch's counterparts, last: once PyTorch's threads have run in the process, MLX's CPU work here
    slows (benchmarks/probes/probe_mkl_torch.py shows the reverse), so every MLX figure is taken first."""
    if not (importlib.util.find_spec("torch") and importlib.util.find_spec("xlstm")):
        return {"skipped": "needs torch and xlstm"}
    import torch
    from xlstm.blocks.mlstm.backends import parallel_stabilized_simple

    rng = np.random.default_rng(0)
    Rt = torch.from_numpy(rng.normal(0, 0.05, (4, 192, 4 * 192)).astype(np.float32))
    y0 = torch.from_numpy(rng.normal(0, 1, (4, 1, 192)).astype(np.float32))
    q, k, v = (torch.from_numpy(rng.normal(0, 1, (1, 4, tokens, 384)).astype(np.float32)) for _ in range(3))
    i, f = (torch.from_numpy(rng.normal(0, 1, (1, 4, tokens, 1)).astype(np.float32)) for _ in range(2))

    def product_loop():
        with torch.no_grad():
            y = y0
            for _ in range(steps):
                y = torch.tanh(torch.bmm(y, Rt)[..., :192])

    def cell():
        with torch.no_grad():
            parallel_stabilized_simple(q, k, v, i, f)

    threads = torch.get_num_threads()
    out = {"threads": threads, "slstm_bmm_and_tanh_us": 1e6 * median_s(product_loop, repeats) / steps}
    torch.set_num_threads(1)  # the heads one after another on one core, as MLX's batched product runs them
    out["slstm_bmm_and_tanh_1_thread_us"] = 1e6 * median_s(product_loop, repeats) / steps
    torch.set_num_threads(threads)
    out["nxai_mlstm_parallel_ms"] = 1e3 * median_s(cell, repeats)
    return out


def prompt(tokens: int, repeats: int, quick: bool) -> dict:
    topology = ROOT / "topologies" / ("xlstm-v1-tiny.yaml" if quick else "xlstm-v1-125m.yaml")
    model, _ = mad.load(topology)
    ids = mx.array(np.random.default_rng(0).integers(0, model.vocab_size, (1, tokens)), mx.int32)
    types = model.program.profile_block_types(ids, repeats=repeats)
    return {"topology": topology.name, "tokens": tokens,
            "ms": {k: round(1e3 * v["seconds"], 2) for k, v in sorted(types.items(), key=lambda kv: -kv[1]["seconds"])}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="transcendentals,slstm,mlstm,prompt,torch")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke run (CI)")
    a = ap.parse_args()
    repeats = 1 if a.quick else 7
    parts = {"transcendentals": lambda: transcendentals(1 << (12 if a.quick else 20), repeats),
             "slstm": lambda: slstm(8 if a.quick else 256, repeats),
             "mlstm": lambda: mlstm(64 if a.quick else 256, repeats),
             "prompt": lambda: prompt(16 if a.quick else 256, 1 if a.quick else 3, a.quick),
             "torch": lambda: torch_side(8 if a.quick else 256, 64 if a.quick else 256, repeats)}
    unknown = [name for name in a.only.split(",") if name not in parts]
    if unknown:
        ap.error(f"--only: unknown part {unknown[0]!r}; the parts are {', '.join(parts)}")
    out = {"mlx": mx.__version__, "blas": mad.backends.cpu.BLAS}
    for name in a.only.split(","):
        out[name] = parts[name]()
        print(json.dumps({name: out[name]}), flush=True)


if __name__ == "__main__":
    main()
