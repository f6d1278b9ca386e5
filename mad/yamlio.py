"""YAML loading that remembers where every mapping key and value was written, within fixed bounds.

`load_yaml` returns plain-looking dicts and lists (`YDict`, `YList`) that also carry the `Source`
of each entry, so that any later check (pydantic, shapes, graph) can point at FILE:LINE:COL.
`load_yaml_data` reads any other YAML file (e.g. a checkpoint's `config.yaml`) into plain dicts and
lists with the same checks.

Whatever a file holds, reading it ends in a value or a `MadError` naming the file (and the position
where there is one), in bounded time and memory:

- files larger than `MAX_FILE_BYTES` are refused before they are parsed;
- binary data (NUL bytes), text that is not UTF-8 and control characters are errors, not decode errors;
- nesting deeper than `MAX_DEPTH` (also through aliases) is refused before anything recurses;
- aliases are counted before anything is built: a document whose aliases would expand to more than
  `MAX_NODES` values (a "billion laughs" bomb), or that contains itself, is refused;
- mapping keys must be scalars (a list or mapping as a key is an error at its position), and a key
  may appear only once per mapping;
- integers beyond `MAX_INT` are refused where they are written.
Only YAML's safe tags are constructed: no Python object is ever created from a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from .errors import MadError, Source

MAX_FILE_BYTES = 4 << 20  # 4 MiB: the largest shipped topology is ~6 KB, a resolved 7B model ~100 KB
MAX_DEPTH = 100  # nesting levels (after aliases); real files nest fewer than 10
MAX_NODES = 1_000_000  # values after alias expansion
MAX_INT = 2**64  # integers written in a file (sizes are bounded far lower, in mad.dims)

MERGE_TAG = "tag:yaml.org,2002:merge"


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


class _Refused(yaml.MarkedYAMLError):
    """A bound was hit; reported like a syntax error, at `problem_mark`, without the 'YAML syntax' lead."""


# ----------------------------------------------------------------------------------------- reading
def read_text(path: str | Path, what: str = "file") -> str:
    """The text of a file: bounded in size, UTF-8 (an initial BOM is dropped), no binary data."""
    file = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except IsADirectoryError:
        raise MadError(f"cannot read {what}: it is a folder", Source(file)) from None
    except OSError as e:
        raise MadError(f"cannot read {what}: {e.strerror or e}", Source(file)) from None
    except ValueError as e:  # e.g. a NUL byte in the path itself
        raise MadError(f"cannot read {what}: {e}", Source(_printable(file))) from None
    if len(data) > MAX_FILE_BYTES:
        raise MadError(f"{what} is too large: more than {MAX_FILE_BYTES // (1 << 20)} MiB "
                       f"(a topology or config file is a few KB)", Source(file))
    return decode_text(data, file, what)


def decode_text(data: bytes, file: str, what: str = "file") -> str:
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or data[:4] in (b"\x00\x00\xfe\xff", b"\xff\xfe\x00\x00"):
        raise MadError(f"{what} is UTF-16 or UTF-32 text; save it as UTF-8", Source(file))
    nul = data.find(b"\x00")
    if nul >= 0:
        line, col = _line_col_bytes(data, nul)
        raise MadError(f"{what} is binary data, not YAML text (a NUL byte)", Source(file, line, col))
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line, col = _line_col_bytes(data, start)
        raise MadError(f"{what} is not UTF-8 text (byte 0x{data[start]:02x} at line {line}, column {col})",
                       Source(file, line, col)) from None


def _line_col_bytes(data: bytes, offset: int) -> tuple[int, int]:
    line_start = data.rfind(b"\n", 0, offset) + 1
    return data.count(b"\n", 0, offset) + 1, offset - line_start + 1


def _line_col(text: str, offset: int) -> tuple[int, int]:
    line_start = text.rfind("\n", 0, offset) + 1
    return text.count("\n", 0, offset) + 1, offset - line_start + 1


def _printable(text: str) -> str:
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


# ----------------------------------------------------------------------------------------- the loader
class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader with a depth limit while composing, alias accounting before constructing, scalar-only
    and unique mapping keys, and bounded integers."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self):  # noqa: ANN201
        node = super().get_single_node()
        if node is not None:
            _measure(node)
        return node

    def check_keys(self, node: MappingNode) -> None:
        """Keys are scalars, each at most once (a key repeated through a `<<` merge overrides, as in YAML)."""
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:
                continue
            if not isinstance(key_node, ScalarNode):
                kind = "list" if isinstance(key_node, SequenceNode) else "mapping"
                raise _Refused(None, None, f"a mapping key must be a plain value (a name or a number), not a {kind}",
                               key_node.start_mark)
            key = self.construct_object(key_node)
            try:
                hash(key)
            except TypeError:
                raise _Refused(None, None, "a mapping key must be a plain value (a name or a number)",
                               key_node.start_mark) from None
            if key in seen:
                raise _Refused(None, None, f"duplicate key '{_printable(str(key))}'", key_node.start_mark)
            seen[key] = True

    def construct_mapping(self, node, deep=False):  # noqa: ANN001,ANN201 - plain data (load_yaml_data)
        if isinstance(node, MappingNode):
            self.check_keys(node)
        return super().construct_mapping(node, deep=deep)

    def construct_bounded_int(self, node: ScalarNode) -> int:
        try:
            value = yaml.SafeLoader.construct_yaml_int(self, node)
        except ValueError:
            raise _Refused(None, None, "integer too large", node.start_mark) from None
        if abs(value) > MAX_INT:
            raise _Refused(None, None, f"integer too large (more than 2**{MAX_INT.bit_length() - 1})",
                           node.start_mark)
        return value


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_bounded_int)


def _children(node: yaml.Node) -> list:
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, SequenceNode):
        return list(node.value)
    return []


def _measure(root: yaml.Node) -> None:
    """Size and depth of the document as it would be built (aliases expanded), without building it."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    state: dict[int, int] = {}  # 1: in progress, 2: done
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        kids = _children(node)
        if done:
            size[key] = min(1 + sum(size[id(c)] for c in kids), MAX_NODES + 1)
            depth[key] = 1 + max((depth[id(c)] for c in kids), default=0)
            state[key] = 2
            if size[key] > MAX_NODES:
                raise _Refused(None, None, f"aliases expand this to more than {MAX_NODES:,} values "
                               f"(an alias bomb?)", node.start_mark)
            if depth[key] > MAX_DEPTH:
                raise _Refused(None, None, f"aliases nest this deeper than {MAX_DEPTH} levels", node.start_mark)
            continue
        if state.get(key) == 2:
            continue
        if state.get(key) == 1:
            raise _Refused(None, None, "an alias refers to a node that contains it (a recursive structure)",
                           node.start_mark)
        state[key] = 1
        stack.append((node, True))
        for child in kids:
            if state.get(id(child)) == 1:
                raise _Refused(None, None, "an alias refers to a node that contains it (a recursive structure)",
                               node.start_mark)
            if state.get(id(child)) != 2:
                stack.append((child, False))


