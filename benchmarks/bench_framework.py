"""What does the MAD framework layer cost? A MAD-built xLSTM vs the same model written by hand in MLX.

Both run the same computation on the same weights: the MAD `LanguageModel` built from a topology
(default `topologies/xlstm-125m.yaml`, the ~160M model of the xLSTM-7B family), and an ordinary
mlx-lm style model file (below) that loads the MAD program's weights under the same names. Both are
compiled the same way: `mx.compile` of the whole forward `(tokens, state) -> (logits, new_state)` with
the model's arrays as implicit inputs (`inputs=module.state`), exactly as `mad.program.Program` does.
The hand-written model runs the kernels MAD's blocks run, from the same registry
(`mad.kernels.registry.dispatch`: the mLSTM cell, the `sigmoid_mul` / `silu_mul` gates and the `linear`
kernel), and fuses its sibling projections (q|k|v|o|i|f, up-gate|up) into one product each when the MAD
program does (`Program.fused`: the CPU and GPU default), so only the wiring differs. It must: on the CPU
the kernels' CPU variants are within an ulp or two of MLX's own functions, and MKL sums a fused product
in another order than the separate ones, and twelve random blocks amplify such 1-ulp differences to
1e-3 in the logits, so a model written with `nn.silu` and separate `nn.Linear`s is not the same
computation (nor as fast) and fails the check below.

First the logits (and the state) of the two are checked to agree on a short input, prefill and one
decode step; then it times, interleaving MAD and hand-written trials in one process:
  decode       one step (batch 1, T=1) from the state after a 64-token prompt, ending in
               `mx.eval(logits, state)` (median of 5*trials steps)
  decode call  the same call without evaluating anything: the host-side cost of one call (checking
               inputs and state, flattening them, replaying the compiled graph), i.e. the framework
               layer without the math (median of `--calls` calls, 200)
  forward      a 512-token forward from the zero state (batch 1), ending in `mx.eval(logits, state)`,
               median of `trials` runs (fewer, at least 1, when they would not fit in `--budget` s)
Warm-up: 5 decode steps each; for the forward one full-length run each, or, when one run is estimated
to take over 10 s (MLX's Linux CPU wheel), a full-length call that traces and compiles the graph
without evaluating it, the kernels having been built by the evaluated 64-token prompt runs.

`--fuse` picks the MAD program's sibling-linear fusion (`mad.passes`; `auto` = the Program default):
`--fuse both` times three models interleaved, MAD unfused ("mad"), MAD fused ("mad-fused") and the
hand-written one, all on the same weights, to measure what fusing gains on this machine.

    python benchmarks/bench_framework.py [--topology FILE] [--set dims.D=1024 ...] [--dtype float32]
                                         [--fuse auto|on|off|both] [--trials 7] [--budget 120] [--json [PATH]]
    python benchmarks/bench_framework.py --quick   # tiny sizes, no pauses, a few seconds (CI: tests/test_benchmarks.py)
"""

from __future__ import annotations

import argparse
from functools import partial
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import mad  # before mlx.core: selects the CPU BLAS, see backends/cpu.py
import mlx.core as mx
import mlx.nn as nn
from mad.model import LanguageModel
from mad.graph import build_graph
from mad.topology import load_topology
from mad.kernels.mlstm import mlstm_sequence
from mad.kernels.registry import dispatch
from mad.program import fuse_enabled

from common import PAUSE_S, interleave, write_json

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"
TOLERANCE = {"float32": 1e-5, "bfloat16": 5e-2, "float16": 5e-2}
WARM_FULL_S = 10.0  # warm up at the timed length when one run is estimated to take less than this


# =========================================================================================
# The hand-written model: a plain MLX (mlx-lm style) xLSTM-7B-family model file.
# =========================================================================================
class ModelArgs:
    def __init__(self, vocab_size: int, hidden_size: int, num_blocks: int, num_heads: int, qk_dim: int,
                 v_dim: int, ffn_dim: int, chunk_size: int = 64, norm_eps: float = 1e-6, cell_eps: float = 1e-6,
                 gate_soft_cap: Optional[float] = 15.0, logit_soft_cap: Optional[float] = 30.0, fuse: bool = False):
        self.vocab_size, self.hidden_size, self.num_blocks, self.num_heads = vocab_size, hidden_size, num_blocks, num_heads
        self.qk_dim, self.v_dim, self.ffn_dim, self.chunk_size = qk_dim, v_dim, ffn_dim, chunk_size
        self.norm_eps, self.cell_eps = norm_eps, cell_eps
        self.gate_soft_cap, self.logit_soft_cap = gate_soft_cap, logit_soft_cap
        self.fuse = fuse  # sibling projections as one product each (q|k|v|o|i|f, up-gate|up)


