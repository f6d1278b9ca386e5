"""MAD (MLX) vs Hugging Face transformers `xLSTMForCausalLM` (PyTorch) on the same CPU, same weights.

The model is the ~160M xLSTM-7B-family model (hidden_size 768, 12 layers, 4 heads, vocab 50304, other
`xLSTMConfig` defaults), float32. Its weights are re-randomised with a fixed seed (HF's own init zeroes
the gate projections), saved with `save_pretrained` to a temporary folder and read back by MAD with
`mad.loading.load(folder)`, so both run identical weights. The logits of the two are compared on a
short input (prefill and one decode step) before anything is timed.

Timed, interleaving MAD and HF trials in one process (batch 1, torch.no_grad, default torch threads):
  decode    `--steps` greedy single-token steps with the cache/state, after a 64-token prompt
            (every trial starts from the same prompt state); tokens/s = steps / time
  prefill   a 1024-token forward from the empty state (logits at every position and final state); MAD
            also reads the same tokens as a prompt (`lm.prefill`: the state and the last position's
            logits, row MAD*), which is how `mad run` reads one; HF's generate() has only the full forward
Every MAD step/forward ends with `mx.eval`; PyTorch on CPU is synchronous. Figures are medians, trials
interleaved with a pause before each (benchmarks/common.py). The timed MAD model runs in a process of
its own (benchmarks/mad_worker.py says why), with the CPU BLAS `import mad` picks there (backends/cpu.py;
printed; MAD_BLAS is passed on); PyTorch uses its own MKL.

Run with an environment that has torch, transformers and (optionally) xlstm, e.g.

    /tmp/ref/bin/python benchmarks/bench_hf.py [--trials 5] [--steps 16] [--json [PATH]]
    python benchmarks/bench_hf.py --quick     # a 2-layer model, tiny lengths, no pauses: a smoke run (CI)

With the `xlstm` package installed, HF runs NX-AI's mLSTM blocks and `mlstm_kernels` native PyTorch
kernels (the "external" path); without it, its own copy in `modeling_xlstm.py`. The script says which.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import platform
import sys
import tempfile
import time
from typing import Optional

from common import PAUSE_S, WORKER_BLAS, MadProcess, interleave, throughput, write_json  # noqa: I001 (reads MAD_BLAS first)

os.environ["MAD_BLAS"] = "mlx"  # here MAD only checks agreement; the timed MAD runs in its own process
import torch  # noqa: E402
import mad  # noqa: E402
import mlx.core as mx  # noqa: E402

from mad.loading import load  # noqa: E402

CONFIG = dict(hidden_size=768, num_hidden_layers=12, num_heads=4, vocab_size=50304)
# --quick: HF sizes its cache with round_up(D * factor, 64), so qk and v dims stay multiples of 64
QUICK_CONFIG = dict(hidden_size=128, num_hidden_layers=2, num_heads=4, vocab_size=256, chunk_size=8)
WARM_FULL_S = 10.0  # warm up at the timed length when one run is estimated to take less than this


def make_hf_model(seed: int, config: dict):
    import transformers
    from transformers import xLSTMConfig, xLSTMForCausalLM
    from transformers.utils import logging as hf_logging
    from transformers.models.xlstm import modeling_xlstm

    hf_logging.disable_progress_bar()
    config = xLSTMConfig(**config)
    torch.manual_seed(seed)
    model = xLSTMForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim == 1:
                r = 1.0 + 0.1 * r if name.endswith("norm.weight") else r
            elif "embeddings" not in name:
                r = r / math.sqrt(p.shape[-1])
            p.copy_(r)
    info = {"transformers": transformers.__version__, "torch": torch.__version__,
            "external_xlstm": bool(getattr(modeling_xlstm, "external_xlstm", False)),
            "chunkwise_kernel": config.chunkwise_kernel, "step_kernel": config.step_kernel,
            "torch_threads": torch.get_num_threads()}
    return model, info


def hf_forward(model, ids: torch.Tensor, cache=None):
    # transformers 5.x renamed xLSTM's `cache_params` (argument and output) to `cache`; the old name goes in 5.40
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "cache_params"
    out = model(input_ids=ids, use_cache=True, **{name: cache})
    return out.logits, getattr(out, name)


def check_same(hf, lm, vocab: int, seed: int) -> dict:
    """Max |logits diff| on a 20-token prefill and one decode step (batch 1)."""
    gen = torch.Generator().manual_seed(seed + 7)
    ids = torch.randint(0, vocab, (1, 21), generator=gen)
    with torch.no_grad():
        l_hf, cache = hf_forward(hf, ids[:, :20])
        d_hf, _ = hf_forward(hf, ids[:, 20:], cache)
    l_mad, state = lm(mx.array(ids[:, :20].numpy()).astype(mx.int32))
    d_mad, _ = lm(mx.array(ids[:, 20:].numpy()).astype(mx.int32), state)

    def diff(a_torch, b_mx):
        a = a_torch.float().numpy()
        b = __import__("numpy").array(b_mx.astype(mx.float32))
        return float(abs(a - b).max()), float(abs(a).max())

    pre, scale = diff(l_hf, l_mad)
    dec, _ = diff(d_hf, d_mad)
    return {"prefill_logits": pre, "decode_logits": dec, "logit_scale": scale,
            "same_argmax_prefill": bool((l_hf.argmax(-1).numpy() == __import__("numpy").array(mx.argmax(l_mad, -1))).all())}


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=5, help="trials per benchmark and model (prefill: within --budget)")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per decode trial")
    ap.add_argument("--prompt", type=int, default=64, help="prompt length before decoding")
    ap.add_argument("--prefill", type=int, default=1024, help="length of the timed prefill")
    ap.add_argument("--budget", type=float, default=150.0,
                    help="seconds for the timed prefills: fewer than --trials (at least 1) when one MAD+HF pair "
                         "is estimated to take longer than budget/trials")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pause", type=float, default=PAUSE_S, help="seconds of rest before each trial (common.interleave)")
    ap.add_argument("--quick", action="store_true",
                    help=f"a smoke run in seconds, timings meaningless: {QUICK_CONFIG}, --trials 1 --steps 2 --prompt 8 "
                         "--prefill 32 --pause 0")
    ap.add_argument("--json", nargs="?", const="-", metavar="PATH", help="write the results as JSON (stdout if no PATH)")
    a = ap.parse_args(argv)
    a.config = QUICK_CONFIG if a.quick else CONFIG
    if a.quick:
        a.trials, a.steps, a.prompt, a.prefill, a.pause = 1, 2, 8, 32, 0.0
    log = sys.stderr if a.json == "-" else sys.stdout
    t_start = time.perf_counter()

    hf, info = make_hf_model(a.seed, a.config)
    with tempfile.TemporaryDirectory(prefix="mad-bench-hf-") as folder:
        hf.save_pretrained(folder)
        lm, _ = load(folder)
        return run(a, log, t_start, hf, info, lm, folder)


def run(a, log, t_start, hf, info, lm, folder) -> dict:
    n_params = sum(p.numel() for p in hf.parameters())
    print(f"xLSTM {n_params / 1e6:.1f}M parameters ({', '.join(f'{k}={v}' for k, v in a.config.items())}), float32, "
          f"batch 1", file=log)
    print(f"HF: transformers {info['transformers']}, torch {info['torch']}, "
          f"{'external xlstm package path' if info['external_xlstm'] else 'built-in path (no xlstm package)'} "
          f"(chunkwise '{info['chunkwise_kernel']}', step '{info['step_kernel']}'), torch threads "
          f"{info['torch_threads']}", file=log)

    check = check_same(hf, lm, a.config["vocab_size"], a.seed)
    print(f"logits agree: max |diff| prefill {check['prefill_logits']:.2e}, decode {check['decode_logits']:.2e} "
          f"(|logits| up to {check['logit_scale']:.1f}; same argmax: {check['same_argmax_prefill']})", file=log)

    gen = torch.Generator().manual_seed(a.seed + 1)
    prompt = torch.randint(0, a.config["vocab_size"], (1, a.prompt), generator=gen)
    long = torch.randint(0, a.config["vocab_size"], (1, a.prefill), generator=gen)

    # ---------------------------------------------------------------- prompt states (shared by all trials)
    worker = MadProcess(folder, prompt.numpy(), long.numpy(), a.steps)
    mad_decode, mad_prefill, mad_prompt = (worker.timer(c) for c in ("decode", "prefill", "prompt"))
    t_prompt_mad = worker.t_prompt
    print(f"MAD: mlx {mx.__version__} on {mx.default_device()}, timed in its own process (CPU BLAS: "
          f"{worker.blas or 'bundled with MLX'}; MAD_BLAS={WORKER_BLAS}), {lm.program.graph.name} topology, "
          f"compile '{lm.program.compile_mode}'", file=log)
    with torch.no_grad():
        t0 = time.perf_counter()
        logits_hf, hf_cache = hf_forward(hf, prompt)
        t_prompt_hf = time.perf_counter() - t0
        hf_tok = logits_hf[:, -1].argmax(-1, keepdim=True)
    hf_saved = {layer: tuple(t.clone() for t in s) for layer, s in hf_cache.rnn_state.items()}
    hf_offset = hf_cache.seqlen_offset.clone()

    def hf_decode() -> float:
        for layer, s in hf_saved.items():  # back to the prompt state
            for dst, src in zip(hf_cache.rnn_state[layer], s):
                dst.copy_(src)
        hf_cache.seqlen_offset.copy_(hf_offset)
        tok = hf_tok
        with torch.no_grad():
            t = time.perf_counter()
            for _ in range(a.steps):
                logits, _ = hf_forward(hf, tok, hf_cache)
                tok = logits[:, -1].argmax(-1, keepdim=True)
            return time.perf_counter() - t

    decode = {"mad": mad_decode, "hf": hf_decode}
    interleave(decode, 1, a.pause)  # warm-up
    decode_times = interleave(decode, a.trials, a.pause)

    # ---------------------------------------------------------------- prefill
    def hf_prefill() -> float:
        with torch.no_grad():
            t = time.perf_counter()
            hf_forward(hf, long)
            return time.perf_counter() - t

    est = {"mad": t_prompt_mad * a.prefill / a.prompt, "hf": t_prompt_hf * a.prefill / a.prompt}
    warm = {}
    for name, fn in (("mad", mad_prefill), ("hf", hf_prefill)):
        if est[name] < WARM_FULL_S:
            fn()
            if name == "mad":
                mad_prompt()
            warm[name] = "one full-length run"
        elif name == "mad":      # trace and compile the full-length graphs without running them; the evaluated
            worker.ask("trace")  # prompt run above already built the same kernels (chunkwise path)
            warm[name] = f"full-length trace (not evaluated) + the evaluated {a.prompt}-token prompt run"
        else:
            hf_forward(hf, long[:, : a.prompt])
            warm[name] = f"a {a.prompt}-token run"
    n_prefill = max(1, min(a.trials, int(a.budget // max(est["mad"] + est["hf"], 1e-9))))
    prefill_times = interleave({"mad": mad_prefill, "mad-prompt": mad_prompt, "hf": hf_prefill}, n_prefill, a.pause)

    results = {"config": a.config, "params": n_params, "dtype": "float32", "hf": info, "mlx": mx.__version__,
               "mlx_device": str(mx.default_device()), "cpu_blas": worker.blas, "machine": platform.machine(), "processor": platform.processor(),
               "check": check, "prefill_warmup": warm, "benchmarks": {}}
    rows = []
    for bench, times, tokens in ((f"decode (after {a.prompt})", decode_times, a.steps),
                                 (f"prefill {a.prefill}", prefill_times, a.prefill)):
        entry = {}
        for k, v in times.items():
            entry[k] = throughput(v, tokens)
        for k in times:
            if k != "hf":
                entry[f"tps_ratio_{k.replace('-', '_')}_over_hf"] = entry[k]["tokens_per_s"] / entry["hf"]["tokens_per_s"]
        results["benchmarks"][bench] = entry
        rows.append((bench, entry))
    results["runtime_s"] = time.perf_counter() - t_start

    print(f"\n{'benchmark':<20} {'model':<5} {'tokens/s':>10} {'ms/token':>10} {'median s':>10} {'trials':>6}"
          f" {'MAD/HF tok/s':>13}", file=log)
    for bench, entry in rows:
        for k, label in (("mad", "MAD"), ("mad-prompt", "MAD*"), ("hf", "HF")):
            if k not in entry:
                continue
            e = entry[k]
            ratio = f"{entry[f'tps_ratio_{k}_over_hf'.replace('-', '_')]:.3f}" if k != "hf" else ""
            print(f"{bench:<20} {label:<5} {e['tokens_per_s']:>10.2f} {e['ms_per_token']:>10.2f} {e['median_s']:>10.3f}"
                  f" {e['trials']:>6} {ratio:>13}", file=log)
    print("(MAD: logits at every position, as HF's forward; MAD*: the prompt read as `mad run` reads it, "
          "state and the last position's logits; transformers' xLSTM has no such option, its generate() "
          "runs the full forward)", file=log)
    print(f"(decode: {a.steps} greedy steps per trial; prefill warm-up: MAD {warm['mad']}, HF {warm['hf']}; "
          f"total {results['runtime_s']:.0f} s)", file=log)
    worker.close()
    write_json(results, a.json)
    return results


if __name__ == "__main__":
    main()
