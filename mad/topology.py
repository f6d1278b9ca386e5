"""Topology files: loading with includes and `--set`, then validation and expansion into a `Resolved` topology.

The language is split by concern: the file models and the resolved form are in `mad.spec`, the conversion
of pydantic errors to positioned diagnostics in `mad.validation`, the `pattern:` parser in `mad.pattern`
and the expander in `mad.expand`. This module reads files (includes, `--set`) and runs the steps in order;
plugins are imported only when the caller trusts the file (`trust_plugins`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Optional

from pydantic import ValidationError

from .errors import Diagnostics, MadError, Source, did_you_mean, printable, short
from .expand import Expander
from .pattern import parse_pattern
from .spec import (GROUP_KEYS, MAX_NODES, GroupSpec, InputSpec, NodeDecl, Resolved, TemplateSpec,  # noqa: F401
                   TopologyFile, check_as, one_line)
from .validation import pydantic_errors, report_validation  # noqa: F401
from .yamlio import YDict, YList, load_yaml, parse_yaml, plain

MAX_INCLUDE_DEPTH = 16


def _set_override(tree: YDict, assignment: str, diags: Diagnostics) -> None:
    assignment = str(assignment)
    where = Source(f"--set {short(assignment, 100)}")
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        diags.error("expected --set key=value (e.g. dims.D=512)", where)
        return
    if not value.strip():
        diags.error(f"--set: no value after '=' (write {short(key.strip())}=null for none)", where)
        return
    try:
        parsed = parse_yaml(value, "--set value", positions=False, what="--set value")
    except MadError as e:
        d = e.diagnostics[0]
        at = f" (column {d.source.col})" if d.source is not None and d.source.col > 1 else ""
        diags.error(f"--set: cannot read the value '{short(value)}': {d.message}{at}", where)
        return
    parts = key.strip().split(".")
    if parts[0] == "include":
        diags.error("--set: includes are read before --set applies; set the included file's dims instead "
                    "(e.g. dims.D=512)", where)
        return
    dims = tree.get("dims")
    if len(parts) == 1 and parts[0] not in tree and isinstance(dims, dict) and parts[0] in dims:
        diags.error(f"--set: '{parts[0]}' is a dim: write dims.{parts[0]}={value}", where)
        return
    node: Any = tree
    while len(parts) > 1:  # keys may contain dots (node names): take the longest key that matches
        if not isinstance(node, dict):
            diags.error(f"--set: '{key}' does not name a field", where)
            return
        n = next((n for n in range(len(parts) - 1, 0, -1) if ".".join(parts[:n]) in node), 0)
        if not n:
            diags.error(f"--set: '{parts[0]}' not found in '{key}'", where,
                        did_you_mean(parts[0], [k for k in node.keys() if isinstance(k, str)]))
            return
        node, parts = node[".".join(parts[:n])], parts[n:]
    if not isinstance(node, dict):
        diags.error(f"--set: '{key}' does not name a field", where)
        return
    if key.startswith("dims.") and parts[-1] not in node and node is tree.get("dims"):
        diags.error(f"--set: unknown dim '{parts[-1]}'", where,
                    did_you_mean(parts[-1], [k for k in node.keys() if isinstance(k, str)]))
        return
    node[parts[-1]] = parsed
    if isinstance(node, YDict):
        node.key_pos[parts[-1]] = where


def shipped_topologies() -> Optional[Path]:
    """The folder of the topologies shipped with MAD (the `mad.topologies` package), if there is one."""
    try:
        spec = importlib.util.find_spec("mad.topologies")
    except (ImportError, ValueError):
        spec = None
    for location in (getattr(spec, "submodule_search_locations", None) or []):
        if Path(location).is_dir():
            return Path(location)
    fallback = Path(__file__).resolve().parent.parent / "topologies"
    return fallback if fallback.is_dir() else None


def _find_include(name: str, base: Path) -> Optional[Path]:
    """`include: [name]`: next to the including file first, then among MAD's shipped topologies."""
    candidates = [base.parent / name]
    shipped = shipped_topologies()
    if shipped is not None and not Path(name).is_absolute():
        candidates.append(shipped / name)
    for path in candidates:
        try:
            if path.is_file():
                return path
        except (OSError, ValueError):
            continue
    return None


