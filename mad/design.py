"""`mad design`: train topologies on the synthetic tasks of `mad.tasks` and compare their accuracies.

For each topology, task and seed: a model with fresh weights (`mad.load`, `dims.V` set to the task's
vocabulary, weights from `mx.random.seed(seed)`), trained `steps` AdamW steps on batches of a fixed generated
training set (mad-lab: a fixed set, several epochs) with a masked cross-entropy on the scored positions, then
scored on a held-out set generated from another seed: the fraction of scored positions whose argmax is the
target. The step is one compiled function (forward, backward, update), as `mad train`'s.

The held-out set has the task's held-out settings: for parity and majority, longer bit strings than trained
(length generalisation, as the xLSTM paper tests; `--train-len` / `--test-len`), and then the model is also
scored on held-out strings of the training lengths. `table` and `plot` (SVG, `train.svg_plot`) show the mean
and standard deviation over the seeds.
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

MAX_LEN = 4096  # longest bit string of --train-len / --test-len


def parse_lengths(text: str, flag: str) -> tuple[int, int]:
    """`MIN:MAX` (or `N`, meaning N:N) -> (MIN, MAX), else a MadError naming `flag`."""
    parts = str(text).split(":")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not 1 <= values[0] <= values[1] <= MAX_LEN:
        raise MadError(f"{flag} must be MIN:MAX (lengths of the bit strings, 1 <= MIN <= MAX <= {MAX_LEN}), "
                       f"got '{text}'")
    return values  # type: ignore[return-value]


def task_settings(name: str, cfg: "DesignConfig") -> tuple[dict, dict]:
    """The generator settings of `name` for training and for the held-out set: the preset's, with
    --train-len / --test-len applied to the tasks that take lengths (T = the longest + 1, the query)."""
    t = TASKS[name]
    train, test = t.settings(cfg.preset), t.test_settings(cfg.preset)
    if t.lengths:
        for lengths, s in ((cfg.train_len, train), (cfg.test_len, test)):
            if lengths is not None:
                s.update(min_len=lengths[0], max_len=lengths[1], seq_len=lengths[1] + 1)
    return train, test


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
    train_len: Optional[tuple[int, int]] = None  # bit-string lengths of the formal tasks (None: the preset's)
    test_len: Optional[tuple[int, int]] = None

    def check(self) -> "DesignConfig":
        problems = []
        for flag, value in (("--train-len", self.train_len), ("--test-len", self.test_len)):
            if value is not None and not (isinstance(value, tuple) and len(value) == 2
                                          and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
                                          and 1 <= value[0] <= value[1] <= MAX_LEN):
                problems.append(f"{flag} must be MIN:MAX with 1 <= MIN <= MAX <= {MAX_LEN}, got {value!r}")
        for name, low in (("steps", 1), ("seeds", 1), ("batch", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                problems.append(f"--{name} must be an integer >= {low}, got {value!r}")
        if isinstance(self.lr, bool) or not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr)
                                             and self.lr > 0):
            problems.append(f"--lr must be a finite number > 0, got {self.lr!r}")
        if isinstance(self.weight_decay, bool) or not (isinstance(self.weight_decay, (int, float))
                                                       and math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            problems.append(f"--weight-decay must be a finite number >= 0, got {self.weight_decay!r}")
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
    """The compiled training step (masked cross-entropy, AdamW) and the compiled scoring of one model.

    `step(x, y, m)` and `correct(x, y, m)` take numpy batches: tokens, targets and the mask of scored
    positions. The model's head runs at the scored positions alone (`positions`: each row's scored
    positions first, padded to the batch's largest count with unscored ones of weight 0), which for a task
    that scores a few positions of each sequence (MQAR: 16 of 256) removes most of the head's products and
    of the cross-entropy over the vocabulary. The loss is the same mean over the scored positions."""

    def __init__(self, model: Any, optimizer: optim.Optimizer, grad_clip: float):
        self.model = model
        picks = getattr(getattr(model, "program", None), "compile_mode", "stage") != "stage"

        def forward(x: mx.array, p: mx.array) -> mx.array:
            return model(x, check_tokens=False, positions=p if picks else None)[0]

        def loss_fn(x: mx.array, p: mx.array, y: mx.array, w: mx.array) -> mx.array:
            ce = nn.losses.cross_entropy(forward(x, p), y, reduction="none")
            return (ce * w).sum() / mx.maximum(w.sum(), 1.0)

        step, state = compile_step(model, optimizer, grad_clip, loss_fn)

        @partial(mx.compile, inputs=state, outputs=state)
        def correct(x: mx.array, p: mx.array, y: mx.array, w: mx.array) -> mx.array:
            hit = (forward(x, p).argmax(axis=-1) == y) & (w > 0)
            return hit.astype(mx.int32).sum()

        def arrays(x: np.ndarray, y: np.ndarray, m: np.ndarray) -> tuple[mx.array, ...]:
            if not picks:
                return mx.array(x), mx.array(np.zeros((len(x), 1), np.int32)), mx.array(y), \
                    mx.array(m.astype(np.float32))
            count = max(int(m.sum(axis=1).max()), 1)
            p = np.argsort(~m, axis=1, kind="stable")[:, :count]  # the scored positions first, in order
            return (mx.array(x), mx.array(p.astype(np.int32)), mx.array(np.take_along_axis(y, p, 1)),
                    mx.array(np.take_along_axis(m, p, 1).astype(np.float32)))

        self.step = lambda x, y, m: step(*arrays(x, y, m))[0]  # the loss
        self.correct = lambda x, y, m: correct(*arrays(x, y, m))


def _accuracy(stepper: "MaskedStepper", x: np.ndarray, y: np.ndarray, m: np.ndarray, batch: int) -> float:
    hits = 0
    for i in range(0, len(x), batch):
        s = slice(i, i + batch)
        hits += int(stepper.correct(x[s], y[s], m[s]).item())
    return hits / max(int(m.sum()), 1)


def run_one(file: Path, task: str, seed: int, cfg: DesignConfig, trust_plugins: bool = False) -> dict:
    """Train `file` on `task` from `seed`; {"accuracy", "loss", "seconds"}, and "in_dist_accuracy" (held-out
    data of the training settings) where the held-out set has other settings (lengths) than training's."""
    from .loading import load

    t = TASKS[task]
    train_settings, test_settings = task_settings(task, cfg)
    n_train, n_test = t.num_train[cfg.preset == "small"], t.num_test[cfg.preset == "small"]
    overrides = topology_overrides(file, t.vocab(cfg.preset), trust_plugins)
    start = time.perf_counter()
    x, y, m = t.make(_seed_of(seed, task, 0), n_train, train=True, **train_settings)
    test = t.make(_seed_of(seed, task, 1), n_test, train=False, **test_settings)
    mx.random.seed(seed)
    model, _ = load(file, overrides=overrides, trust_plugins=trust_plugins)
    tc = TrainConfig(steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                     seed=seed).check()
    stepper = MaskedStepper(model, make_optimizer(tc), cfg.grad_clip)
    order = np.random.default_rng(_seed_of(seed, task, 2))
    batch = min(cfg.batch, n_train)
    perm, pos = order.permutation(n_train), 0
    for _ in range(cfg.steps):
        if pos + batch > n_train:
            perm, pos = order.permutation(n_train), 0
        idx = perm[pos:pos + batch]
        pos += batch
        loss_arr = stepper.step(x[idx], y[idx], m[idx])
        mx.eval(loss_arr, model.parameters())
    result = {"accuracy": _accuracy(stepper, *test, cfg.eval_batch), "loss": float(loss_arr.item())}
    if test_settings != train_settings:
        same = t.make(_seed_of(seed, task, 3), n_test, train=False, **train_settings)
        result["in_dist_accuracy"] = _accuracy(stepper, *same, cfg.eval_batch)
    result["seconds"] = time.perf_counter() - start
    return result


