"""The block contract and the registry of block types.

A block type is a pydantic model (its fields are what a topology file may write on a node) that also
says, for concrete input types, what it outputs (`infer`), what recurrent state it owns (`state`),
which MLX module runs it (`build`) and, optionally, that it is a plain linear map (`linear_form`) and how
it splits over a tensor-parallel group (`shard_rule`), which lets graph passes rewrite it without knowing
its class. Register one with `@register("name")`; MAD's own
blocks and a user's are registered the same way. Entry points in the group `mad.blocks` are imported only
when the caller trusts plugins (`block_types(trust_plugins=True)`): importing runs their code. No
registration may replace one of MAD's own block types.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, ClassVar, Optional, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo
from pydantic_core import PydanticCustomError

from .dims import DimError, Size, evaluate, label, names_in, shape_str
from .errors import MadError


# ----------------------------------------------------------------------------------------- types
@dataclass(frozen=True)
class TensorType:
    """What flows along an edge: a shape of dims and a dtype.

    dtype is "int32", "float32" (always float32, e.g. recurrent state) or "float" (the program's
    compute dtype, chosen when it runs: float32, bfloat16 or float16).
    """

    shape: tuple[Size, ...]
    dtype: str = "float"

    def __str__(self) -> str:
        return f"{shape_str(self.shape)} {self.dtype}"


class ShapeError(ValueError):
    """Raised by `Block.infer` when inputs do not fit; the graph adds the edge and the source."""


BROKEN_DIM = "mad_broken_dim"
"""Error type of a field that reads a dim which has an error of its own (reported once, at the dim)."""


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {str(value).lower()}")
    return value


def _dim_field(minimum: int) -> Callable[[Any, ValidationInfo], Any]:
    def resolve(value: Any, info: ValidationInfo) -> Any:
        context = info.context or {}
        env = context.get("dims")
        if value is None:
            return value
        if env is None:
            if isinstance(value, int) and value < minimum:
                raise ValueError(f"must be at least {minimum}, got {value}")
            return value
        broken = context.get("broken") or ()
        if broken and isinstance(value, str) and names_in(value) & set(broken):
            raise PydanticCustomError(BROKEN_DIM, "reads a dim with an error")
        try:
            size = evaluate(value, env)
        except DimError as e:
            raise ValueError(str(e)) from None
        if size < minimum:
            raise ValueError(f"must be at least {minimum}, got {label(size)}")
        return size

    return resolve


def _dim_input(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected a size (an integer or a dim expression), got {str(value).lower()}")
    return value


# A block field holding a size: an int or an expression over the topology's dims ("D // NH"), at least 1.
Dim = Annotated[Union[int, str], BeforeValidator(_dim_input), AfterValidator(_dim_field(1))]
OptDim = Annotated[Optional[Union[int, str]], BeforeValidator(_dim_input), AfterValidator(_dim_field(1))]
# A block field holding an offset or count that may be 0 (e.g. where a slice starts).
NonNegDim = Annotated[Union[int, str], BeforeValidator(_dim_input), AfterValidator(_dim_field(0))]
Inputs = Union[str, list[str], dict[str, str], None]
# Float fields: finite, never a bool (`eps: true` is a mistake, not 1.0).
FiniteFloat = Annotated[float, Field(allow_inf_nan=False), BeforeValidator(_no_bool)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False), BeforeValidator(_no_bool)]
PositiveInt = Annotated[int, Field(gt=0), BeforeValidator(_no_bool)]


# ----------------------------------------------------------------------------------------- blocks
class Block(BaseModel):
    """Base of every block spec. Subclasses add typed fields and override the methods below."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, arbitrary_types_allowed=True)

    type: str
    inputs: Inputs = Field(None, alias="in", description="source node(s): a name, a list, or {port: name}")

    ports: ClassVar[tuple[str, ...]] = ("x",)
    """Input port names, in call order."""
    variadic: ClassVar[bool] = False
    """If true the block takes any number (>= 1) of inputs on its single port."""
    positionwise: ClassVar[bool] = False
    """True if each output position depends only on the same position of the inputs (linears, norms,
    gates, adds). A program asked for its outputs at the last position only (`last_only`, as when
    reading a prompt) runs the positionwise nodes that feed only those outputs on that position alone."""

    def infer(self, *inputs: TensorType) -> TensorType:
        """Output type for the given input types; raise ShapeError if they do not fit."""
        raise NotImplementedError

    def state(self, *inputs: TensorType) -> dict[str, TensorType]:
        """Recurrent state this node owns (names -> types, first dim the batch). Default: none."""
        return {}

    def build(self, *inputs: TensorType) -> Callable:
        """The MLX module (or pure function) that runs this node.

        Stateless: `fn(*xs) -> y`. Recurrent: `fn(*xs, state=dict, mode=str) -> (y, new_state)`.
        A block with a `tie: <node>` field reads that node's weight: its module has `tie(source_module)`.
        """
        raise NotImplementedError

    def linear_form(self, *inputs: TensorType) -> Optional["LinearForm"]:
        """Declare that this node computes `y = softcap(x W^T + b)` over its single input, with its own
        (untied) weights, so that passes may run it as part of a larger matmul (`mad.passes`); None
        (the default) if it computes anything else. Only the declaration is read, never the module."""
        return None

    def fold_form(self, *inputs: TensorType) -> Optional["FoldForm"]:
        """Declare elementwise work that a `linear` next to this node may do in its own kernel at decode
        (`mad.passes.find_folds`): an RMS norm before a linear, a residual add or a gated activation after
        one. None (the default): none. Only the declaration is read, never the module."""
        return None

    def shard_rule(self, *inputs: TensorType) -> Optional["ShardRule"]:
        """Declare how this node may be split over the members of a tensor-parallel group (`mad.shard`):
        by heads (`SplitHeads`), as a dense map (`SplitDense`), over a hidden dim (`SplitHidden`), or as a
        slice or concatenation of split values (`SplitSlice`, `SplitConcat`). None (the default): the node
        needs its whole inputs, and every member runs it whole. Only the declaration is read."""
        return None


