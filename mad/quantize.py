"""Quantized weights: MLX's `mx.quantize` formats, chosen, stored and run as mlx-lm does.

What is quantized (mlx-lm's `quantize_model`: every module with `to_quantized`, in MAD's terms):

- every node that declares a plain linear form (`Block.linear_form`: y = softcap(x W^T + b) with its
  weight at `weight` and its bias at `bias`: the `linear` nodes) becomes a `QuantizedLinear`;
- inside every other node's module, each leaf `nn.quantize` would take (`nn.Linear`, e.g. a `swiglu`'s
  projections, and `nn.Embedding`, the `embedding` node itself), as `QuantizedLinear` and MLX's
  `nn.QuantizedEmbedding`;
- a tied linear (`tie:`) follows the node it reads: when that embedding is quantized, the head runs
  `mx.quantized_matmul` on the embedding's packed matrix (mlx-lm's `QuantizedEmbedding.as_linear`).

Norms, convolutions, the block-diagonal (`headwise_linear`) projections, the sLSTM's recurrent matrices
and every `bias` stay in the compute dtype, as in mlx-lm (no `to_quantized` there).

**The small gate projections** (an mLSTM layer's input and forget gates: out = number of heads, 8 for
xLSTM-7B) stay in the compute dtype too: `default_predicate` keeps every projection with fewer than
`MIN_ROWS` outputs unquantized. They hold a negligible share of the weights (2 x 8 x 4096 of the about
200M per block of xLSTM-7B), so quantizing them saves nothing, while their outputs are gate pre-activations that go
through exp and log-sigmoid and accumulate over the whole sequence in the forget gate's running sum: a
weight error there is a systematic drift of the memory's decay, not noise. mlx-lm keeps such small
routing projections at higher precision too (the MoE routers' `quant_predicate`s: 8 bits). The price is
one more matmul per layer: the gates form a fused group of their own beside the quantized q|k|v|o.

**Stored names** are mlx-lm's: `<path>.weight` (uint32, `bits` values packed per word, [out, in * bits /
32]), `<path>.scales` and, for the affine mode, `<path>.biases` ([out, in / group_size]), `<path>.bias`
unchanged. **The config** (mad.json's `quantization`, mlx-lm's config.json entry, per-module overrides
included):

    {"group_size": 64, "bits": 4, "mode": "affine",
     "backbone.blocks.0.mlstm_layer.igate_preact": false,       # left in the compute dtype
     "lm_head": {"group_size": 64, "bits": 8, "mode": "affine"}} # other settings for this module

A module not listed takes the top-level settings; the config names every module that stays unquantized,
so loading never re-runs a predicate. `Program.quantize(config)` swaps the modules (before weights are
loaded: a checkpoint is read into the quantized modules), `quantize_model` picks the config from flags
and a predicate, `convert` is `mad convert`.

**The product** is the `quantized_linear` kernel (kernels/qlinear.py, through the kernel registry): on a
CUDA GPU, affine 4- and 8-bit products of up to 8 rows (decode) run MAD's kernel
(kernels/qlinear_device.py), everything else `mx.quantized_matmul`. On the CPU a bfloat16 or float16
product runs in float32: MLX's CPU `quantized_matmul` (0.32) accumulates in the input's dtype, which on a
4096-wide row of bfloat16 is off by about a tenth of the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .errors import Diagnostics, MadError, did_you_mean
from .kernels.registry import dispatch
from .passes import FusedLinear, FusionGroup


@dataclass(frozen=True)
class ModeSpec:
    group_sizes: tuple[int, ...]
    bits: tuple[int, ...]
    default_group_size: int
    default_bits: int


# What `mx.quantize` accepts (MLX 0.32's table; tests/test_quantize.py holds it to mx.quantize), affine's
# bits as mlx-lm's convert offers them. Defaults as `nn.quantize`'s.
MODES = {
    "affine": ModeSpec((32, 64, 128), (2, 3, 4, 5, 6, 8), 64, 4),
    "mxfp4": ModeSpec((32,), (4,), 32, 4),
    "mxfp8": ModeSpec((32,), (8,), 32, 8),
    "nvfp4": ModeSpec((16,), (4,), 16, 4),
}
SETTING_KEYS = ("group_size", "bits", "mode")
MIN_ROWS = 32  # projections with fewer outputs stay in the compute dtype (see the module docstring)
API_NAMES = {"bits": "bits", "group_size": "group_size", "mode": "mode"}
CLI_FLAGS = {"bits": "--q-bits", "group_size": "--q-group-size", "mode": "--q-mode"}


@dataclass(frozen=True)
class QuantSettings:
    """How one matrix is quantized: `mx.quantize(w, group_size, bits, mode=mode)`."""

    bits: int
    group_size: int
    mode: str = "affine"

    @property
    def affine(self) -> bool:
        """Affine quantization stores `biases` beside the scales; the floating-point modes do not."""
        return self.mode == "affine"

    def to_dict(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def __str__(self) -> str:
        return f"{self.bits}-bit {self.mode}, group size {self.group_size}"


def _choices(values: Sequence[int]) -> str:
    return ", ".join(map(str, values[:-1])) + f" or {values[-1]}" if len(values) > 1 else str(values[0])


def quant_settings(bits: Any = None, group_size: Any = None, mode: Any = "affine",
                   names: Mapping[str, str] = API_NAMES) -> QuantSettings:
    """Checked settings; None takes the mode's default (as `nn.quantize`). A MadError, naming the
    settings by `names` (`CLI_FLAGS` for `mad convert`), for any combination `mx.quantize` refuses."""
    if mode is None:
        mode = "affine"
    if not isinstance(mode, str) or mode not in MODES:
        raise MadError(f"{names['mode']} must be one of {', '.join(MODES)}, got {mode!r}")
    spec = MODES[mode]
    for key, value in (("bits", bits), ("group_size", group_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise MadError(f"{names[key]} must be an integer, got {value!r}")
    bits = spec.default_bits if bits is None else bits
    group_size = spec.default_group_size if group_size is None else group_size
    wrong = [f"{names[k]} {v}" for k, v, ok in (("bits", bits, spec.bits), ("group_size", group_size, spec.group_sizes))
             if v not in ok]
    if wrong:
        raise MadError(f"{mode} quantization takes {names['bits']} {_choices(spec.bits)} and {names['group_size']} "
                       f"{_choices(spec.group_sizes)} (what mx.quantize accepts), got {' and '.join(wrong)}")
    return QuantSettings(bits, group_size, mode)


# ----------------------------------------------------------------------------------------- the product
def quantized_linear(x: mx.array, w: mx.array, scales: mx.array, biases: Optional[mx.array], q: QuantSettings,
                     bias: Optional[mx.array] = None, splits: Sequence[int] = (),
                     caps: Sequence[Optional[float]] = (None,)) -> list[mx.array]:
    """The parts of softcap(x @ dequantize(w).T + bias), split at the columns `splits` (as the `linear`
    kernel, kernels/linear.py): the `quantized_linear` kernel of the registry (see the module docstring)."""
    from .kernels.qlinear import QuantizedMatrix  # here: importing MAD loads no kernel module (kernels/registry.py)

    packed = QuantizedMatrix(w, scales, biases, q.group_size, q.bits, q.mode)
    return dispatch("quantized_linear")(x, packed, bias, splits, caps)


def packed_matrix(module: nn.Module, q: QuantSettings) -> Any:
    """The `kernels.qlinear.QuantizedMatrix` of a quantized module's arrays."""
    from .kernels.qlinear import QuantizedMatrix  # here: importing MAD loads no kernel module (kernels/registry.py)

    return QuantizedMatrix(*_arrays(module), q.group_size, q.bits, q.mode)


