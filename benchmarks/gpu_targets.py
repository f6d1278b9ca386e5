"""The GPU speed targets of the xLSTM-7B shape in one process, each beside the limit it is bound by.

One model (random bf16 weights, float32 state) is built once; then, with `mad.bench.bench` (the code of
`mad bench`): decode at batch 1 after a short prompt, the first token and decode after a 16k prompt, a
64k prefill, decode at batch 32. The card's copy rate and bf16 matrix-product rate are measured in the
same run (`mad.bench.device_limits`) and each figure is printed as a fraction of its limit
(`mad bench --limits`: decode = weight + state bytes per step over the copy rate, prompt = two FLOPs per
weight over the product rate).

    python benchmarks/gpu_targets.py [--topology topologies/xlstm-7b.yaml] [--set dims.L=4] [--json PATH]
                                     [--only decode1,long,prefill,decode32] [--prefill-step 4096[,8192,...]]
                                     [--setting MODULE.NAME=VALUE] [--quick]

`--prefill-step` takes prompt tokens per forward call (`mad bench --prefill-step`); with several, comma-separated,
every part runs once per value in the order given (repeat values to interleave them), in the same process.

`--quick` runs every part with tiny sizes (a check that the script works, on any device).
"""

from __future__ import annotations

import argparse
import json
import time

import mad  # noqa: F401  (before mlx: the CPU BLAS choice)
import mlx.core as mx

from common import add_setting_option, apply_settings
from mad.bench import bench, device_limits, limit_fractions, step_costs
from mad.model import PREFILL_STEP

PARTS = ("decode1", "long", "prefill", "decode32")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", default="topologies/xlstm-7b.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="topology override, as in mad")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--only", default=",".join(PARTS), help="comma-separated parts: " + ", ".join(PARTS))
    ap.add_argument("--quick", action="store_true", help="tiny sizes: check that the script runs")
    ap.add_argument("--prefill-step", default=str(PREFILL_STEP),
                    help="prompt tokens per forward call; several, comma-separated, run in turn")
    ap.add_argument("--json", help="also write the figures to this file")
    add_setting_option(ap)
    args = ap.parse_args()
    settings = apply_settings(args.setting)
    parts = [p for p in args.only.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    try:
        steps = [int(v) for v in args.prefill_step.split(",")]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1:
        ap.error(f"--prefill-step {args.prefill_step!r}: positive whole numbers, comma-separated")
    q = args.quick
    # (batch, prompt tokens, generated tokens, trials) per part
    settings = {"decode1": (1, 16 if q else 128, 8 if q else 128, 2 if q else 3),
                "long": (1, 64 if q else 16384, 8 if q else 64, 1 if q else 2),
                "prefill": (1, 128 if q else 65536, 1, 1),
                "decode32": (4 if q else 32, 16 if q else 128, 4 if q else 32, 1 if q else 3)}

    start = time.perf_counter()
    model, _ = mad.load(args.topology, dtype=args.dtype, overrides=args.overrides)
    mx.eval(model.parameters())
    out = {"device": str(mx.default_device()), "topology": args.topology, "overrides": args.overrides,
           "settings": settings,
           "dtype": args.dtype, "load_seconds": time.perf_counter() - start}
    out["limits"] = device_limits(model.program.dtype)
    out["costs"] = step_costs(model)
    lim = out["limits"]
    print(f"device {out['device']}: copy {lim['copy_bytes_per_s'] / 1e12:.3f} TB/s, "
          f"{lim['matmul_dtype']} matmul {lim['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s; "
          f"weights read a step {out['costs']['weight_bytes'] / 1e9:.2f} GB, "
          f"state {out['costs']['state_bytes'] / 1e6:.1f} MB a sequence", flush=True)
    for step, part in [(step, part) for step in steps for part in parts]:
        batch, prompt, gen, trials = settings[part]
        r = bench(model, prompt, gen, batch, trials, prefill_step=step, echo=lambda line: None)
        r["fractions"] = limit_fractions(r, lim, out["costs"])
        r["first_token_ms"] = 1e3 * batch * prompt / r["medians"]["prompt_tps"]
        r["prefill_step"] = step
        if len(steps) == 1:
            out[part] = r
        else:
            out.setdefault("runs", []).append(dict(r, part=part))
        med, frac = r["medians"], r["fractions"]
        tag = part if len(steps) == 1 else f"{part} (prefill step {step})"
        line = (f"{tag}: batch {batch}, prompt {prompt}: prompt {med['prompt_tps']:,.0f} tokens/s "
                f"({100 * frac['prefill_fraction']:.1f}% of the matmul rate), first token {r['first_token_ms']:.1f} ms")
        if gen > 1:
            line += (f"; decode {med['generation_tps']:,.1f} tokens/s ({100 * frac['decode_fraction']:.1f}% of the "
                     f"copy rate)")
        print(line + f"; peak {med['peak_memory']:.1f} GB", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