def _positions_loader(file: str) -> type:
    class Loader(_BoundedLoader):
        pass

    def mapping(loader: _BoundedLoader, node: MappingNode) -> YDict:
        out = YDict()
        out.pos, out.key_pos = _source(file, node), {}
        loader.check_keys(node)
        loader.flatten_mapping(node)
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            out[key] = loader.construct_object(value_node, deep=True)
            out.key_pos[key] = _source(file, key_node)
        return out

    def sequence(loader: _BoundedLoader, node: SequenceNode) -> YList:
        out = YList(loader.construct_object(n, deep=True) for n in node.value)
        out.pos, out.item_pos = _source(file, node), [_source(file, n) for n in node.value]
        return out

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, sequence)
    return Loader


def parse_yaml(text: str, file: str, positions: bool = True, what: str = "file") -> Any:
    """Parse YAML text within the bounds; any problem is a `MadError` at `file` (and its position).

    With `positions`, mappings and lists are `YDict`/`YList` with the positions of their entries.
    """
    if len(text) > MAX_FILE_BYTES:
        raise MadError(f"{what} is too large: more than {MAX_FILE_BYTES // (1 << 20)} MiB", Source(file))
    loader = None
    try:
        loader = (_positions_loader(file) if positions else _BoundedLoader)(text)
        return loader.get_single_data()
    except _Refused as e:
        mark = e.problem_mark
        raise MadError(e.problem, Source(file, mark.line + 1, mark.column + 1)) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = Source(file, mark.line + 1, mark.column + 1) if mark else Source(file)
        problem = e.problem or e.context or "cannot parse"
        if isinstance(e, yaml.constructor.ConstructorError) and "could not determine a constructor" in problem:
            tag = problem.rpartition("tag ")[2]
            raise MadError(f"YAML tag {tag} is not allowed: only plain values, lists and mappings are read",
                           where) from None
        if problem.startswith("but ") and e.context:
            problem = f"{e.context}, {problem}"
        raise MadError(f"YAML syntax: {problem}", where) from None
    except yaml.reader.ReaderError as e:
        line, col = _line_col(text, e.position) if isinstance(e.position, int) else (0, 0)
        char = e.character if isinstance(e.character, int) else ord(e.character or "\0")
        raise MadError(f"character #x{char:04x} is not allowed in YAML (a control character)",
                       Source(file, line, col)) from None
    except yaml.YAMLError as e:
        raise MadError(f"YAML: {_printable(str(e))}", Source(file)) from None
    except RecursionError:  # not expected: depth is bounded above
        raise MadError(f"YAML nested too deeply (more than {MAX_DEPTH} levels)", Source(file)) from None
    finally:
        if loader is not None:
            loader.dispose()