class Linear(nn.Module):
    """`nn.Linear` (weight [out, in], optional bias) plus an optional soft-cap, computed by MAD's `linear`
    kernel (on a GPU its decode kernel, with bias and cap in the epilogue), as MAD's `linear` block does."""

    def __init__(self, d_in: int, d_out: int, bias: bool = False, cap: Optional[float] = None):
        super().__init__()
        scale = d_in ** -0.5
        self.weight = mx.random.uniform(-scale, scale, (d_out, d_in))
        if bias:
            self.bias = mx.zeros((d_out,))
        self.cap = cap

    def __call__(self, x: mx.array) -> mx.array:
        return dispatch("linear")(x, self.weight, self.bias if "bias" in self else None, (), (self.cap,))[0]


class Projections(nn.Module):
    """Sibling projections of one input: separate `Linear`s, or (fused) one product over their weights
    stacked by rows, split back by columns (`linear` kernel: each part with its bias and soft-cap; the
    members without a bias get zeros). `Model.sanitize` stacks the checkpoint's per-member weights."""

    def __init__(self, d_in: int, members: dict[str, tuple[int, bool, Optional[float]]], fuse: bool):
        super().__init__()
        self.names, self.fuse = list(members), fuse
        self.widths = [w for w, _, _ in members.values()]
        self.caps = [c for _, _, c in members.values()]
        if fuse:
            self.weight = mx.zeros((sum(self.widths), d_in))
            if any(b for _, b, _ in members.values()):
                self.bias = mx.zeros((sum(self.widths),))
        else:
            for name, (w, b, cap) in members.items():
                setattr(self, name, Linear(d_in, w, b, cap))

    def __call__(self, x: mx.array) -> list[mx.array]:
        if self.fuse:
            splits = [sum(self.widths[:j + 1]) for j in range(len(self.widths) - 1)]
            return dispatch("linear")(x, self.weight, self.bias if "bias" in self else None, splits, self.caps)
        return [getattr(self, name)(x) for name in self.names]


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