def _arrays(module: nn.Module) -> tuple[mx.array, mx.array, Optional[mx.array]]:
    """(packed weight, scales, biases or None) of a quantized module."""
    return module["weight"], module["scales"], module["biases"] if "biases" in module else None


def _settings_of(module: nn.Module) -> QuantSettings:
    if isinstance(module, QuantizedLinear):
        return module.q
    return QuantSettings(module.bits, module.group_size, module.mode)  # nn.QuantizedEmbedding / nn.QuantizedLinear


def is_quantized(module: Any) -> bool:
    return isinstance(module, (QuantizedLinear, nn.QuantizedEmbedding, nn.QuantizedLinear))


class QuantizedLinear(nn.Module):
    """y = softcap(x W^T + b) with W quantized: a `linear` node's (or an `nn.Linear`'s) quantized twin.

    Parameters under nn.QuantizedLinear's names: `weight` (packed uint32), `scales`, `biases` (affine
    only), `bias` (if it has one). A tied one (`tie`) has no weight of its own and reads its source's
    packed matrix (a quantized embedding), as mlx-lm's `as_linear`. Frozen, as MLX's quantized layers:
    the packed weights take no gradient.
    """

    def __init__(self, weight: Optional[tuple], bias: Optional[mx.array], cap: Optional[float], q: QuantSettings):
        super().__init__()
        if weight is not None:
            self.weight, self.scales, biases = weight
            if biases is not None:
                self.biases = biases
        if bias is not None:
            self.bias = bias
        self.q = q
        self._cap = cap
        self._tied: Optional[Callable[[], nn.Module]] = None
        self.freeze()

    @classmethod
    def from_float(cls, weight: mx.array, bias: Optional[mx.array], cap: Optional[float],
                   q: QuantSettings) -> "QuantizedLinear":
        """Quantize `weight` [out, in] (lazily: nothing is computed here)."""
        wq, scales, *biases = mx.quantize(weight, q.group_size, q.bits, mode=q.mode)
        return cls((wq, scales, biases[0] if biases else None), bias, cap, q)

    @classmethod
    def tied_to(cls, source: nn.Module, bias: Optional[mx.array], cap: Optional[float]) -> "QuantizedLinear":
        """A head reading the quantized matrix of `source` (set by `tie`, as `LinearModule.tie`)."""
        return cls(None, bias, cap, _settings_of(source))

    def tie(self, source: nn.Module) -> None:
        self._tied = lambda: source  # a function, not a child module: the weights stay the source's

    def __call__(self, x: mx.array) -> mx.array:
        return dispatch("quantized_linear")(x, *self.linear_args())[0]

    def linear_args(self) -> tuple:
        """(packed matrix, bias, splits, caps): the `quantized_linear` kernel's arguments after x."""
        source = self._tied() if self._tied is not None else self
        return packed_matrix(source, self.q), self["bias"] if "bias" in self else None, (), (self._cap,)