def load_yaml(path: str | Path, text: str | None = None, what: str = "topology file") -> Any:
    """Parse a YAML file into YDict/YList trees; any problem becomes a `MadError` at its position."""
    file = str(path)
    if text is None:
        text = read_text(path, what)
    return parse_yaml(text, file, positions=True, what=what)


def load_yaml_data(path: str | Path, what: str = "file") -> Any:
    """Read a YAML (or JSON) file into plain Python dicts and lists, with the bounds of `load_yaml`.

    Raises `MadError` naming the file (and the position of a syntax error) for any problem: unreadable,
    binary or not UTF-8, syntax, a key used twice, an alias bomb, too large or too deeply nested.
    `what` names the file in messages (e.g. "config.yaml").
    """
    file = str(path)
    return parse_yaml(read_text(path, what), file, positions=False, what=what)


def position(tree: Any, path: tuple, fallback: Source) -> Source:
    """The deepest known position of `path` (keys and indices) inside a YDict/YList tree."""
    best, node = fallback, tree
    for key in path:
        if isinstance(node, YDict) and not (_hashable(key) and key in node) and isinstance(key, str):
            key = next((k for k in node if key in (str(k), repr(k))), key)  # a key that is not text
        if isinstance(node, YDict) and _hashable(key) and key in node:
            best, node = node.key_pos.get(key, best), node[key]
        elif isinstance(node, YList) and isinstance(key, int) and 0 <= key < len(node):
            best, node = node.item_pos[key], node[key]
        else:
            break
    return best


def _hashable(key: Any) -> bool:
    try:
        hash(key)
    except TypeError:
        return False
    return True


def plain(tree: Any) -> Any:
    """Strip positions: YDict/YList -> dict/list (for dumping)."""
    if isinstance(tree, dict):
        return {k: plain(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [plain(v) for v in tree]
    return tree
