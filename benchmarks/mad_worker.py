"""MAD's side of bench_hf.py and bench_nxai.py, in a process of its own (see `common.MadProcess`).

A process that has loaded MAD's CPU BLAS (Intel MKL, backends/cpu.py) and run a product slows PyTorch's
work in the same process (NX-AI's xLSTM prefill 1.1-2.5x, benchmarks/probes/probe_mkl_torch.py), so the comparison scripts keep
PyTorch and the timed MAD model in different processes, interleaving their trials as before.

    python mad_worker.py FOLDER STEPS     (FOLDER: the checkpoint, prompt.npy and long.npy)

Prints one JSON line ({"t_prompt": s, "blas": path}) when ready, then answers each command read from
stdin with one line: the seconds it measured (decode, prefill, prompt), 0 for `trace` (the full-length
calls, all positions and last position, traced and compiled, not evaluated) and for `slstm` (after `slstm-setup N`, which checks MAD's
sLSTM layer on bench_nxai's N-step inputs against FOLDER/slstm_ref.npy and answers the max |diff| in
JSON) the seconds of that layer alone.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import mad  # before mlx.core: selects the CPU BLAS, see backends/cpu.py
import mlx.core as mx
import numpy as np

from mad.kernels.registry import dispatch
from mad.loading import load

from common import slstm_inputs


def mad_timers(lm, prompt, long, steps: int):
    """The prompt's state, computed once and timed; then a decode timer (`steps` greedy steps from that
    state, each evaluated), a prefill timer (`long` in one call, logits at every position) and a prompt
    timer (`long` read as generation reads a prompt, `lm.prefill`: the state and the last position's
    logits). Returns (decode, prefill, prompt, prompt seconds); the timers return their seconds."""
    t0 = time.perf_counter()
    logits, state0 = lm(prompt)
    tok0 = mx.argmax(logits[:, -1], axis=-1)[:, None]
    mx.eval(tok0, state0)
    t_prompt = time.perf_counter() - t0

    def decode() -> float:
        tok, state = tok0, state0
        t = time.perf_counter()
        for _ in range(steps):
            logits, state = lm(tok, state, check_tokens=False)
            tok = mx.argmax(logits[:, -1], axis=-1)[:, None]
            mx.eval(tok, state)
        return time.perf_counter() - t

    def prefill() -> float:
        t = time.perf_counter()
        mx.eval(lm(long, check_tokens=False))
        return time.perf_counter() - t

    def read_prompt() -> float:
        t = time.perf_counter()
        mx.eval(lm.prefill(long, check_tokens=False))
        return time.perf_counter() - t

    return decode, prefill, read_prompt, t_prompt


def slstm_timer(folder: Path, steps: int):
    """MAD's sLSTM layer on bench_nxai's inputs, the kernel its models run (`dispatch`: on the CPU the native
    loop where it builds, else the pure-MLX one): (timer, max |h - FOLDER/slstm_ref.npy|)."""
    slstm_sequence = dispatch("slstm_sequence")
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

    def trace() -> float:  # both full-length graphs traced and compiled, nothing evaluated
        lm(long, check_tokens=False)
        lm(long, last_only=True, check_tokens=False)
        return 0.0

    fns = {"decode": decode, "prefill": prefill, "prompt": read_prompt, "trace": trace}
    print(json.dumps({"t_prompt": t_prompt, "blas": mad.backends.cpu.BLAS}), flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        if command == "slstm-setup":
            fns["slstm"], diff = slstm_timer(folder, int(args[0]))
            print(json.dumps({"max_abs_diff_h": diff}), flush=True)
            continue
        print(repr(float(fns[command]())), flush=True)


if __name__ == "__main__":
    main()
