"""Topology files: the pydantic models of the language, loading with includes and `--set`, and the
expansion of sugar (templates, `repeat`, `pattern`, `at`, `every`) into one flat list of nodes.

The output of this module is a `Resolved` topology: dims, inputs, outputs and a list of `NodeDecl`,
each with its fully qualified name, its raw fields, its resolved input names and its source position.
Block fields are validated later, in `mad.graph`, by each block type's own pydantic model.

Sizes are checked arithmetically before anything is expanded: a topology expands to at most
`MAX_NODES` nodes (a `repeat` count, a `pattern` or nested templates beyond that are errors at the group),
and plugins are imported only when the caller trusts the file (`trust_plugins`).
"""

from __future__ import annotations

import copy
import importlib.util
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import Diagnostics, MadError, Source, did_you_mean
from .yamlio import YDict, YList, load_yaml, parse_yaml, plain, position

Strict = ConfigDict(extra="forbid", populate_by_name=True)

MAX_NODES = 100_000
"""The most nodes a topology may expand to (the 7B model has ~800; xLSTM v1 1.3B ~1,300)."""
MAX_INCLUDE_DEPTH = 16


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected a size (an integer or a dim expression), got {str(value).lower()}")
    return value


def _int_no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {str(value).lower()}")
    return value


# an integer or a dim expression (never a bool: `D: true` is a mistake, not 1)
DimSpec = Annotated[Union[int, str], BeforeValidator(_no_bool)]
Int = Annotated[int, BeforeValidator(_int_no_bool)]


# --------------------------------------------------------------------------------- file models
class InputSpec(BaseModel):
    model_config = Strict
    shape: list[DimSpec] = Field(description="dims of the input, e.g. [B, T]")
    dtype: Literal["int32", "float", "float32"] = "float"


class EveryRule(BaseModel):
    model_config = Strict
    n: Int = Field(gt=0, description="place the body at i % n == offset")
    offset: Int = Field(0, ge=0)

    @model_validator(mode="after")
    def _offset_below_n(self) -> "EveryRule":
        if self.offset >= self.n:
            raise ValueError(f"offset ({self.offset}) must be less than n ({self.n}): i % {self.n} is never "
                             f"{self.offset}")
        return self


def _every_rule(value: Any) -> Any:
    """`every: {body: 8}` is `every: {body: {n: 8}}`."""
    return {"n": value} if isinstance(value, int) and not isinstance(value, bool) else value


# `every: {body: 8}` or `every: {body: {n: 8, offset: 7}}`
_Every = Annotated[EveryRule, BeforeValidator(_every_rule, json_schema_input_type=Union[int, EveryRule])]

_AS_SPEC = re.compile(r"0?[0-9]{0,2}d?")


def check_as(text: str) -> str:
    """An instance name template: text with `{i}` and `{name}` (e.g. `{i:02d}`), nothing else."""
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as e:
        raise ValueError(f"cannot read '{text}': {e} (write {{i}} and {{name}}; {{{{ for a brace)") from None
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in ("i", "name"):
            raise ValueError(f"'{{{name}}}' is not a placeholder: use {{i}} (the index) and {{name}} (the group)")
        if conversion or (spec and not (name == "i" and _AS_SPEC.fullmatch(spec))):
            raise ValueError(f"'{text}': only {{i}}, {{name}} and a width such as {{i:02d}} are allowed")
    return text


class GroupSpec(BaseModel):
    """A repeated chain of one or several bodies (`repeat` + `at`/`every`, or `pattern`)."""

    model_config = Strict
    repeat: Optional[DimSpec] = Field(None, description="number of instances (an int or a dim expression)")
    pattern: Optional[str] = Field(None, description='e.g. "(m m m s) x 3"; letters are keys of `choices`')
    body: Union[str, dict[str, Any], None] = Field(None, description="template or block type (or inline node)")
    choices: dict[str, Union[str, dict[str, Any]]] = Field(default_factory=dict)
    at: dict[str, list[Int]] = Field(default_factory=dict, description="body -> instance indices")
    every: dict[str, _Every] = Field(default_factory=dict, description="body -> every n, or {n, offset}")
    as_: str = Field("{name}.{i}", alias="as", description="instance name; {i} is the index, {name} the group")
    inputs: Union[str, list[str], dict[str, str], None] = Field(None, alias="in")

    @field_validator("as_")
    @classmethod
    def _as(cls, value: str) -> str:
        return check_as(value)


