"""`mad train`: train any topology as a next-token language model.

One training step is one compiled function (forward, backward, AdamW update), `mx.compile`d with the
model's and the optimizer's state as its inputs and outputs, as mlx-lm trains. The loss is the mean
next-token cross-entropy over the batch, the model run on whole sequences (the program's parallel or
chunkwise path, from a zero state).

The output folder is a MAD checkpoint (`mad.save`): `mad.load(OUT)` reads the trained model, and
`OUT/training/` holds what `--resume` needs to continue exactly: the optimizer state
(`optimizer.safetensors`), the step, the data position and the seed (`state.json`), the run's settings.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from .errors import MadError, Source
from .graph import MAX_TENSOR

SCHEDULES = ("cosine", "constant")
TRAIN_DTYPES = ("float32", "bfloat16")
STATE_FORMAT = "mad-train-state"
STATE_VERSION = 1
EVAL_WINDOWS = 64  # held-out windows evaluated at each evaluation (the same ones every time)


@dataclass
class TrainConfig:
    """The settings of a run (`mad train` flags). `warmup` None: min(100, steps // 10)."""

    steps: int = 1000
    batch: int = 8
    seq: int = 256
    lr: float = 3e-4
    warmup: Optional[int] = None
    schedule: str = "cosine"
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    dtype: str = "float32"
    seed: int = 0
    eval_every: int = 100
    save_every: int = 500
    min_lr_ratio: float = 0.1  # cosine decays to lr * this

    # the settings that shape the trajectory: a resumed run must keep them (steps may grow, see `resume`)
    FIXED = ("batch", "seq", "lr", "warmup", "schedule", "weight_decay", "grad_clip", "dtype", "seed", "min_lr_ratio")

    def check(self) -> "TrainConfig":
        """Every setting in range, else one MadError per bad flag (all together); fills in `warmup`."""
        problems = []

        def integer(name: str, value: Any, low: int) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                problems.append(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")

        def real(name: str, value: Any, positive: bool) -> bool:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and (value > 0 if positive else value >= 0)
            if not ok:
                problems.append(f"--{name.replace('_', '-')} must be a finite number {'> 0' if positive else '>= 0'}, "
                                f"got {value!r}")
            return ok

        integer("steps", self.steps, 1)
        integer("batch", self.batch, 1)
        integer("seq", self.seq, 1)
        integer("eval_every", self.eval_every, 0)
        integer("save_every", self.save_every, 0)
        real("lr", self.lr, True)
        real("weight_decay", self.weight_decay, False)
        real("grad_clip", self.grad_clip, False)
        if isinstance(self.min_lr_ratio, bool) or not isinstance(self.min_lr_ratio, (int, float)) \
                or not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            problems.append(f"--seed must be an integer in 0..{2**32 - 1}, got {self.seed!r}")
        if self.schedule not in SCHEDULES:
            problems.append(f"--schedule must be {' or '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.dtype not in TRAIN_DTYPES:
            problems.append(f"--dtype must be {' or '.join(TRAIN_DTYPES)}, got {self.dtype!r}")
        if self.warmup is None and isinstance(self.steps, int) and self.steps >= 1:
            self.warmup = min(100, self.steps // 10)
        elif self.warmup is not None:
            integer("warmup", self.warmup, 0)
            if not problems and self.warmup > self.steps:
                problems.append(f"--warmup {self.warmup} is more than --steps {self.steps}")
        if problems:
            from .errors import Diagnostic

            raise MadError([Diagnostic(p) for p in problems])
        return self

    def lr_at(self, step: mx.array) -> mx.array:
        """The learning rate of the update that makes step `step` + 1 (step: the optimizer's update count):
        linear warmup from lr / warmup to lr over `warmup` updates, then constant or cosine down to
        lr * min_lr_ratio at `steps`."""
        s = step.astype(mx.float32)
        lr = mx.array(self.lr, mx.float32)
        warm = lr * (s + 1) / max(self.warmup, 1)
        if self.schedule == "constant":
            after = lr
        else:
            progress = mx.clip((s - self.warmup) / max(self.steps - self.warmup, 1), 0.0, 1.0)
            low = lr * self.min_lr_ratio
            after = low + (lr - low) * 0.5 * (1 + mx.cos(math.pi * progress))
        return mx.where(s < self.warmup, warm, after)


# ----------------------------------------------------------------------------------------- the step
def trainable(model: Any) -> tuple[nn.Module, Callable[[mx.array], mx.array]]:
    """(the module whose parameters are trained, tokens -> float32 logits over whole sequences): the
    `LanguageModel` itself, an `nn.Module` whose parameter names are the checkpoint names, run from a
    zero state on whole sequences (the program's parallel or chunkwise path)."""
    if not isinstance(model, nn.Module):
        raise MadError(f"train: expected a model from mad.load, got {type(model).__name__}")
    return model, lambda x: model(x, check_tokens=False)[0]


def update_streams() -> list[mx.Stream]:
    """The streams `AdamW` spreads an update over: `backends.cpu.parallel_streams()` on the CPU, the default
    stream elsewhere."""
    if mx.default_device() != mx.cpu:
        return [mx.default_stream(mx.default_device())]
    from .backends.cpu import parallel_streams

    return parallel_streams()


class AdamW(optim.AdamW):
    """`optim.AdamW`, the same state and arithmetic, for the compiled step: `update(model, gradients, scale)`
    multiplies each gradient by the clipping factor `scale` first, and the parameters' updates (each with its
    scaling, which fuses into it) are spread by size over `update_streams()`.

    MLX's CPU runs an elementwise kernel on one core, and the kernels of different streams at once, each
    stream on a thread of its own. An update reads and writes every weight and both moments (xlstm-125m:
    162M of each): on one core it was the longest elementwise work of a CPU training step."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._scale: Optional[mx.array] = None
        self._streams: list = []
        self._load: list[int] = []

    def update(self, model: nn.Module, gradients: dict, scale: Optional[mx.array] = None) -> None:
        """`optim.AdamW.update` with every gradient multiplied by `scale` (a scalar array; None: as they are)."""
        self._scale = scale
        try:
            super().update(model, gradients)
        finally:
            self._scale = None

    def apply_gradients(self, gradients: dict, parameters: dict) -> dict:
        self._streams = update_streams()
        self._load = [0] * len(self._streams)
        return super().apply_gradients(gradients, parameters)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        i = self._load.index(min(self._load))  # the least loaded stream so far, in the gradients' order
        self._load[i] += gradient.size
        with mx.stream(self._streams[i]):
            if self._scale is not None:
                gradient = scaled(gradient, self._scale)
            return super().apply_single(gradient, parameter, state)


def make_optimizer(cfg: TrainConfig) -> AdamW:
    return AdamW(learning_rate=cfg.lr_at, weight_decay=cfg.weight_decay)


def next_token_loss(logits: mx.array, targets: mx.array, reduction: str = "mean") -> mx.array:
    """The cross-entropy of `logits` (..., V) at the integer `targets` (...), computed in float32:
    logsumexp(z) - z[target] per position, then reduced ("mean", "sum" or "none"): the numbers of
    `nn.losses.cross_entropy` to float32 rounding, faster to differentiate on the CPU.

    On the vocabulary-wide logits of a training step (25.7M of them for 512 tokens of xlstm-125m) MLX's
    `logsumexp` and the `softmax` of its gradient are the slowest part of the loss on the CPU (MLX's CPU
    `exp`, see kernels/activations.py). Here the exponentials go through the "exp" kernel (the CPU's
    arithmetic exp, within 1 ulp of `mx.exp`), once: the forward keeps p = exp(z - max z) and its sum s,
    and the gradient of a position's loss is p / s - onehot(target), one fused elementwise pass."""
    from .kernels.registry import dispatch

    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    exp = dispatch("exp")

    @mx.custom_function
    def loss(z: mx.array, y: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        z32 = z.astype(mx.float32)
        top = mx.max(z32, axis=-1, keepdims=True)
        p = exp(z32 - top)                                      # <= 1
        s = p.sum(axis=-1, keepdims=True)                       # >= 1
        picked = mx.take_along_axis(z32, y[..., None], axis=-1)
        return ((top + mx.log(s)) - picked)[..., 0], p, s

    @loss.vjp
    def loss_vjp(primals, cotangents, outputs):
        z, y = primals
        _, p, s = outputs
        hit = mx.arange(z.shape[-1], dtype=y.dtype) == y[..., None]
        dz = cotangents[0][..., None] * (p * (1.0 / s) - hit)   # softmax(z) - onehot(y), scaled
        return dz.astype(z.dtype), mx.zeros_like(y)

    per_position = loss(logits, targets)[0]
    if reduction == "none":
        return per_position
    return per_position.mean() if reduction == "mean" else per_position.sum()


def _blocks(g: mx.array, parts: int = 64) -> mx.array:
    """g flattened to (k, 1, n / k) in float32, k the largest divisor of its size n up to `parts`: a few
    blocks, each one dot product for BLAS (whose own blocking keeps its sums accurate)."""
    g = g.astype(mx.float32) if g.dtype != mx.float32 else g
    k = math.gcd(g.size, parts)
    return g.reshape(k, 1, g.size // k)


def global_norm(grads: Any) -> mx.array:
    """sqrt(sum of every squared entry of the gradient tree), accurate to float32 rounding at any size.

    Each array's sum of squares is a batch of matrix products (k, 1, n/k) @ (k, n/k, 1): BLAS dot products
    of a few blocks, summed. `g.square().sum()` (`optim.clip_grad_norm`'s) adds millions of squares into
    one float32 accumulator on MLX's CPU, where the later terms fall below its rounding: 1e-3 low on 1.6M
    entries, 3-10% on the 38.6M of xlstm-125m's embedding (tests/test_grad.py holds this one to 1e-6), and
    slower than the products."""
    total = mx.array(0.0, mx.float32)
    for _, g in tree_flatten(grads):
        b = _blocks(g)
        total = total + (b @ b.swapaxes(-1, -2)).sum()
    return mx.sqrt(total)


def clip_scale(norm: mx.array, max_norm: float) -> mx.array:
    """`optim.clip_grad_norm`'s factor: min(max_norm / (norm + 1e-6), 1)."""
    return mx.minimum(max_norm / (norm + 1e-6), 1.0)


def scaled(grads: Any, scale: mx.array) -> Any:
    """Every gradient times `scale`, each in its own dtype."""
    return tree_map(lambda g: (g * scale).astype(g.dtype), grads)


def clip_grad_norm(grads: Any, max_norm: float) -> tuple[Any, mx.array]:
    """`optim.clip_grad_norm` with `global_norm`: (the gradients scaled by `clip_scale`, each in its own dtype,
    the norm before scaling)."""
    norm = global_norm(grads)
    return scaled(grads, clip_scale(norm, max_norm)), norm


def compile_step(model: nn.Module, optimizer: optim.Optimizer, grad_clip: float,
                 loss_fn: Callable[..., mx.array]) -> tuple[Callable[..., tuple[mx.array, mx.array]], list]:
    """One training step as one compiled function: `step(*batch) -> (loss, gradient norm)`: the loss and
    its gradients, clipping (grad_clip 0: off; the norm is then 0), the optimizer's update. Returns the
    step and the state it compiles over (the model's and the optimizer's). The norm is `global_norm`'s.

    The gradients are made row-contiguous before the update (a no-op for those that are): a weight's
    gradient from a matrix product can come out as a transposed view, and MLX's CPU runs a fused kernel
    over a mix of layouts (the optimizer's moments are contiguous) as a loop with run-time strides that
    the compiler does not vectorise: on xlstm-125m's CPU step the AdamW update took longer than the
    copies that avoid it (benchmarks/bench_train.py). MAD's `AdamW` takes the clipping factor itself, so
    that the scaling fuses into each parameter's update on that update's stream; another optimizer gets
    the scaled gradients."""
    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(*batch: mx.array) -> tuple[mx.array, mx.array]:
        loss, grads = value_and_grad(*batch)
        grads = tree_map(mx.contiguous, grads)
        norm = global_norm(grads) if grad_clip > 0 else mx.array(0.0)
        scale = clip_scale(norm, grad_clip) if grad_clip > 0 else None
        if isinstance(optimizer, AdamW):
            optimizer.update(model, grads, scale)  # the scaling fused into each parameter's update
        else:
            optimizer.update(model, grads if scale is None else scaled(grads, scale))
        return loss, norm

    return step, state


class Stepper:
    """The compiled training step and the compiled held-out loss of one model and optimizer."""

    def __init__(self, model: Any, optimizer: optim.Optimizer, grad_clip: float):
        if mx.default_device() == mx.cpu:
            from .backends.cpu import reuse_large_blocks

            reuse_large_blocks()  # the step's large arrays, reused from step to step
        self.module, forward = trainable(model)
        self.optimizer = optimizer

        def loss_fn(x: mx.array, y: mx.array) -> mx.array:
            return next_token_loss(forward(x), y, "mean")

        self.step, self.state = compile_step(self.module, optimizer, grad_clip, loss_fn)
        self.evaluate = compile_eval(model)


def compile_eval(model: Any) -> Callable[[mx.array, mx.array], mx.array]:
    """The summed next-token cross-entropy of a batch, `evaluate(x, y)`, as one compiled function (no
    gradients): held-out losses in `mad train` and `mad eval`."""
    module, forward = trainable(model)
    state = [module.state]

    # outputs too: running the program may refresh a fused group's concatenated weight (`Program._sync_fused`),
    # which must leave the trace as a real array
    @partial(mx.compile, inputs=state, outputs=state)
    def evaluate(x: mx.array, y: mx.array) -> mx.array:
        return next_token_loss(forward(x), y, "sum")

    return evaluate


# ----------------------------------------------------------------------------------------- state files
def optimizer_arrays(optimizer: optim.Optimizer) -> dict[str, mx.array]:
    return dict(tree_flatten(optimizer.state))


def load_optimizer_arrays(optimizer: optim.Optimizer, arrays: dict[str, mx.array], where: str) -> None:
    """Put saved optimizer arrays into an initialised optimizer's state, checked name by name."""
    own = optimizer_arrays(optimizer)
    missing = [k for k in own if k not in arrays]
    extra = [k for k in arrays if k not in own]
    wrong = [k for k in own if k in arrays and tuple(arrays[k].shape) != tuple(own[k].shape)]
    if missing or extra or wrong:
        what = (f"missing '{missing[0]}'" if missing else f"unexpected '{extra[0]}'" if extra
                else f"'{wrong[0]}' has shape {tuple(arrays[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)}")
        raise MadError(f"the optimizer state does not fit the model: {what} ({len(missing)} missing, {len(extra)} "
                       f"unexpected, {len(wrong)} of another shape)", Source(where))
    optimizer.state = tree_map_with_path(lambda path, v: arrays[path].astype(v.dtype), optimizer.state)


def svg_plot(points: list[tuple[float, float]], eval_points: list[tuple[float, float]], title: str, *,
             series: Optional[list[dict]] = None, xlabel: str = "step", xticks: Optional[list[str]] = None,
             ylim: Optional[tuple[float, float]] = None) -> str:
    """A small line chart as SVG text (no dependency): the loss (and the held-out loss) by step, or `series`,
    each {"label", "color", "points": [(x, y)], "spread": [s] (optional: error bars y +- s), "line": bool
    (default True), "dots": bool}. `xticks` names the x positions 0, 1, ... (categories) instead of numbers."""
    if series is None:
        series = [{"label": "loss", "color": "#1f77b4", "points": points},
                  {"label": "held-out loss", "color": "#d62728", "points": eval_points, "dots": True}]
    w, h, ml, mr, mt, mb = 640, 360, 60, 20, 30, 40
    def finite(sr: dict) -> list[tuple[float, float, float]]:
        spread = sr.get("spread") or [0.0] * len(sr["points"])
        return [(x, v, e) for (x, v), e in zip(sr["points"], spread) if math.isfinite(v) and math.isfinite(e)]

    series = [dict(sr, points=finite(sr)) for sr in series]
    everything = [p for sr in series for p in sr["points"]]
    allv = [v + d for _, v, e in everything for d in (-e, e)] or [0.0, 1.0]
    lo, hi = ylim or (min(allv), max(allv))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    if xticks:
        smin, smax = -0.5, len(xticks) - 0.5
    else:
        smax = max([x for x, _, _ in everything] + [1])
        smin = min([x for x, _, _ in everything] + [smax])
    span = max(smax - smin, 1)

    def px(s: float) -> float:
        return ml + (s - smin) / span * (w - ml - mr)

    def py(v: float) -> float:
        return mt + (hi - v) / (hi - lo) * (h - mt - mb)

    def esc(t: str) -> str:
        return t.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
           'font-family="sans-serif" font-size="11">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="13">{esc(title)}</text>',
           f'<line x1="{ml}" y1="{h - mb}" x2="{w - mr}" y2="{h - mb}" stroke="black"/>',
           f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{h - mb}" stroke="black"/>']
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        out.append(f'<text x="{ml - 5}" y="{py(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
        out.append(f'<line x1="{ml}" y1="{py(v):.1f}" x2="{w - mr}" y2="{py(v):.1f}" stroke="#ddd"/>')
    ticks = list(enumerate(xticks)) if xticks else [(smin + span * k / 4, str(int(round(smin + span * k / 4))))
                                                     for k in range(5)]
    for s, name in ticks:
        out.append(f'<text x="{px(s):.1f}" y="{h - mb + 15}" text-anchor="middle">{esc(name)}</text>')
    out.append(f'<text x="{(w + ml) / 2}" y="{h - 5}" text-anchor="middle">{esc(xlabel)}</text>')
    for sr in series:
        pts, color = sr["points"], sr["color"]
        if pts and sr.get("line", True):
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="'
                       + " ".join(f"{px(x):.1f},{py(v):.1f}" for x, v, _ in pts) + '"/>')
        out.extend(f'<line x1="{px(x):.1f}" y1="{py(v - e):.1f}" x2="{px(x):.1f}" y2="{py(v + e):.1f}" '
                   f'stroke="{color}" stroke-width="1.5"/>' for x, v, e in pts if e > 0)
        if sr.get("dots"):
            out.extend(f'<circle cx="{px(x):.1f}" cy="{py(v):.1f}" r="2.5" fill="{color}"/>' for x, v, _ in pts)
    for k, sr in enumerate(s for s in series if s["points"]):
        out.append(f'<text x="{w - mr - 5}" y="{mt + 12 + 14 * k}" text-anchor="end" fill="{sr["color"]}">'
                   f'{esc(sr["label"])}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------- the run
def _finite_weights(module: nn.Module) -> bool:
    flags = [mx.isfinite(v).all() for _, v in tree_flatten(module.parameters())]
    mx.eval(flags)
    return all(f.item() for f in flags)


def _read_state(out: Path) -> dict:
    from .loading import _read_json

    file = out / "training" / "state.json"
    if not file.is_file():
        raise MadError(f"--resume: {out} holds no training state (training/state.json); it was not written by "
                       "`mad train`, or by an older one", Source(str(out)))
    state = _read_json(file, "training/state.json")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not isinstance(state.get("step"), int) \
            or not isinstance(state.get("config"), dict):
        raise MadError("training/state.json: not a MAD training state", Source(str(file)))
    return state


def _read_metrics(out: Path, upto: int) -> list[dict]:
    file = out / "metrics.jsonl"
    records = []
    if file.is_file():
        for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if isinstance(r, dict) and isinstance(r.get("step"), int) and r["step"] <= upto:
                records.append(r)
    return records


def _given(cfg: TrainConfig, given: set[str], saved: dict) -> TrainConfig:
    """A resumed run's settings: the saved ones, where a flag was not given; a given flag that changes a
    setting that shapes the trajectory (all but steps, eval_every, save_every) is an error."""
    values = asdict(cfg)
    for name in TrainConfig.FIXED + ("steps", "eval_every", "save_every"):
        if name in saved and name not in given:
            values[name] = saved[name]
    changed = [n for n in TrainConfig.FIXED if n in given and n in saved and values[n] != saved[n]]
    if changed:
        flags = ", ".join(f"--{n.replace('_', '-')} {values[n]} (saved: {saved[n]})" for n in changed)
        raise MadError(f"--resume continues the saved run, whose settings these flags change: {flags}; leave them "
                       "out, or start a new run in another folder")
    return TrainConfig(**values)


def train(source: Optional[str | Path], data: str | Path, out: str | Path, config: Optional[TrainConfig] = None, *,
          resume: bool = False, given: Optional[set[str]] = None, trust_plugins: bool = False,
          memory_check: bool = True, echo: Optional[Callable[[str], None]] = print, progress: Optional[bool] = None,
          stop_after: Optional[int] = None) -> dict:
    """Train `source` (a topology file, a build folder, a checkpoint folder to fine-tune) on `data` into the
    checkpoint folder `out`; see the module docstring. Returns a summary (final step, last loss, last
    held-out loss, the folder).

    `resume`: continue the run saved in `out` (its weights, optimizer, step, settings; `source` may be None).
    `given`: the settings the user gave explicitly (a resumed run keeps the others' saved values).
    `stop_after`: end after this many steps of this call, saving, as an interruption would leave it (tests).
    """
    from .data import cached_meta, corpus_key, data_files, tokenise
    from .loading import check_memory, load
    from .report import _clean_stale, _tmp_prefix, check_build_target
    from .save import is_mad_checkpoint
    from .tokenizers import ByteTokenizer

    echo = echo or (lambda s: None)
    cfg = config or TrainConfig()
    given = set(given or ())
    out = Path(out)
    check_build_target(out, "-o", checkpoint=True)  # absent, empty or MAD's own: before any work
    saved: Optional[dict] = None
    if resume:
        if not is_mad_checkpoint(out):
            raise MadError(f"--resume: {out} is not a checkpoint folder written by `mad train`", Source(str(out)))
        saved = _read_state(out)
        cfg = _given(cfg, given, saved["config"])
    cfg.check()
    if mx.default_device() == mx.cpu:
        from .backends.cpu import malloc_opted_out

        malloc_opted_out()  # a bad MAD_MALLOC is reported before anything is read or written
    if resume and saved["step"] >= cfg.steps:
        raise MadError(f"--resume: the run in {out} is at step {saved['step']}, --steps {cfg.steps} is reached; "
                       f"give a larger --steps to train on")

    # ---- the model
    mx.random.seed(cfg.seed)
    if resume:
        model, tok = load(out, dtype=cfg.dtype, trust_plugins=trust_plugins, memory_check=memory_check)
    else:
        if source is None:
            raise MadError("give the model to train: a topology file, a build folder or a checkpoint folder")
        model, tok = load(source, dtype=cfg.dtype, trust_plugins=trust_plugins, memory_check=memory_check)
    if model.program.quantization is not None:
        from .quantize import describe_quantization

        raise MadError(f"the model is quantized ({describe_quantization(model.program.quantization)}); mad train "
                       "trains floating-point weights: train the unquantized model, then quantize it (mad convert -q)",
                       Source(str(source or out)))
    if tok is None:
        if model.vocab_size > 256:
            raise MadError(f"{source}: the model has a vocabulary of {model.vocab_size} ids and no tokenizer.json; "
                           "bytes cover 256 ids")
        tok = ByteTokenizer()
    model.tokenizer = tok
    graph = model.program.graph
    if memory_check:  # weights, gradients and AdamW's two moments
        check_memory(graph, cfg.dtype, str(source or out), extra_bytes=3 * graph.param_count() * 4)
    if cfg.batch * cfg.seq * model.vocab_size > MAX_TENSOR:
        raise MadError(f"--batch {cfg.batch} x --seq {cfg.seq} x vocabulary {model.vocab_size} = "
                       f"{cfg.batch * cfg.seq * model.vocab_size:,} logits, more than the {MAX_TENSOR:,} elements "
                       "MAD allows in one tensor; lower --batch or --seq")
    limit = getattr(graph, "max_seq", None)
    if limit is not None and cfg.seq > int(limit):
        raise MadError(f"--seq {cfg.seq} is longer than the model allows ({limit})")

    # ---- the data: tokenised once into a memory-mapped file (OUT/data/, or a staging folder beside OUT)
    files = data_files(Path(data))
    key = corpus_key(files, tok, model.vocab_size)
    staging: Optional[Path] = None
    data_dir = out / "data"
    meta = cached_meta(data_dir, key) if is_mad_checkpoint(out) else None
    if meta is None:
        out.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(out.parent, out.name)
        staging = Path(tempfile.mkdtemp(prefix=_tmp_prefix(out.name), dir=out.parent))
        from .report import MARKER
        from .report import MARKER_TEXT

        (staging / MARKER).write_text(MARKER_TEXT)  # a killed run's staging folder is cleaned by the next
        data_dir = staging / "data"
        echo(f"tokenising {data} ...")
        try:
            meta = tokenise(files, tok, model.vocab_size, data_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    try:
        return _run(model, tok, cfg, out, data_dir, meta, saved, echo, progress, stop_after, source, data, staging)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _run(model, tok, cfg: TrainConfig, out: Path, data_dir: Path, meta: dict, saved: Optional[dict], echo, progress,
         stop_after, source, data, staging) -> dict:
    from .data import META_FILE, TOKENS_FILE, open_corpus
    from .save import write_checkpoint

    corpus = open_corpus(data_dir, meta, cfg.seq, cfg.seed, str(data))
    held = corpus.eval_batches(cfg.batch, EVAL_WINDOWS)
    echo(f"{meta['tokens']:,} tokens: {corpus.n_train:,} for training ({corpus.windows:,} sequences of {cfg.seq}), "
         f"{meta['tokens'] - corpus.n_train:,} held out" + ("" if held else " (too few to evaluate)"))

    optimizer = make_optimizer(cfg)
    module, _ = trainable(model)
    optimizer.init(module.trainable_parameters())
    step0 = 0
    metrics: list[dict] = []
    if saved is not None:
        file = out / "training" / "optimizer.safetensors"
        try:
            arrays = mx.load(str(file), format="safetensors")
        except Exception as e:  # noqa: BLE001
            raise MadError(f"cannot read the optimizer state (truncated or corrupt?): {e}", Source(str(file))) from None
        load_optimizer_arrays(optimizer, arrays, str(file))
        step0 = saved["step"]
        metrics = _read_metrics(out, step0)
        if saved.get("data", {}).get("windows") not in (None, corpus.windows):
            echo(f"note: the data differ from the saved run's ({corpus.windows} sequences, saved: "
                 f"{saved['data']['windows']}); training goes on with the new data")
        # the step draws no random numbers (no dropout): the seed fixed the initial weights and fixes the data
        # order (`Corpus.batch`), so the RNG key recorded in state.json needs no restoring
    stepper = Stepper(model, optimizer, cfg.grad_clip)
    mx.eval(stepper.state)

    def eval_loss() -> Optional[float]:
        if not held:
            return None
        total, count = mx.array(0.0), 0
        for b in held:
            b = mx.array(b)
            total = total + stepper.evaluate(b[:, :-1], b[:, 1:])
            count += b.shape[0] * (b.shape[1] - 1)
        return float(total.item()) / count

    saved_step = {"step": step0, "any": saved is not None}
    live = out / "metrics.jsonl" if saved is not None else None  # appended to between checkpoints
    if saved is not None:  # the records after the saved step belong to an interrupted run: drop them
        from .report import write_atomic_file

        write_atomic_file(live, lambda p: Path(p).write_text("".join(json.dumps(r) + "\n" for r in metrics)),
                          flag="-o")
    links = lambda: {f"data/{TOKENS_FILE}": corpus.folder / TOKENS_FILE, f"data/{META_FILE}": corpus.folder / META_FILE}

    def save(step: int, final: bool = False) -> None:
        if not _finite_weights(module):
            kept = (f"the checkpoint of step {saved_step['step']} in {out} is kept" if saved_step["any"]
                    else "no checkpoint was written")
            raise MadError(f"step {step}: the weights hold NaN or infinite values after this step; training stopped "
                           f"and {kept}. A smaller --lr, a --grad-clip, more --warmup or float32 may help")
        state = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": step,
                 "data": corpus.position(step, cfg.batch), "seed": cfg.seed,
                 "rng": np.asarray(mx.random.state[0]).tolist(), "config": asdict(cfg),
                 "source": str(source) if source is not None else None, "data_path": str(data)}
        opt = optimizer_arrays(optimizer)
        mx.eval(opt)
        extra = {"training/state.json": json.dumps(state, indent=1) + "\n",
                 "training/optimizer.safetensors": lambda p: mx.save_safetensors(str(p), opt,
                                                                                   metadata={"format": STATE_FORMAT}),
                 "metrics.jsonl": "".join(json.dumps(r) + "\n" for r in metrics)}
        if final:
            extra["loss.svg"] = svg_plot([(r["step"], r["loss"]) for r in metrics],
                                         [(r["step"], r["eval_loss"]) for r in metrics if "eval_loss" in r],
                                         f"{model.program.graph.name}: training loss")
        write_checkpoint(out, model, tok, extra=extra, links=links(), info={"step": step}, flag="-o")
        corpus.folder = out / "data"  # the cache now lives in the checkpoint (the same file, hard-linked)
        saved_step.update(step=step, any=True)
        nonlocal live
        live = out / "metrics.jsonl"

    last = stop_after if stop_after is not None else cfg.steps
    end = min(cfg.steps, step0 + last)
    tokens_per_step = cfg.batch * cfg.seq
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True, highlight=False)
    show = console.is_terminal if progress is None else progress
    last_loss = last_eval = None
    with Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                  TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s"), TimeRemainingColumn(),
                  console=console, disable=not show, transient=False) as bar:
        task = bar.add_task("train", total=cfg.steps, completed=step0, loss="-", tps="-")
        tic = time.perf_counter()
        for step in range(step0, end):
            b = mx.array(corpus.batch(step, cfg.batch))
            lr = float(cfg.lr_at(mx.array(step)).item())
            loss, norm = stepper.step(b[:, :-1], b[:, 1:])
            mx.eval(loss, norm, stepper.state)
            value = float(loss.item())
            toc = time.perf_counter()
            tps = tokens_per_step / max(toc - tic, 1e-9)
            tic = toc
            n = step + 1
            record = {"step": n, "loss": value, "lr": lr, "tokens_per_sec": round(tps, 1),
                      "grad_norm": float(norm.item())}
            if not math.isfinite(value):
                metrics.append(record)
                kept = (f"the checkpoint of step {saved_step['step']} in {out} is kept" if saved_step["any"]
                        else "no checkpoint was written")
                if live is not None:
                    with open(live, "a", encoding="utf-8") as f:
                        f.write(json.dumps(record) + "\n")
                raise MadError(f"step {n}: the loss is {value} (not finite); training stopped and {kept}. A smaller "
                               f"--lr, a --grad-clip, more --warmup or float32 may help")
            if (cfg.eval_every and n % cfg.eval_every == 0) or n == cfg.steps:  # 0: at the end only
                last_eval = eval_loss()
                if last_eval is not None:
                    record["eval_loss"] = last_eval
                    if not show:
                        echo(f"step {n}: loss {value:.4f}, held-out loss {last_eval:.4f}, {tps:,.0f} tokens/s")
            metrics.append(record)
            last_loss = value
            if live is not None:
                try:
                    with open(live, "a", encoding="utf-8") as f:
                        f.write(json.dumps(record) + "\n")
                except OSError:
                    live = None
            bar.update(task, completed=n, loss=f"{value:.4f}", tps=f"{tps:,.0f}")
            if cfg.save_every and n % cfg.save_every == 0 and n < end:
                save(n)
    save(end, final=True)
    echo(f"step {end}/{cfg.steps}: loss {last_loss:.4f}" + (f", held-out loss {last_eval:.4f}" if last_eval is not None
                                                            else "") + f"; wrote {out}/")
    return {"step": end, "loss": last_loss, "eval_loss": last_eval, "out": str(out)}


__all__ = ["SCHEDULES", "AdamW", "TrainConfig", "Stepper", "clip_grad_norm", "clip_scale", "global_norm",
           "next_token_loss", "svg_plot", "train", "trainable"]
