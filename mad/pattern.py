"""The `pattern:` mini-language of groups: '(m m m s) x 3' -> a flat list of choice keys.

Its length is computed before anything is expanded, so a pattern that would expand past the node limit
(`mad.spec.MAX_NODES`) is an error at once, whatever its nesting.
"""

from __future__ import annotations

import re
from typing import Optional

from . import spec as _spec  # MAX_NODES is read when used (see mad.spec)
from .errors import short

_PATTERN_TOKEN = re.compile(r"\(|\)|x\s*\d+|[A-Za-z_][\w-]*")


def parse_pattern(text: str, max_items: Optional[int] = None) -> list[str]:
    """Expand '(m m m s) x 3' or 'm x 7 s' into a flat list of choice keys.

    The length is computed first (without recursion, for any nesting of parentheses), so that a pattern
    longer than `max_items` (default `mad.spec.MAX_NODES`) is an error before anything is expanded.
    """
    max_items = _spec.MAX_NODES if max_items is None else max_items
    tokens = _PATTERN_TOKEN.findall(text)
    if "".join(tokens).replace(" ", "") != re.sub(r"\s+", "", text):
        raise ValueError(f"cannot read pattern '{text}' (use names, '( ... )' and 'x N')")
    # an item is (key or list of items, count); a frame is the list of items of one '( ... )'
    stack: list[list[list]] = [[]]
    can_repeat = False
    for tok in tokens:
        if tok == "(":
            stack.append([])
            can_repeat = False
        elif tok == ")":
            if len(stack) == 1:
                raise ValueError(f"unbalanced ')' in pattern '{text}'")
            items = stack.pop()
            stack[-1].append([items, 1])
            can_repeat = True
        elif tok.startswith("x") and tok[1:].strip().isdigit():
            if not can_repeat:
                raise ValueError(f"'x N' must follow a name or '( ... )' in pattern '{text}'")
            digits = tok[1:].strip()
            if len(digits) > 9:
                raise ValueError(f"pattern '{short(text)}' repeats {digits[:12]}... times: more than the limit of "
                                 f"{max_items:,} instances")
            stack[-1][-1][1] = int(digits)
            can_repeat = False
        else:
            stack[-1].append([tok, 1])
            can_repeat = True
    if len(stack) > 1:
        raise ValueError(f"unbalanced '(' in pattern '{text}'")

    def length(items: list) -> int:
        """sum of len(item) * count, without recursion; factors capped (the total only needs comparing)."""
        total, pending = 0, [(items, 1)]
        while pending:
            group, factor = pending.pop()
            for item, count in group:
                if isinstance(item, str):
                    total += factor * count
                    if total > max_items:
                        return max_items + 1
                else:
                    pending.append((item, min(factor * count, max_items + 1)))
        return total

    n = length(stack[0])
    if n > max_items:
        raise ValueError(f"pattern '{short(text)}' expands to more than {max_items:,} instances (the limit)")
    if n == 0:
        raise ValueError(f"pattern '{text}' is empty")

    def expand(items: list) -> list[str]:
        """Innermost groups first: every group is expanded once, from its expanded parts."""
        order, todo = [], [items]
        while todo:
            group = todo.pop()
            order.append(group)
            todo.extend(item for item, _ in group if not isinstance(item, str))
        flat: dict[int, list[str]] = {}
        for group in reversed(order):
            seq: list[str] = []
            for item, count in group:
                seq += ([item] if isinstance(item, str) else flat[id(item)]) * count
            flat[id(group)] = seq
        return flat[id(items)]

    return expand(stack[0])


__all__ = ["parse_pattern"]
