"""Where does a GPU decode step of the xLSTM-7B shape spend its time? Variant timings, and a range for a profiler.

Prints one table (milliseconds per decode step, batch B, bf16 weights, float32 state):
  mad            the MAD-built model, a compiled step, evaluated every step
  mad-async      the same, double-buffered as in `mad bench` (the next step queued before reading)
  mad-call       host time of one call alone (graph replay, no evaluation)
  mad-eval       `mx.eval` of a step whose graph was built beforehand (host dispatch + device, no build)
  matmuls        only the weight matmuls of the 7B step (same shapes, same count), compiled: the
                 bandwidth floor plus launch gaps, without anything else
  bytes-floor    weight bytes (+ float32 state read and written) / measured copy bandwidth
Each figure is the median of `--steps` steps after a warm-up. Run it on the GPU machine:

    python benchmarks/probes/gpu_decode_probe.py [--batch 1] [--steps 50] [--set dims.L=16] [--kernels auto]
        [--compare-fuse | --compare-fold | --compare-inference | --compare-tensor-cores
         | --compare-setting MODULE.NAME=V1,V2 | --profile-steps N] [--bits 4]
        # --bits: quantized as bench_quant.py does (no matmuls row)
`--profile-steps N` runs N double-buffered steps between cuProfilerStart and cuProfilerStop, for
`nsys profile --capture-range=cudaProfilerApi --trace=cuda,nvtx`: the kernels' time a step against the wall
time it prints, and MLX's host time per primitive (its NVTX ranges), for exactly those N steps.
Decode steps run inside `mad.inference()` (as generation does); `--compare-inference` times them inside and
outside it (kernels bare or wrapped for gradients), interleaved on one model.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

import mad
from mad.kernels.registry import set_policy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py, one level up
from common import kernel_setting  # noqa: E402


def median_ms(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def decode_ms(model, token: mx.array, state: dict, n: int) -> float:
    """ms per step of n greedy steps, double-buffered as in `mad bench` (next step queued first)."""
    start = time.perf_counter()
    for _ in range(n):
        logits, state = model(token, state, check_tokens=False)
        token = mx.argmax(logits[:, -1:], axis=-1).astype(mx.int32)
        mx.async_eval(token, state)
    mx.eval(token, state)
    return 1e3 * (time.perf_counter() - start) / n


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    x = mx.random.normal((nbytes // 4,))
    mx.eval(x)
    fn = mx.compile(lambda a: a + 1.0)
    mx.eval(fn(x))
    ms = median_ms(lambda: mx.eval(fn(x)), 10)
    return 2 * nbytes / (ms / 1e3)


def load_model(args):
    """The model of --topology and --set, bf16, quantized as --bits says (affine, group 64; each weight
    evaluated in turn, so that the float originals are freed as they go)."""
    model, _ = mad.load(args.topology, dtype="bfloat16", overrides=args.overrides)
    if args.bits:
        from mad.quantize import quantize_model
        quantize_model(model, bits=args.bits, group_size=64)
        for w in model.program.parameters().values():
            mx.eval(w)
        mx.clear_cache()
    return model


def compare_inference(args) -> None:
    """Decode ms/step inside and outside `mad.inference()`, same model, 5 interleaved rounds."""
    import contextlib

    model = load_model(args)
    B = args.batch
    _, state = model(mx.random.randint(0, 1000, (B, 16)).astype(mx.int32))
    token = mx.random.randint(0, 1000, (B, 1)).astype(mx.int32)
    modes = {"inference": mad.inference, "gradients": contextlib.nullcontext}
    times = {k: [] for k in modes}
    for k, ctx in modes.items():
        with ctx():
            decode_ms(model, token, state, 5)
    for _ in range(5):
        for k, ctx in modes.items():
            with ctx():
                times[k].append(decode_ms(model, token, state, args.steps))
    print(json.dumps({"batch": B, "bits": args.bits, **{f"{k}_ms": statistics.median(v) for k, v in times.items()},
                      **{f"{k}_tps": 1e3 * B / statistics.median(v) for k, v in times.items()}}, indent=1))


def profile(args) -> None:
    """N double-buffered decode steps between the CUDA driver's cuProfilerStart and cuProfilerStop (after
    a warm-up), so that a profiler that captures that range sees those steps only; prints ms a step."""
    import ctypes

    cuda = ctypes.CDLL("libcuda.so.1")
    model = load_model(args)
    B = args.batch
    _, state = model(mx.random.randint(0, model.vocab_size, (B, 16)).astype(mx.int32))
    token = mx.random.randint(0, model.vocab_size, (B, 1)).astype(mx.int32)
    decode_ms(model, token, state, 10)
    mx.synchronize()
    cuda.cuProfilerStart()
    ms = decode_ms(model, token, state, args.profile_steps)
    mx.synchronize()
    cuda.cuProfilerStop()
    print(json.dumps({"batch": B, "bits": args.bits, "steps": args.profile_steps, "ms_per_step": ms,
                      "tokens_per_s": 1e3 * B / ms}, indent=1))


def compare_tensor_cores(args) -> None:
    """Decode ms/step of a quantized model with its 4-bit products on the tensor-core kernel
    (kernels/qlinear_mma.py) for all of them, for the long ones only, and for none (the per-value kernel;
    `qlinear_device.TENSOR_CORES`, read when a step is traced), and of the bf16 model they were quantized
    from: four models on the same weights, 5 interleaved rounds; the logits' largest difference between
    the tensor-core and per-value kernels."""
    from mad.kernels import qlinear_device
    from mad.quantize import quantize_model

    settings = {"tensor_cores": "all", "long_on_tensor_cores": "long", "per_value": "none"}
    models = {}
    for name in (*settings, "bf16"):
        model, _ = mad.load(args.topology, dtype="bfloat16", overrides=args.overrides)
        if models:
            model.program.load_weights(models["tensor_cores"].program.parameters())
        models[name] = model
    for name in settings:  # after all share the first one's bf16 weights
        quantize_model(models[name], bits=args.bits or 4, group_size=64)
    for model in models.values():
        mx.eval(model.program.parameters())
    mx.clear_cache()
    B = args.batch
    V = models["bf16"].vocab_size
    tokens = mx.random.randint(0, V, (B, 16)).astype(mx.int32)
    token = mx.random.randint(0, V, (B, 1)).astype(mx.int32)
    states, logits = {}, {}
    default = qlinear_device.TENSOR_CORES
    with mad.inference():
        for k, model in models.items():
            qlinear_device.TENSOR_CORES = settings.get(k, "none")  # each model traces its steps with its kernel
            states[k] = model(tokens)[1]
            logits[k] = model(token, states[k], check_tokens=False)[0].astype(mx.float32)
            decode_ms(model, token, states[k], 5)
        qlinear_device.TENSOR_CORES = default
        agree = float(mx.max(mx.abs(logits["tensor_cores"] - logits["per_value"])))
        times = {k: [] for k in models}
        for _ in range(5):
            for k in models:
                times[k].append(decode_ms(models[k], token, states[k], args.steps))
    print(json.dumps({"batch": B, "bits": args.bits or 4, "max_abs_logit_diff": agree,
                      **{f"{k}_ms": statistics.median(v) for k, v in times.items()},
                      **{f"{k}_tps": 1e3 * B / statistics.median(v) for k, v in times.items()}}, indent=1))


def compare_setting(args) -> None:
    """Decode ms/step of one model per value of kernel modules' settings, `--compare-setting
    MODULE.NAME=V1,V2,...` (e.g. mad.kernels.mlstm_device.SPLITS=1,4; given several times, model i takes
    the i-th value of each): each traces its step with its values (settings are read when a step is
    traced), all on the same weights (quantized alike with `--bits`), 5 interleaved rounds; the largest
    logit difference of each to the first."""
    settings = [(module, name, getattr(module, name), values) for module, name, values in args.compare_setting]
    labels = [",".join(f"{name}={values[i]!r}" for _, name, _, values in settings)
              for i in range(len(settings[0][3]))]
    models = {}
    for label in labels:
        model, _ = mad.load(args.topology, dtype="bfloat16", overrides=args.overrides)
        if models:
            model.program.load_weights(next(iter(models.values())).program.parameters())
        models[label] = model
    if args.bits:
        from mad.quantize import quantize_model
        for model in models.values():
            quantize_model(model, bits=args.bits, group_size=64)
    for model in models.values():
        mx.eval(model.program.parameters())
    mx.clear_cache()
    B = args.batch
    V = next(iter(models.values())).vocab_size
    tokens = mx.random.randint(0, V, (B, 16)).astype(mx.int32)
    token = mx.random.randint(0, V, (B, 1)).astype(mx.int32)
    states, logits = {}, {}
    with mad.inference():
        try:
            for i, (k, model) in enumerate(models.items()):
                for module, name, _, values in settings:
                    setattr(module, name, values[i])
                states[k] = model(tokens)[1]
                logits[k] = model(token, states[k], check_tokens=False)[0].astype(mx.float32)
                decode_ms(model, token, states[k], 5)
        finally:
            for module, name, default, _ in settings:
                setattr(module, name, default)
        first = next(iter(logits.values()))
        diffs = {k: float(mx.max(mx.abs(v - first))) for k, v in logits.items()}
        times = {k: [] for k in models}
        for _ in range(5):
            for k in models:
                times[k].append(decode_ms(models[k], token, states[k], args.steps))
    print(json.dumps({"batch": B, "bits": args.bits, "max_abs_logit_diff_to_first": diffs,
                      **{f"{k} ms": statistics.median(v) for k, v in times.items()},
                      **{f"{k} tokens/s": 1e3 * B / statistics.median(v) for k, v in times.items()}}, indent=1))


def compare(args, what: str) -> None:
    """Decode ms/step of two programs on the same weights, 5 interleaved rounds: fused against unfused
    sibling projections (`what` "fuse"), or folded against unfolded norms, residual adds and gated
    activations (`what` "fold", `MAD_FOLD`); quantized first with `--bits`."""
    import os

    from mad.model import LanguageModel
    from mad.quantize import quantize_model

    models = {}
    for on in (True, False):
        os.environ["MAD_FOLD"] = "1" if on or what != "fold" else "0"
        program = mad.build(args.topology, args.overrides, dtype="bfloat16", fuse=on if what == "fuse" else True)
        if models:
            program.load_weights(next(iter(models.values())).program.parameters())
        mx.eval(program.parameters())
        models[f"{what}ed" if on else f"un{what}ed"] = LanguageModel(program)
    os.environ.pop("MAD_FOLD")
    for model in models.values() if args.bits else ():
        quantize_model(model, bits=args.bits, group_size=64)  # the same float weights, quantized alike
        for w in model.program.parameters().values():
            mx.eval(w)
        mx.clear_cache()
    B = args.batch
    tokens = mx.random.randint(0, 1000, (B, 16)).astype(mx.int32)
    states = {k: m(tokens)[1] for k, m in models.items()}
    token = mx.random.randint(0, 1000, (B, 1)).astype(mx.int32)
    first, second = (m(token, states[k], check_tokens=False)[0] for k, m in models.items())
    agree = float(mx.max(mx.abs(first.astype(mx.float32) - second.astype(mx.float32))))

    times = {k: [] for k in models}
    with mad.inference():
        for k in models:
            decode_ms(models[k], token, states[k], 5)
        for _ in range(5):
            for k in models:
                times[k].append(decode_ms(models[k], token, states[k], args.steps))
    print(json.dumps({"batch": B, "bits": args.bits, "overrides": args.overrides, "max_abs_logit_diff": agree,
                      **{f"{k}_ms": statistics.median(v) for k, v in times.items()},
                      **{f"{k}_tps": 1e3 * B / statistics.median(v) for k, v in times.items()}}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--topology", default="topologies/xlstm-7b.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--kernels", default="auto")
    ap.add_argument("--json")
    ap.add_argument("--bits", type=int, default=None, choices=(2, 3, 4, 5, 6, 8),
                    help="quantize the projections and head (affine, group 64)")
    ap.add_argument("--compare-fuse", action="store_true",
                    help="only time fused vs unfused decode (same weights), interleaved")
    ap.add_argument("--compare-fold", action="store_true",
                    help="only time folded vs unfolded decode (same weights, MAD_FOLD), interleaved")
    ap.add_argument("--compare-tensor-cores", action="store_true",
                    help="4-bit decode with the tensor-core kernel on all, the long or none of the products, and bf16, interleaved")
    ap.add_argument("--compare-setting", metavar="MODULE.NAME=V1,V2", action="append",
                    type=functools.partial(kernel_setting, several=True),
                    help="one model per value of a kernel module's setting (several: the i-th values together), "
                         "same weights, interleaved")
    ap.add_argument("--compare-inference", action="store_true",
                    help="only time decode inside vs outside mad.inference(), interleaved")
    ap.add_argument("--profile-steps", type=int, metavar="N",
                    help="only run N decode steps between cuProfilerStart/Stop (for nsys --capture-range)")
    args = ap.parse_args()
    if args.profile_steps is not None and args.profile_steps < 1:
        ap.error("--profile-steps must be 1 or more")
    if args.compare_setting and len({len(values) for *_, values in args.compare_setting}) != 1:
        ap.error("--compare-setting: give every setting the same number of values")
    set_policy(args.kernels)
    if args.profile_steps is not None:
        with mad.inference():
            return profile(args)
    if args.compare_inference:
        return compare_inference(args)
    if args.compare_tensor_cores:
        return compare_tensor_cores(args)
    if args.compare_setting:
        return compare_setting(args)
    with mad.inference():
        return run(args)


def run(args) -> None:
    if args.compare_fuse or args.compare_fold:
        return compare(args, "fuse" if args.compare_fuse else "fold")

    model = load_model(args)
    program = model.program
    B = args.batch
    tokens = mx.random.randint(0, model.vocab_size, (B, 16)).astype(mx.int32)
    _, state = model(tokens)
    mx.eval(state)
    token = mx.random.randint(0, model.vocab_size, (B, 1)).astype(mx.int32)
    out = {}

    def step():
        logits, st = model(token, state, check_tokens=False)
        mx.eval(logits, st)

    for _ in range(5):
        step()
    out["mad"] = median_ms(step, args.steps)

    decode_ms(model, token, state, 5)
    out["mad-async"] = statistics.median(decode_ms(model, token, state, args.steps) for _ in range(3))
    out["mad-call"] = median_ms(lambda: model(token, state, check_tokens=False), args.steps)
    mx.eval(state)
    evals = []
    for _ in range(args.steps):
        built = model(token, state, check_tokens=False)
        start = time.perf_counter()
        mx.eval(built)
        evals.append(time.perf_counter() - start)
    out["mad-eval"] = 1e3 * statistics.median(evals)

    # the weight matmuls alone: every 2-D weight of the program once, as x @ W^T, chained so that
    # each waits for the one before (as in the model)
    weights = [w for k, w in program.parameters().items() if w.ndim == 2 and "embeddings" not in k]
    weight_bytes = sum(w.nbytes for k, w in program.parameters().items() if "embeddings" not in k)
    xs = {d: mx.random.normal((B, d)).astype(mx.bfloat16) for d in {w.shape[1] for w in weights}}

    def matmuls(xs, ws):
        acc = mx.zeros((B, 1), mx.float32)
        for w in ws:
            x = xs[w.shape[1]] + (acc * 0).astype(mx.bfloat16)  # depends on the previous product
            acc = acc + (x @ w.T)[:, :1].astype(mx.float32)
        return acc

    if not args.bits:
        mm = mx.compile(lambda xs: matmuls(xs, weights))
        mx.eval(mm(xs))
        out["matmuls"] = median_ms(lambda: mx.eval(mm(xs)), args.steps)

    bw = copy_bandwidth()
    state_bytes = sum(a.nbytes for n in state.values() for a in n.values())
    out["bytes-floor"] = 1e3 * (weight_bytes + 2 * state_bytes) / bw
    out["weight_GB"] = weight_bytes / 1e9
    out["state_GB"] = state_bytes / 1e9
    out["copy_TBps"] = bw / 1e12
    out["tokens_per_s_async"] = 1e3 * B / out["mad-async"]
    print(json.dumps({"batch": B, "bits": args.bits, "overrides": args.overrides, "kernels": args.kernels, **out}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
