"""Named dims: small integer expressions over other dims, runtime dims, constraints.

    dims: {B: batch, T: seq, D: 768, NH: 4, DH: D // NH, F: round_up(int(D * 2.667), 64)}

`batch`, `seq` and `dynamic` mark runtime dims (known only when the program runs); every other dim
is an integer expression of `+ - * // % ( )`, `min`, `max`, `round_up(x, m)`, `int(x)` over numbers
and other dims. A resolved dim is a `DimVal`: an int that remembers the expression it came from,
so shapes print as `(B, T, D=768)`.
"""

from __future__ import annotations

import ast
import functools
import math
import operator
from dataclasses import dataclass
from typing import Mapping, Union

RUNTIME_KINDS = ("batch", "seq", "dynamic")


class DimVal(int):
    """An integer that remembers its symbolic expression (for messages and summaries)."""

    expr: str

    def __new__(cls, value: int, expr: str | None = None) -> "DimVal":
        obj = super().__new__(cls, value)
        obj.expr = expr if expr is not None else str(int(value))
        return obj

    def label(self) -> str:
        return str(int(self)) if self.expr == str(int(self)) else f"{self.expr}={int(self)}"

    def __reduce__(self):  # keep pickling/deepcopy working
        return (DimVal, (int(self), self.expr))


@dataclass(frozen=True)
class Sym:
    """A runtime dim (batch, sequence length): equal only to itself."""

    name: str
    kind: str = "dynamic"

    def label(self) -> str:
        return self.name

    def __str__(self) -> str:
        return self.name


Size = Union[DimVal, int, Sym]


def label(size: Size) -> str:
    return size.label() if isinstance(size, (DimVal, Sym)) else str(size)


def shape_str(shape: tuple) -> str:
    return "(" + ", ".join(label(s) for s in shape) + ")"


class DimError(ValueError):
    pass


_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod, ast.Div: operator.truediv,
}
_CMPOPS = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge,
}

MAX_DIM = 2**40
"""The largest size a dim may have (real models stay below 2**20); also bounds `repeat` counts' dims."""
MAX_VALUE = 2**80
"""The largest magnitude of any value while an expression is evaluated (constraints may multiply dims)."""
MAX_EXPR_CHARS = 500
"""The longest dim expression or constraint (real ones are under 50 characters)."""
MAX_EXPR_DEPTH = 100
"""The deepest nesting of operations and calls in one expression."""


