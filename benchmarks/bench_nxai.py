"""MAD (MLX) vs NX-AI `xLSTMLMModel` (PyTorch, vanilla sLSTM backend) on the same CPU, same weights.

The model is the ~125M-class xLSTM[7:1] of `topologies/xlstm-v1-125m.yaml`: vocab 50304, width 768, 24 blocks,
sLSTM at 7, 15, 23 (4 heads), mLSTM v1 elsewhere (4 heads, inner 1536), float32, batch 1. NX-AI builds it from
the same `xLSTMLMModelConfig` mapping; its weights are re-randomised with a fixed seed
(`tests/reference/make_nxai_fixtures.randomise_`), saved as an NX-AI checkpoint folder and read back by MAD
with `mad.loading.load(folder)`, so both run identical weights. Logits are compared before anything is timed.

Timed, interleaving MAD and NX-AI trials in one process (torch.no_grad, default torch threads):
  decode    `--steps` greedy single-token steps from the state after a `--prompt`-token prompt (MAD: one
            prefill call; NX-AI has no stateful forward, so its prompt state comes from `step` per token);
            every trial starts from the same prompt state; tokens/s = steps / time
  prefill   a `--prefill`-token forward from the empty state (MAD also returns the final state; NX-AI's
            forward returns logits only)
  sLSTM     the recurrence alone, one layer's shapes (B 1, 4 heads of 192), `--prefill` steps: the
            `slstm_sequence` kernel MAD's models run (on the CPU the native loop, kernels/slstm_native.py,
            where it builds; `MAD_NATIVE=0`: the pure-MLX loop) against NX-AI's vanilla `slstm_forward` (a
            Python loop of torch ops), same inputs
Every MAD call ends with `mx.eval`; PyTorch on CPU is synchronous. Figures are medians of interleaved
trials. The timed MAD model runs in a process of its own (benchmarks/mad_worker.py says why), with the
CPU BLAS `import mad` picks there (backends/cpu.py; printed; MAD_BLAS is passed on).

    /tmp/ref/bin/python benchmarks/bench_nxai.py [--trials 3] [--steps 16] [--prefill 256] [--json [PATH]]
    python benchmarks/bench_nxai.py --quick   # 4 blocks of width 64, tiny lengths, no pauses: a smoke run (CI)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from common import (PAUSE_S, WORKER_BLAS, MadProcess, interleave, slstm_inputs, throughput,  # noqa: I001 (reads MAD_BLAS first)
                    write_json)

os.environ["MAD_BLAS"] = "mlx"  # here MAD only checks agreement; the timed MAD runs in its own process
import torch  # noqa: E402
import mad  # noqa: E402
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mad.loading import load  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "reference"))
from make_nxai_fixtures import build_model, randomise_, state_dict  # noqa: E402

CONFIG = {
    "vocab_size": 50304, "embedding_dim": 768, "num_blocks": 24, "slstm_at": [7, 15, 23],
    "mlstm_block": {"mlstm": {"num_heads": 4, "conv1d_kernel_size": 4, "qkv_proj_blocksize": 4, "proj_factor": 2.0}},
    "slstm_block": {"slstm": {"backend": "vanilla", "num_heads": 4, "conv1d_kernel_size": 4},
                    "feedforward": {"proj_factor": 1.3, "act_fn": "gelu"}},
}
QUICK_CONFIG = dict(CONFIG, vocab_size=256, embedding_dim=64, num_blocks=4, slstm_at=[1])  # --quick


def clone_state(state):
    """NX-AI's step state (nested dicts/tuples of tensors; its conv step updates tensors in place)."""
    if isinstance(state, dict):
        return {k: clone_state(v) for k, v in state.items()}
    if isinstance(state, tuple):
        return tuple(clone_state(v) for v in state)
    return state.clone() if isinstance(state, torch.Tensor) else state


