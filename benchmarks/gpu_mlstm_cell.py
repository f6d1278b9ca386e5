"""The mLSTM cell alone on the GPU at the xLSTM-7B head shapes: the chunkwise prefill path that a layer
runs (`kernels.mlstm.mlstm_sequence`, with the device kernels the registry dispatches), against the
device's limits measured in the same run.

Work counted per (batch row, head, chunk of L tokens), as multiply-adds x 2:
    Q K^T (L x L x DQK), S V (L x L x DV), q C of the entering state (L x DQK x DV),
    the chunk's own state K^T V (DQK x L x DV); the gate and normaliser arithmetic is left out.
Bytes counted two ways:
    minimum   q, k, v read and h written once (input dtype), the gates read, the final state written;
    chunked   the minimum plus the per-chunk states this formulation materialises (float32 C of every
              chunk: the chunk sums written and read, the entering states written and read).
With `--parts`, the two halves of the chunkwise form are also timed alone: the chunk states (the chunk
sums K^T V and the recurrence, as the registry dispatches them) and the intra-chunk outputs (Q K^T, S V and q C, given the states).
Limits measured here: a device copy (compiled `a + 1` over 2 GiB float32, bytes read + written) and
a large matrix product in the input dtype (MLX's matmul; float32 runs in TF32 unless
MLX_ENABLE_TF32=0, as in the model).

    python benchmarks/gpu_mlstm_cell.py [--tokens 8192] [--chunks 64,128] [--dtypes bfloat16,float32]
                                        [--trials 10] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics

from common import timed, write_json


def ceilings(trials: int) -> dict:
    import mlx.core as mx

    out = {}
    a = mx.random.normal((512 * 1024 * 1024,))       # 2 GiB float32
    inc = mx.compile(lambda x: x + 1)
    t = statistics.median(timed(lambda: inc(a), trials)[1])
    out["copy_TBps"] = 2 * a.nbytes / t / 1e12
    del a
    for dtype in ("bfloat16", "float32"):
        n = 8192
        x, y = (mx.random.normal((n, n)).astype(getattr(mx, dtype)) for _ in range(2))
        t = statistics.median(timed(lambda: x @ y, trials)[1])
        out[f"matmul_{dtype}_TFLOPs"] = 2 * n ** 3 / t / 1e12
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dqk", type=int, default=256)
    ap.add_argument("--dv", type=int, default=512)
    ap.add_argument("--chunks", type=lambda v: [int(x) for x in v.split(",")], default=[64, 128])
    ap.add_argument("--dtypes", type=lambda v: v.split(","), default=["bfloat16", "float32"])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--parts", action="store_true", help="also time the chunk states and the outputs alone")
    ap.add_argument("--no-limits", action="store_true", help="skip measuring the limits (a smoke run)")
    ap.add_argument("--json")
    a = ap.parse_args()

    import mlx.core as mx
    import numpy as np

    from mad.kernels.mlstm import _split_chunks, _zero_state, chunk_outputs, mlstm_sequence
    from mad.kernels.registry import dispatch

    B, NH, T, DQK, DV = a.batch, a.heads, a.tokens, a.dqk, a.dv
    limits = (dict.fromkeys(("copy_TBps", "matmul_bfloat16_TFLOPs", "matmul_float32_TFLOPs"), float("nan"))
              if a.no_limits else ceilings(a.trials))
    print("limits: " + ", ".join(f"{k} {v:.1f}" for k, v in limits.items()), flush=True)
    rng = np.random.default_rng(0)
    rows = {}
    for dtype in a.dtypes:
        dt = getattr(mx, dtype)
        q, k = (mx.array(rng.normal(0, 1, (B, NH, T, DQK)).astype(np.float32)).astype(dt) for _ in range(2))
        v = mx.array(rng.normal(0, 1, (B, NH, T, DV)).astype(np.float32)).astype(dt)
        i = mx.array(rng.normal(0, 2, (B, NH, T)).astype(np.float32))
        f = mx.array(rng.normal(3, 2, (B, NH, T)).astype(np.float32))
        mx.eval(q, k, v, i, f)
        for L in a.chunks:
            cell = mx.compile(lambda q, k, v, i, f, L=L: mlstm_sequence(q, k, v, i, f, chunk_size=L))
            (h, (C, n, m)), times = timed(lambda: cell(q, k, v, i, f), a.trials)
            finite = bool(mx.all(mx.isfinite(h)).item()) and bool(mx.all(mx.isfinite(C)).item())
            s = statistics.median(times)
            NC = T // L
            flops = 2 * B * NH * NC * (L * L * DQK + L * L * DV + 2 * L * DQK * DV)
            size = dt.size
            bytes_min = (B * NH * T * (2 * DQK + 2 * DV) * size + B * NH * T * 2 * 4
                         + B * NH * (DQK * DV + DQK + 1) * 4)
            bytes_chunked = bytes_min + 4 * B * NH * NC * DQK * DV * 4
            matmul = limits[f"matmul_{dtype}_TFLOPs"] * 1e12
            row = {"dtype": dtype, "chunk": L, "median_s": s, "times_s": times, "finite": finite,
                   "flops": flops, "TFLOPs": flops / s / 1e12, "fraction_of_matmul": flops / s / matmul,
                   "bytes_min": bytes_min, "bytes_chunked": bytes_chunked,
                   "TBps_min": bytes_min / s / 1e12, "TBps_chunked": bytes_chunked / s / 1e12,
                   "floor_s": max(flops / matmul, bytes_min / (limits["copy_TBps"] * 1e12)),
                   "states_kernel": getattr(dispatch("mlstm_chunk_states"), "__name__", "?"),
                   "outputs_kernel": getattr(dispatch("mlstm_chunk_outputs"), "__name__", "?")}
            if a.parts:
                scale = DQK ** -0.5

                def states(q, k, v, i, f, L=L):
                    qc, kc, vc, ic, b = _split_chunks(q * scale, k, v, i, f, L)
                    return dispatch("mlstm_chunk_states")(kc, vc, b, ic, _zero_state(B, NH, DQK, DV))

                def outputs(q, k, v, i, f, s_in, L=L, fn=chunk_outputs):
                    qc, kc, vc, ic, b = _split_chunks(q * scale, k, v, i, f, L)
                    return fn(qc, kc, vc, b, ic, s_in, 1e-6)

                states_c = mx.compile(states)
                s_in, _ = states_c(q, k, v, i, f)
                mx.eval(s_in)
                row["states_s"] = statistics.median(timed(lambda: states_c(q, k, v, i, f), a.trials)[1])
                for name, fn in (("outputs_reference_s", chunk_outputs),
                                 ("outputs_s", dispatch("mlstm_chunk_outputs"))):
                    outputs_c = mx.compile(lambda q, k, v, i, f, s_in, fn=fn: outputs(q, k, v, i, f, s_in, fn=fn))
                    row[name] = statistics.median(timed(lambda: outputs_c(q, k, v, i, f, s_in), a.trials)[1])
                print(f"  chunk states alone {row['states_s'] * 1e3:.3f} ms; outputs alone (states given) "
                      f"{row['outputs_s'] * 1e3:.3f} ms ({dispatch('mlstm_chunk_outputs').__name__}), "
                      f"pure MLX {row['outputs_reference_s'] * 1e3:.3f} ms", flush=True)
            rows[f"{dtype} L{L}"] = row
            print(f"{dtype:8s} chunk {L:3d}: {s * 1e3:7.3f} ms, {row['TFLOPs']:6.1f} TFLOP/s "
                  f"({row['fraction_of_matmul']:.0%} of the matmul rate), {row['TBps_min']:.2f} TB/s minimum bytes, "
                  f"{row['TBps_chunked']:.2f} TB/s with the chunk states; floor {row['floor_s'] * 1e3:.3f} ms; "
                  f"finite {finite}", flush=True)
    write_json({"batch": B, "heads": NH, "tokens": T, "dqk": DQK, "dv": DV, "limits": limits, "rows": rows,
                "mlx": mx.__version__}, a.json)


if __name__ == "__main__":
    main()
