"""pydantic validation errors -> `Diagnostics` at the YAML positions of the offending fields.

Shared by the file models (`mad.topology`) and the block models (`mad.graph`), so that a wrong field
reads the same wherever it was written: one message per mistake, union alternatives folded, and a
"did you mean" for an unknown field.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ValidationError

from .errors import Diagnostics, Source, did_you_mean
from .yamlio import position


def pydantic_errors(err: ValidationError) -> list[tuple[tuple, str, str]]:
    """(loc, type, message) per error; union alternatives (`int`, `str`, ...) folded into one error."""
    out: dict[tuple, tuple[str, str]] = {}
    for e in err.errors():
        loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden":  # the last part is the key as written, whatever it looks like
            loc = tuple(p for p in loc[:-1] if not _is_tag(p)) + loc[-1:]
        while loc and _is_tag(loc[-1]):
            loc = loc[:-1]
        msg = e["msg"].removeprefix("Value error, ")
        if loc in out and out[loc][0] != "extra_forbidden":
            prev = out[loc][1]
            out[loc] = (e["type"], prev if msg in prev else f"{prev}, or {msg[0].lower()}{msg[1:]}")
        else:
            out[loc] = (e["type"], msg)
    return [(loc, t, m) for loc, (t, m) in out.items()]


_TYPE_TAGS = {"int", "str", "float", "bool", "list", "dict", "none", "EveryRule", "literal"}
_TAG = re.compile(r"[A-Za-z_-]+\[.*\]", re.S)


def _is_tag(part: Any) -> bool:
    """A union alternative or validator pydantic puts in an error's location (`int`, `function-after[...]`)."""
    return isinstance(part, str) and (part in _TYPE_TAGS or part == "[key]" or bool(_TAG.fullmatch(part)))


def report_validation(err: ValidationError, model: type[BaseModel], tree: Any, fallback: Source,
                      diags: Diagnostics, what: str = "") -> None:
    """Turn a pydantic error into diagnostics at the YAML positions of the offending fields.

    `what` names the thing validated (e.g. "node 'blocks.3.ffn'") at the start of each message.
    """
    lead = f"{what}: " if what else ""
    for loc, etype, msg in pydantic_errors(err):
        if etype == "mad_broken_dim":
            continue  # the field reads a dim with an error: reported once, at the dim
        where = position(tree, loc, fallback)
        where = Source(where.file, where.line, where.col, fallback.chain)
        once = (where.file, where.line, where.col, etype, msg)  # one report per written mistake
        if etype == "extra_forbidden":
            inside = f" in '{'.'.join(map(str, loc[:-1]))}'" if loc[:-1] else ""
            diags.error(f"{lead}unknown field '{loc[-1]}'{inside}", where,
                        did_you_mean(loc[-1], _fields_of(model, loc[:-1])), once=once)
        else:
            path = ".".join(str(p) for p in loc)
            diags.error(f"{lead}{path}: {msg}" if path else f"{lead}{msg}", where, once=once)


def _fields_of(model: Any, path: tuple) -> list[str]:
    """Field names (aliases) of the pydantic model found by walking `path` from `model`."""
    for key in path:
        field = next((f for k, f in getattr(model, "model_fields", {}).items() if key in (k, f.alias)), None)
        if field is None:
            continue  # a dict key or list index: stay on the value type
        candidates = [field.annotation, *getattr(field.annotation, "__args__", ())]
        candidates += [b for a in candidates for b in getattr(a, "__args__", ())]
        model = next((a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return [f.alias or k for k, f in getattr(model, "model_fields", {}).items()]


__all__ = ["pydantic_errors", "report_validation"]
