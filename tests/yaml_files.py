"""Helpers for tests that write topology files, check the positions errors point at, and run the CLI."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path


def write(tmp_path: Path, text: str, name: str = "topology.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def where(path: Path, needle: str, at: str | None = None) -> str:
    """'FILE:LINE:COL' of `at` (default: the first non-blank character) on the first line containing `needle`."""
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if needle in line:
            col = line.index(at) + 1 if at is not None else len(line) - len(line.lstrip()) + 1
            return f"{path}:{i}:{col}"
    raise AssertionError(f"{needle!r} not in {path}")


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from mad import cli as cli_module

    monkeypatch.setattr(sys, "argv", ["mad", *map(str, args)])
    code = 0
    try:
        cli_module.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err