@dataclass(frozen=True)
class LinearForm:
    """What `Block.linear_form` declares: y = x W^T (+ b), then c * tanh(y / c) if `softcap` is c.

    `weight` and `bias` are the names of W [out, in] and b [out] among the module's parameters (as
    `tree_flatten(module.parameters())` names them); `bias` is None when there is none. A fused program
    reads the initial values there and gives the weights back under the node's own names.
    """

    weight: str = "weight"
    bias: Optional[str] = None
    softcap: Optional[float] = None


@dataclass(frozen=True)
class FoldForm:
    """What `Block.fold_form` declares (`kernels/fold.py` computes it):

      "rms_norm"  y = x * rsqrt(mean(x^2) + eps) * weight over the last dim (`weight` names the
                  parameter); a linear reading y may read x and apply it
      "add"       y = a + b (two inputs); the linear computing a or b may add the other to its result
      "gate"      y = act(gate) * x; a fused pair of linears computing gate and x may return y
      "head_norm" y = layer_norm(each of `heads` slices of the last dim, eps) * (weight + offset) (+ bias);
                  a gate reading y may apply it with its activation in one kernel
    """

    kind: str
    eps: float = 0.0
    weight: Optional[str] = None
    act: Optional[str] = None
    heads: int = 0
    offset: float = 0.0
    bias: Optional[str] = None


# ----------------------------------------------------------------------------------------- tensor parallelism
# What `Block.shard_rule` declares; the pass that reads the declarations is `mad.shard`. "n" is the number of
# members of the group; a member's fields are the block's own fields with the updates the callables return.
@dataclass(frozen=True)
class Cut:
    """Where a weight or state tensor holds its heads: along `axis`, as `groups` consecutive blocks that
    each run over every head in order (a gate-major bias [i | f | z | o] over heads: groups=4). A member keeps
    its heads' part of every block."""

    axis: int
    groups: int = 1


def _no_change(*_: Any) -> dict:
    return {}


@dataclass(frozen=True)
class SplitHeads:
    """Output head h depends only on head h of every input, of the weights and of the state: `heads` heads
    over the last dim of each input and of the output (an elementwise block: one head per channel). Split
    over n members, each runs heads // n of them, with the fields `local(n)` returns."""

    heads: int
    weights: dict[str, Cut] = field(default_factory=dict)
    state: dict[str, Cut] = field(default_factory=dict)
    local: Callable[[int], dict] = _no_change

    @classmethod
    def channels(cls, width: int, weights: Optional[dict[str, Cut]] = None,
                 state: Optional[dict[str, Cut]] = None) -> "SplitHeads":
        """An elementwise (per-channel) block over `width` channels."""
        return cls(int(width), dict(weights or {}), dict(state or {}))


@dataclass(frozen=True)
class SplitDense:
    """y = softcap(x W^T + b) over one input. Split by output columns, each member computes its columns from
    the whole x (fields `columns(n)`); split by input rows, each member multiplies its part of a split x and
    the partial products are summed over the group, b and the soft-cap applied after the sum (fields
    `rows(with_bias)`: only one member adds b)."""

    weight: str
    bias: Optional[str]
    softcap: Optional[float]
    columns: Callable[[int], dict]
    rows: Callable[[bool], dict]


@dataclass(frozen=True)
class SplitHidden:
    """y = sum over a hidden dim of `hidden` units (a feed-forward: down(act(gate x) * up x)). Each member
    computes hidden // n units from the whole x (fields `local(n)`, weights cut along their hidden axis) and
    the partial outputs are summed over the group."""

    hidden: int
    weights: dict[str, Cut]
    local: Callable[[int], dict]