def design(files: list[Path], tasks: list[str] | str, cfg: DesignConfig, trust_plugins: bool = False,
           echo: Optional[Callable[[str], None]] = None) -> dict:
    """Every topology on every task over `cfg.seeds` seeds (0..seeds-1); the results as one dict."""
    cfg.check()
    names = task_names(tasks)
    files = [Path(f) for f in files]
    if not files:
        raise MadError("mad design: give at least one topology file")
    if (cfg.train_len or cfg.test_len) and not any(TASKS[n].lengths for n in names):
        flag = "--train-len" if cfg.train_len else "--test-len"
        takes = ", ".join(n for n, t in TASKS.items() if t.lengths)
        raise MadError(f"{flag} sets the lengths of the bit strings of {takes}; none of the tasks given takes it")
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
                    also = f" ({r['in_dist_accuracy']:.3f} at train lengths)" if "in_dist_accuracy" in r else ""
                    echo(f"{f.name} {name} seed {seed}: accuracy {r['accuracy']:.3f}{also}, loss {r['loss']:.3f}, "
                         f"{r['seconds']:.0f} s" + ("" if math.isfinite(r["loss"]) else " (the loss diverged)"))
            acc = np.array([r["accuracy"] for r in runs])
            row = {"topology": str(f), "task": name, "accuracies": acc.tolist(), "mean": float(acc.mean()),
                   "std": float(acc.std()), "final_losses": [r["loss"] for r in runs],
                   "seconds": sum(r["seconds"] for r in runs)}
            if "in_dist_accuracy" in runs[0]:
                row["in_dist_accuracies"] = [r["in_dist_accuracy"] for r in runs]
            results.append(row)
    settings = {n: dict(zip(("train", "test"), task_settings(n, cfg))) for n in names}
    return {"steps": cfg.steps, "seeds": cfg.seeds, "batch": cfg.batch, "lr": cfg.lr,
            "weight_decay": cfg.weight_decay, "preset": cfg.preset, "tasks": settings, "results": results}


