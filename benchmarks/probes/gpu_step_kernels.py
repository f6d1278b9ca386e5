"""The GPU kernels of one decode step (or one prompt call), for Nsight Compute (ncu) to time one by one.

    ncu --clock-control none --csv --metrics gpu__time_duration.sum \\
        python benchmarks/probes/gpu_step_kernels.py [--set dims.L=2] [--prompt 8192 | --train 8 1024] [--bits 4] > ncu.csv
    python benchmarks/probes/gpu_step_kernels.py --report ncu.csv

The run builds the model (bf16, random weights), reads a 16-token prompt, takes two warm-up steps,
then one step between two launches of a marker kernel (`mad_marker`); `--report` sums the kernels
between the last two markers by name: the GPU time of one step without launch gaps. With `--prompt N`
the timed call is one forward call over N prompt tokens (the prefill's unit), after one untimed call of
the same shape; with `--train B T` one training step (`mad train`'s compiled step: loss, gradients,
clipping, AdamW) on a (B, T) batch, after two untimed steps, in `--dtype` (float32 by default).
"""

from __future__ import annotations

import argparse
import collections
import csv
import sys

import mlx.core as mx


def marker() -> None:
    kernel = mx.fast.cuda_kernel(name="mad_marker", input_names=["x"], output_names=["y"],
                                 source="y[0] = x[0];")
    mx.eval(kernel(inputs=[mx.ones((1,))], grid=(1, 1, 1), threadgroup=(1, 1, 1),
                   output_shapes=[(1,)], output_dtypes=[mx.float32])[0])


def train(topology: str, overrides: list[str], batch: int, seq: int, dtype: str) -> None:
    import mad
    from mad.train import Stepper, TrainConfig, make_optimizer, trainable

    model, _ = mad.load(topology, dtype=dtype, overrides=overrides)
    cfg = TrainConfig(lr=1e-4, weight_decay=0.01, grad_clip=1.0, warmup=0, schedule="constant", dtype=dtype).check()
    optimizer = make_optimizer(cfg)
    optimizer.init(trainable(model)[0].trainable_parameters())
    stepper = Stepper(model, optimizer, cfg.grad_clip)
    tokens = mx.random.randint(0, model.vocab_size, (batch, seq + 1)).astype(mx.int32)
    for timed in (False, False, True):
        if timed:
            marker()
        loss, norm = stepper.step(tokens[:, :-1], tokens[:, 1:])
        mx.eval(loss, norm, stepper.state)
    marker()


def run(topology: str, overrides: list[str], batch: int, prompt: int, bits: int | None = None) -> None:
    import mad

    model, _ = mad.load(topology, dtype="bfloat16", overrides=overrides)
    if bits:
        from mad.quantize import quantize_model
        quantize_model(model, bits=bits, group_size=64)  # as bench_quant.py and gpu_decode_probe.py --bits
    if prompt:
        tokens = mx.random.randint(0, model.vocab_size, (batch, prompt)).astype(mx.int32)
        with mad.inference():  # as `LanguageModel.prefill` reads a segment
            for timed in (False, True):
                if timed:
                    marker()
                logits, state = model(tokens, last_only=True, check_tokens=False)
                mx.eval(logits, state)
        marker()
        return
    tokens = mx.random.randint(0, model.vocab_size, (batch, 16)).astype(mx.int32)
    _, state = model(tokens)
    token = tokens[:, -1:]
    for _ in range(2):
        logits, state = model(token, state, check_tokens=False)
        mx.eval(logits, state)
    marker()
    logits, state = model(token, state, check_tokens=False)
    mx.eval(logits, state)
    marker()


def report(path: str) -> None:
    rows = [r for r in csv.DictReader(line for line in open(path) if line.startswith('"'))]
    names = [r["Kernel Name"] for r in rows]
    marks = [i for i, n in enumerate(names) if "mad_marker" in n]
    step = rows[marks[-2] + 1:marks[-1]]
    total = collections.Counter()
    count = collections.Counter()
    for r in step:
        if r["Metric Name"] == "gpu__time_duration.sum":
            key = r["Kernel Name"][:90]
            total[key] += float(r["Metric Value"].replace(",", ""))
            count[key] += 1
    grand = sum(total.values())
    print(f"{sum(count.values())} kernels, {grand / 1e3:.1f} us of GPU time in one step")
    for key, ns in total.most_common():
        print(f"{ns / 1e3:9.1f} us  {count[key]:4d}x  {key}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--topology", default="topologies/xlstm-7b.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=0, help="time one call over this many prompt tokens instead")
    ap.add_argument("--train", type=int, nargs=2, metavar=("B", "T"), help="time one training step instead")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="with --train")
    ap.add_argument("--bits", type=int, choices=(2, 3, 4, 5, 6, 8),
                    help="quantize the projections and head first (affine, group 64)")
    ap.add_argument("--report")
    args = ap.parse_args()
    if args.report:
        report(args.report)
    else:
        if args.train:
            train(args.topology, args.overrides, *args.train, args.dtype)
        else:
            run(args.topology, args.overrides, args.batch, args.prompt, args.bits)
        sys.exit(0)