def round_up(x: int | float, multiple: int | float) -> int:
    """The smallest multiple of `multiple` that is >= x (`multiple` > 0)."""
    if multiple <= 0:
        raise DimError(f"round_up: the multiple must be positive, got {_num(multiple)}")
    if isinstance(x, int) and isinstance(multiple, int):
        return -(-x // multiple) * multiple
    return int(math.ceil(x / multiple) * multiple)


def _int(x: int | float) -> int:
    return int(x)


def _min(*args: int | float) -> int | float:
    return min(args)


def _max(*args: int | float) -> int | float:
    return max(args)


_FUNCS = {"min": _min, "max": _max, "round_up": round_up, "int": _int}
_ARITY = {"min": (1, 64), "max": (1, 64), "round_up": (2, 2), "int": (1, 1)}


def _num(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _bounded(value: object, text: str) -> object:
    """Every intermediate value is a finite number of bounded size (no huge ints, inf or nan)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise DimError(f"'{text}' overflows (the value is not finite)")
    if abs(value) > MAX_VALUE:
        raise DimError(f"'{text}' is too large (a value beyond 2**{MAX_VALUE.bit_length() - 1})")
    return value


def _number(value: object, text: str, what: str) -> object:
    if isinstance(value, bool):
        raise DimError(f"a comparison cannot be used as a number ({what}) in '{text}'")
    return value


def _eval(node: ast.AST, env: Mapping[str, object], text: str) -> object:
    if isinstance(node, ast.Expression):
        return _eval(node.body, env, text)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return _bounded(node.value, text)
    if isinstance(node, ast.Name):
        if node.id not in env:
            from .errors import did_you_mean

            raise DimError(f"unknown dim '{node.id}' in '{text}'" + _hint(did_you_mean(node.id, env)))
        value = env[node.id]
        if isinstance(value, Sym):
            raise DimError(f"'{node.id}' is a runtime dim ({value.kind}); it cannot be used in '{text}'")
        return value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left = _number(_eval(node.left, env, text), text, "an operand")
        right = _number(_eval(node.right, env, text), text, "an operand")
        if isinstance(node.op, (ast.FloorDiv, ast.Mod, ast.Div)) and right == 0:
            raise DimError(f"division by zero in '{text}'")
        try:
            return _bounded(_BINOPS[type(node.op)](left, right), text)
        except OverflowError:
            raise DimError(f"'{text}' overflows") from None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _number(_eval(node.operand, env, text), text, "an operand")
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Compare) and all(type(op) in _CMPOPS for op in node.ops):
        left = _eval(node.left, env, text)
        for op, comp in zip(node.ops, node.comparators):
            right = _eval(comp, env, text)
            if not _CMPOPS[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.BoolOp):
        values = [_eval(v, env, text) for v in node.values]
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS and not node.keywords
            and not any(isinstance(a, ast.Starred) for a in node.args)):
        name = node.func.id
        low, high = _ARITY[name]
        if not low <= len(node.args) <= high:
            want = f"{low}" if low == high else f"{low} or more"
            raise DimError(f"{name}() takes {want} argument{'s' if high > 1 else ''}, got {len(node.args)} in '{text}'")
        args = [_number(_eval(a, env, text), text, f"an argument of {name}()") for a in node.args]
        try:
            return _bounded(_FUNCS[name](*args), text)
        except DimError as e:
            raise DimError(f"{e} in '{text}'") from None
        except (OverflowError, ValueError) as e:
            raise DimError(f"{name}() in '{text}': {e}") from None
    raise DimError(
        f"'{text}' is not a dim expression (allowed: numbers, dims, + - * // % ( ), min, max, round_up, int)"
    )


def _hint(hint: str) -> str:
    return f"; {hint}" if hint else ""


@functools.lru_cache(maxsize=4096)
def _parse_cached(text: str) -> ast.Expression:
    if len(text) > MAX_EXPR_CHARS:
        raise DimError(f"expression too long ({len(text)} characters; the limit is {MAX_EXPR_CHARS})")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        raise DimError(f"'{_shown(text)}' is not a valid expression") from None
    except (RecursionError, MemoryError):
        raise DimError(f"expression nested too deeply (more than {MAX_EXPR_DEPTH} levels)") from None
    stack = [(tree, 0)]
    while stack:  # depth of the tree, without recursion
        node, depth = stack.pop()
        if depth > MAX_EXPR_DEPTH:
            raise DimError(f"expression nested too deeply (more than {MAX_EXPR_DEPTH} levels): '{_shown(text)}'")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return tree


def _parse(text: str) -> ast.Expression:
    return _parse_cached(str(text).strip())


def _shown(text: object) -> str:
    """An expression as messages quote it: at most 80 characters."""
    text = str(text)
    return text if len(text) <= 80 else text[:77] + "..."


def evaluate(expr: int | str, env: Mapping[str, object]) -> DimVal:
    """Evaluate a dim expression to a `DimVal`; errors name the expression.

    The result is an integer of at most `MAX_DIM` in size (it may be zero or negative: the places that use
    a dim as a size check that it is positive).
    """
    if isinstance(expr, bool):
        raise DimError(f"expected a dim, got {expr!r}")
    if isinstance(expr, DimVal):
        return expr
    if isinstance(expr, int):
        return DimVal(_in_range(expr, None))
    if isinstance(expr, float):
        if not math.isfinite(expr) or abs(expr) > MAX_VALUE:
            raise DimError(f"a dim must be an integer, got {expr}")
        raise DimError(f"a dim must be an integer, got {expr:g}")
    if not isinstance(expr, str):
        raise DimError(f"expected a dim (an integer or an expression), got {type(expr).__name__}")
    value = _eval(_parse(expr), env, _shown(expr))
    if isinstance(value, float):
        if not value.is_integer():
            raise DimError(f"'{expr}' is not an integer ({value:g}); use int(...) or round_up(...)")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DimError(f"'{expr}' does not give an integer")
    text = str(expr).strip()
    return DimVal(_in_range(value, text), text if not text.lstrip("-").isdigit() else None)


def _in_range(value: int, text: str | None) -> int:
    if abs(value) > MAX_DIM:
        shown = f"'{text}' is {value}" if text is not None else (f"{value}" if abs(value) < 10**30 else "the value")
        raise DimError(f"{shown} is too large for a dim (the limit is 2**{MAX_DIM.bit_length() - 1} = {MAX_DIM:,})")
    return value


def check(constraint: str, env: Mapping[str, object]) -> bool:
    """Evaluate a constraint such as `D % NH == 0`."""
    return bool(_eval(_parse(constraint), env, _shown(constraint)))


def names_in(expr: int | str, strict: bool = False) -> set[str]:
    """The dim names an expression reads (empty for a number; with `strict`, a bad expression raises)."""
    if not isinstance(expr, str):
        return set()
    try:
        tree = _parse(expr)
    except DimError:
        if strict:
            raise
        return set()
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id not in _FUNCS}


def resolve_dims(raw: Mapping[str, int | str]) -> tuple[dict[str, Size], dict[str, str]]:
    """Resolve a dims table in dependency order.

    Returns (env, errors): env maps each dim to a DimVal or Sym; errors maps a dim name to a message.
    Each DimVal's expression is the dim's own name (so shapes print `D=768`, not `768`).
    Linear in the size of the table (a topological order of the dims' references).
    """
    import networkx as nx

    env: dict[str, Size] = {name: Sym(name, value.strip()) for name, value in raw.items()
                            if isinstance(value, str) and value.strip() in RUNTIME_KINDS}
    errors: dict[str, str] = {}
    g = nx.DiGraph()
    known = set(raw)
    for name, value in raw.items():
        if name in env:
            continue
        g.add_node(name)
        try:
            deps = names_in(value, strict=True) & known
        except DimError as e:
            errors[name] = str(e)
            continue
        for dep in deps:
            if dep not in env or dep == name:
                g.add_edge(dep, name)
    cond = nx.condensation(g)
    for comp in nx.topological_sort(cond):
        members = cond.nodes[comp]["members"]
        if len(members) > 1:
            names = sorted(members)
            shown = ", ".join(names[:10]) + (f", ... ({len(names)} dims)" if len(names) > 10 else "")
            for name in members:
                errors[name] = f"dim '{name}' is part of a cycle: {shown}"
            continue
        (name,) = members
        if name in errors:
            continue
        if g.has_edge(name, name):
            errors[name] = f"dim '{name}' refers to itself"
            continue
        if any(dep in errors for dep in g.predecessors(name)):
            errors[name] = f"dim '{name}' depends on a dim with an error"
            continue
        try:
            env[name] = DimVal(int(evaluate(raw[name], env)), name)
        except DimError as e:
            errors[name] = str(e)
    order = {name: i for i, name in enumerate(raw)}
    env = dict(sorted(env.items(), key=lambda kv: order[kv[0]]))
    errors = dict(sorted(errors.items(), key=lambda kv: order[kv[0]]))
    return env, errors