class QuantizedFusedLinear(nn.Module):
    """A `FusionGroup` of quantized linears with the same settings as one `mx.quantized_matmul`:
    `x -> [y_1, ..., y_n]`, as `passes.FusedLinear` for float weights. Holds the members' `weight`,
    `scales`, `biases` stacked by rows (each member keeps a row slice of them: the Program keeps the two
    in step) and `bias` when any member has one (zeros for the others)."""

    def __init__(self, group: FusionGroup, arrays: dict[str, mx.array]):
        super().__init__()
        for attr, value in arrays.items():
            self[attr] = value
        self.group = group

    @classmethod
    def from_modules(cls, group: FusionGroup, modules: list[nn.Module]) -> "QuantizedFusedLinear":
        arrays = {attr: mx.concatenate([m[attr] for m in modules]) for attr in ("weight", "scales", "biases")
                  if attr != "biases" or group.quant.affine}
        if any(group.bias):
            dtype = next(m["bias"].dtype for m in modules if "bias" in m)
            arrays["bias"] = mx.concatenate([m["bias"] if "bias" in m else mx.zeros((w,), dtype)
                                             for m, w in zip(modules, group.widths)])
        return cls(group, arrays)

    def row_attrs(self) -> tuple[str, ...]:
        """The arrays stacked by rows, in the order `member_params` gives them."""
        return tuple(a for a in ("weight", "scales", "biases", "bias") if a in self)

    def member_params(self, form: Any) -> list[tuple[str, str]]:
        """(attribute here, the member's parameter name) of one member's rows."""
        return [(a, a) for a in self.row_attrs() if a != "bias" or form.bias is not None]

    def __call__(self, x: mx.array) -> list[mx.array]:
        return dispatch("quantized_linear")(x, *self.linear_args())

    def linear_args(self) -> tuple:
        """(packed matrix, bias, splits, caps): the `quantized_linear` kernel's arguments after x."""
        return (packed_matrix(self, self.group.quant), self["bias"] if "bias" in self else None,
                [stop for _, stop in self.group.bounds[:-1]], self.group.softcap)


