"""MQAR at the xLSTM paper's setting (Zoology's generator: 256 tokens, 16 key-value pairs, vocabulary 8192;
`mad design --preset mad`), trained for a time budget instead of a step count, the held-out accuracy printed
every `--eval-every` steps: how many steps a topology needs before `mad design --steps N` is worth running.

Same data, model, optimizer and step as `mad design` (`mad.design.run_one`: masked cross-entropy, AdamW with
a cosine schedule over `--steps`, gradient clipping 1.0). One JSON line per evaluation, on stdout:

    python benchmarks/probes/gpu_mqar.py [--topology topologies/examples/design-recall-mlstm.yaml]
        [--set dims.D=128] [--steps 20000] [--budget 420] [--batch 64] [--lr 3e-3] [--eval-every 1000]
        [--preset mad|small]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import mad  # noqa: F401  (before mlx.core: the CPU BLAS)
import mlx.core as mx

from mad.design import DesignConfig, MaskedStepper, _accuracy, _seed_of, task_settings, topology_overrides
from mad.loading import load
from mad.tasks import TASKS
from mad.train import TrainConfig, make_optimizer

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--topology", default=str(ROOT / "topologies" / "examples" / "design-recall-mlstm.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--steps", type=int, default=20000, help="the schedule's length (the run may stop earlier)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds of training before stopping")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="mad", choices=["mad", "small"],
                    help="the task's size: mad (the paper's) or small (`mad design`'s default)")
    a = ap.parse_args()
    cfg = DesignConfig(steps=a.steps, batch=a.batch, lr=a.lr, preset=a.preset).check()
    small = cfg.preset == "small"
    t = TASKS["mqar"]
    train_settings, test_settings = task_settings("mqar", cfg)
    start = time.perf_counter()
    x, y, m = t.make(_seed_of(a.seed, "mqar", 0), t.num_train[small], train=True, **train_settings)
    test = t.make(_seed_of(a.seed, "mqar", 1), t.num_test[small], train=False, **test_settings)
    overrides = topology_overrides(Path(a.topology), t.vocab(cfg.preset)) + a.overrides
    mx.random.seed(a.seed)
    model, _ = load(a.topology, overrides=overrides)
    tc = TrainConfig(steps=a.steps, lr=a.lr, grad_clip=1.0, seed=a.seed).check()
    stepper = MaskedStepper(model, make_optimizer(tc), 1.0)
    print(json.dumps({"settings": train_settings, "train": len(x), "test": len(test[0]), "overrides": overrides,
                      "params": model.program.graph.param_count(), "device": str(mx.default_device()),
                      "data_s": round(time.perf_counter() - start, 1)}), flush=True)
    order = np.random.default_rng(_seed_of(a.seed, "mqar", 2))
    perm, pos = order.permutation(len(x)), 0
    train_start = time.perf_counter()
    for step in range(1, a.steps + 1):
        if pos + a.batch > len(x):
            perm, pos = order.permutation(len(x)), 0
        idx = perm[pos:pos + a.batch]
        pos += a.batch
        loss = stepper.step(mx.array(x[idx]), mx.array(y[idx]), mx.array(m[idx]))
        mx.eval(loss, model.parameters())
        elapsed = time.perf_counter() - train_start
        if step % a.eval_every == 0 or step == a.steps or elapsed > a.budget:
            acc = _accuracy(stepper, *test, 256)
            print(json.dumps({"step": step, "loss": round(float(loss.item()), 4), "accuracy": round(acc, 4),
                              "seconds": round(elapsed, 1)}), flush=True)
            if elapsed > a.budget:
                break


if __name__ == "__main__":
    main()
