"""Training tokens/s: MAD (MLX) against the PyTorch references on the same machine, same model and batch.

One training step is the forward, the backward and the AdamW update with gradient clipping (1.0), in
float32 (default) or bfloat16 (`--dtype`: weights, activations and optimizer state in bf16 on both sides,
`mad train --dtype bfloat16` and a PyTorch model cast with `.to(torch.bfloat16)`; the loss in float32),
on a (batch, seq + 1) token batch (inputs and next-token targets), from random weights:

  xlstm-7b family   `topologies/xlstm-125m.yaml` (hidden 768, 12 blocks, 4 heads, vocab 50304) against
                    NX-AI's `xLSTMLarge` (`xLSTMLargeConfig`, mode "train", the native PyTorch kernels:
                    chunkwise "chunkwise--native_autograd", sequence "native_sequence__native", step
                    "native"; transformers' `xLSTMForCausalLM` wraps it, and its backward fails today)
  original stack    `topologies/xlstm-v1-125m.yaml` (xLSTM[7:1], width 768, 24 blocks) against NX-AI's
                    `xLSTMLMModel` (sLSTM backend "vanilla")

MAD's step is `mad train`'s: `mad.train.Stepper` (one `mx.compile`d function: loss, gradients, clipping,
AdamW), evaluated after every step. PyTorch's: `loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW`
(on a GPU followed by `torch.cuda.synchronize()`). Both start from the same weights (the reference's own
initialisation from a seed, saved as a checkpoint folder that MAD loads), so the first step's loss and
gradient norm are compared before anything is timed. Trials of `--steps`
steps alternate between the two (common.interleave), after `--warmup` untimed steps (MAD traces and
compiles there); the figure is the median step time over all timed steps, tokens/s = batch * seq / it.
MAD runs in a process of its own (benchmarks/mad_worker.py says why), with the CPU BLAS `import mad`
picks there (MAD_BLAS is passed on).

    python benchmarks/bench_train.py [--device cpu|gpu] [--family 7b|v1|both] [--batch 2] [--seq 256]
                                     [--dtype float32|bfloat16] [--steps 2] [--trials 3] [--warmup 1]
                                     [--json [PATH]]
    python benchmarks/bench_train.py --quick   # tiny models, a few steps, seconds: a smoke run (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from common import PAUSE_S, WORKER_BLAS, interleave, write_json  # noqa: I001 (reads MAD_BLAS first)

ROOT = Path(__file__).resolve().parents[1]
LR, WEIGHT_DECAY, GRAD_CLIP = 1e-4, 0.01, 1.0  # both sides; constant learning rate, no warmup
CHUNK = 64  # NX-AI's native chunkwise kernel needs seq to be a multiple of its chunk size

HF_CONFIG = dict(hidden_size=768, num_hidden_layers=12, num_heads=4, vocab_size=50304)  # = xlstm-125m.yaml
NXAI_CONFIG = {  # = xlstm-v1-125m.yaml (bench_nxai.py's)
    "vocab_size": 50304, "embedding_dim": 768, "num_blocks": 24, "slstm_at": [7, 15, 23],
    "mlstm_block": {"mlstm": {"num_heads": 4, "conv1d_kernel_size": 4, "qkv_proj_blocksize": 4, "proj_factor": 2.0}},
    "slstm_block": {"slstm": {"backend": "vanilla", "num_heads": 4, "conv1d_kernel_size": 4},
                    "feedforward": {"proj_factor": 1.3, "act_fn": "gelu"}},
}
QUICK_HF = dict(hidden_size=128, num_hidden_layers=2, num_heads=4, vocab_size=256, chunk_size=16)
QUICK_NXAI = dict(NXAI_CONFIG, vocab_size=256, embedding_dim=64, num_blocks=2, slstm_at=[1])
QUICK_CHUNK = 16


# ----------------------------------------------------------------------------------------- MAD (worker process)
def worker(folder: str, device: str, dtype: str) -> None:
    """MAD's side, in its own process: load FOLDER (the checkpoint, batches.npy), print one JSON line when
    ready, then answer each `run K` read from stdin with one JSON line: K steps' seconds, losses, norms."""
    import mad  # (before mlx.core: selects the CPU BLAS, see backends/cpu.py)
    import mlx.core as mx
    import numpy as np

    from mad.loading import load
    from mad.train import Stepper, TrainConfig, make_optimizer, trainable

    mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
    batches = np.load(Path(folder) / "batches.npy")
    model, _ = load(folder, dtype=dtype, memory_check=False)
    cfg = TrainConfig(lr=LR, weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP, warmup=0, schedule="constant",
                      dtype=dtype).check()
    optimizer = make_optimizer(cfg)
    optimizer.init(trainable(model)[0].trainable_parameters())
    stepper = Stepper(model, optimizer, cfg.grad_clip)
    data = [(mx.array(b[:, :-1]), mx.array(b[:, 1:])) for b in batches]
    mx.eval(data)
    print(json.dumps({"blas": mad.backends.cpu.BLAS, "mlx": mx.__version__, "device": str(mx.default_device()),
                      "params": model.program.graph.param_count(), "compile": model.program.compile_mode}), flush=True)
    k = 0
    for line in sys.stdin:
        n = int(line.split()[1])
        times, results = [], []
        for _ in range(n):
            x, y = data[k % len(data)]
            k += 1
            mx.synchronize()
            t = time.perf_counter()
            loss, norm = stepper.step(x, y)
            mx.eval(loss, norm, stepper.state)
            times.append(time.perf_counter() - t)
            results.append((loss, norm))
        print(json.dumps({"times": times, "losses": [r[0].item() for r in results],
                          "norms": [r[1].item() for r in results]}), flush=True)