class MultiHeadLayerNorm(nn.Module):
    """LayerNorm over each head's slice, in float32, then a weight over the whole dim."""

    def __init__(self, heads: int, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.heads, self.eps = heads, eps

    def __call__(self, x: mx.array) -> mx.array:
        b, t, d = x.shape
        y = mx.fast.layer_norm(x.reshape(b, t, self.heads, d // self.heads).astype(mx.float32), None, None, self.eps)
        return y.reshape(b, t, d).astype(x.dtype) * self.weight


class MLSTMLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        d, nh, cap = args.hidden_size, args.num_heads, args.gate_soft_cap
        self.in_proj = Projections(d, {"q": (args.qk_dim, False, None), "k": (args.qk_dim, False, None),
                                       "v": (args.v_dim, False, None), "ogate_preact": (args.v_dim, False, None),
                                       "igate_preact": (nh, True, cap), "fgate_preact": (nh, True, cap)}, args.fuse)
        self.multihead_norm = MultiHeadLayerNorm(nh, args.v_dim, args.norm_eps)
        self.out_proj = Linear(args.v_dim, d)
        self.heads, self.chunk_size, self.eps = nh, args.chunk_size, args.cell_eps

    def __call__(self, x: mx.array, state: tuple) -> tuple[mx.array, tuple]:
        b, t, _ = x.shape

        def heads(y: mx.array) -> mx.array:  # (B, T, NH*DH) -> (B, NH, T, DH)
            return y.reshape(b, t, self.heads, -1).transpose(0, 2, 1, 3)

        q, k, v, o, i, f = self.in_proj(x)
        i = i.astype(mx.float32).transpose(0, 2, 1)
        f = f.astype(mx.float32).transpose(0, 2, 1)
        h, state = mlstm_sequence(heads(q), heads(k), heads(v), i, f, state, chunk_size=self.chunk_size, eps=self.eps)
        h = h.transpose(0, 2, 1, 3).reshape(b, t, -1)
        return self.out_proj(dispatch("sigmoid_mul")(o, self.multihead_norm(h))), state  # sigmoid(o) * norm(h)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.up = Projections(args.hidden_size, {"proj_up_gate": (args.ffn_dim, False, None),
                                                 "proj_up": (args.ffn_dim, False, None)}, args.fuse)
        self.proj_down = Linear(args.ffn_dim, args.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = self.up(x)
        return self.proj_down(dispatch("silu_mul")(gate, up))  # silu(gate) * up


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm_mlstm = RMSNorm(args.hidden_size, args.norm_eps)
        self.mlstm_layer = MLSTMLayer(args)
        self.norm_ffn = RMSNorm(args.hidden_size, args.norm_eps)
        self.ffn = FeedForward(args)

    def __call__(self, x: mx.array, state: tuple) -> tuple[mx.array, tuple]:
        y, state = self.mlstm_layer(self.norm_mlstm(x), state)
        x = x + y
        return x + self.ffn(self.norm_ffn(x)), state


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.blocks = [Block(args) for _ in range(args.num_blocks)]
        self.out_norm = RMSNorm(args.hidden_size, args.norm_eps)


class Model(nn.Module):
    """logits, cache = model(tokens (B, T) int32, cache: list of (C, n, m) per block)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.backbone = Backbone(args)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, cap=args.logit_soft_cap)

    def __call__(self, tokens: mx.array, cache: list) -> tuple[mx.array, list]:
        x = self.backbone.embeddings(tokens)
        new_cache = []
        for block, state in zip(self.backbone.blocks, cache):
            x, state = block(x, state)
            new_cache.append(state)
        return self.lm_head(self.backbone.out_norm(x)), new_cache

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Checkpoint names (`...mlstm_layer.q.weight`) -> this model's: the members of a `Projections` move
        under it (`...mlstm_layer.in_proj.q.weight`), or, fused, are stacked into its weight and bias."""
        out = dict(weights)
        for prefix, attr, proj in self.projections():
            take = lambda name, kind: out.pop(f"{prefix}.{name}.{kind}", None)  # noqa: E731
            if not proj.fuse:
                for name in proj.names:
                    for kind in ("weight", "bias"):
                        if (w := take(name, kind)) is not None:
                            out[f"{prefix}.{attr}.{name}.{kind}"] = w
                continue
            weight = out[f"{prefix}.{attr}.weight"] = mx.concatenate([take(name, "weight") for name in proj.names])
            biases = [take(name, "bias") for name in proj.names]
            if "bias" in proj:  # zeros of the weights' dtype (a float32 zero would promote a bfloat16 product)
                out[f"{prefix}.{attr}.bias"] = mx.concatenate([mx.zeros((w,), weight.dtype) if b is None else b
                                                               for b, w in zip(biases, proj.widths)])
        return out

    def projections(self) -> list[tuple[str, str, Projections]]:
        """(the checkpoint prefix of its members, its attribute, the module) for every `Projections`."""
        return [(f"backbone.blocks.{i}.{part}", attr, getattr(getattr(block, part), attr))
                for i, block in enumerate(self.backbone.blocks)
                for part, attr in (("mlstm_layer", "in_proj"), ("ffn", "up"))]

    def make_cache(self, batch: int) -> list:
        a = self.args
        dqk, dv = a.qk_dim // a.num_heads, a.v_dim // a.num_heads
        return [(mx.zeros((batch, a.num_heads, dqk, dv)), mx.zeros((batch, a.num_heads, dqk)),
                 mx.zeros((batch, a.num_heads))) for _ in range(a.num_blocks)]


class HandWritten:
    """The compiled hand-written model with the calling convention of `mad.generate.LanguageModel`."""

    def __init__(self, model: Model):
        self.model = model
        self._forward = mx.compile(lambda tokens, cache: model(tokens, cache), inputs=model.state)

    def __call__(self, tokens: mx.array, cache: Optional[list] = None) -> tuple[mx.array, list]:
        if cache is None:
            cache = self.model.make_cache(tokens.shape[0])
        logits, cache = self._forward(tokens, cache)
        return logits.astype(mx.float32), cache


def args_from_program(program: mad.Program, fuse: bool) -> ModelArgs:
    """The hand-written model's config, read from the MAD program (dims and node options); `fuse`: its
    sibling projections as one product each."""
    dims, g = program.graph.dims, program.graph.g
    spec = lambda n: g.nodes[n]["spec"]  # noqa: E731
    layer = "backbone.blocks.0.mlstm_layer"
    return ModelArgs(
        vocab_size=int(dims["V"]), hidden_size=int(dims["D"]), num_blocks=int(dims["L"]), num_heads=int(dims["NH"]),
        qk_dim=int(dims["QK"]), v_dim=int(dims["VD"]), ffn_dim=int(dims["F"]), chunk_size=int(dims["CHUNK"]),
        norm_eps=spec("backbone.blocks.0.norm_mlstm").eps, cell_eps=spec(f"{layer}.cell").eps,
        gate_soft_cap=spec(f"{layer}.igate_preact").softcap, logit_soft_cap=spec("lm_head").softcap, fuse=fuse)


def hand_written(program: mad.Program, fuse: bool) -> HandWritten:
    """The hand-written model on the MAD program's weights (the same values under the checkpoint's names)."""
    model = Model(args_from_program(program, fuse))
    model.load_weights(list(model.sanitize(program.parameters()).items()), strict=True)
    mx.eval(model.parameters())
    return HandWritten(model)


# =========================================================================================
# The benchmark
# =========================================================================================
def randomise(program: mad.Program, seed: int) -> None:
    """Fresh random weights for every parameter (norm weights near 1, random biases), fixed seed."""
    mx.random.seed(seed)
    new = {}
    for name, w in program.parameters().items():
        if w.ndim == 1:
            new[name] = (1.0 + 0.1 * mx.random.normal(w.shape)) if name.endswith("norm.weight") \
                else mx.random.normal(w.shape)
        else:
            new[name] = mx.random.normal(w.shape) * (1.0 if "embeddings" in name else 1.0 / math.sqrt(w.shape[-1]))
    program.load_weights(new)
    mx.eval(program.parameters())


def max_diff(a: mx.array, b: mx.array) -> float:
    return mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))).item()


