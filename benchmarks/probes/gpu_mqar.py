"""MQAR at the xLSTM paper's setting (Zoology's generator: 256 tokens, 16 key-value pairs, vocabulary 8192;
`mad design --preset mad`), trained for a time budget instead of a step count, the held-out accuracy printed
every `--eval-every` steps: how many steps a topology needs before `mad design --steps N` is worth running.
With `--state DIR` the run leaves its weights, optimizer, step and data order in DIR when it stops and a
later run with the same DIR goes on from there exactly (the same numbers as one uninterrupted run), so a
schedule longer than one sitting runs in several.

Same data, model, optimizer and step as `mad design` (`mad.design.run_one`: masked cross-entropy, AdamW with
a cosine schedule over `--steps`, gradient clipping 1.0). One JSON line per evaluation, on stdout:

    python benchmarks/probes/gpu_mqar.py [--topology topologies/examples/design-recall-mlstm.yaml]
        [--set dims.D=128] [--steps 20000] [--budget 420] [--batch 64] [--lr 3e-3] [--eval-every 1000]
        [--preset mad|small] [--seq-len T] [--kv-pairs C] [--zero-filler] [--state DIR]

`--seq-len` / `--kv-pairs` replace the preset's context length and key-value pairs (Zoology's figure 2 and
the xLSTM paper: 64/4, 128/8, 256/16 at vocabulary 8192), for training and held-out sets alike.

`--zero-filler`: token 0 between the queries instead of random tokens (Zoology's `random_non_queries=False`,
the setting of its ICLR'24 figure 2), training and held-out sets alike.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import mad  # noqa: F401  (before mlx.core: the CPU BLAS)
import mlx.core as mx

from mlx.utils import tree_flatten, tree_unflatten

from mad.design import DesignConfig, MaskedStepper, _accuracy, _seed_of, task_settings, topology_overrides
from mad.loading import load
from mad.report import write_atomic_file
from mad.tasks import TASKS
from mad.train import TrainConfig, load_optimizer_arrays, make_optimizer, optimizer_arrays

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
    ap.add_argument("--seq-len", type=int, help="tokens a sequence (default: the preset's)")
    ap.add_argument("--kv-pairs", type=int, help="key-value pairs a sequence (default: the preset's)")
    ap.add_argument("--zero-filler", action="store_true", help="token 0 between the queries (Zoology's "
                    "random_non_queries=False) instead of random tokens")
    ap.add_argument("--state", type=Path, help="folder to go on from (if it holds a saved run) and to save to")
    ap.add_argument("--stop-after", type=int, help="stop after this many steps of this run (then save, with --state)")
    a = ap.parse_args()
    if a.stop_after is not None and a.stop_after < 0:
        ap.error(f"--stop-after {a.stop_after}: a number of steps, 0 or more")
    if a.state is not None and a.state.exists() and not a.state.is_dir():
        ap.error(f"--state {a.state}: not a folder")
    if a.state is not None and a.state.is_dir() and not (a.state / STATE).exists() and any(a.state.iterdir()):
        ap.error(f"--state {a.state}: holds files but no saved run ({STATE}); give an empty or new folder")
    saved = None
    if a.state is not None and (a.state / STATE).exists():
        try:
            saved = json.loads((a.state / STATE).read_text())
            same = saved["args"] == same_run_args(a)
        except (OSError, ValueError, KeyError, TypeError) as e:
            ap.error(f"--state {a.state}: cannot read {STATE}: {e}")
        if not same:
            ap.error(f"--state {a.state}: saved by a run with other settings ({saved['args']})")
    cfg = DesignConfig(steps=a.steps, batch=a.batch, lr=a.lr, preset=a.preset).check()
    small = cfg.preset == "small"
    t = TASKS["mqar"]
    train_settings, test_settings = task_settings("mqar", cfg)
    for key, value in (("seq_len", a.seq_len), ("num_kv_pairs", a.kv_pairs), ("random_non_queries", not a.zero_filler)):
        if value is not None:
            train_settings[key] = test_settings[key] = value
    try:
        t.make(0, 1, **train_settings)
    except mad.MadError as e:
        ap.error(f"--seq-len/--kv-pairs: {e}")
    start = time.perf_counter()
    x, y, m = t.make(_seed_of(a.seed, "mqar", 0), t.num_train[small], train=True, **train_settings)
    test = t.make(_seed_of(a.seed, "mqar", 1), t.num_test[small], train=False, **test_settings)
    overrides = topology_overrides(Path(a.topology), t.vocab(cfg.preset)) + a.overrides
    mx.random.seed(a.seed)
    model, _ = load(a.topology, overrides=overrides)
    tc = TrainConfig(steps=a.steps, lr=a.lr, grad_clip=1.0, seed=a.seed).check()
    optimizer = make_optimizer(tc)
    optimizer.init(model.trainable_parameters())
    order = np.random.default_rng(_seed_of(a.seed, "mqar", 2))
    perm, pos, step0 = order.permutation(len(x)), 0, 0
    if saved is not None:
        try:
            weights, opt, kept = (load_saved(a.state / f, saved["step"]) for f in (WEIGHTS, OPTIMIZER, ORDER))
            model.update(tree_unflatten(list(weights.items())))
            load_optimizer_arrays(optimizer, opt, str(a.state / OPTIMIZER))
            order.bit_generator.state = saved["order"]
            perm, pos, step0 = np.array(kept["perm"]), saved["pos"], saved["step"]
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, mad.MadError) as e:
            ap.error(f"--state {a.state}: the saved run does not load: {e}")
    stepper = MaskedStepper(model, optimizer, 1.0)
    print(json.dumps({"settings": train_settings, "train": len(x), "test": len(test[0]), "overrides": overrides,
                      "params": model.program.graph.param_count(), "device": str(mx.default_device()),
                      "data_s": round(time.perf_counter() - start, 1)}), flush=True)
    train_start = time.perf_counter()
    step = step0
    last = a.steps if a.stop_after is None else min(a.steps, step0 + a.stop_after)
    for step in range(step0 + 1, last + 1):
        if pos + a.batch > len(x):
            perm, pos = order.permutation(len(x)), 0
        idx = perm[pos:pos + a.batch]
        pos += a.batch
        loss = stepper.step(x[idx], y[idx], m[idx])
        mx.eval(loss, model.parameters())
        elapsed = time.perf_counter() - train_start
        if step % a.eval_every == 0 or step == last or elapsed > a.budget:
            acc = _accuracy(stepper, *test, 256)
            print(json.dumps({"step": step, "loss": round(float(loss.item()), 4), "accuracy": round(acc, 4),
                              "seconds": round(elapsed, 1)}), flush=True)
            if elapsed > a.budget:
                break
    if a.state is not None:
        save_state(a, model, optimizer, step, perm, pos, order)


STATE, WEIGHTS, OPTIMIZER, ORDER = "state.json", "weights.safetensors", "optimizer.safetensors", "order.safetensors"


def load_saved(path: Path, step: int) -> dict:
    """The arrays of one saved file, which must have been written at `step` (a save cut short leaves files
    of two steps: refused rather than mixed)."""
    arrays, meta = mx.load(str(path), return_metadata=True)
    if meta.get("step") != str(step):
        raise ValueError(f"{path.name} was saved at step {meta.get('step')}, {STATE} at step {step}")
    return arrays


def same_run_args(a: argparse.Namespace) -> dict:
    """The settings a saved run must share with the one going on from it (the budget and reporting may differ)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()
            if k not in ("budget", "eval_every", "state", "stop_after")}


def save_state(a: argparse.Namespace, model, optimizer, step: int, perm: np.ndarray, pos: int, order) -> None:
    """The run's weights, optimizer, data order and step into `a.state`, each file written whole and marked
    with the step (state.json last: a folder without it holds no run to go on from)."""
    files = {WEIGHTS: dict(tree_flatten(model.parameters())), OPTIMIZER: optimizer_arrays(optimizer),
             ORDER: {"perm": mx.array(perm)}}
    for name, arrays in files.items():
        mx.eval(arrays)
        write_atomic_file(a.state / name, lambda p, arrays=arrays: mx.save_safetensors(
            str(p), arrays, metadata={"step": str(step)}), flag="--state")
    state = {"step": step, "pos": pos, "order": order.bit_generator.state, "args": same_run_args(a)}
    write_atomic_file(a.state / STATE, lambda p: Path(p).write_text(json.dumps(state)), flag="--state")


if __name__ == "__main__":
    main()