class MadTrainer:
    """The worker process (`worker`), started with the caller's MAD_BLAS; `run(k)` asks it for k steps."""

    def __init__(self, folder: Path, device: str, dtype: str):
        env = dict(os.environ, MAD_BLAS=WORKER_BLAS)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(folder),
                                      "--device", device, "--dtype", dtype], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env, cwd=Path(__file__).parent)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the MAD worker stopped (exit code {self.proc.wait()})")
        return json.loads(line)

    def run(self, k: int) -> dict:
        self.proc.stdin.write(f"run {k}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


# ----------------------------------------------------------------------------------------- the PyTorch references
class TorchTrainer:
    """The reference's step: forward, cross-entropy, backward, clip_grad_norm_, AdamW; `run(k)` as MadTrainer's."""

    def __init__(self, model, batches, device: str, dtype: str):
        import torch

        self.torch = torch
        self.dev = torch.device("cuda" if device == "gpu" else "cpu")
        self.model = model.to(self.dev, getattr(torch, dtype)).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=LR, weight_decay=WEIGHT_DECAY)
        self.data = [(torch.as_tensor(b[:, :-1]).long().to(self.dev), torch.as_tensor(b[:, 1:]).long().to(self.dev))
                     for b in batches]
        self.k = 0

    def sync(self) -> None:
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()

    def step(self, x, y):
        out = self.model(x)
        logits = out[0] if isinstance(out, tuple) else out
        loss = self.torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        loss.backward()
        norm = self.torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss, norm

    def run(self, k: int) -> dict:
        times, losses, norms = [], [], []
        for _ in range(k):
            x, y = self.data[self.k % len(self.data)]
            self.k += 1
            self.sync()
            t = time.perf_counter()
            loss, norm = self.step(x, y)
            self.sync()
            times.append(time.perf_counter() - t)
            losses.append(loss.item())
            norms.append(norm.item())
        return {"times": times, "losses": losses, "norms": norms}


def xlstm_large(folder: Path, quick: bool, seed: int):
    """NX-AI `xLSTMLarge` with native kernels, and the same weights written to `folder` as an HF checkpoint:
    transformers' `xLSTMForCausalLM` with its own initialisation (a model about to be trained, loss near
    log V), `save_pretrained`, its state dict loaded into xLSTMLarge."""
    import dataclasses

    import torch
    import transformers
    from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    hf = transformers.xLSTMForCausalLM(transformers.xLSTMConfig(**(QUICK_HF if quick else HF_CONFIG)))
    hf.save_pretrained(str(folder))
    c = hf.config
    cfg = xLSTMLargeConfig(
        embedding_dim=c.hidden_size, num_heads=c.num_heads, num_blocks=c.num_hidden_layers, vocab_size=c.vocab_size,
        use_bias=c.use_bias, norm_eps=c.norm_eps, add_out_norm=c.add_out_norm, qk_dim_factor=c.qk_dim_factor,
        v_dim_factor=c.v_dim_factor, ffn_proj_factor=c.ffn_proj_factor,
        ffn_round_up_to_multiple_of=c.ffn_round_up_to_multiple_of, gate_soft_cap=c.gate_soft_cap,
        output_logit_soft_cap=c.output_logit_soft_cap, chunk_size=c.chunk_size, mode="train",
        chunkwise_kernel="chunkwise--native_autograd", sequence_kernel="native_sequence__native", step_kernel="native",
        return_last_states=True)  # without it, NX-AI's layer unpacks h itself as (h, state)
    model = xLSTMLarge(dataclasses.replace(cfg))
    sd = {("embedding.weight" if k == "backbone.embeddings.weight" else k): v for k, v in hf.state_dict().items()}
    model.load_state_dict(sd, strict=True)
    info = {"reference": "xlstm.xlstm_large xLSTMLarge", "chunkwise_kernel": cfg.chunkwise_kernel,
            "sequence_kernel": cfg.sequence_kernel, "step_kernel": cfg.step_kernel, "chunk_size": cfg.chunk_size}
    return model, info