class TemplateSpec(BaseModel):
    """A named sub-graph. Its node names become `<instance>.<node>`."""

    model_config = Strict
    inputs: list[str] = Field(default_factory=lambda: ["x"])
    nodes: dict[str, dict[str, Any]]
    output: Optional[str] = Field(None, description="node whose output is the template's; default: the last")


class TopologyFile(BaseModel):
    """The top level of a topology file."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    mad: Literal[1] = Field(description="language version")
    name: str
    description: str = ""
    include: list[str] = Field(default_factory=list, description="files whose dims/templates (and graph) this extends")
    plugins: list[str] = Field(default_factory=list, description="Python modules to import (they register blocks)")
    dims: dict[str, DimSpec] = Field(default_factory=dict)
    constraints: list[str] = Field(default_factory=list)
    inputs: dict[str, InputSpec] = Field(default_factory=dict)
    templates: dict[str, TemplateSpec] = Field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = Field(default_factory=dict)
    outputs: dict[str, str] = Field(default_factory=dict)


GROUP_KEYS = {"repeat", "pattern"}


# --------------------------------------------------------------------------------- resolved form
@dataclass
class NodeDecl:
    name: str
    raw: dict  # the node's own fields (type and block fields), as written
    inputs: Union[list[str], dict[str, str]]
    source: Source
    fields: Any  # the YDict the fields came from (positions for field errors)
    unit: str  # its stage: the top-level entry or group instance it came from (or an explicit `stage:`)


@dataclass
class Resolved:
    name: str
    file: str
    dims: dict[str, Any]  # raw dim expressions after includes and --set
    dims_pos: dict[str, Source]
    constraints: list[tuple[str, Source]]
    inputs: dict[str, InputSpec]
    inputs_pos: dict[str, Source]
    nodes: list[NodeDecl]
    outputs: dict[str, tuple[str, Source]]
    plugins: list[str] = field(default_factory=list)
    description: str = ""
    trust_plugins: bool = False  # import `plugins` (and `mad.blocks` entry points) when the graph is built
    plugins_pos: list[Source] = field(default_factory=list)  # where each plugin was listed
    plugin_dirs: list[Optional[str]] = field(default_factory=list)  # the folder of the file that listed it

    def to_yaml(self) -> str:
        """The fully expanded file: no includes, templates or repeats; every node with its source.

        Written by a YAML emitter (every name and value quoted as YAML needs it), one line per node with a
        `# from FILE:LINE:COL` comment (non-printable characters escaped), so that loading it gives the
        same nodes.
        """
        head: dict[str, Any] = {"mad": 1, "name": self.name}
        if self.description:
            head["description"] = self.description
        if self.plugins:
            head["plugins"] = _FlowSeq(self.plugins)
        head["dims"] = dict(self.dims)
        if self.constraints:
            head["constraints"] = _FlowSeq([c for c, _ in self.constraints])
        head["inputs"] = {k: _FlowMap(v.model_dump()) for k, v in self.inputs.items()}
        lines = [_dump(head).rstrip("\n"), "nodes:" if self.nodes else "nodes: {}"]
        for d in self.nodes:
            body = dict(plain(d.raw))
            body["in"] = d.inputs
            if d.unit != d.name:
                body["stage"] = d.unit
            chain = "  (" + " <- ".join(reversed(d.source.chain)) + ")" if d.source.chain else ""
            lines.append("  # from " + _comment(f"{d.source}{chain}"))
            lines += ["  " + line for line in _dump({d.name: _FlowMap(body)}).rstrip("\n").split("\n")]
        outputs = {k: v for k, (v, _) in self.outputs.items()}
        lines.append(_dump({"outputs": outputs}).rstrip("\n"))
        return "\n".join(lines) + "\n"


class _FlowMap(dict):
    """A mapping written in flow style on one line: {type: linear, out: V, in: [x]}."""


class _FlowSeq(list):
    """A list written in flow style on one line: [a, b]."""


class _Dumper(yaml.SafeDumper):
    """Safe YAML: strings with any non-printable character (newlines included) are double-quoted with
    escapes, so that every scalar stays on its line; YDict/YList/DimVal are written as plain values."""

    def ignore_aliases(self, data: Any) -> bool:
        return True  # a value used twice is written twice, not as an anchor and alias


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = '"' if not data.isprintable() else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _represent_str)
_Dumper.add_representer(_FlowMap, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v.items(), flow_style=True))
_Dumper.add_representer(_FlowSeq, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
_Dumper.add_multi_representer(dict, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v.items()))
_Dumper.add_multi_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v))
_Dumper.add_multi_representer(int, lambda d, v: d.represent_bool(v) if isinstance(v, bool) else d.represent_int(int(v)))


def _dump(value: Any) -> str:
    return yaml.dump(value, Dumper=_Dumper, default_flow_style=False, sort_keys=False, allow_unicode=True,
                     width=float("inf"))


def _comment(text: str) -> str:
    """Text that is safe on one comment line: non-printable characters (a newline in a path) escaped."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _flow(value: Any) -> str:
    """One value as one line of flow YAML (for messages)."""
    return yaml.dump(plain(value), Dumper=_Dumper, default_flow_style=True, width=float("inf"), sort_keys=False,
                     allow_unicode=True).strip().removesuffix("\n...")


