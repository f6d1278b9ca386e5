"""Where the sLSTM kernel's step time goes: the same kernel with one part taken out at a time.

Each variant is the kernel body of `kernels.slstm_device` with a piece removed by text substitution
(the results are then wrong; only the time is of interest), run at several batch sizes:

  base       the kernel as shipped
  noxchg     no exchange between the blocks of a head (no tagged store, no polling): each block goes on
             with the y it already has in shared memory
  noloop     no R y loop at all: one shared-memory read per batch row instead of CPT / 4
  bare       noloop and noxchg: the gate math, the barriers and the input/output traffic only
  relaxed    the exchange with GPU-scope relaxed loads and stores instead of volatile (system scope) ones
  fastmath   the gate math with the hardware's approximate exp, log, tanh and division (how much of the
             step the math's latency is); "+" combines variants, e.g. bare+fastmath

    python benchmarks/probes/probe_slstm.py [--batches 1,2,4,8] [--split 0,1] [--rows 2,1] [--tokens 2048] [--trials 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

# benchmarks/common.py, one level up from benchmarks/probes/
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import timed, write_json

NH, DH = 4, 512

POLL = "if (pstep >= 0 && pstep < L - 1) {"
PUT = "put(xchg + 2 *"
LOOP = re.compile(r"#pragma unroll\n\s+for \(int e = 0; e < CPT / 4; \+\+e\) \{.*?\n                    \}\n", re.S)
ONE_READ = ("for (int j = 0; j < RPT; ++j) for (int q = 0; q < BG; ++q) "
            "acc[j][q] += ys[(b + q) * DH + (slot_r + j * RS) % DH];\n")


def variant_body(names: str, body: str) -> str:
    for name in names.split("+"):
        body = one_variant(name, body)
    return body


def one_variant(name: str, body: str) -> str:
    def sub(pattern, new, text):
        out, count = (pattern.subn(new, text) if isinstance(pattern, re.Pattern)
                      else (text.replace(pattern, new), text.count(pattern)))
        assert count == 1, f"{name}: pattern found {count} times"
        return out

    if name in ("noxchg", "bare"):
        body = sub(POLL, "if (tag < 0) {", body)          # never true: compiled, not run
        body = sub(PUT, "if (tag < 0) " + PUT, body)
    if name in ("noloop", "bare"):
        body = sub(LOOP, ONE_READ, body)
    if name == "relaxed":
        body = sub("st.volatile.global.v2.s32", "st.relaxed.gpu.global.v2.s32", body)
        body = sub("ld.volatile.global.v2.s32", "ld.relaxed.gpu.global.v2.s32", body)
    if name == "fastmath":
        body = sub("LOG1P(EXP(-FABS(r[1])))", "__logf(1.0f + __expf(-FABS(r[1])))", body)
        body = body.replace("EXP(", "__expf(")
        body = sub("tanhf(r[2])", "tanh_approx(r[2])", body)
        body = sub("(1.0f / (1.0f + __expf(-r[3]))) * c / n", "__fdividef(__fdividef(c, 1.0f + __expf(-r[3])), n)", body)
        body = ('auto tanh_approx = [](float x) { float r; asm("tanh.approx.f32 %0, %1;" : "=f"(r) : "f"(x)); '
                'return r; };\n') + body
    return body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2, 4, 8])
    ap.add_argument("--variants", type=lambda v: v.split(","), default=["base", "noxchg", "noloop", "bare"])
    ap.add_argument("--split", type=lambda v: [bool(int(x)) for x in v.split(",")], default=[False, True],
                    help="kernel built with the batch tile in one piece (0) and in two halves taking turns (1)")
    ap.add_argument("--rows", type=lambda v: [int(x) for x in v.split(",")], default=[2],
                    help="rows of the recurrent matrix per thread (the plan's RPT)")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args()

    import mlx.core as mx
    import numpy as np

    from mad.kernels import slstm_device as sd

    rng = np.random.default_rng(0)
    R = mx.array(rng.normal(0, DH ** -0.5, (NH, 4 * DH, DH)).astype(np.float32))
    bias = mx.array(rng.normal(0, 1, (4 * NH * DH,)).astype(np.float32))
    base_body = sd.SEQUENCE_BODY
    results = {}
    for name, split, rpt in ((n, s, r) for r in a.rows for s in a.split for n in a.variants):
        sd.SEQUENCE_BODY = variant_body(name, base_body)
        sd.sequence_kernel.cache_clear()
        sd.SPLIT, sd.ROWS_PER_THREAD = split, (rpt,)
        for B in a.batches:
            gates = [mx.array(rng.normal(0, 1, (B, NH, a.tokens, DH)).astype(np.float32)) for _ in range(4)]
            mx.eval(gates)
            _, times = timed(lambda: sd.slstm_sequence_device(*gates, R, bias), a.trials)
            us = statistics.median(times) / a.tokens * 1e6
            results[f"{name} split {split} rows {rpt} B{B}"] = {
                "variant": name, "split": split, "rows_per_thread": rpt, "batch": B, "seconds": times, "us_per_step": us}
            print(f"{name:8s} split {split:d} rows {rpt} B {B:2d}: {us:6.2f} us/step", flush=True)
    sd.SEQUENCE_BODY = base_body
    write_json({"tokens": a.tokens, "heads": NH, "head_dim": DH, "mlx": mx.__version__, "results": results}, a.json)


if __name__ == "__main__":
    main()
