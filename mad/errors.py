"""User-facing errors: every mistake is a `Diagnostic` pointing at FILE:LINE:COL.

A build collects all diagnostics of a file and raises one `MadError`; the CLI prints them and exits
with code 2. Nothing here knows about blocks or graphs.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Iterable


@dataclass(frozen=True)
class Source:
    """Where something was written: file, 1-based line and column, and the sugar that produced it."""

    file: str
    line: int = 0
    col: int = 0
    chain: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}" if self.line else self.file

    def via(self, step: str) -> "Source":
        """The same position, one more template/repeat step deeper."""
        return Source(self.file, self.line, self.col, self.chain + (step,))


@dataclass
class Diagnostic:
    message: str
    source: Source | None = None
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        where = f"{self.source}: " if self.source else ""
        lines = [f"{where}error: {self.message}"]
        lines += [f"  {n}" for n in self.notes]
        if self.source and self.source.chain:
            lines.append("  from: " + " <- ".join(reversed(self.source.chain)))
        return "\n".join(lines)


class MadError(Exception):
    """One or more user mistakes (topology, config, checkpoint, input). Exit code 2, no traceback."""

    def __init__(self, diagnostics: Iterable[Diagnostic] | str, source: Source | None = None):
        if isinstance(diagnostics, str):
            diagnostics = [Diagnostic(diagnostics, source)]
        self.diagnostics = list(diagnostics)
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(d.render() for d in self.diagnostics)


class Diagnostics:
    """Collects errors so that a whole file is reported at once."""

    def __init__(self) -> None:
        self.items: list[Diagnostic] = []
        self._seen: set = set()

    def error(self, message: str, source: Source | None = None, *notes: str, once: object = None) -> None:
        """Record an error. With `once`, errors of equal key are reported once (e.g. the same
        mistake inside a template repeated 32 times)."""
        if once is not None:
            if once in self._seen:
                return
            self._seen.add(once)
        self.items.append(Diagnostic(message, source, [n for n in notes if n]))

    def extend(self, err: MadError) -> None:
        self.items.extend(err.diagnostics)

    def raise_if_any(self) -> None:
        if self.items:
            raise MadError(self.items)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A 'did you mean ...?' hint, or '' when nothing is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else ""


def printable(text: str) -> str:
    """`text` with non-printable characters escaped, so that a message stays on its line."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def short(text: str, n: int = 60) -> str:
    """`printable(text)`, cut to `n` characters with '...' (a message quotes a value, never a page of it)."""
    text = printable(text)
    return text if len(text) <= n else text[: n - 3] + "..."