# --------------------------------------------------------------------------------- loading
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


def _printable(text: str) -> str:
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _set_override(tree: YDict, assignment: str, diags: Diagnostics) -> None:
    assignment = str(assignment)
    where = Source(f"--set {_short(assignment, 100)}")
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        diags.error("expected --set key=value (e.g. dims.D=512)", where)
        return
    if not value.strip():
        diags.error(f"--set: no value after '=' (write {_short(key.strip())}=null for none)", where)
        return
    try:
        parsed = parse_yaml(value, "--set value", positions=False, what="--set value")
    except MadError as e:
        d = e.diagnostics[0]
        at = f" (column {d.source.col})" if d.source is not None and d.source.col > 1 else ""
        diags.error(f"--set: cannot read the value '{_short(value)}': {d.message}{at}", where)
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
            diags.error(f"include: expected a file name, got {_flow(inc)}", where)
            continue
        inc_path = _find_include(inc, path)
        if inc_path is None:
            diags.error(f"included file not found: {_printable(inc)}", where)
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
            raise MadError(f"no such topology file: {_printable(str(path))}", Source(_printable(str(path))))
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
                diags.error(f"{key}: the name {_flow(name)} is empty or has a control character (a newline?)", where)


# --------------------------------------------------------------------------------- expansion
_PATTERN_TOKEN = re.compile(r"\(|\)|x\s*\d+|[A-Za-z_][\w-]*")


