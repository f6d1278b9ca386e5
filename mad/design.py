"""`mad design`: train topologies on the synthetic tasks of `mad.tasks` and compare their accuracies.

For each topology, task and seed: a model with fresh weights (`mad.load`, `dims.V` set to the task's
vocabulary, weights from `mx.random.seed(seed)`), trained `steps` AdamW steps on batches of a fixed generated
training set (mad-lab: a fixed set, several epochs) with a masked cross-entropy on the scored positions, then
scored on a held-out set generated from another seed: the fraction of scored positions whose argmax is the
target. The step is one compiled function (forward, backward, update), as `mad train`'s.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from .errors import MadError, Source
from .tasks import PRESETS, TASKS, task_names
from .train import TrainConfig, compile_step, make_optimizer


@dataclass
class DesignConfig:
    steps: int = 300
    seeds: int = 1
    batch: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0  # mad-lab: 0
    grad_clip: float = 1.0
    preset: str = "small"
    eval_batch: int = 128

    def check(self) -> "DesignConfig":
        problems = []
        for name, low in (("steps", 1), ("seeds", 1), ("batch", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                problems.append(f"--{name} must be an integer >= {low}, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"--lr must be a finite number > 0, got {self.lr!r}")
        if self.preset not in PRESETS:
            problems.append(f"--preset must be {' or '.join(PRESETS)}, got {self.preset!r}")
        if problems:
            from .errors import Diagnostic

            raise MadError([Diagnostic(p) for p in problems])
        return self


def _seed_of(seed: int, task: str, split: int) -> list[int]:
    """A Generator seed for (design seed, task, split): the same numbers on every machine."""
    return [int(seed), sum((i + 1) * ord(c) for i, c in enumerate(task)), split]


def topology_overrides(file: Path, vocab: int, trust_plugins: bool = False) -> list[str]:
    """The `--set` overrides that make `file` a language model over `vocab` tokens: `dims.V=vocab` where
    the topology has a dim V, none where its vocabulary already covers the task; else a MadError. A
    topology that is not a language model (one int32 token input) is a MadError."""
    from .graph import build_graph
    from .topology import load_topology

    if not file.is_file():
        raise MadError(f"mad design trains topology files; {file} is not a file", Source(str(file)))
    resolved = load_topology(file, [], trust_plugins=trust_plugins)
    overrides = [f"dims.V={vocab}"] if "V" in resolved.dims else []
    graph = build_graph(load_topology(file, overrides, trust_plugins=trust_plugins))
    ints = [k for k, t in graph.inputs.items() if t.dtype == "int32"]
    if len(graph.inputs) != 1 or len(ints) != 1:
        raise MadError(f"{file}: '{graph.name}' is not a language model (it needs exactly one int32 token input)",
                       Source(str(file)))
    out = "logits" if "logits" in graph.outputs else next(iter(graph.outputs))
    have = int(graph.g.nodes[graph.outputs[out]]["type"].shape[-1])
    if have < vocab:
        raise MadError(f"{file}: the task needs a vocabulary of {vocab} tokens, the topology has {have} and no dim "
                       "V to set; give it a dim V for the vocabulary", Source(str(file)))
    return overrides


class MaskedStepper:
    """The compiled training step (masked cross-entropy, AdamW) and the compiled scoring of one model."""

    def __init__(self, model: Any, optimizer: optim.Optimizer, grad_clip: float):
        self.model = model

        def forward(x: mx.array) -> mx.array:
            return model(x, check_tokens=False)[0]

        def loss_fn(x: mx.array, y: mx.array, m: mx.array) -> mx.array:
            ce = nn.losses.cross_entropy(forward(x), y, reduction="none")
            m = m.astype(ce.dtype)
            return (ce * m).sum() / mx.maximum(m.sum(), 1.0)

        step, state = compile_step(model, optimizer, grad_clip, loss_fn)

        @partial(mx.compile, inputs=state, outputs=state)
        def correct(x: mx.array, y: mx.array, m: mx.array) -> mx.array:
            hit = (forward(x).argmax(axis=-1) == y) & m
            return hit.astype(mx.int32).sum()

        self.step = lambda x, y, m: step(x, y, m)[0]  # the loss
        self.correct = correct


def run_one(file: Path, task: str, seed: int, cfg: DesignConfig, trust_plugins: bool = False) -> dict:
    """Train `file` on `task` from `seed`; {"accuracy", "loss", "seconds"}."""
    from .loading import load

    t = TASKS[task]
    settings = t.settings(cfg.preset)
    n_train, n_test = t.num_train[cfg.preset == "small"], t.num_test[cfg.preset == "small"]
    overrides = topology_overrides(file, t.vocab(cfg.preset), trust_plugins)
    start = time.perf_counter()
    x, y, m = t.make(_seed_of(seed, task, 0), n_train, train=True, **settings)
    tx, ty, tm = t.make(_seed_of(seed, task, 1), n_test, train=False, **settings)
    mx.random.seed(seed)
    model, _ = load(file, overrides=overrides, trust_plugins=trust_plugins)
    tc = TrainConfig(steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                     seed=seed).check()
    stepper = MaskedStepper(model, make_optimizer(tc), cfg.grad_clip)
    order = np.random.default_rng(_seed_of(seed, task, 2))
    batch = min(cfg.batch, n_train)
    perm, pos, loss = order.permutation(n_train), 0, float("nan")
    for _ in range(cfg.steps):
        if pos + batch > n_train:
            perm, pos = order.permutation(n_train), 0
        idx = perm[pos:pos + batch]
        pos += batch
        loss_arr = stepper.step(mx.array(x[idx]), mx.array(y[idx]), mx.array(m[idx]))
        mx.eval(loss_arr, model.parameters())
    loss = float(loss_arr.item())
    hits = 0
    for i in range(0, n_test, cfg.eval_batch):
        s = slice(i, i + cfg.eval_batch)
        hits += int(stepper.correct(mx.array(tx[s]), mx.array(ty[s]), mx.array(tm[s])).item())
    scored = int(tm.sum())
    return {"accuracy": hits / max(scored, 1), "loss": loss, "seconds": time.perf_counter() - start}


def design(files: list[Path], tasks: list[str] | str, cfg: DesignConfig, trust_plugins: bool = False,
           echo: Optional[Callable[[str], None]] = None) -> dict:
    """Every topology on every task over `cfg.seeds` seeds (0..seeds-1); the results as one dict."""
    cfg.check()
    names = task_names(tasks)
    files = [Path(f) for f in files]
    if not files:
        raise MadError("mad design: give at least one topology file")
    for f in files:  # every input checked before anything trains
        for v in sorted({TASKS[n].vocab(cfg.preset) for n in names}):
            topology_overrides(f, v, trust_plugins)
    results = []
    for f in files:
        for name in names:
            runs = []
            for seed in range(cfg.seeds):
                r = run_one(f, name, seed, cfg, trust_plugins)
                runs.append(r)
                if echo:
                    echo(f"{f.name} {name} seed {seed}: accuracy {r['accuracy']:.3f} (loss {r['loss']:.3f}, "
                         f"{r['seconds']:.1f} s)")
            acc = np.array([r["accuracy"] for r in runs])
            results.append({"topology": str(f), "task": name, "accuracies": acc.tolist(),
                            "mean": float(acc.mean()), "std": float(acc.std()),
                            "final_losses": [r["loss"] for r in runs], "seconds": sum(r["seconds"] for r in runs)})
    return {"steps": cfg.steps, "seeds": cfg.seeds, "batch": cfg.batch, "lr": cfg.lr, "preset": cfg.preset,
            "tasks": {n: TASKS[n].settings(cfg.preset) for n in names}, "results": results}


def table(summary: dict) -> Any:
    """A rich table: topology x task, mean ± std accuracy over the seeds."""
    from rich.table import Table

    tasks = list(summary["tasks"])
    tab = Table(title=f"mad design: accuracy on held-out data ({summary['steps']} steps, {summary['seeds']} "
                      f"seed{'s' if summary['seeds'] != 1 else ''}, preset {summary['preset']})")
    tab.add_column("topology")
    for t in tasks:
        tab.add_column(t, justify="right")
    by = {(r["topology"], r["task"]): r for r in summary["results"]}
    for topo in dict.fromkeys(r["topology"] for r in summary["results"]):
        tab.add_row(Path(topo).name, *(f"{by[topo, t]['mean']:.3f} ± {by[topo, t]['std']:.3f}" for t in tasks))
    return tab
