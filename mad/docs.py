"""Documentation generated from the code, so that it cannot drift from it.

`block_table()` is the Markdown table of MAD's own block types (README.md, "Block types"): each type's
one-line description (the first sentence of its class docstring), its input ports and its fields with
type and default, read from the block registry (`mad.block.block_types`) and the pydantic fields.

    python -m mad.docs            # rewrite the table in README.md, between the block-table markers
    python -m mad.docs --check    # exit 1 if README.md's table is not block_table()
    python -m mad.docs --print    # print the table

tests/test_readme.py checks that README.md holds the current table.
"""

from __future__ import annotations

import argparse
import re
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic_core import PydanticUndefined

START = "<!-- block-table -->"
END = "<!-- /block-table -->"
README = Path(__file__).resolve().parents[1] / "README.md"
_SKIP = {"type", "inputs", "in"}  # every block has them: the node's type and its sources (`in`)


def _is_builtin(cls: type) -> bool:
    return cls.__module__.startswith("mad.blocks.")


def _summary(cls: type) -> str:
    """The first sentence of the class's own docstring (not an inherited one), on one line."""
    doc = cls.__dict__.get("__doc__") or ""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    match = re.search(r"(?<!e\.g)(?<!i\.e)\.(\s|$)", paragraph)
    return paragraph[: match.start() + 1] if match else paragraph


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:  # constrained types (PositiveFloat, ...): the type they constrain
        return _type_name(args[0])
    if origin is Literal:
        return "/".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]  # Optional: the default None says so
        if set(rest) == {int, str}:
            return "dim"  # an int or a dim expression ("D // NH"), see mad.block.Dim
        return " or ".join(_type_name(a) for a in rest)
    if origin is not None:
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", str(annotation))


def _field(name: str, info: Any) -> str:
    text = f"{name}: {_type_name(info.annotation)}"
    if info.default is not PydanticUndefined:
        text += f" = {info.default}"
    elif info.default_factory is not None:
        text += f" = {info.default_factory()}"
    return text


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def block_table() -> str:
    """The Markdown table of MAD's own block types: type, description, ports, fields (`name: type = default`;
    `dim` is an integer or a dim expression; a field with no default is required)."""
    from mad.block import block_types

    own = [(name, cls) for name, cls in block_types().items() if _is_builtin(cls)]
    own.sort(key=lambda item: item[0])
    lines = ["| type | what | ports | fields |", "|---|---|---|---|"]
    for name, cls in own:
        fields = [_field(f, info) for f, info in cls.model_fields.items()
                  if f not in _SKIP and info.alias not in _SKIP]
        ports = ", ".join(cls.ports) + (" (variadic)" if getattr(cls, "variadic", False) else "")
        cells = [f"`{name}`", _cell(_summary(cls)), ports, ", ".join(f"`{_cell(f)}`" for f in fields)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _section(text: str) -> tuple[int, int]:
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"README has no '{START}' ... '{END}' section")
    return start + len(START), end


def readme_table(path: Path = README) -> str:
    """The table between the markers in README.md, as written there."""
    text = path.read_text(encoding="utf-8")
    start, end = _section(text)
    return text[start:end].strip("\n") + "\n"


def write_readme(path: Path = README) -> bool:
    """Put block_table() between the markers of `path`; return whether the file changed."""
    text = path.read_text(encoding="utf-8")
    start, end = _section(text)
    new = text[:start] + "\n" + block_table() + text[end:]
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mad.docs", description=__doc__.split("\n\n")[0])
    parser.add_argument("readme", nargs="?", type=Path, default=README, help="default: the checkout's README.md")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="exit 1 if the README's table is out of date")
    group.add_argument("--print", action="store_true", help="print the table instead of writing it")
    args = parser.parse_args(argv)
    if args.print:
        sys.stdout.write(block_table())
        return 0
    if not args.readme.is_file():
        parser.error(f"{args.readme}: no such file (the README lives in a checkout of MAD, not in a wheel)")
    if args.check:
        ok = readme_table(args.readme) == block_table()
        print(f"{args.readme}: block table {'up to date' if ok else 'out of date: run python -m mad.docs'}")
        return 0 if ok else 1
    changed = write_readme(args.readme)
    print(f"{args.readme}: block table {'rewritten' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
