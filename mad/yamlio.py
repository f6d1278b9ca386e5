"""YAML loading that remembers where every mapping key and value was written.

`load_yaml` returns plain-looking dicts and lists (`YDict`, `YList`) that also carry the `Source`
of each entry, so that any later check (pydantic, shapes, graph) can point at FILE:LINE:COL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import MadError, Source


class YDict(dict):
    """A dict with `pos` (its own position) and `key_pos[key]` (where each key was written)."""

    pos: Source
    key_pos: dict


class YList(list):
    """A list with `pos` and `item_pos[i]`."""

    pos: Source
    item_pos: list


def _source(file: str, node: yaml.Node) -> Source:
    return Source(file, node.start_mark.line + 1, node.start_mark.column + 1)


def _loader(file: str) -> type:
    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> YDict:
        out = YDict()
        out.pos, out.key_pos = _source(file, node), {}
        loader.flatten_mapping(node)
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if key in out:
                raise MadError(f"duplicate key '{key}'", _source(file, key_node))
            out[key] = loader.construct_object(value_node, deep=True)
            out.key_pos[key] = _source(file, key_node)
        return out

    def sequence(loader: yaml.SafeLoader, node: yaml.SequenceNode) -> YList:
        out = YList(loader.construct_object(n, deep=True) for n in node.value)
        out.pos, out.item_pos = _source(file, node), [_source(file, n) for n in node.value]
        return out

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, sequence)
    return Loader


def load_yaml(path: str | Path, text: str | None = None) -> Any:
    """Parse a YAML file into YDict/YList trees; a syntax error becomes a `MadError` at its position."""
    file = str(path)
    if text is None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise MadError(f"cannot read topology file: {e.strerror}", Source(file)) from None
    try:
        return yaml.load(text, Loader=_loader(file))  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = Source(file, mark.line + 1, mark.column + 1) if mark else Source(file)
        raise MadError(f"YAML syntax: {e.problem or e.context}", where) from None


def position(tree: Any, path: tuple, fallback: Source) -> Source:
    """The deepest known position of `path` (keys and indices) inside a YDict/YList tree."""
    best, node = fallback, tree
    for key in path:
        if isinstance(node, YDict) and key in node:
            best, node = node.key_pos.get(key, best), node[key]
        elif isinstance(node, YList) and isinstance(key, int) and 0 <= key < len(node):
            best, node = node.item_pos[key], node[key]
        else:
            break
    return best


def plain(tree: Any) -> Any:
    """Strip positions: YDict/YList -> dict/list (for dumping)."""
    if isinstance(tree, dict):
        return {k: plain(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [plain(v) for v in tree]
    return tree
