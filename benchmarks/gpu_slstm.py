"""The sLSTM recurrence on the GPU: MAD's one-launch kernel vs the pure-MLX step loop, and NX-AI's
`xLSTMLMModel` (vanilla sLSTM backend, PyTorch) on the ~1.3B xLSTM[7:1] stack.

  layer    the sLSTM recurrence alone at the ~1.3B stack's shapes (4 heads of 512, `--batch` rows,
           `--tokens` steps): `kernels.slstm_device` (one launch) against `kernels.slstm.slstm_sequence`
           (a loop of one compiled step per token, the reference) on the same GPU, same inputs; the two
           outputs are compared first. The launch-free limit is the FP32 work 2 * B * NH * 4 * DH^2 flops
           per step at the H200's FP32 peak (`--fp32-tflops`, 67 for an H200 SXM): the weights stay on
           chip, so the bytes (inputs and outputs, a few MB) are far below the HBM time.
  nxai     NX-AI's model built from the `topologies/xlstm-v1-1.3b.yaml` mapping (width 2048, 48 blocks,
           sLSTM at 7, 15, ..., 47), `--dtype`, on CUDA: prefill `--tokens` tokens at batch `--batch`
           (one forward) and decode at batch 1 (`--steps` `step` calls after an `--prompt`-token prompt
           run by `step`), `torch.cuda.synchronize()` before every clock read, median of `--trials`
           after a warm-up. MAD's figures for the same stack come from `mad bench` (see RESULTS.md).

    python benchmarks/gpu_slstm.py layer [--batch 8] [--tokens 2048] [--trials 5] [--json PATH]
    python benchmarks/gpu_slstm.py nxai  [--batch 8] [--tokens 2048] [--steps 32] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from common import timed, write_json

NH, DH = 4, 512          # the ~1.3B stack's sLSTM heads
CONFIG_1_3B = {
    "vocab_size": 50304, "embedding_dim": 2048, "num_blocks": 48, "slstm_at": list(range(7, 48, 8)),
    "mlstm_block": {"mlstm": {"num_heads": 4, "conv1d_kernel_size": 4, "qkv_proj_blocksize": 4, "proj_factor": 2.0}},
    "slstm_block": {"slstm": {"backend": "vanilla", "num_heads": 4, "conv1d_kernel_size": 4},
                    "feedforward": {"proj_factor": 1.3, "act_fn": "gelu"}},
}


def layer(a) -> dict:
    import mlx.core as mx
    import numpy as np

    from mad.kernels.slstm import slstm_sequence
    from mad.kernels import slstm_device
    from mad.kernels.slstm_device import multiprocessors, plan, slstm_sequence_device

    B, T = a.batch, a.tokens
    rng = np.random.default_rng(0)
    gates = [mx.array(rng.normal(mu, s, (B, NH, T, DH)).astype(np.float32)) for mu, s in ((0, 2), (1, 2), (0, 1), (0, 1))]
    R = mx.array(rng.normal(0, DH ** -0.5, (NH, 4 * DH, DH)).astype(np.float32))
    b = mx.array(rng.normal(0, 1, (4 * NH * DH,)).astype(np.float32))
    mx.eval(gates, R, b)

    if a.kernel_only:                                   # one launch, for a profiler
        mx.eval(slstm_sequence_device(*gates, R, b))
        return {}
    (h_r, s_r), t_loop = timed(lambda: slstm_sequence(*gates, R, b), max(1, a.trials // 2))
    groups = {}
    for bg, split in ((bg, split) for split in (True, False) for bg in a.groups):
        slstm_device.BATCH_GROUP, slstm_device.SPLIT = bg, split   # batch rows per pass; halves taking turns
        try:
            (h_k, s_k), times = timed(lambda: slstm_sequence_device(*gates, R, b), a.trials)
        except RuntimeError as e:
            print(f"  batch group {bg}, split {split}: {e}")
            continue
        groups[bg, split] = {"kernel_s": times, "rel_diff_h": float(mx.linalg.norm(h_k - h_r) / mx.linalg.norm(h_r)),
                      "max_abs_diff_h": float(mx.max(mx.abs(h_k - h_r)))}
        print(f"  batch group {bg}, split {split}: {statistics.median(times) * 1e3:.2f} ms, relative diff "
              f"{groups[bg, split]['rel_diff_h']:.1e}")
    best = min(groups, key=lambda g: statistics.median(groups[g]["kernel_s"]))
    t_kernel, diff, rel = groups[best]["kernel_s"], groups[best]["max_abs_diff_h"], groups[best]["rel_diff_h"]
    p = plan(NH, DH, multiprocessors())
    flops = 2 * B * NH * 4 * DH * DH * T
    limit_s = flops / (a.fp32_tflops * 1e12)
    k, r = statistics.median(t_kernel), statistics.median(t_loop)
    out = {"batch": B, "tokens": T, "heads": NH, "head_dim": DH, "plan": p.__dict__, "batch_group_split": best,
           "variants": {f"group {g}, split {sp}": v for (g, sp), v in groups.items()},
           "multiprocessors": multiprocessors(), "kernel_s": t_kernel, "loop_s": t_loop,
           "kernel_median_s": k, "loop_median_s": r, "speedup": r / k, "us_per_step_kernel": k / T * 1e6,
           "us_per_step_loop": r / T * 1e6, "flops": flops, "tflops_kernel": flops / k / 1e12,
           "launch_free_limit_s": limit_s, "fraction_of_limit": limit_s / k, "max_abs_diff_h": diff,
           "rel_diff_h": rel, "mlx": mx.__version__}
    print(f"sLSTM layer, B {B}, T {T}, {NH} heads of {DH}, float32; plan {p}, (batch group, split) {best}")
    print(f"  kernel  {k * 1e3:9.2f} ms  ({k / T * 1e6:.2f} us/step, {flops / k / 1e12:.1f} TFLOP/s, "
          f"{limit_s / k:.0%} of the {limit_s * 1e3:.2f} ms launch-free limit at {a.fp32_tflops} TFLOP/s)")
    print(f"  loop    {r * 1e3:9.2f} ms  ({r / T * 1e6:.2f} us/step)   speed-up {r / k:.1f}x")
    print(f"  outputs: max |diff| {diff:.2e}, relative {rel:.2e}")
    return out


def nxai(a) -> dict:
    import torch
    import xlstm

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "reference"))
    from make_nxai_fixtures import build_model, randomise_

    dtype = getattr(torch, a.dtype)
    cfg = dict(CONFIG_1_3B, context_length=max(a.tokens, a.prompt + a.steps + 1))
    torch.manual_seed(0)
    model = build_model(cfg)
    randomise_(model, seed=0, width_scale=(24 / cfg["embedding_dim"]) ** 0.5)
    model = model.to("cuda", dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    long = torch.randint(0, cfg["vocab_size"], (a.batch, a.tokens), generator=gen).cuda()
    prompt = torch.randint(0, cfg["vocab_size"], (1, a.prompt), generator=gen).cuda()

    def clock(fn):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t

    with torch.no_grad():
        clock(lambda: model(long))                                  # warm-up
        prefill = [clock(lambda: model(long)) for _ in range(a.trials)]
        state = None
        for t in range(a.prompt):
            logits, state = model.step(prompt[:, t:t + 1], state)
        tok = logits[:, -1].argmax(-1, keepdim=True)

        def decode():
            s, x = state, tok
            for _ in range(a.steps):
                lg, s = model.step(x, s)
                x = lg[:, -1].argmax(-1, keepdim=True)

        clock(decode)                                               # warm-up
        decode_t = [clock(decode) for _ in range(a.trials)]
    p_med, d_med = statistics.median(prefill), statistics.median(decode_t)
    out = {"params": params, "dtype": a.dtype, "xlstm": xlstm.__version__, "torch": torch.__version__,
           "prefill_s": prefill, "prefill_tokens_per_s": a.batch * a.tokens / p_med,
           "decode_s": decode_t, "decode_tokens_per_s": a.steps / d_med, "batch": a.batch, "tokens": a.tokens,
           "steps": a.steps, "prompt": a.prompt, "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9}
    print(f"NX-AI xLSTMLMModel {params / 1e9:.3f}B, {a.dtype}, sLSTM vanilla, xlstm {xlstm.__version__}, "
          f"torch {torch.__version__}")
    print(f"  prefill B {a.batch} x {a.tokens}: {out['prefill_tokens_per_s']:.0f} tokens/s (median {p_med:.2f} s)")
    print(f"  decode B 1: {out['decode_tokens_per_s']:.2f} tokens/s ({a.steps} steps after {a.prompt}, "
          f"median {d_med:.2f} s); peak {out['peak_memory_gb']:.1f} GB")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("layer", "nxai"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--fp32-tflops", type=float, default=67.0)
    ap.add_argument("--groups", type=lambda v: [int(x) for x in v.split(",")], default=[4, 2, 1],
                    help="batch-group sizes of the kernel to try (layer)")
    ap.add_argument("--kernel-only", action="store_true", help="one launch of the kernel, nothing timed (for ncu)")
    ap.add_argument("--json")
    a = ap.parse_args()
    write_json(layer(a) if a.what == "layer" else nxai(a), a.json)


if __name__ == "__main__":
    main()
