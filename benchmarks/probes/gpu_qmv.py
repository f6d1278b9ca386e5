"""Decode-sized quantized products on the GPU: what weight bandwidth do MLX's `mx.quantized_matmul` and MAD's
`quantized_linear` kernel (kernels/qlinear_device.py) reach at 1-8 rows, against the bf16 product MAD runs
(its `linear` kernel), for the xLSTM-7B block shapes?

Each product is timed as in `gpu_gemv.py` (median of 50 runs of a chain of 20 dependent products over
rotating weights, so that the weights do not sit in L2); bandwidth = bytes of the packed weights, scales
and biases (or the bf16 weights) over the time. `mad_q*_err` is the relative (Frobenius) difference
between MAD's kernel and MLX's product on one weight: a check that the timed kernel computes the same.

`--configs` times MAD's kernels: `mma` / `mma:S` / `mma:S:A` the tensor-core kernel (kernels/qlinear_mma.py;
S warps per block over k, A groups loaded ahead), `fma` the per-value kernel (kernels/qlinear_device.py)
with its defaults, `R:S:W` the per-value kernel with R output features per warp, S warp steps loading while
one is computed and W warps per block, `R:S:W:X` the same with x staged in shared memory (X = 1) or not
(default: the variant's own choice). The bf16 product above the `linear` kernel's row
limit is MLX's matmul.

    python benchmarks/probes/gpu_qmv.py [--bits 4 8] [--group-size 64] [--rows 1 8] [--configs 4:1:4 8:2:4]
                                        [--json PATH]
"""

from __future__ import annotations

import argparse
import json

import mad  # noqa: F401
import mlx.core as mx

from mad.kernels.linear_device import linear_device, row_limit
from mad.kernels.qlinear import QuantizedMatrix
from mad.kernels import qlinear_device
from mad.kernels.qlinear_device import features_per_warp, quantized_linear_device

from gpu_gemv import CHAIN, time_chain  # the bf16 probe's timing (this folder is on sys.path when run)

SHAPES = {"q|k|v|o": (12288, 4096), "up|gate": (21888, 4096), "down": (4096, 10944), "lm_head": (50304, 4096)}


def launch_settings(config, rows: int) -> dict:
    """quantized_linear_device's keywords for a --configs entry: None (the kernel the variant picks), "mma",
    "mma:S" or "mma:S:A" (the tensor-core kernel, S warps per block, A groups loaded ahead), "fma" (the
    per-value kernel, its defaults) or
    "R:S:W" / "R:S:W:X" (the per-value kernel so, X: x staged in shared memory)."""
    if config is None:
        return {}
    try:
        if config.startswith("mma"):
            parts = [int(v) for v in config.split(":")[1:]]
            if len(parts) > 2:
                raise ValueError
            parts += [None, None]
            return {"split": parts[0], "ahead": parts[1], "tensor_cores": "all"}
        if config == "fma":
            return {"features": features_per_warp(rows)}
        fields = [int(v) for v in config.split(":")]
        if (len(fields) not in (3, 4) or fields[0] < 1 or fields[1] < 0 or fields[2] < 1
                or (len(fields) == 4 and fields[3] not in (0, 1))):
            raise ValueError
    except ValueError:
        raise ValueError(f"--configs {config!r}: expected mma, mma:S, mma:S:A, fma, R:S:W or R:S:W:X "
                         "(integers: R, W >= 1, S >= 0, X 0 or 1)") from None
    settings = {"features": fields[0], "steps_ahead": fields[1], "warps": fields[2]}
    if len(fields) == 4:
        settings["shared_x"] = bool(fields[3])
    return settings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--configs", nargs="+", default=[None], metavar="CONFIG",
                    help="MAD kernel settings: mma, mma:S, fma, R:S:W or R:S:W:X (the docstring)")
    ap.add_argument("--quick", action="store_true", help="one small shape (a check that the script runs)")
    ap.add_argument("--json")
    args = ap.parse_args()
    for config in args.configs:  # every entry read before anything runs
        try:
            launch_settings(config, 1)
        except ValueError as e:
            ap.error(str(e))
    shapes = {"small": (256, 512)} if args.quick else SHAPES
    default = qlinear_device.TENSOR_CORES  # what the variant does unless a config says otherwise
    out = []
    for name, (N, K) in shapes.items():
        ws = [(mx.random.normal((N, K)) * 0.02).astype(mx.bfloat16) for _ in range(CHAIN)]
        mx.eval(ws)
        for M in args.rows:
            x = mx.random.normal((M, K)).astype(mx.bfloat16)
            s = time_chain(lambda a, w: linear_device(a, w)[0] if M <= row_limit() else a @ w.T, ws, x)
            row = {"shape": name, "N": N, "K": K, "M": M, "bf16_us": 1e6 * s, "bf16_GBps": 2 * N * K / s / 1e9}
            for bits in args.bits:
                qs = [mx.quantize(w, group_size=args.group_size, bits=bits) for w in ws]
                mx.eval(qs)
                nbytes = sum(a.nbytes for a in qs[0])
                t = time_chain(lambda a, q: mx.quantized_matmul(a, *q, transpose=True, group_size=args.group_size,
                                                               bits=bits), qs, x)
                row[f"q{bits}_us"], row[f"q{bits}_GBps"] = 1e6 * t, nbytes / t / 1e9
                packed = [QuantizedMatrix(*q, args.group_size, bits) for q in qs]
                for config in args.configs:
                    name_r = f"mad_q{bits}" + ("" if config is None else f"_{config}")
                    kw = launch_settings(config, M)
                    qlinear_device.TENSOR_CORES = kw.pop("tensor_cores", default)
                    t = time_chain(lambda a, m: quantized_linear_device(a, m, **kw)[0], packed, x)
                    qlinear_device.TENSOR_CORES = default
                    row[f"{name_r}_us"], row[f"{name_r}_GBps"] = 1e6 * t, nbytes / t / 1e9
                mine = quantized_linear_device(x, packed[0])[0].astype(mx.float32)
                theirs = mx.quantized_matmul(x, *qs[0], transpose=True, group_size=args.group_size,
                                             bits=bits).astype(mx.float32)
                row[f"mad_q{bits}_err"] = (mx.linalg.norm(mine - theirs) / mx.linalg.norm(theirs)).item()
                del qs, packed
            out.append(row)
            print(" ".join(f"{k}={v:.1e}" if k.endswith("_err") else f"{k}={v:.1f}" if isinstance(v, float) else
                           f"{k}={v}" for k, v in row.items()), flush=True)
        del ws
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