# ----------------------------------------------------------------------------------------- what is quantized
@dataclass(frozen=True, eq=False)
class Target:
    """A module that may be quantized: a linear node (`kind` "linear", its whole module replaced), or a
    leaf with `to_quantized` (`kind` "module") at `path` (the node itself, or `node.sub.path`)."""

    node: str
    path: str
    kind: str
    cols: int      # inputs: what the group size must divide
    module: nn.Module  # the float module (a predicate's second argument)


def _plain_form(graph: Any, node: str) -> Any:
    """The node's `LinearForm` if it is y = softcap(x W^T + b) with its weight at `weight` and its bias at
    `bias` (the names of the quantized twin), else None."""
    d = graph.g.nodes[node]
    if len(d["inputs"]) != 1:
        return None
    form = d["spec"].linear_form(graph.g.nodes[d["inputs"][0]]["type"])
    if form is None or form.weight != "weight" or form.bias not in (None, "bias") \
            or len(d["params"].get("weight", ())) != 2:
        return None
    return form


def targets(graph: Any, modules: Mapping[str, Any]) -> dict[str, Target]:
    """Every module `Program.quantize` may quantize, by path, in execution order (see the module docstring)."""
    out: dict[str, Target] = {}
    for n in graph.blocks():
        d = graph.g.nodes[n]
        module = modules[n]
        if is_quantized(module):
            raise MadError("the model is quantized already")
        if _plain_form(graph, n) is not None:
            out[n] = Target(n, n, "linear", int(d["params"]["weight"][1]), module)
            continue
        if getattr(d["spec"], "tie", None) or not isinstance(module, nn.Module):
            continue  # a tied linear follows its source
        leaves = [("", module)] if hasattr(module, "to_quantized") else \
            tree_flatten(module.leaf_modules(), is_leaf=nn.Module.is_module)
        for sub, leaf in leaves:
            if is_quantized(leaf):
                raise MadError("the model is quantized already")
            shape = tuple(leaf.weight.shape) if hasattr(leaf, "to_quantized") and "weight" in leaf else ()
            if len(shape) >= 2:
                path = f"{n}.{sub}" if sub else n
                out[path] = Target(n, path, "module", shape[-1], leaf)
    return out


def default_predicate(path: str, module: nn.Module) -> bool:
    """mlx-lm's default (every module with `to_quantized`), but projections with fewer than `MIN_ROWS`
    outputs (per-head gates) stay in the compute dtype (see the module docstring)."""
    return math.prod(module.weight.shape[:-1]) >= MIN_ROWS


Predicate = Callable[[str, nn.Module], Union[bool, dict]]