def slstm_only(worker: MadProcess, steps: int, trials: int, pause: float) -> dict:
    """The sLSTM recurrence alone: MAD's kernel (in the worker) vs NX-AI's vanilla loop."""
    from xlstm.blocks.slstm.src.vanilla import slstm_forward, slstm_pointwise_function_registry

    wx, R, b = slstm_inputs(steps)
    B, H = wx.shape[1], wx.shape[2] // 4
    wx_t, R_t, b_t = torch.tensor(wx), torch.tensor(R), torch.tensor(b)
    fn = slstm_pointwise_function_registry["slstm"]

    def nxai() -> float:
        with torch.no_grad():
            t = time.perf_counter()
            slstm_forward(wx_t, torch.zeros(4, B, H), R_t, b_t, fn)
            return time.perf_counter() - t

    with torch.no_grad():
        ref = slstm_forward(wx_t, torch.zeros(4, B, H), R_t, b_t, fn)[0][0, 1:]
    np.save(worker.folder / "slstm_ref.npy", ref.numpy())
    diff = json.loads(worker.ask(f"slstm-setup {steps}"))["max_abs_diff_h"]
    timers = {"mad": worker.timer("slstm"), "nxai": nxai}
    interleave(timers, 1, pause)
    return {"times": interleave(timers, trials, pause), "max_abs_diff_h": diff}


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16, help="decode steps per decode trial")
    ap.add_argument("--prompt", type=int, default=64, help="prompt length before decoding")
    ap.add_argument("--prefill", type=int, default=256, help="length of the timed prefill (and of the sLSTM-only run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pause", type=float, default=PAUSE_S, help="seconds of rest before each trial (common.interleave)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run in seconds, timings meaningless: vocab 256, width 64, 4 blocks (sLSTM at 1), "
                         "--trials 1 --steps 2 --prompt 8 --prefill 16 --pause 0")
    ap.add_argument("--json", nargs="?", const="-", metavar="PATH", help="write the results as JSON (stdout if no PATH)")
    a = ap.parse_args(argv)
    if a.quick:
        a.trials, a.steps, a.prompt, a.prefill, a.pause = 1, 2, 8, 16, 0.0
    log = sys.stderr if a.json == "-" else sys.stdout
    t_start = time.perf_counter()

    cfg = dict(QUICK_CONFIG if a.quick else CONFIG, context_length=max(a.prefill, a.prompt + a.steps + 1, 32))
    torch.manual_seed(a.seed)
    nx = build_model(cfg)
    randomise_(nx, seed=a.seed, width_scale=(24 / cfg["embedding_dim"]) ** 0.5)
    with tempfile.TemporaryDirectory(prefix="mad-bench-nxai-") as folder:
        from safetensors.torch import save_file
        import yaml

        Path(folder, "config.yaml").write_text(yaml.safe_dump(cfg))
        save_file(state_dict(nx), str(Path(folder, "model.safetensors")))
        lm, _ = load(folder)
        return run(a, log, t_start, cfg, nx, lm, folder)