@dataclass(frozen=True)
class SplitSlice:
    """y = x[..., start:start+size]: a split x gives a split y when start and stop are boundaries of x's
    parts; each member slices its own part (fields `local(member_start, member_size)`)."""

    start: int
    size: int
    local: Callable[[int, int], dict]


@dataclass(frozen=True)
class SplitConcat:
    """y = concat(x_1, ..., x_k) over the last dim: split inputs give a split y, each member concatenating its
    own parts."""


ShardRule = Union[SplitHeads, SplitDense, SplitHidden, SplitSlice, SplitConcat]


BLOCKS: dict[str, type[Block]] = {}
_ENTRY_POINTS_LOADED = False
_ENTRY_POINT_ERRORS: list[str] = []
BUILTIN_MODULES = ("mad.blocks.core", "mad.blocks.wiring", "mad.blocks.conv", "mad.blocks.ffn", "mad.blocks.mlstm",
                   "mad.blocks.slstm")
"""MAD's own block modules: importing one registers its block types (`block_types()` imports them all)."""


class RegistrationError(MadError, ValueError):
    """A block type registered twice (by a different class), or over one of MAD's own."""


def is_builtin(cls: type) -> bool:
    return cls.__module__.startswith("mad.blocks.")


def _load_builtins() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def register(name: str) -> Callable[[type[Block]], type[Block]]:
    """Class decorator: make a Block subclass available as `type: name` in topology files.

    A name can be registered once; registering the same class again (a module reloaded) is fine. MAD's
    own block types cannot be replaced.
    """

    def wrap(cls: type[Block]) -> type[Block]:
        if not (isinstance(cls, type) and issubclass(cls, Block)):
            raise TypeError(f"@register('{name}') needs a subclass of mad.Block")
        if not is_builtin(cls):
            _load_builtins()  # MAD's own names are taken first, whatever the user imports first
        if not isinstance(name, str) or not name or not name.isprintable() or any(c.isspace() for c in name):
            raise RegistrationError(f"@register({name!r}): a block type name must be a word (no spaces or "
                                    f"control characters)")
        old = BLOCKS.get(name)
        if old is not None and old is not cls:
            same = (old.__module__, old.__qualname__) == (cls.__module__, cls.__qualname__)
            if not same:  # the same module and class again is a reload
                what = "one of MAD's own block types" if is_builtin(old) else "already registered"
                raise RegistrationError(
                    f"block type '{name}' is already registered by {old.__module__} ({old.__qualname__}): "
                    f"{cls.__module__} ({cls.__qualname__}) cannot replace it ({what}); choose another name")
        cls.block_type = name
        BLOCKS[name] = cls
        return cls

    return wrap


def block_types(trust_plugins: bool = False) -> dict[str, type[Block]]:
    """All registered block types: MAD's own and every class registered so far in this process; with
    `trust_plugins`, also those of the installed entry points (group `mad.blocks`), imported on first
    use. Entry points that fail to load are listed by `entry_point_errors()`."""
    global _ENTRY_POINTS_LOADED
    _load_builtins()
    if trust_plugins and not _ENTRY_POINTS_LOADED:
        _ENTRY_POINTS_LOADED = True
        for ep in importlib.metadata.entry_points(group="mad.blocks"):
            try:
                ep.load()
            except Exception as e:  # noqa: BLE001 - an installed plugin may fail in any way
                _ENTRY_POINT_ERRORS.append(f"entry point '{ep.name}' ({ep.value}, group mad.blocks) failed to "
                                           f"load: {type(e).__name__}: {e}")
    return BLOCKS


def entry_point_errors() -> list[str]:
    """Messages of the `mad.blocks` entry points that failed to load (after `block_types(trust_plugins=True)`)."""
    return list(_ENTRY_POINT_ERRORS)


# ----------------------------------------------------------------------------------------- helpers
def expect_float(x: TensorType, what: str = "input") -> None:
    if x.dtype == "int32":
        raise ShapeError(f"{what} must be a float tensor, got {x}")


def expect_last(x: TensorType, size: Size, what: str = "input") -> None:
    """Check the last dim (and that the input is a float tensor)."""
    expect_float(x, what)
    if not x.shape or x.shape[-1] != size:
        expected = shape_str((*x.shape[:-1], size)) if x.shape else shape_str((size,))
        raise ShapeError(f"{what}: expected {expected}, got {shape_str(x.shape)}")


def with_last(x: TensorType, size: Size, dtype: str | None = None) -> TensorType:
    return TensorType((*x.shape[:-1], size), dtype or x.dtype)


def same_types(inputs: tuple[TensorType, ...], what: str = "inputs") -> TensorType:
    first = inputs[0]
    for other in inputs[1:]:
        if other.shape != first.shape:
            raise ShapeError(f"{what} differ in shape: {shape_str(first.shape)} vs {shape_str(other.shape)}")
        if other.dtype != first.dtype:
            raise ShapeError(f"{what} differ in dtype: {first.dtype} vs {other.dtype}")
    return first