def xlstm_lm(folder: Path, quick: bool, seed: int, seq: int):
    """NX-AI `xLSTMLMModel` (vanilla sLSTM backend) with its own initialisation, written to `folder` as an
    NX-AI checkpoint (config.yaml, model.safetensors)."""
    import yaml
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "tests" / "reference"))
    from make_nxai_fixtures import build_model, state_dict

    import torch

    cfg = dict(QUICK_NXAI if quick else NXAI_CONFIG, context_length=seq)
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.reset_parameters()  # NX-AI's initialisation, as its training script (experiments/main.py) calls it
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    save_file(state_dict(model), str(folder / "model.safetensors"))
    return model, {"reference": "xlstm xLSTMLMModel", "slstm_backend": cfg["slstm_block"]["slstm"]["backend"]}


# ----------------------------------------------------------------------------------------- the comparison
def compare(family: str, a, log) -> dict:
    import numpy as np
    import torch

    with tempfile.TemporaryDirectory(prefix=f"mad-bench-train-{family}-") as tmp:
        folder = Path(tmp)
        if family == "7b":
            ref, info = xlstm_large(folder, a.quick, a.seed)
        else:
            ref, info = xlstm_lm(folder, a.quick, a.seed, a.seq)
        vocab = int(ref.config.vocab_size)
        rng = np.random.default_rng(a.seed + 1)
        batches = rng.integers(0, vocab, (a.batches, a.batch, a.seq + 1), dtype=np.int32)
        np.save(folder / "batches.npy", batches)
        n_params = sum(p.numel() for p in ref.parameters())
        mad_side = MadTrainer(folder, a.device, a.dtype)
        try:
            torch_side = TorchTrainer(ref, batches, a.device, a.dtype)
            name = ("xlstm-125m" if family == "7b" else "xlstm-v1-125m") if not a.quick else f"tiny {family} (--quick)"
            print(f"\n{name} ({n_params / 1e6:.1f}M parameters; MAD {mad_side.info['params'] / 1e6:.1f}M), batch "
                  f"{a.batch} x seq {a.seq}, {a.dtype}, AdamW lr {LR} wd {WEIGHT_DECAY}, clip {GRAD_CLIP}", file=log)
            print(f"  reference: {info}, torch {torch.__version__}, threads {torch.get_num_threads()}", file=log)
            print(f"  MAD: mlx {mad_side.info['mlx']} on {mad_side.info['device']}, compile "
                  f"'{mad_side.info['compile']}', CPU BLAS {mad_side.info['blas'] or 'bundled with MLX'}", file=log)
            warm = {"mad": mad_side.run(a.warmup), "ref": torch_side.run(a.warmup)}
            first = {k: (v["losses"][0], v["norms"][0]) for k, v in warm.items()}
            check = {"loss_mad": first["mad"][0], "loss_ref": first["ref"][0],
                     "loss_rel_diff": abs(first["mad"][0] - first["ref"][0]) / abs(first["ref"][0]),
                     "grad_norm_mad": first["mad"][1], "grad_norm_ref": first["ref"][1],
                     "grad_norm_rel_diff": abs(first["mad"][1] - first["ref"][1]) / abs(first["ref"][1])}
            print(f"  first step, same weights and batch: loss {check['loss_mad']:.6f} (MAD) vs {check['loss_ref']:.6f}"
                  f" (reference), rel. diff {check['loss_rel_diff']:.1e}; gradient norm rel. diff "
                  f"{check['grad_norm_rel_diff']:.1e}", file=log, flush=True)
            steps: dict[str, list[float]] = {"mad": [], "ref": []}

            def trial(side, key):
                def go() -> float:
                    r = side.run(a.steps)
                    steps[key].extend(r["times"])
                    print(f"  {key} trial {len(steps[key]) // a.steps}: steps of "
                          f"{', '.join(f'{t * 1e3:.0f}' for t in r['times'])} ms", file=log, flush=True)
                    return sum(r["times"])
                return go

            interleave({"mad": trial(mad_side, "mad"), "ref": trial(torch_side, "ref")}, a.trials, a.pause)
        finally:
            mad_side.close()
    tokens = a.batch * a.seq
    res = {k: {"median_step_s": statistics.median(v), "tokens_per_s": tokens / statistics.median(v),
               "min_step_s": min(v), "steps": len(v), "step_times_s": v} for k, v in steps.items()}
    ratio = res["mad"]["tokens_per_s"] / res["ref"]["tokens_per_s"]
    for k, label in (("mad", "MAD"), ("ref", "reference")):
        print(f"  {label:>9}: {res[k]['tokens_per_s']:9.1f} tokens/s (median step "
              f"{res[k]['median_step_s'] * 1e3:.0f} ms over {res[k]['steps']} steps)", file=log)
    print(f"  MAD / reference: {ratio:.2f}x", file=log)
    return {"model": name, "params": n_params, "reference": info, "check": check, "mad": res["mad"],
            "ref": res["ref"], "mad_over_ref": ratio, "mad_info": mad_side.info}


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="both sides on the CPU or on one GPU")
    ap.add_argument("--family", choices=("7b", "v1", "both"), default="both")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="weights, activations and optimizer state (the first-step check holds in float32 only)")
    ap.add_argument("--seq", type=int, default=256, help=f"tokens per sequence (a multiple of {CHUNK})")
    ap.add_argument("--steps", type=int, default=2, help="steps per timed trial")
    ap.add_argument("--trials", type=int, default=3, help="timed trials per side (interleaved)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (MAD compiles there)")
    ap.add_argument("--batches", type=int, default=4, help="distinct token batches, used in turn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pause", type=float, default=PAUSE_S, help="seconds of rest before each trial")
    ap.add_argument("--quick", action="store_true",
                    help=f"a smoke run in seconds, timings meaningless: {QUICK_HF} and a 2-block xLSTM[1:1] of width "
                         f"64, --batch 2 --seq 32 --steps 2 --trials 1 --warmup 1 --pause 0")
    ap.add_argument("--json", nargs="?", const="-", metavar="PATH", help="the results as JSON (stdout if no PATH)")
    ap.add_argument("--worker", metavar="FOLDER", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker, a.device, a.dtype)
        return {}
    if a.quick:
        a.batch, a.seq, a.steps, a.trials, a.warmup, a.pause, a.batches = 2, 32, 2, 1, 1, 0.0, 2
    chunk = QUICK_CHUNK if a.quick else CHUNK
    if a.seq % chunk or min(a.batch, a.seq, a.steps, a.trials, a.warmup, a.batches) < 1:
        ap.error(f"--seq must be a positive multiple of {chunk}; --batch, --steps, --trials, --warmup, --batches >= 1")
    log = sys.stderr if a.json == "-" else sys.stdout
    import torch

    if a.device == "gpu" and not torch.cuda.is_available():
        ap.error("--device gpu: PyTorch sees no CUDA GPU here")
    # glibc's malloc settings move both sides' CPU figures by a third here (freed buffers returned to the
    # kernel and faulted in again): say which were set, as they reach both processes
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"}
    print(f"bench_train: {platform.platform()}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}, device {a.device}"
          + (f", malloc environment {malloc}" if malloc else ""), file=log)
    t0 = time.perf_counter()
    families = ("7b", "v1") if a.family == "both" else (a.family,)
    results = {"device": a.device, "dtype": a.dtype, "batch": a.batch, "seq": a.seq, "quick": a.quick, "platform": platform.platform(),
               "cpus": os.cpu_count(), "load_average_start": os.getloadavg(), "malloc_environment": malloc,
               "benchmarks": {f: compare(f, a, log) for f in families}}
    results["load_average_end"] = os.getloadavg()
    results["seconds"] = time.perf_counter() - t0
    write_json(results, a.json)
    return results


if __name__ == "__main__":
    main()