def _load_file(path: Path, stack: tuple[str, ...], diags: Diagnostics, text: str | None = None) -> YDict | None:
    tree = load_yaml(path, text)  # positions name the file as the user wrote it
    if not isinstance(tree, YDict):
        diags.error("a topology file must be a mapping (mad: 1, name: ..., nodes: ...)", Source(str(path), 1, 1))
        return None
    includes = tree.get("include")
    if includes is None:
        return tree
    if not isinstance(includes, list):
        diags.error("include: expected a list of file names, e.g. include: [xlstm-7b.yaml]",
                    tree.key_pos.get("include", tree.pos))
        return tree
    for i, inc in enumerate(includes):
        where = includes.item_pos[i] if isinstance(includes, YList) else tree.pos
        if not isinstance(inc, str) or not inc.strip():
            diags.error(f"include: expected a file name, got {one_line(inc)}", where)
            continue
        inc_path = _find_include(inc, path)
        if inc_path is None:
            diags.error(f"included file not found: {printable(inc)}", where)
            continue
        if str(inc_path.resolve()) in stack:
            diags.error(f"include cycle: {' -> '.join(stack + (str(inc_path),))}", where)
            continue
        if len(stack) > MAX_INCLUDE_DEPTH:
            diags.error(f"includes nest more than {MAX_INCLUDE_DEPTH} files deep", where)
            continue
        try:
            base = _load_file(inc_path, stack + (str(inc_path.resolve()),), diags)
        except MadError as e:
            diags.extend(e)
            continue
        if base is not None:
            _merge_include(tree, base, diags)
    return tree


def _merge_include(tree: YDict, base: YDict, diags: Diagnostics) -> None:
    """Included dims, constraints, templates and plugins are defaults; its graph is used if ours is empty."""
    for key in ("dims", "templates"):
        theirs, own = base.get(key), tree.get(key)
        if theirs is not None and not isinstance(theirs, dict):
            diags.error(f"{key}: expected a mapping", base.key_pos.get(key, base.pos))
            continue
        if own is not None and not isinstance(own, dict):
            continue  # reported when this file is validated
        merged = YDict(theirs or {})
        merged.pos = getattr(theirs, "pos", base.pos)
        merged.key_pos = dict(getattr(theirs, "key_pos", {}))
        own = own or {}
        merged.update(own)
        merged.key_pos.update(getattr(own, "key_pos", {}))
        if merged or key in tree:
            tree[key] = merged
            tree.key_pos.setdefault(key, base.key_pos.get(key, base.pos))
    for key in ("constraints", "plugins"):
        theirs, own = base.get(key), tree.get(key)
        if theirs is not None and not isinstance(theirs, list):
            diags.error(f"{key}: expected a list", base.key_pos.get(key, base.pos))
            continue
        if own is not None and not isinstance(own, list):
            continue
        items = YList(list(theirs or []) + list(own or []))
        items.pos = tree.pos
        items.item_pos = (list(getattr(theirs, "item_pos", [base.pos] * len(theirs or [])))
                          + list(getattr(own, "item_pos", [tree.pos] * len(own or []))))
        if items:
            tree[key] = items
    for key in ("inputs", "nodes", "outputs", "description"):
        if key not in tree and key in base:
            tree[key] = base[key]
            tree.key_pos[key] = base.key_pos[key]


def load_topology(path: str | Path, overrides: list[str] = (), text: str | None = None,
                  trust_plugins: bool = False) -> Resolved:
    """Load, merge includes, apply `--set` overrides, validate the file structure and expand sugar.

    `trust_plugins`: the file (or a file it includes) may list Python modules under `plugins:`; they are
    imported (which runs their code) only when this is true. Without it, `build_graph` reports each one
    as an error. Every problem is raised as one `MadError` with all the diagnostics found.
    """
    path = Path(path)
    diags = Diagnostics()
    if text is None:
        try:
            exists = path.is_file()
        except (OSError, ValueError):
            exists = False
        if not exists:
            raise MadError(f"no such topology file: {printable(str(path))}", Source(printable(str(path))))
    try:
        key = str(path.resolve())
    except (OSError, ValueError):  # e.g. a NUL in a label given with `text`
        key = str(path)
    tree = _load_file(path, (key,), diags, text)
    if tree is None:
        diags.raise_if_any()
    # errors must name the file as the user wrote it
    for assignment in overrides:
        _set_override(tree, assignment, diags)
    diags.raise_if_any()
    try:
        spec = TopologyFile.model_validate(plain(tree))
    except ValidationError as e:
        report_validation(e, TopologyFile, tree, tree.pos, diags)
        diags.raise_if_any()
    _check_names(spec, tree, diags)
    expander = Expander(spec, tree, diags)
    resolved = expander.run()
    resolved.trust_plugins = bool(trust_plugins)
    if diags.items or expander.incomplete:
        # the graph cannot be built: still report every mistake of the nodes that needs no graph
        from .graph import check_declarations

        check_declarations(resolved, diags)
    diags.raise_if_any()
    return resolved


def _check_names(spec: TopologyFile, tree: YDict, diags: Diagnostics) -> None:
    """Names of dims, inputs, templates and outputs are printable text (no newlines or control characters)."""
    for key in ("dims", "inputs", "templates", "outputs"):
        sub = tree.get(key)
        for name in getattr(spec, key):
            if not name or not name.isprintable():
                where = sub.key_pos.get(name, tree.pos) if isinstance(sub, YDict) else tree.pos
                diags.error(f"{key}: the name {one_line(name)} is empty or has a control character (a newline?)", where)


__all__ = ["MAX_INCLUDE_DEPTH", "MAX_NODES", "Resolved", "load_topology", "parse_pattern", "report_validation",
           "shipped_topologies"]
