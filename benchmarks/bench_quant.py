"""Quantized decode: tokens/s and peak memory of a topology at bfloat16 against 4-bit and 8-bit weights.

Each variant is the same model (fresh weights from one seed, `mad.load(topology, dtype="bfloat16")`), the
quantized ones then quantized in place (`mad.quantize.quantize_model`: the projections, the head and the
embedding; the per-head gates stay bfloat16) and their bfloat16 arrays freed before anything is timed.
For each variant, in one process, one after the other:

  agreement  the logits of a `--prompt`-token prompt (batch 1, every position) against the bfloat16
             model's: max |diff|, mean |diff| and top-1 agreement (the share of positions whose argmax
             is the bfloat16 model's)
  decode     `mad.bench.bench` (as `mad bench`): a `--prompt`-token prompt, then `--generate` greedy
             decode steps at batch `--batch`, `--trials` times after a warm-up; medians of prompt_tps,
             generation_tps and peak_memory (GB, MLX's peak of the trial: weights, state, activations)
  weights    the bytes the variant's parameters take

and then, for each quantized variant, decode tokens/s and peak memory as multiples of bfloat16's (the
issue's target for xLSTM-7B at batch 1: 4-bit decode >= 2x bfloat16's, peak memory <= 1/3 of it).

    python benchmarks/bench_quant.py --device gpu --topology topologies/xlstm-7b.yaml   # the lead's H100 run
    python benchmarks/bench_quant.py [--topology FILE] [--set dims.L=4 ...] [--bits 4 8] [--group-size 64]
                                     [--mode affine] [--prompt 128] [--generate 128] [--batch 1] [--trials 3]
                                     [--device cpu|gpu] [--json [PATH]]
    python benchmarks/bench_quant.py --quick   # xlstm-tiny, a few seconds on a CPU
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import mad  # before mlx.core: selects the CPU BLAS, see backends/cpu.py
import mlx.core as mx
import numpy as np
from mad.bench import bench
from mad.quantize import bits_per_weight, quantize_model

from common import write_json

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"


def build(a: argparse.Namespace, bits: int | None):
    """The model at bfloat16 (`bits` None) or quantized, its float arrays freed; the weights evaluated."""
    mx.random.seed(a.seed)
    model, _ = mad.load(a.topology, dtype="bfloat16", overrides=a.overrides, memory_check=not a.no_memory_check)
    if bits is not None:
        quantize_model(model, bits=bits, group_size=a.group_size, mode=a.mode)
        for w in model.program.parameters().values():  # one at a time: each float matrix is freed once quantized
            mx.eval(w)
    gc.collect()
    mx.clear_cache()
    return model


def agreement(logits: mx.array, reference: np.ndarray) -> dict:
    got = np.array(logits.astype(mx.float32))
    diff = np.abs(got - reference)
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "top1_agreement": float((got.argmax(-1) == reference.argmax(-1)).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--topology", default=str(TOPOLOGIES / "xlstm-125m.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8], help="the quantized variants")
    ap.add_argument("--group-size", type=int, default=None, help="default: the mode's (affine: 64)")
    ap.add_argument("--mode", default="affine")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (also the agreement check's length)")
    ap.add_argument("--generate", type=int, default=128, help="decode steps per trial")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=["cpu", "gpu"], default=None)
    ap.add_argument("--no-memory-check", action="store_true")
    ap.add_argument("--quick", action="store_true", help="xlstm-tiny, 16 + 8 tokens, one trial")
    ap.add_argument("--json", nargs="?", const="-", metavar="PATH",
                    help="write the results as JSON (stdout if no PATH)")
    a = ap.parse_args()
    if a.quick:
        a.topology, a.prompt, a.generate, a.trials = str(TOPOLOGIES / "xlstm-tiny.yaml"), 16, 8, 1
        a.group_size = a.group_size or 32  # xlstm-tiny's 64-wide rows
    if a.device:
        mx.set_default_device(mx.gpu if a.device == "gpu" else mx.cpu)
    log = sys.stderr if a.json == "-" else sys.stdout
    echo = lambda line: print(line, file=log, flush=True)  # noqa: E731

    results = {"topology": a.topology, "overrides": a.overrides, "mode": a.mode, "group_size": a.group_size,
               "prompt": a.prompt, "generate": a.generate, "batch": a.batch, "trials": a.trials,
               "mlx": mx.__version__, "device": str(mx.default_device()), "variants": {}}
    reference = None
    for bits in [None, *a.bits]:
        name = "bfloat16" if bits is None else f"{bits}-bit"
        model = build(a, bits)
        prompt = mx.random.randint(0, model.vocab_size, (1, a.prompt), key=mx.random.key(a.seed + 1)).astype(mx.int32)
        logits, _ = model(prompt, check_tokens=False)
        entry = {"weight_bytes": sum(w.nbytes for w in model.program.parameters().values()),
                 "bits_per_weight": bits_per_weight(model.program), "quantization": model.program.quantization}
        if reference is None:
            reference = np.array(logits.astype(mx.float32))
        else:
            entry["agreement"] = agreement(logits, reference)
        del logits
        echo(f"== {name}: {entry['weight_bytes'] / 1e6:,.1f} MB of weights, "
             f"{entry['bits_per_weight']:.2f} bits per weight")
        run = bench(model, a.prompt, a.generate, a.batch, a.trials, seed=a.seed, echo=echo)
        entry["medians"], entry["trials"] = run["medians"], run["trials"]
        if "agreement" in entry:
            ag = entry["agreement"]
            echo(f"logits vs bfloat16: max |diff| {ag['max_abs_diff']:.4g}, mean |diff| {ag['mean_abs_diff']:.4g}, "
                 f"top-1 agreement {100 * ag['top1_agreement']:.1f}%")
        results["variants"][name] = entry
        del model
        gc.collect()
        mx.clear_cache()

    base = results["variants"]["bfloat16"]["medians"]
    echo("")
    echo(f"{'variant':>9}  {'decode tok/s':>12}  {'x bf16':>7}  {'peak MB':>9}  {'x bf16':>7}  {'top-1':>6}  "
         f"{'max |diff|':>10}")
    for name, entry in results["variants"].items():
        med = entry["medians"]
        speed = med["generation_tps"] / base["generation_tps"] if base["generation_tps"] else float("nan")
        memory = med["peak_memory"] / base["peak_memory"] if base["peak_memory"] else float("nan")
        entry["vs_bfloat16"] = {"generation_tps": speed, "peak_memory": memory}
        ag = entry.get("agreement", {"top1_agreement": 1.0, "max_abs_diff": 0.0})
        echo(f"{name:>9}  {med['generation_tps']:12.1f}  {speed:7.2f}  {1e3 * med['peak_memory']:9.1f}  {memory:7.2f}  "
             f"{100 * ag['top1_agreement']:5.1f}%  {ag['max_abs_diff']:10.4g}")
    write_json(results, a.json)


if __name__ == "__main__":
    main()