def check_same(mad_lm: LanguageModel, hand: HandWritten, vocab: int, dtype: str) -> dict:
    """Logits and states of the two on a 13-token prefill and one decode step must agree."""
    toks = mx.random.randint(0, vocab, (2, 13)).astype(mx.int32)
    nxt = mx.random.randint(0, vocab, (2, 1)).astype(mx.int32)
    lm, sm = mad_lm(toks)
    lh, sh = hand(toks)
    dm, sm2 = mad_lm(nxt, sm)
    dh, sh2 = hand(nxt, sh)
    nodes = [n for n in mad_lm.program.nodes if n in mad_lm.program.stateful]
    state = max(max_diff(sm2[n][k], sh2[i][j]) for i, n in enumerate(nodes) for j, k in enumerate("Cnm"))
    out = {"prefill_logits": max_diff(lm, lh), "decode_logits": max_diff(dm, dh), "state": state,
           "logit_scale": mx.max(mx.abs(lm)).item()}
    tol = TOLERANCE[dtype]
    bad = {k: v for k, v in out.items() if k != "logit_scale" and not v < tol}
    if bad:
        raise SystemExit(f"MAD and hand-written differ (tolerance {tol}): {bad}")
    return out


def clocked(fn: Callable[[], object]) -> Callable[[], float]:
    """fn, returning the seconds it took (what `interleave` records)."""

    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", default=str(TOPOLOGIES / "xlstm-125m.yaml"), help="an xLSTM-7B-family topology")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="topology override, e.g. dims.D=1024 (repeatable)")
    ap.add_argument("--dtype", default="float32", choices=list(TOLERANCE))
    ap.add_argument("--fuse", default="auto", choices=["auto", "on", "off", "both"],
                    help="sibling-linear fusion of the MAD program; both: time MAD unfused and fused")
    ap.add_argument("--trials", type=int, default=7,
                    help="forwards per model (within --budget); decode takes 5x as many single steps")
    ap.add_argument("--budget", type=float, default=120.0,
                    help="seconds for the timed forwards: fewer than --trials (at least 1) when one trial of every model is "
                         "estimated to take longer than budget/trials")
    ap.add_argument("--prompt", type=int, default=64, help="prompt length before the timed decode step")
    ap.add_argument("--seq", type=int, default=512, help="length of the timed forward")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calls", type=int, default=200, help="host-side decode calls timed per model")
    ap.add_argument("--pause", type=float, default=PAUSE_S, help="seconds of rest before each trial (common.interleave)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run in seconds, timings meaningless: dims D=64 L=2 V=256 (further --set apply after "
                         "them), --prompt 8 --seq 32 --trials 1 --calls 10 --pause 0")
    ap.add_argument("--json", nargs="?", const="-", metavar="PATH", help="write the results as JSON (stdout if no PATH)")
    a = ap.parse_args(argv)
    if a.quick:
        a.overrides = ["dims.D=64", "dims.L=2", "dims.V=256", *a.overrides]
        a.prompt, a.seq, a.trials, a.calls, a.pause = 8, 32, 1, 10, 0.0

    t_start = time.perf_counter()
    fuse = {"auto": "auto", "on": True, "off": False, "both": False}[a.fuse]

    def build(fuse) -> mad.Program:
        return mad.Program(build_graph(load_topology(a.topology, a.overrides)), dtype=a.dtype, fuse=fuse)

    program = build(fuse)
    randomise(program, a.seed)
    mad_lm = LanguageModel(program)
    args = args_from_program(program, program.fused)
    n_params = sum(v.size for v in program.parameters().values())
    log = sys.stderr if a.json == "-" else sys.stdout
    print(f"{program.graph.name}: {n_params / 1e6:.1f}M parameters, D={args.hidden_size} blocks={args.num_blocks} "
          f"heads={args.num_heads} vocab={args.vocab_size}, {a.dtype}, mlx {mx.__version__} on {mx.default_device()}",
          file=log)

    models = {"mad": mad_lm}
    if a.fuse == "both":
        fused = build(True)
        fused.load_weights(program.parameters())
        mx.eval(fused.root.parameters())
        models["mad-fused"] = LanguageModel(fused)
    for name, m in models.items():
        groups = len(m.program.fusion_groups) if m.program.fused else 0
        print(f"{name}: fuse={m.program.fuse} -> {groups} fused groups", file=log)
    # each MAD model against the hand-written model of the same layout (fused or not); with --fuse both,
    # the timed hand-written model is the layout fuse="auto" picks on this device
    hands = {fused: hand_written(program, fused) for fused in {m.program.fused for m in models.values()}}
    hand_fused = fuse_enabled("auto") if a.fuse == "both" else program.fused
    hand = hands.get(hand_fused) or hand_written(program, hand_fused)
    check = {}
    for name, m in models.items():
        check[name] = c = check_same(m, hands[m.program.fused], args.vocab_size, a.dtype)
        print(f"{name} vs hand ({'fused' if m.program.fused else 'unfused'}), same computation: max |logits diff| "
              f"prefill {c['prefill_logits']:.2e}, decode {c['decode_logits']:.2e}, state {c['state']:.2e} "
              f"(|logits| up to {c['logit_scale']:.1f})", file=log)
    check = check["mad"] if len(check) == 1 else check
    print(f"hand: {'fused' if hand_fused else 'unfused'} projections", file=log)
    models["hand"] = hand
    mx.random.seed(a.seed + 1)
    prompt = mx.random.randint(0, args.vocab_size, (1, a.prompt)).astype(mx.int32)
    seq = mx.random.randint(0, args.vocab_size, (1, a.seq)).astype(mx.int32)
    token = mx.random.randint(0, args.vocab_size, (1, 1)).astype(mx.int32)

    # (a) decode: one step from the state after the prompt (the prompt runs also give a time estimate)
    states, t_prompt = {}, {}
    for name, m in models.items():
        t0 = time.perf_counter()
        logits, states[name] = m(prompt)
        mx.eval(logits, states[name])
        t_prompt[name] = time.perf_counter() - t0

    def unchecked(m):
        # MAD's token check (one host read of the ids) is off, as in generation's decode loop: the
        # framework's cost is what is compared, and the hand-written model checks nothing either
        return partial(m, check_tokens=False) if isinstance(m, LanguageModel) else m

    def decode_fn(m, state):
        def run():
            logits, st = unchecked(m)(token, state)
            mx.eval(logits, st)
        return run

    decode = {name: clocked(decode_fn(m, states[name])) for name, m in models.items()}
    interleave(decode, 5, a.pause)  # warm-up (traces and compiles the T=1 graph)
    decode_times = interleave(decode, 5 * a.trials, a.pause)

    # (a') the host side of a decode call alone: build the lazy outputs, evaluate nothing. This is the
    # framework layer (input/state handling, flattening, replaying the compiled graph) without the math.
    call = {name: clocked(lambda m=m, s=states[name]: unchecked(m)(token, s)) for name, m in models.items()}
    call_times = interleave(call, a.calls, a.pause)

    # (b) forward of `seq` tokens from the zero state
    def forward_fn(m):
        def run():
            logits, st = unchecked(m)(seq)
            mx.eval(logits, st)
        return run

    forward = {name: clocked(forward_fn(m)) for name, m in models.items()}
    est = max(t_prompt.values()) * a.seq / a.prompt  # one run, estimated from the prompt runs
    if est < WARM_FULL_S:
        interleave(forward, 1, a.pause)
        warmup = "one full-length run each"
    else:  # trace + compile the full-length graph without running it; the evaluated prompt runs
        for m in models.values():  # above already built the same (chunkwise) kernels
            m(seq)
        warmup = f"full-length trace (not evaluated) + the evaluated {a.prompt}-token prompt runs"
    n_forward = max(1, min(a.trials, int(a.budget // (len(models) * est))))
    forward_times = interleave(forward, n_forward, a.pause)

    results = {"model": program.graph.name, "topology": a.topology, "overrides": a.overrides, "dtype": a.dtype,
               "fuse": {name: m.program.fused for name, m in models.items() if name != "hand"}, "hand_fused": hand_fused,
               "params": n_params, "mlx": mx.__version__, "device": str(mx.default_device()),
               "machine": platform.machine(), "check": check, "benchmarks": {}}
    rows = []
    for bench, times, tokens in (("decode", decode_times, 1), ("decode call", call_times, 0),
                                 (f"forward{a.seq}", forward_times, a.seq)):
        med = {k: statistics.median(v) for k, v in times.items()}
        entry = {k: {"median_ms": med[k] * 1e3, "tokens_per_s": tokens / med[k] if tokens else None,
                     "trials": len(times[k]), "min_ms": min(times[k]) * 1e3} for k in times}
        entry["ratio_mad_over_hand"] = med["mad"] / med["hand"]
        if "mad-fused" in med:
            entry["ratio_fused_over_hand"] = med["mad-fused"] / med["hand"]
            entry["ratio_fused_over_unfused"] = med["mad-fused"] / med["mad"]
        results["benchmarks"][bench] = entry
        rows.append((bench, entry))
    results["forward_warmup"] = warmup
    results["runtime_s"] = time.perf_counter() - t_start

    print(f"\n{'benchmark':<12} {'model':<10} {'median ms':>10} {'min ms':>9} {'tokens/s':>10} {'trials':>6}"
          f" {'MAD/hand':>9}", file=log)
    for bench, entry in rows:
        for k in models:
            e = entry[k]
            ratio = f"{e['median_ms'] / entry['hand']['median_ms']:.3f}" if k != "hand" else ""
            tps = f"{e['tokens_per_s']:.1f}" if e["tokens_per_s"] else "-"
            label = {"mad": "MAD", "mad-fused": "MAD fused"}.get(k, k)
            print(f"{bench:<12} {label:<10} {e['median_ms']:>10.3f} {e['min_ms']:>9.3f} {tps:>10}"
                  f" {e['trials']:>6} {ratio:>9}", file=log)
        if "ratio_fused_over_unfused" in entry:
            print(f"{bench:<12} fused/unfused {entry['ratio_fused_over_unfused']:.3f}", file=log)
    print(f"(decode: one T=1 step after a {a.prompt}-token prompt, batch 1, evaluated; decode call: the same call "
          f"on the host only, nothing evaluated; forward: {a.seq} tokens, batch 1, warm-up: {warmup}; "
          f"total {results['runtime_s']:.0f} s)", file=log)
    write_json(results, a.json)
    return results


if __name__ == "__main__":
    main()
