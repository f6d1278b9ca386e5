"""Named dims: small integer expressions over other dims, runtime dims, constraints.

    dims: {B: batch, T: seq, D: 768, NH: 4, DH: D // NH, F: round_up(int(D * 2.667), 64)}

`batch`, `seq` and `dynamic` mark runtime dims (known only when the program runs); every other dim
is an integer expression of `+ - * // % ( )`, `min`, `max`, `round_up(x, m)`, `int(x)` over numbers
and other dims. A resolved dim is a `DimVal`: an int that remembers the expression it came from,
so shapes print as `(B, T, D=768)`.
"""

from __future__ import annotations

import ast
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


def round_up(x: int, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


_FUNCS = {"min": min, "max": max, "round_up": round_up, "int": int}


def _eval(node: ast.AST, env: Mapping[str, object], text: str) -> object:
    if isinstance(node, ast.Expression):
        return _eval(node.body, env, text)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in env:
            from .errors import did_you_mean

            raise DimError(f"unknown dim '{node.id}' in '{text}'" + _hint(did_you_mean(node.id, env)))
        value = env[node.id]
        if isinstance(value, Sym):
            raise DimError(f"'{node.id}' is a runtime dim ({value.kind}); it cannot be used in '{text}'")
        return value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left, env, text), _eval(node.right, env, text)
        if isinstance(node.op, (ast.FloorDiv, ast.Mod, ast.Div)) and right == 0:
            raise DimError(f"division by zero in '{text}'")
        return _BINOPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _eval(node.operand, env, text)
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
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS and not node.keywords:
        return _FUNCS[node.func.id](*[_eval(a, env, text) for a in node.args])
    raise DimError(
        f"'{text}' is not a dim expression (allowed: numbers, dims, + - * // % ( ), min, max, round_up, int)"
    )


def _hint(hint: str) -> str:
    return f"; {hint}" if hint else ""


def _parse(text: str) -> ast.Expression:
    try:
        return ast.parse(str(text).strip(), mode="eval")
    except SyntaxError:
        raise DimError(f"'{text}' is not a valid expression") from None


def evaluate(expr: int | str, env: Mapping[str, object]) -> DimVal:
    """Evaluate a dim expression to a `DimVal`; errors name the expression."""
    if isinstance(expr, bool):
        raise DimError(f"expected a dim, got {expr!r}")
    if isinstance(expr, DimVal):
        return expr
    if isinstance(expr, int):
        return DimVal(expr)
    if isinstance(expr, float):
        raise DimError(f"a dim must be an integer, got {expr}")
    value = _eval(_parse(expr), env, str(expr))
    if isinstance(value, float):
        if not value.is_integer():
            raise DimError(f"'{expr}' is not an integer ({value:g}); use int(...) or round_up(...)")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DimError(f"'{expr}' does not give an integer")
    text = str(expr).strip()
    return DimVal(value, text if not text.lstrip("-").isdigit() else None)


def check(constraint: str, env: Mapping[str, object]) -> bool:
    """Evaluate a constraint such as `D % NH == 0`."""
    return bool(_eval(_parse(constraint), env, constraint))


def names_in(expr: int | str) -> set[str]:
    if not isinstance(expr, str):
        return set()
    try:
        tree = _parse(expr)
    except DimError:
        return set()
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id not in _FUNCS}


def resolve_dims(raw: Mapping[str, int | str]) -> tuple[dict[str, Size], dict[str, str]]:
    """Resolve a dims table in dependency order.

    Returns (env, errors): env maps each dim to a DimVal or Sym; errors maps a dim name to a message.
    Each DimVal's expression is the dim's own name (so shapes print `D=768`, not `768`).
    """
    env: dict[str, Size] = {}
    errors: dict[str, str] = {}
    pending = dict(raw)
    for name, value in raw.items():
        if isinstance(value, str) and value.strip() in RUNTIME_KINDS:
            env[name] = Sym(name, value.strip())
            del pending[name]
    while pending:
        progressed = False
        for name, value in list(pending.items()):
            deps = names_in(value) & set(raw)
            if any(d in pending for d in deps if d != name):
                continue
            del pending[name]
            progressed = True
            if name in deps:
                errors[name] = f"dim '{name}' refers to itself"
                continue
            if any(d in errors for d in deps):
                errors[name] = f"dim '{name}' depends on a dim with an error"
                continue
            try:
                env[name] = DimVal(int(evaluate(value, env)), name)
            except DimError as e:
                errors[name] = str(e)
        if not progressed:
            for name in pending:
                errors[name] = f"dim '{name}' is part of a cycle: " + ", ".join(sorted(pending))
            break
    return env, errors