def quantization_config(found: Mapping[str, Target], settings: QuantSettings,
                        predicate: Optional[Predicate] = None) -> dict:
    """The config (module docstring) for `settings` and `predicate(path, module) -> bool | dict` (mlx-lm's
    `quant_predicate`: False leaves the module as it is, a dict gives it settings of its own), applied to
    every target; `default_predicate` when None."""
    predicate = predicate or default_predicate
    config: dict[str, Any] = settings.to_dict()
    for path, t in found.items():
        choice = predicate(path, t.module)
        if isinstance(choice, dict):
            own = _entry_settings(choice, f"predicate('{path}')")
            if own != settings:
                config[path] = own.to_dict()
        elif not isinstance(choice, bool):
            raise MadError(f"a quantization predicate returns True, False or a dict of settings, got {choice!r} for "
                           f"'{path}'")
        elif not choice:
            config[path] = False
    return config


def _entry_settings(entry: Mapping, what: str) -> QuantSettings:
    unknown = [k for k in entry if k not in SETTING_KEYS]
    if unknown:
        raise MadError(f"{what}: unknown key '{unknown[0]}' (expected {', '.join(SETTING_KEYS)})")
    names = {k: f"{what}.{k}" for k in SETTING_KEYS}
    return quant_settings(entry.get("bits"), entry.get("group_size"), entry.get("mode"), names)