def _labels(summary: dict) -> dict[str, str]:
    """Topology path -> its file name, or the whole path where two share a name."""
    topos = list(dict.fromkeys(r["topology"] for r in summary["results"]))
    names = [Path(t).name for t in topos]
    return {t: (n if names.count(n) == 1 else t) for t, n in zip(topos, names)}


def _column(name: str, settings: dict) -> str:
    """A task's column title; with the lengths trained and tested where the task takes lengths."""
    train, test = settings["train"], settings["test"]
    if not TASKS[name].lengths:
        return name
    lengths = [f"{s['min_len']}..{s.get('max_len') or s['seq_len'] - 1}" for s in (train, test)]
    return f"{name}\n(train {lengths[0]}, test {lengths[1]})"


def table(summary: dict) -> Any:
    """A rich table: topology x task, mean ± std accuracy over the seeds (NaN: a run whose loss diverged), and
    for tasks tested at other lengths than trained, the accuracy at the training lengths below it."""
    from rich.table import Table

    tasks = list(summary["tasks"])
    tab = Table(title=f"mad design: accuracy on held-out data ({summary['steps']} steps, {summary['seeds']} "
                      f"seed{'s' if summary['seeds'] != 1 else ''}, preset {summary['preset']})")
    tab.add_column("topology")
    for t in tasks:
        tab.add_column(_column(t, summary["tasks"][t]), justify="right")
    by = {(r["topology"], r["task"]): r for r in summary["results"]}
    diverged = False
    for topo, label in _labels(summary).items():
        cells = []
        for t in tasks:
            r = by[topo, t]
            bad = not all(math.isfinite(v) for v in r["final_losses"])
            diverged |= bad
            cell = f"{r['mean']:.3f} ± {r['std']:.3f}" + (" (NaN)" if bad else "")
            if "in_dist_accuracies" in r:
                same = np.array(r["in_dist_accuracies"])
                cell += f"\n{same.mean():.3f} ± {same.std():.3f} at train lengths"
            cells.append(cell)
        tab.add_row(label, *cells)
    if diverged:
        tab.caption = "(NaN): a run's training loss became NaN or infinite"
    return tab


PLOT_MARK = "<!-- mad design: accuracy chart -->"  # a file holding it is MAD's own: --plot may replace it
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
SHORT = {"in-context-recall": "recall", "fuzzy-in-context-recall": "fuzzy recall",
         "noisy-in-context-recall": "noisy recall", "selective-copying": "sel. copying"}


def plot(summary: dict) -> str:
    """An SVG chart (`train.svg_plot`): held-out accuracy per task, a dot per topology at the mean over the
    seeds with a bar of ± the standard deviation."""
    from .train import svg_plot

    tasks = list(summary["tasks"])
    labels = _labels(summary)
    by = {(r["topology"], r["task"]): r for r in summary["results"]}
    n = len(labels)
    width = min(0.6 / max(n - 1, 1), 0.15)  # dots of one task side by side
    series = [{"label": label, "color": COLORS[j % len(COLORS)], "line": False, "dots": True,
               "points": [(i + (j - (n - 1) / 2) * width, by[topo, t]["mean"]) for i, t in enumerate(tasks)],
               "spread": [by[topo, t]["std"] for t in tasks]}
              for j, (topo, label) in enumerate(labels.items())]
    title = (f"mad design: held-out accuracy, mean ± std over {summary['seeds']} seed"
             f"{'s' if summary['seeds'] != 1 else ''} ({summary['steps']} steps)")
    text = svg_plot([], [], title, series=series, xlabel="task", xticks=[SHORT.get(t, t) for t in tasks],
                    ylim=(0.0, 1.0))
    head, rest = text.split("\n", 1)
    return f"{head}\n{PLOT_MARK}\n{rest}"


def check_plot_target(path: Path) -> Path:
    """Before any work: the chart can be written at `path`, and a file already there is empty or a chart
    `mad design` wrote (nothing else of the user's is replaced)."""
    from .report import check_output_file

    path = check_output_file(path, "--plot")
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            head = f.read(4096)
        if PLOT_MARK.encode() not in head:
            raise MadError(f"--plot {path}: the file exists and is not a chart written by mad design; MAD replaces "
                           "only its own (give another name, or remove it first)")
    return path


def write_plot(summary: dict, path: Path) -> None:
    """Write `plot(summary)` to `path`, atomically (complete or absent, never half-written)."""
    from .report import write_atomic_file

    check_plot_target(path)
    text = plot(summary)
    write_atomic_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), flag="--plot")