def parse_pattern(text: str, max_items: Optional[int] = None) -> list[str]:
    """Expand '(m m m s) x 3' or 'm x 7 s' into a flat list of choice keys.

    The length is computed first (without recursion, for any nesting of parentheses), so that a pattern
    longer than `max_items` (default `MAX_NODES`) is an error before anything is expanded.
    """
    max_items = MAX_NODES if max_items is None else max_items
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
                raise ValueError(f"pattern '{_short(text)}' repeats {digits[:12]}... times: more than the limit of "
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
        raise ValueError(f"pattern '{_short(text)}' expands to more than {max_items:,} instances (the limit)")
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


def _short(text: str, n: int = 60) -> str:
    text = _printable(text)
    return text if len(text) <= n else text[: n - 3] + "..."


class Expander:
    """Turns templates and groups into a flat, ordered list of `NodeDecl`."""

    def __init__(self, spec: TopologyFile, tree: YDict, diags: Diagnostics):
        from .dims import resolve_dims

        self.spec, self.tree, self.diags = spec, tree, diags
        self.nodes: list[NodeDecl] = []
        self.file = tree.pos.file
        self.env, self.dim_errors = resolve_dims(spec.dims)
        self.incomplete = False  # a part was left out without an error of its own (e.g. it reads a broken dim)
        self._sizes: dict[str, int] = {}

    # -- helpers
    def _pos(self, container: Any, key: Any, fallback: Source) -> Source:
        if isinstance(container, YDict):
            try:
                return container.key_pos.get(key, fallback)
            except TypeError:
                return fallback
        return fallback

    def _kind(self, entry: dict) -> str:
        if GROUP_KEYS & set(entry):
            return "group"
        if isinstance(entry.get("type"), str) and entry.get("type") in self.spec.templates:
            return "template"
        return "block"

    def _output_of(self, name: str, entry: Any, fqn: str, depth: int = 0) -> str:
        """The FQN of the node whose output an entry (block, template instance or group) produces."""
        if depth > 32 or not isinstance(entry, dict):
            return fqn
        kind = self._kind(entry)
        if kind == "block":
            return fqn
        if kind == "template":
            tpl = self.spec.templates[entry["type"]]
            if not tpl.nodes:
                return fqn
            out = tpl.output or list(tpl.nodes)[-1]
            return self._output_of(out, tpl.nodes.get(out, {}), f"{fqn}.{out}", depth + 1)
        try:
            group = GroupSpec.model_validate({k: v for k, v in entry.items()})
            bodies = self._group_bodies(name, group, fqn)
        except (ValidationError, ValueError):
            return fqn
        if not bodies:
            return fqn
        inst, body = bodies[-1]
        return self._output_of(inst, body, inst, depth + 1)

    def _group_bodies(self, name: str, group: GroupSpec, fqn: str) -> list[tuple[str, Any]]:
        if (group.repeat is None) == (group.pattern is None):
            raise ValueError("a group needs exactly one of 'repeat' or 'pattern'")
        if group.pattern is not None:
            keys = parse_pattern(group.pattern)
            unknown = [k for k in keys if k not in group.choices]
            if unknown:
                raise ValueError(f"pattern names '{unknown[0]}', which is not in choices ({', '.join(group.choices) or 'none'})")
            bodies = [group.choices[k] for k in keys]
        else:
            if group.body is None:
                raise ValueError("'repeat' needs a 'body'")
            bodies = [group.body] * self._count(group.repeat)
        for body, rule in group.every.items():
            for i in range(rule.offset, len(bodies), rule.n):
                bodies[i] = body
        for body, indices in group.at.items():
            for i in indices:
                if not -len(bodies) <= i < len(bodies):
                    raise ValueError(f"at: index {i} is outside 0..{len(bodies) - 1}")
                bodies[i] = body
        scope = fqn[: len(fqn) - len(name)]  # the enclosing template instance's prefix, or ""
        try:
            names = [scope + group.as_.format(i=i, name=name) for i in range(len(bodies))]
        except (KeyError, IndexError, ValueError, AttributeError) as e:  # check_as let it through: never
            raise ValueError(f"cannot make names from 'as: {group.as_}': {e}") from None
        if len(set(names)) != len(names):
            raise ValueError(f"'as: {group.as_}' gives the same name twice; put {{i}} in it")
        out = [(inst, {"type": body} if isinstance(body, str) else body) for inst, body in zip(names, bodies)]
        return out

    def _count(self, value: int | str) -> int:
        from .dims import DimError, evaluate, names_in

        broken = names_in(value) & set(self.dim_errors)
        if broken:
            self.incomplete = True  # the dim's own error is reported (check_declarations)
            raise _Skip()
        try:
            count = int(evaluate(value, self.env))
        except DimError as e:
            raise ValueError(f"repeat: {e}") from None
        if count < 1:
            raise ValueError(f"repeat must be at least 1, got {count}")
        if count > MAX_NODES:
            shown = f"{value} = {count:,}" if isinstance(value, str) else f"{count:,}"
            dims_tree = self.tree.get("dims")
            notes = [f"{d} is set at {self._pos(dims_tree, d, self.tree.pos)}" for d in sorted(names_in(value))
                     if isinstance(dims_tree, YDict) and d in dims_tree]
            raise _GroupError(f"repeat: {shown} instances are more than the limit of {MAX_NODES:,}", notes)
        return count

    # -- sizes (before anything is expanded)
    def _size(self, entry: Any, fqn: str, depth: int = 0) -> int:
        """How many nodes an entry expands to (capped just above MAX_NODES); 0 where it has an error."""
        if not isinstance(entry, dict) or depth > 40:
            return 0
        kind = self._kind(entry)
        if kind == "block":
            return 1
        if kind == "template":
            name = entry["type"]
            if name not in self._sizes:
                self._sizes[name] = 0  # a template that contains itself is reported when it is expanded
                tpl = self.spec.templates[name]
                total = 0
                for sub, sub_entry in tpl.nodes.items():
                    total = min(total + self._size(sub_entry, f"{fqn}.{sub}", depth + 1), MAX_NODES + 1)
                self._sizes[name] = total
            return self._sizes[name]
        try:
            group = GroupSpec.model_validate(plain(entry))
            bodies = self._group_bodies(fqn.rpartition(".")[2] or fqn, group, fqn)
        except (ValidationError, ValueError, _Skip):
            return 0
        total = 0
        for inst, body in bodies:
            total = min(total + self._size(body, inst, depth + 1), MAX_NODES + 1)
            if total > MAX_NODES:
                break
        return total

    # -- scopes
    def run(self) -> Resolved:
        spec, tree = self.spec, self.tree
        top_inputs = {k: k for k in spec.inputs}
        first_input = next(iter(spec.inputs), None)
        nodes_tree = tree.get("nodes")
        total = 0
        for name, entry in spec.nodes.items():
            total += self._size(entry, name)
            if total > MAX_NODES:
                where = self._pos(nodes_tree, name, tree.pos)
                self.diags.error(f"the topology expands to more than {MAX_NODES:,} nodes (the limit), at "
                                 f"'{_short(name)}'", where)
                break
        else:
            self._scope(spec.nodes, nodes_tree, "", top_inputs, first_input, tree.pos, unit=None)
        known = {d.name for d in self.nodes} | set(spec.inputs)
        outputs: dict[str, tuple[str, Source]] = {}
        node_entries = tree.get("nodes") or {}
        out_tree = tree.get("outputs") or {}
        for out_name, ref in spec.outputs.items():
            where = self._pos(out_tree, out_name, tree.pos)
            target = self._output_of(ref, node_entries.get(ref), ref) if ref in node_entries else ref
            if target not in known and total <= MAX_NODES and not self.incomplete:
                self.diags.error(f"output '{out_name}' refers to unknown node '{ref}'", where, did_you_mean(ref, known))
            outputs[out_name] = (target, where)
        dims_tree = tree.get("dims") or {}
        cons_tree = tree.get("constraints")
        plugins_tree = tree.get("plugins")
        plugins_pos = [plugins_tree.item_pos[i] if isinstance(plugins_tree, YList) and i < len(plugins_tree.item_pos)
                       else self._pos(tree, "plugins", tree.pos) for i in range(len(spec.plugins))]
        return Resolved(
            name=spec.name,
            file=self.file,
            dims=dict(spec.dims),
            dims_pos={k: self._pos(dims_tree, k, tree.pos) for k in spec.dims},
            constraints=[(c, cons_tree.item_pos[i] if isinstance(cons_tree, YList) else tree.pos)
                         for i, c in enumerate(spec.constraints)],
            inputs=spec.inputs,
            inputs_pos={k: self._pos(tree.get("inputs"), k, tree.pos) for k in spec.inputs},
            nodes=self.nodes,
            outputs=outputs,
            plugins=list(spec.plugins),
            description=spec.description,
            plugins_pos=plugins_pos,
            plugin_dirs=[_folder_of(p) for p in plugins_pos],
        )

    def _scope(self, entries: dict, entries_tree: Any, prefix: str, bindings: dict[str, str],
               default_in: str | None, where: Source, unit: str | None, chain: tuple[str, ...] = ()) -> str | None:
        """Expand one scope (the top level or a template body); return the FQN of its last output."""
        local = {name: self._output_of(name, entry, prefix + name) for name, entry in entries.items()}
        previous = default_in
        for name, entry in entries.items():
            fqn = prefix + name
            entry_tree = entries_tree.get(name) if isinstance(entries_tree, dict) else None
            src = Source(**{**self._pos(entries_tree, name, where).__dict__, "chain": chain})
            if not name or not name.isprintable():
                self.diags.error(f"node name {_flow(name)} is empty or has a control character (a newline?)", src,
                                 once=("name", src.file, src.line, src.col))
                previous = local[name]
                continue
            if not isinstance(entry, dict):
                self.diags.error(f"node '{fqn}' must be a mapping with a 'type'", src,
                                 once=("mapping", src.file, src.line, src.col))
                continue
            stage = entry.get("stage")
            if stage is not None and (not isinstance(stage, str) or not stage or not stage.isprintable()):
                self.diags.error(f"node '{fqn}': stage must be a name, got {_short(_flow(stage))}",
                                 self._pos(entry_tree, "stage", src), once=("stage", src.file, src.line, src.col))
                entry = {k: v for k, v in entry.items() if k != "stage"}
            refs = entry.get("in", previous)
            inputs = self._bind(refs, local, bindings, src, fqn)
            kind = self._kind(entry)
            my_unit = unit or fqn
            if kind == "group":
                self._group(name, fqn, entry, entry_tree, inputs, src, unit, chain)
            elif kind == "template":
                self._template(fqn, entry, entry_tree, inputs, src, my_unit, chain)
            else:
                raw = {k: v for k, v in entry.items() if k not in ("in", "stage")}
                self.nodes.append(NodeDecl(fqn, raw, inputs, src, entry_tree, entry.get("stage", my_unit)))
            previous = local[name]
        return previous

    def _bind(self, refs: Any, local: dict, bindings: dict, src: Source, fqn: str) -> Union[list[str], dict[str, str]]:
        def one(ref: Any) -> str:
            if not isinstance(ref, str):
                self.diags.error(f"node '{fqn}': input must be a node name, got {_short(_flow(ref))}", src,
                                 once=("input", src.file, src.line, src.col, _flow(ref)))
                return _flow(ref)
            if ref in local:
                return local[ref]
            if ref in bindings:
                return bindings[ref]
            return ref  # a fully qualified name; the graph checks it exists

        if refs is None:
            self.diags.error(f"node '{fqn}' has no input: give it 'in:'", src,
                             once=("no input", src.file, src.line, src.col))
            return []
        if isinstance(refs, dict):
            return {str(port): one(r) for port, r in refs.items()}
        if isinstance(refs, list):
            return [one(r) for r in refs]
        return [one(refs)]

    def _template(self, fqn: str, entry: dict, entry_tree: Any, inputs: Any, src: Source, unit: str,
                  chain: tuple[str, ...]) -> None:
        name = entry["type"]
        tpl = self.spec.templates[name]
        once = (src.file, src.line, src.col)
        extra = set(entry) - {"type", "in"}
        if extra:
            self.diags.error(f"template instance '{fqn}' takes only 'type' and 'in', not {sorted(map(str, extra))}",
                             src, once=("extra",) + once)
        if len(chain) > 16:
            self.diags.error(f"template '{name}' nests too deep (recursive template?)", src, once=("deep",) + once)
            return
        if isinstance(inputs, dict):
            unknown = set(inputs) - set(tpl.inputs)
            if unknown:
                self.diags.error(f"template '{name}' has no input '{sorted(unknown)[0]}' (inputs: {tpl.inputs})", src,
                                 once=("tpl input",) + once)
            bindings = dict(inputs)
        else:
            if len(inputs) != len(tpl.inputs):
                self.diags.error(f"template '{name}' takes {len(tpl.inputs)} input(s) {tpl.inputs}, got {len(inputs)}",
                                 src, once=("tpl inputs",) + once)
            bindings = dict(zip(tpl.inputs, inputs))
        tpl_tree = (self.tree.get("templates") or {}).get(name)
        nodes_tree = tpl_tree.get("nodes") if isinstance(tpl_tree, dict) else None
        where = tpl_tree.pos if isinstance(tpl_tree, YDict) else src
        step = f"template '{name}' as '{fqn}'"
        if tpl.output is not None and tpl.output not in tpl.nodes:
            self.diags.error(f"template '{name}': output '{tpl.output}' is not one of its nodes", where,
                             did_you_mean(tpl.output, tpl.nodes), once=("tpl output", name))
        self._scope(tpl.nodes, nodes_tree, fqn + ".", bindings, tpl.inputs and bindings.get(tpl.inputs[0]),
                    where, unit, chain + (step,))

    def _group(self, name: str, fqn: str, entry: dict, entry_tree: Any, inputs: Any, src: Source,
               unit: str | None, chain: tuple[str, ...]) -> None:
        once = (src.file, src.line, src.col)
        try:
            group = GroupSpec.model_validate(plain(entry))
        except ValidationError as e:
            report_validation(e, GroupSpec, entry_tree, src, self.diags, f"group '{fqn}'")
            return
        try:
            bodies = self._group_bodies(name, group, fqn)
        except _Skip:
            return
        except ValueError as e:
            self.diags.error(f"group '{fqn}': {e}", src, *getattr(e, "notes", ()),
                             once=("group", str(e).replace(fqn, "")) + once)
            return
        previous = inputs
        for i, (inst, body) in enumerate(bodies):
            if not inst.isprintable():
                self.diags.error(f"group '{fqn}': instance name {_flow(inst)} has a control character", src,
                                 once=("inst name",) + once)
                return
            label = body.get("type") if isinstance(body, dict) else body
            label = label if isinstance(label, str) else _flow(label)
            step = f"{'pattern' if group.pattern else 'repeat'} '{fqn}' i={i} ({_short(label)}) at {src}"
            if not isinstance(body, dict):
                self.diags.error(f"group '{fqn}': a body must be a template, a block type or a mapping", src,
                                 once=("body",) + once)
                return
            body_kind = self._kind(body)
            if body_kind == "group":
                self.diags.error(f"group '{fqn}': a body cannot itself be a group", src, once=("nested group",) + once)
                return
            isrc = src.via(step)
            if body_kind == "template":
                self._template(inst, body, entry_tree, previous, isrc, unit or inst, chain + (step,))
            else:
                if "in" in body:
                    self.diags.error(f"group '{fqn}': a body takes its input from the group's chain; "
                                     f"write 'in' on the group, not in the body", src, once=("body in",) + once)
                    return
                stage = body.get("stage", unit or inst)
                if not isinstance(stage, str) or not stage or not stage.isprintable():
                    self.diags.error(f"group '{fqn}': stage must be a name, got {_short(_flow(stage))}", src,
                                     once=("stage",) + once)
                    return
                raw = copy.deepcopy({k: v for k, v in body.items() if k not in ("in", "stage")})
                self.nodes.append(NodeDecl(inst, raw, previous, Source(**{**src.__dict__, "chain": chain + (step,)}),
                                           entry_tree.get("body") if isinstance(entry_tree, dict) else None, stage))
            previous = [self._output_of(inst, body, inst)]


class _GroupError(ValueError):
    """A group mistake with notes (e.g. where the dim behind a `repeat` count is set)."""

    def __init__(self, message: str, notes: list[str]):
        super().__init__(message)
        self.notes = notes


class _Skip(ValueError):
    """A group left out without an error of its own (its repeat reads a dim that has an error)."""


def _folder_of(where: Source) -> Optional[str]:
    """The folder of the file a plugin was listed in (None for `--set` or text without a file)."""
    if where is None or not where.line:
        return None
    try:
        folder = Path(where.file).resolve().parent
        return str(folder) if folder.is_dir() else None
    except (OSError, ValueError):
        return None