def resolve(found: Mapping[str, Target], config: Any) -> tuple[QuantSettings, dict[str, Optional[QuantSettings]]]:
    """(the top-level settings, {target path: its settings, or None to stay unquantized}) of a config,
    checked: the settings of each entry, every entry a target of this model, and every group size
    dividing its module's inputs."""
    if not isinstance(config, dict):
        raise MadError(f"quantization: expected a mapping of settings, got {type(config).__name__}")
    missing = [k for k in ("bits", "group_size") if k not in config]
    if missing:
        raise MadError(f"quantization: missing '{missing[0]}' (a quantization config holds group_size, bits and "
                       "mode)")
    top = {k: config.get(k) for k in SETTING_KEYS}
    default = _entry_settings({k: v for k, v in top.items() if v is not None}, "quantization")
    plan: dict[str, Optional[QuantSettings]] = {}
    diags = Diagnostics()
    for key, value in config.items():
        if key in SETTING_KEYS:
            continue
        if key not in found:
            hint = did_you_mean(key, found)
            diags.error(f"quantization: '{key}' is not a projection or embedding of this model" +
                        (f"; {hint}" if hint else ""))
        elif value is False:
            plan[key] = None
        elif value is True:
            plan[key] = default
        elif isinstance(value, dict):
            try:
                plan[key] = _entry_settings(value, f"quantization['{key}']")
            except MadError as e:
                diags.extend(e)
        else:
            diags.error(f"quantization: '{key}' must be false, true or a mapping of settings, got {value!r}")
    diags.raise_if_any()
    for path in found:
        plan.setdefault(path, default)
    bad = [(p, q) for p, q in plan.items() if q is not None and found[p].cols % q.group_size]
    if bad:
        listed = ", ".join(f"'{p}' ({found[p].cols} inputs, group size {q.group_size})" for p, q in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        divides = lambda g: all(found[p].cols % g == 0 for p, _ in bad)  # noqa: E731
        same = [g for g in MODES[default.mode].group_sizes if divides(g)]
        other = [(m, g) for m, spec in MODES.items() for g in spec.group_sizes if m != default.mode and divides(g)]
        leave = "leave them unquantized (a predicate returning False for them, or false for them in the config)"
        hint = (f"group size {same[-1]} divides them" if same else
                f"mode {other[0][0]} (group size {other[0][1]}) divides them, or {leave}" if other else leave)
        raise MadError(f"quantization: the group size must divide a projection's input size; it does not for "
                       f"{listed}{more}: {hint}")
    return default, plan


# ----------------------------------------------------------------------------------------- the swap
def _quantized(t: Target, q: QuantSettings, cap: Optional[float]) -> nn.Module:
    m = t.module
    if t.kind == "linear" or isinstance(m, nn.Linear):
        params = dict(tree_flatten(m.parameters()))
        return QuantizedLinear.from_float(params["weight"], params.get("bias"), cap, q)
    if isinstance(m, nn.Embedding):
        return nn.QuantizedEmbedding.from_embedding(m, q.group_size, q.bits, q.mode)
    return m.to_quantized(group_size=q.group_size, bits=q.bits, mode=q.mode)


def quantized_modules(graph: Any, modules: Mapping[str, Any], config: Any) -> tuple[dict, dict, dict]:
    """Apply a config to a Program's node modules (float, freshly built or loaded).

    Returns (the node modules, with the quantized ones swapped in; {linear node: its settings or None},
    which the fusion pass groups by; the config as checked: the top-level settings, every module left
    unquantized as false, every module with other settings as its own entry). Leaves inside a node's
    module are replaced in place (`update_modules`)."""
    found = targets(graph, modules)
    default, plan = resolve(found, config)
    new = dict(modules)
    for path, q in plan.items():
        if q is None:
            continue
        t = found[path]
        cap = getattr(graph.g.nodes[t.node]["spec"], "softcap", None) if t.kind == "linear" else None
        module = _quantized(t, q, cap)
        if path == t.node:
            new[t.node] = module
        else:
            modules[t.node].update_modules(tree_unflatten([(path[len(t.node) + 1:], module)]))
    for n in graph.blocks():
        spec = graph.g.nodes[n]["spec"]
        tie = getattr(spec, "tie", None)
        if tie and is_quantized(new[tie]):
            old = modules[n]
            new[n] = QuantizedLinear.tied_to(new[tie], old["bias"] if "bias" in old else None,
                                             getattr(spec, "softcap", None))
    storage = {p: q for p, q in plan.items() if found[p].kind == "linear"}
    checked: dict[str, Any] = default.to_dict()
    for path, q in plan.items():
        if q is None:
            checked[path] = False
        elif q != default:
            checked[path] = q.to_dict()
    return new, storage, checked


def describe_quantization(config: Mapping[str, Any]) -> str:
    """A checked config in words: "4-bit affine, group size 64; 4 modules unquantized, 1 with own settings"."""
    text = str(QuantSettings(config["bits"], config["group_size"], config.get("mode", "affine")))
    left = sum(1 for k, v in config.items() if k not in SETTING_KEYS and v is False)
    own = sum(1 for k, v in config.items() if k not in SETTING_KEYS and isinstance(v, dict))
    extras = [f"{left} module{'s' * (left != 1)} unquantized"] * bool(left) \
        + [f"{own} with settings of its own"] * bool(own)
    return text + ("; " + ", ".join(extras) if extras else "")


def fused_linear(group: FusionGroup, modules: list[nn.Module]) -> nn.Module:
    """The module that runs a fusion group: quantized or float (`passes.FusedLinear`)."""
    return (QuantizedFusedLinear if group.quant is not None else FusedLinear).from_modules(group, modules)


# ----------------------------------------------------------------------------------------- models
def quantize_model(model: Any, bits: Optional[int] = None, group_size: Optional[int] = None, mode: str = "affine",
                   predicate: Optional[Predicate] = None, names: Mapping[str, str] = API_NAMES) -> dict:
    """Quantize a `LanguageModel` (from `mad.load`) or a `Program` in place, as mlx-lm's `quantize_model`:
    the settings (None: the mode's default), `predicate(path, module) -> bool | dict` per module
    (`default_predicate` when None). Returns the config it applied (module docstring)."""
    settings = quant_settings(bits, group_size, mode, names)
    program = getattr(model, "program", model)
    if not hasattr(program, "quantize") or not hasattr(program, "graph"):
        raise MadError(f"quantize: expected a model from mad.load or a mad.Program, got {type(model).__name__}")
    found = targets(program.graph, program.modules())
    program.quantize(quantization_config(found, settings, predicate))
    if model is not program:  # a LanguageModel holds the node modules too: point it at the new ones
        for key in [k for k in model if k not in program.root]:
            del model[key]
        for node, module in program.root.items():
            model[node] = module
    return program.quantization


def bits_per_weight(program: Any) -> float:
    """Stored bits per parameter of the float model (mlx-lm's `compute_bits_per_weight`)."""
    total = sum(a.nbytes for a in program.parameters().values())
    return total * 8 / max(program.graph.param_count(), 1)


def convert(source: Union[str, Path], out: Union[str, Path], quantize: bool = False, bits: Optional[int] = None,
            group_size: Optional[int] = None, mode: Optional[str] = None, dtype: Optional[str] = None,
            overrides: Sequence[str] = (), seed: int = 0, trust_plugins: bool = False, memory_check: bool = True,
            names: Mapping[str, str] = CLI_FLAGS, echo: Callable[[str], None] = print) -> dict:
    """`mad convert`: load `source` (anything `mad.load` reads), quantize it when `quantize`, and write a MAD
    checkpoint folder at `out` (absent or an empty folder; written atomically). Every setting is
    checked before anything is loaded. Returns a summary."""
    from .loading import load
    from .program import dtype_of
    from .report import check_build_target
    from .save import write_checkpoint

    if dtype is not None:
        dtype_of(dtype)
    if not quantize:
        given = [names[k] for k, v in (("bits", bits), ("group_size", group_size), ("mode", mode)) if v is not None]
        if given:
            verb = "sets" if len(given) == 1 else "set"
            raise MadError(f"{', '.join(given)} {verb} how to quantize: add -q to quantize")
    settings = quant_settings(bits, group_size, mode, names) if quantize else None
    out = Path(out)
    try:
        empty = out.is_dir() and not out.is_symlink() and not any(out.iterdir())
    except OSError:
        empty = False
    if (out.exists() or out.is_symlink()) and not empty:
        raise MadError(f"-o {out}: exists; mad convert writes a new folder (give another path, or remove it first)")
    check_build_target(out, "-o", checkpoint=True)  # the other rules of MAD's writers ('.', a path under a file)
    mx.random.seed(seed)  # the weights of a topology file
    model, tokenizer = load(source, dtype=dtype, overrides=list(overrides), trust_plugins=trust_plugins,
                            memory_check=memory_check)
    program = model.program
    if quantize:
        if program.quantization is not None:
            raise MadError(f"{source} is quantized already; convert the unquantized model")
        echo(f"[INFO] Quantizing: {settings}")
        quantize_model(model, settings.bits, settings.group_size, settings.mode, names=names)
        from rich.progress import Progress

        arrays = list(program.parameters().values())
        with Progress(transient=True) as progress:  # one array at a time: each float matrix is freed once quantized
            task = progress.add_task("quantizing", total=len(arrays))
            for a in arrays:
                mx.eval(a)
                progress.advance(task)
    write_checkpoint(out, model, tokenizer, flag="-o")
    summary = {"out": str(out), "dtype": str(program.dtype).rsplit(".", 1)[-1],
               "quantization": program.quantization, "bits_per_weight": bits_per_weight(program)}
    if quantize:
        echo(f"[INFO] Quantized model with {summary['bits_per_weight']:.3f} bits per weight.")
    echo(f"wrote {out}/")
    return summary


__all__ = ["CLI_FLAGS", "MIN_ROWS", "MODES", "QuantSettings", "QuantizedFusedLinear", "QuantizedLinear", "Target",
           "bits_per_weight", "convert", "default_predicate", "describe_quantization", "fused_linear", "is_quantized",
           "quant_settings", "quantization_config", "quantize_model", "quantized_linear", "quantized_modules",
           "resolve", "targets"]
