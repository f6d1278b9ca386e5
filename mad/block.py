"""The block contract and the registry of block types.

A block type is a pydantic model (its fields are what a topology file may write on a node) that also
says, for concrete input types, what it outputs (`infer`), what recurrent state it owns (`state`) and
which MLX module runs it (`build`). Register one with `@register("name")`; MAD's own blocks and a
user's are registered the same way. Entry points in the group `mad.blocks` are imported on first use.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import Annotated, Any, Callable, ClassVar, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo

from .dims import DimError, Size, evaluate, shape_str


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


def _resolve_dim(value: Any, info: ValidationInfo) -> Any:
    env = (info.context or {}).get("dims")
    if env is None or value is None:
        return value
    try:
        return evaluate(value, env)
    except DimError as e:
        raise ValueError(str(e)) from None


# A block field holding a dim: an int or an expression over the topology's dims ("D // NH").
Dim = Annotated[Union[int, str], AfterValidator(_resolve_dim)]
OptDim = Annotated[Optional[Union[int, str]], AfterValidator(_resolve_dim)]
Inputs = Union[str, list[str], dict[str, str], None]


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
    modes: ClassVar[tuple[str, ...]] = ()
    """Evaluation modes a recurrent block offers, e.g. ("step", "chunkwise", "parallel")."""
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
        """
        raise NotImplementedError


BLOCKS: dict[str, type[Block]] = {}
_ENTRY_POINTS_LOADED = False


def register(name: str) -> Callable[[type[Block]], type[Block]]:
    """Class decorator: make a Block subclass available as `type: name` in topology files."""

    def wrap(cls: type[Block]) -> type[Block]:
        if not (isinstance(cls, type) and issubclass(cls, Block)):
            raise TypeError(f"@register('{name}') needs a subclass of mad.Block")
        if name in BLOCKS and BLOCKS[name] is not cls and BLOCKS[name].__qualname__ != cls.__qualname__:
            raise ValueError(f"block type '{name}' is already registered by {BLOCKS[name].__module__}")
        cls.block_type = name
        BLOCKS[name] = cls
        return cls

    return wrap


def block_types() -> dict[str, type[Block]]:
    """All registered block types: MAD's own, entry points (`mad.blocks`), and decorated classes."""
    global _ENTRY_POINTS_LOADED
    importlib.import_module("mad.blocks")
    if not _ENTRY_POINTS_LOADED:
        _ENTRY_POINTS_LOADED = True
        for ep in importlib.metadata.entry_points(group="mad.blocks"):
            ep.load()
    return BLOCKS


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