def run(a, log, t_start, cfg, nx, lm, folder) -> dict:
    n_params = sum(p.numel() for p in nx.parameters())
    import xlstm

    print(f"xLSTM {n_params / 1e6:.1f}M parameters (width {cfg['embedding_dim']}, {cfg['num_blocks']} blocks, sLSTM at "
          f"{', '.join(map(str, cfg['slstm_at']))}, vocab {cfg['vocab_size']}), float32, batch 1", file=log)
    print(f"NX-AI: xlstm {xlstm.__version__}, torch {torch.__version__}, sLSTM backend vanilla, torch threads "
          f"{torch.get_num_threads()}", file=log)

    gen = torch.Generator().manual_seed(a.seed + 1)
    check_ids = torch.randint(0, cfg["vocab_size"], (1, 21), generator=gen)
    with torch.no_grad():
        ref = nx(check_ids).numpy()
        exact = copy.deepcopy(nx).double()(check_ids).numpy()  # the float32 noise level of this model and draw
    pre, state = lm(mx.array(check_ids[:, :20].numpy()).astype(mx.int32))
    dec, _ = lm(mx.array(check_ids[:, 20:].numpy()).astype(mx.int32), state)
    check = {"prefill_logits": float(np.abs(np.array(pre) - ref[:, :20]).max()),
             "decode_logits": float(np.abs(np.array(dec) - ref[:, 20:]).max()),
             "logit_scale": float(np.abs(ref).max()), "nxai_float32_vs_float64": float(np.abs(ref - exact).max()),
             "mad_vs_nxai_float64": float(np.abs(np.array(pre) - exact[:, :20]).max())}
    print(f"logits agree: max |diff| prefill {check['prefill_logits']:.2e}, decode step {check['decode_logits']:.2e} "
          f"(|logits| up to {check['logit_scale']:.1f}; NX-AI's own float32 is {check['nxai_float32_vs_float64']:.2e} "
          f"from float64, MAD {check['mad_vs_nxai_float64']:.2e})", file=log)

    prompt = torch.randint(0, cfg["vocab_size"], (1, a.prompt), generator=gen)
    long = torch.randint(0, cfg["vocab_size"], (1, a.prefill), generator=gen)

    # ---------------------------------------------------------------- prompt states (shared by all trials)
    worker = MadProcess(folder, prompt.numpy(), long.numpy(), a.steps)
    mad_decode, mad_prefill = worker.timer("decode"), worker.timer("prefill")
    print(f"MAD: mlx {mx.__version__} on {mx.default_device()}, timed in its own process (CPU BLAS: "
          f"{worker.blas or 'bundled with MLX'}; MAD_BLAS={WORKER_BLAS}), {lm.program.graph.name} topology, "
          f"compile '{lm.program.compile_mode}'", file=log)
    with torch.no_grad():
        nx_state = None
        for t in range(a.prompt):
            lg, nx_state = nx.step(prompt[:, t:t + 1], nx_state)
        nx_tok = lg[:, -1].argmax(-1, keepdim=True)
    nx_saved = clone_state(nx_state)

    def nx_decode() -> float:
        state, tok = clone_state(nx_saved), nx_tok
        with torch.no_grad():
            t = time.perf_counter()
            for _ in range(a.steps):
                logits, state = nx.step(tok, state)
                tok = logits[:, -1].argmax(-1, keepdim=True)
            return time.perf_counter() - t

    decode = {"mad": mad_decode, "nxai": nx_decode}
    interleave(decode, 1, a.pause)  # warm-up
    decode_times = interleave(decode, a.trials, a.pause)

    # ---------------------------------------------------------------- prefill
    def nx_prefill() -> float:
        with torch.no_grad():
            t = time.perf_counter()
            nx(long)
            return time.perf_counter() - t

    prefill = {"mad": mad_prefill, "nxai": nx_prefill}
    first = {k: v[0] for k, v in interleave(prefill, 1, a.pause).items()}  # warm-up at the timed length (MAD traces and
    # compiles the program for this shape once: the first call at a new length pays that)
    prefill_times = interleave(prefill, a.trials, a.pause)

    slstm = slstm_only(worker, a.prefill, a.trials, a.pause)

    results = {"config": cfg, "params": n_params, "dtype": "float32", "torch": torch.__version__,
               "xlstm": xlstm.__version__, "torch_threads": torch.get_num_threads(), "mlx": mx.__version__,
               "mlx_device": str(mx.default_device()), "cpu_blas": worker.blas, "machine": platform.machine(),
               "processor": platform.processor(), "check": check, "benchmarks": {},
               "slstm_only_max_abs_diff_h": slstm["max_abs_diff_h"], "prefill_first_call_s": first}
    rows = []
    for bench, times, tokens in ((f"decode (after {a.prompt})", decode_times, a.steps),
                                 (f"prefill {a.prefill}", prefill_times, a.prefill),
                                 (f"sLSTM only, {a.prefill} steps", slstm["times"], a.prefill)):
        entry = {}
        for k, v in times.items():
            entry[k] = throughput(v, tokens)
        entry["tps_ratio_mad_over_nxai"] = entry["mad"]["tokens_per_s"] / entry["nxai"]["tokens_per_s"]
        results["benchmarks"][bench] = entry
        rows.append((bench, entry))
    results["runtime_s"] = time.perf_counter() - t_start

    print(f"\n{'benchmark':<26} {'model':<6} {'tokens/s':>10} {'ms/token':>10} {'median s':>10} {'trials':>6}"
          f" {'MAD/NX-AI':>10}", file=log)
    for bench, entry in rows:
        for k, label in (("mad", "MAD"), ("nxai", "NX-AI")):
            e = entry[k]
            ratio = f"{entry['tps_ratio_mad_over_nxai']:.3f}" if k == "mad" else ""
            print(f"{bench:<26} {label:<6} {e['tokens_per_s']:>10.2f} {e['ms_per_token']:>10.2f} {e['median_s']:>10.3f}"
                  f" {e['trials']:>6} {ratio:>10}", file=log)
    print(f"(first prefill call, untimed warm-up: MAD {first['mad']:.1f} s incl. trace and compile, NX-AI "
          f"{first['nxai']:.1f} s; sLSTM-only outputs agree to {slstm['max_abs_diff_h']:.1e}; total "
          f"{results['runtime_s']:.0f} s)", file=log)
    worker.close()
    write_json(results, a.json)
    return results


if __name__ == "__main__":
    main()
