"""MAD's side of bench_hf.py and bench_nxai.py, in a process of its own (see `common.MadProcess`).

A process that has loaded MAD's CPU BLAS (Intel MKL, mad/blas.py) and run a product slows PyTorch's
OpenMP work in the same process 2-4x (NX-AI's xLSTM prefill, measured), so the comparison scripts keep
PyTorch and the timed MAD model in different processes, interleaving their trials as before.

    python mad_worker.py FOLDER STEPS     (FOLDER: the checkpoint, prompt.npy and long.npy)

Prints one JSON line ({"t_prompt": s, "blas": path}) when ready, then answers each command read from
stdin with one line: the seconds it measured (decode, prefill, prompt), 0 for `trace` (the full-length
call traced and compiled, not evaluated) and for `slstm` (after `slstm-setup N`, which checks MAD's
sLSTM layer on bench_nxai's N-step inputs against FOLDER/slstm_ref.npy and answers the max |diff| in
JSON) the seconds of that layer alone.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import mad  # before mlx.core: selects the CPU BLAS, see mad/blas.py
import mlx.core as mx
import numpy as np

from mad.loading import load

from common import mad_timers


def slstm_timer(folder: Path, steps: int):
    from bench_nxai import slstm_inputs
    from mad.kernels.slstm import slstm_sequence

    wx, R, b = slstm_inputs(steps)
    B, NH, DH = wx.shape[1], R.shape[0], R.shape[2]
    gates = [mx.array(g) for g in wx.reshape(steps, B, 4, NH, DH).transpose(2, 1, 3, 0, 4)]
    R_mx, b_mx = mx.array(R), mx.array(b)
    h, _ = slstm_sequence(*gates, R_mx, b_mx)
    ref = np.load(folder / "slstm_ref.npy")
    diff = float(np.abs(np.array(h).transpose(2, 0, 1, 3).reshape(ref.shape) - ref).max())

    def run() -> float:
        t = time.perf_counter()
        h, s = slstm_sequence(*gates, R_mx, b_mx)
        mx.eval(h, s)
        return time.perf_counter() - t

    return run, diff


def main() -> None:
    folder, steps = Path(sys.argv[1]), int(sys.argv[2])
    lm, _ = load(folder)
    prompt = mx.array(np.load(folder / "prompt.npy")).astype(mx.int32)
    long = mx.array(np.load(folder / "long.npy")).astype(mx.int32)
    decode, prefill, read_prompt, t_prompt = mad_timers(lm, prompt, long, steps)
    fns = {"decode": decode, "prefill": prefill, "prompt": read_prompt, "trace": lambda: (lm(long), 0.0)[1]}
    print(json.dumps({"t_prompt": t_prompt, "blas": mad.blas.LOADED}), flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        if command == "slstm-setup":
            fns["slstm"], diff = slstm_timer(folder, int(args[0]))
            print(json.dumps({"max_abs_diff_h": diff}), flush=True)
            continue
        print(repr(float(fns[command]())), flush=True)


if __name__ == "__main__":
    main()
