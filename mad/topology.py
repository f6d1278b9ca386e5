"""Topology files: the pydantic models of the language, loading with includes and `--set`, and the
expansion of sugar (templates, `repeat`, `pattern`, `at`, `every`) into one flat list of nodes.

The output of this module is a `Resolved` topology: dims, inputs, outputs and a list of `NodeDecl`,
each with its fully qualified name, its raw fields, its resolved input names and its source position.
Block fields are validated later, in `mad.graph`, by each block type's own pydantic model.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import Diagnostics, MadError, Source, did_you_mean
from .yamlio import YDict, YList, load_yaml, plain, position

Strict = ConfigDict(extra="forbid", populate_by_name=True)


# --------------------------------------------------------------------------------- file models
class InputSpec(BaseModel):
    model_config = Strict
    shape: list[Union[int, str]] = Field(description="dims of the input, e.g. [B, T]")
    dtype: Literal["int32", "float", "float32"] = "float"


class EveryRule(BaseModel):
    model_config = Strict
    n: int = Field(gt=0, description="place the body at i % n == offset")
    offset: int = Field(0, ge=0)


class GroupSpec(BaseModel):
    """A repeated chain of one or several bodies (`repeat` + `at`/`every`, or `pattern`)."""

    model_config = Strict
    repeat: Union[int, str, None] = Field(None, description="number of instances (an int or a dim expression)")
    pattern: Optional[str] = Field(None, description='e.g. "(m m m s) x 3"; letters are keys of `choices`')
    body: Union[str, dict[str, Any], None] = Field(None, description="template or block type (or inline node)")
    choices: dict[str, Union[str, dict[str, Any]]] = Field(default_factory=dict)
    at: dict[str, list[int]] = Field(default_factory=dict, description="body -> instance indices")
    every: dict[str, Union[int, EveryRule]] = Field(default_factory=dict, description="body -> every n")
    as_: str = Field("{name}.{i}", alias="as", description="instance name; {i} is the index, {name} the group")
    inputs: Union[str, list[str], dict[str, str], None] = Field(None, alias="in")


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
    dims: dict[str, Union[int, str]] = Field(default_factory=dict)
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

    def to_yaml(self) -> str:
        """The fully expanded file: no includes, templates or repeats; every node with its source."""
        lines = ["mad: 1", f"name: {self.name}"]
        if self.description:
            lines.append("description: " + _flow(self.description))
        if self.plugins:
            lines.append("plugins: " + _flow(self.plugins))
        lines.append("dims:")
        lines += [f"  {k}: {_flow(v)}" for k, v in self.dims.items()]
        if self.constraints:
            lines.append("constraints: " + _flow([c for c, _ in self.constraints]))
        lines.append("inputs:")
        lines += [f"  {k}: {_flow(v.model_dump())}" for k, v in self.inputs.items()]
        lines.append("nodes:")
        for d in self.nodes:
            body = dict(d.raw)
            body["in"] = d.inputs
            if d.unit != d.name:
                body["stage"] = d.unit
            lines.append(f"  # from {d.source}" + ("  (" + " <- ".join(reversed(d.source.chain)) + ")" if d.source.chain else ""))
            lines.append(f"  {_flow(d.name)}: {_flow(body)}")
        lines.append("outputs:")
        lines += [f"  {k}: {_flow(v)}" for k, (v, _) in self.outputs.items()]
        return "\n".join(lines) + "\n"


def _flow(value: Any) -> str:
    return yaml.safe_dump(plain(value), default_flow_style=True, width=10**9, sort_keys=False).strip().removesuffix("\n...")


# --------------------------------------------------------------------------------- loading
def pydantic_errors(err: ValidationError) -> list[tuple[tuple, str, str]]:
    """(loc, type, message) per error; union alternatives (`int`, `str`, ...) folded into one error."""
    out: dict[tuple, tuple[str, str]] = {}
    for e in err.errors():
        loc = tuple(e["loc"])
        while loc and isinstance(loc[-1], str) and (loc[-1] in _TYPE_TAGS or "[" in loc[-1]):
            loc = loc[:-1]
        msg = e["msg"].removeprefix("Value error, ")
        if loc in out and out[loc][0] != "extra_forbidden":
            prev = out[loc][1]
            out[loc] = (e["type"], prev if msg in prev else f"{prev}, or {msg[0].lower()}{msg[1:]}")
        else:
            out[loc] = (e["type"], msg)
    return [(loc, t, m) for loc, (t, m) in out.items()]


_TYPE_TAGS = {"int", "str", "float", "bool", "list", "dict", "none", "EveryRule", "literal"}


def report_validation(err: ValidationError, model: type[BaseModel], tree: Any, fallback: Source,
                      diags: Diagnostics, what: str = "") -> None:
    """Turn a pydantic error into diagnostics at the YAML positions of the offending fields.

    `what` names the thing validated (e.g. "node 'blocks.3.ffn'") at the start of each message.
    """
    lead = f"{what}: " if what else ""
    for loc, etype, msg in pydantic_errors(err):
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


def _set_override(tree: YDict, assignment: str, diags: Diagnostics) -> None:
    where = Source(f"--set {assignment}")
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        diags.error("expected --set key=value (e.g. dims.D=512)", where)
        return
    parts = key.strip().split(".")
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
            diags.error(f"--set: '{parts[0]}' not found in '{key}'", where, did_you_mean(parts[0], node.keys()))
            return
        node, parts = node[".".join(parts[:n])], parts[n:]
    if not isinstance(node, dict):
        diags.error(f"--set: '{key}' does not name a field", where)
        return
    if key.startswith("dims.") and parts[-1] not in node and node is tree.get("dims"):
        diags.error(f"--set: unknown dim '{parts[-1]}'", where, did_you_mean(parts[-1], node.keys()))
        return
    node[parts[-1]] = yaml.safe_load(value)
    if isinstance(node, YDict):
        node.key_pos[parts[-1]] = where


def _load_file(path: Path, stack: tuple[str, ...], diags: Diagnostics, text: str | None = None) -> YDict | None:
    tree = load_yaml(path, text)  # positions name the file as the user wrote it
    if not isinstance(tree, YDict):
        diags.error("a topology file must be a mapping (mad: 1, name: ..., nodes: ...)", Source(str(path), 1, 1))
        return None
    for i, inc in enumerate(tree.get("include", []) or []):
        inc_path = path.parent / str(inc)
        where = tree["include"].item_pos[i] if isinstance(tree["include"], YList) else tree.pos
        if str(inc_path.resolve()) in stack:
            diags.error(f"include cycle: {' -> '.join(stack + (str(inc_path),))}", where)
            continue
        if not inc_path.is_file():
            diags.error(f"included file not found: {inc}", where)
            continue
        base = _load_file(inc_path, stack + (str(inc_path.resolve()),), diags)
        if base is not None:
            _merge_include(tree, base)
    return tree


def _merge_include(tree: YDict, base: YDict) -> None:
    """Included dims, constraints, templates and plugins are defaults; its graph is used if ours is empty."""
    for key in ("dims", "templates"):
        merged = YDict(base.get(key) or {})
        merged.pos = getattr(base.get(key), "pos", base.pos)
        merged.key_pos = dict(getattr(base.get(key), "key_pos", {}))
        own = tree.get(key) or {}
        merged.update(own)
        merged.key_pos.update(getattr(own, "key_pos", {}))
        if merged or key in tree:
            tree[key] = merged
            tree.key_pos.setdefault(key, base.key_pos.get(key, base.pos))
    for key in ("constraints", "plugins"):
        items = YList(list(base.get(key) or []) + list(tree.get(key) or []))
        items.pos = tree.pos
        items.item_pos = list(getattr(base.get(key), "item_pos", [])) + list(getattr(tree.get(key), "item_pos", []))
        if items:
            tree[key] = items
    for key in ("inputs", "nodes", "outputs", "description"):
        if key not in tree and key in base:
            tree[key] = base[key]
            tree.key_pos[key] = base.key_pos[key]


def load_topology(path: str | Path, overrides: list[str] = (), text: str | None = None) -> Resolved:
    """Load, merge includes, apply `--set` overrides, validate the file structure and expand sugar."""
    path = Path(path)
    diags = Diagnostics()
    if text is None and not path.is_file():
        raise MadError(f"no such topology file: {path}", Source(str(path)))
    tree = _load_file(path, (str(path.resolve()),), diags, text)
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
    resolved = Expander(spec, tree, diags).run()
    diags.raise_if_any()
    return resolved


# --------------------------------------------------------------------------------- expansion
_PATTERN_TOKEN = re.compile(r"\(|\)|x\s*\d+|[A-Za-z_][\w-]*")


def parse_pattern(text: str) -> list[str]:
    """Expand '(m m m s) x 3' or 'm x 7 s' into a flat list of choice keys."""
    tokens = _PATTERN_TOKEN.findall(text)
    if "".join(tokens).replace(" ", "") != re.sub(r"\s+", "", text):
        raise ValueError(f"cannot read pattern '{text}' (use names, '( ... )' and 'x N')")
    pos = 0

    def sequence() -> list[str]:
        nonlocal pos
        out: list[str] = []
        while pos < len(tokens) and tokens[pos] != ")":
            tok = tokens[pos]
            pos += 1
            if tok == "(":
                items = sequence()
                if pos >= len(tokens) or tokens[pos] != ")":
                    raise ValueError(f"unbalanced '(' in pattern '{text}'")
                pos += 1
            elif tok.startswith("x") and tok[1:].strip().isdigit():
                raise ValueError(f"'x N' must follow a name or '( ... )' in pattern '{text}'")
            else:
                items = [tok]
            if pos < len(tokens) and re.fullmatch(r"x\s*\d+", tokens[pos]):
                items = items * int(tokens[pos][1:])
                pos += 1
            out += items
        return out

    result = sequence()
    if pos != len(tokens):
        raise ValueError(f"unbalanced ')' in pattern '{text}'")
    if not result:
        raise ValueError(f"pattern '{text}' is empty")
    return result


class Expander:
    """Turns templates and groups into a flat, ordered list of `NodeDecl`."""

    def __init__(self, spec: TopologyFile, tree: YDict, diags: Diagnostics):
        self.spec, self.tree, self.diags = spec, tree, diags
        self.nodes: list[NodeDecl] = []
        self.file = tree.pos.file

    # -- helpers
    def _pos(self, container: Any, key: Any, fallback: Source) -> Source:
        if isinstance(container, YDict):
            return container.key_pos.get(key, fallback)
        return fallback

    def _kind(self, entry: dict) -> str:
        if GROUP_KEYS & set(entry):
            return "group"
        if entry.get("type") in self.spec.templates:
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
            rule = rule if isinstance(rule, EveryRule) else EveryRule(n=rule)
            for i in range(len(bodies)):
                if i % rule.n == rule.offset:
                    bodies[i] = body
        for body, indices in group.at.items():
            for i in indices:
                if not -len(bodies) <= i < len(bodies):
                    raise ValueError(f"at: index {i} is outside 0..{len(bodies) - 1}")
                bodies[i] = body
        scope = fqn[: len(fqn) - len(name)]  # the enclosing template instance's prefix, or ""
        names = [scope + group.as_.format(i=i, name=name) for i in range(len(bodies))]
        if len(set(names)) != len(names):
            raise ValueError(f"'as: {group.as_}' gives the same name twice; put {{i}} in it")
        out = [(inst, {"type": body} if isinstance(body, str) else body) for inst, body in zip(names, bodies)]
        return out

    def _count(self, value: int | str) -> int:
        from .dims import DimError, evaluate, resolve_dims

        env, _ = resolve_dims(self.spec.dims)
        try:
            count = int(evaluate(value, env))
        except DimError as e:
            raise ValueError(f"repeat: {e}") from None
        if count < 1:
            raise ValueError(f"repeat must be at least 1, got {count}")
        return count

    # -- scopes
    def run(self) -> Resolved:
        spec, tree = self.spec, self.tree
        top_inputs = {k: k for k in spec.inputs}
        first_input = next(iter(spec.inputs), None)
        self._scope(spec.nodes, tree.get("nodes"), "", top_inputs, first_input, tree.pos, unit=None)
        known = {d.name for d in self.nodes} | set(spec.inputs)
        outputs: dict[str, tuple[str, Source]] = {}
        node_entries = tree.get("nodes") or {}
        out_tree = tree.get("outputs") or {}
        for out_name, ref in spec.outputs.items():
            where = self._pos(out_tree, out_name, tree.pos)
            target = self._output_of(ref, node_entries.get(ref), ref) if ref in node_entries else ref
            if target not in known:
                self.diags.error(f"output '{out_name}' refers to unknown node '{ref}'", where, did_you_mean(ref, known))
            outputs[out_name] = (target, where)
        dims_tree = tree.get("dims") or {}
        cons_tree = tree.get("constraints")
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
            if not isinstance(entry, dict):
                self.diags.error(f"node '{fqn}' must be a mapping with a 'type'", src)
                continue
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
                self.diags.error(f"node '{fqn}': input must be a node name, got {ref!r}", src)
                return str(ref)
            if ref in local:
                return local[ref]
            if ref in bindings:
                return bindings[ref]
            return ref  # a fully qualified name; the graph checks it exists

        if refs is None:
            self.diags.error(f"node '{fqn}' has no input: give it 'in:'", src)
            return []
        if isinstance(refs, dict):
            return {port: one(r) for port, r in refs.items()}
        if isinstance(refs, list):
            return [one(r) for r in refs]
        return [one(refs)]

    def _template(self, fqn: str, entry: dict, entry_tree: Any, inputs: Any, src: Source, unit: str,
                  chain: tuple[str, ...]) -> None:
        name = entry["type"]
        tpl = self.spec.templates[name]
        extra = set(entry) - {"type", "in"}
        if extra:
            self.diags.error(f"template instance '{fqn}' takes only 'type' and 'in', not {sorted(extra)}", src)
        if len(chain) > 16:
            self.diags.error(f"template '{name}' nests too deep (recursive template?)", src)
            return
        if isinstance(inputs, dict):
            unknown = set(inputs) - set(tpl.inputs)
            if unknown:
                self.diags.error(f"template '{name}' has no input '{sorted(unknown)[0]}' (inputs: {tpl.inputs})", src)
            bindings = dict(inputs)
        else:
            if len(inputs) != len(tpl.inputs):
                self.diags.error(f"template '{name}' takes {len(tpl.inputs)} input(s) {tpl.inputs}, got {len(inputs)}", src)
            bindings = dict(zip(tpl.inputs, inputs))
        tpl_tree = (self.tree.get("templates") or {}).get(name)
        nodes_tree = tpl_tree.get("nodes") if isinstance(tpl_tree, dict) else None
        where = tpl_tree.pos if isinstance(tpl_tree, YDict) else src
        step = f"template '{name}' as '{fqn}'"
        if tpl.output is not None and tpl.output not in tpl.nodes:
            self.diags.error(f"template '{name}': output '{tpl.output}' is not one of its nodes", where,
                             did_you_mean(tpl.output, tpl.nodes))
        self._scope(tpl.nodes, nodes_tree, fqn + ".", bindings, tpl.inputs and bindings.get(tpl.inputs[0]),
                    where, unit, chain + (step,))

    def _group(self, name: str, fqn: str, entry: dict, entry_tree: Any, inputs: Any, src: Source,
               unit: str | None, chain: tuple[str, ...]) -> None:
        try:
            group = GroupSpec.model_validate(plain(entry))
        except ValidationError as e:
            report_validation(e, GroupSpec, entry_tree, src, self.diags, f"group '{fqn}'")
            return
        try:
            bodies = self._group_bodies(name, group, fqn)
        except ValueError as e:
            self.diags.error(f"group '{fqn}': {e}", src)
            return
        previous = inputs
        for i, (inst, body) in enumerate(bodies):
            label = body.get("type") if isinstance(body, dict) else body
            step = f"{'pattern' if group.pattern else 'repeat'} '{fqn}' i={i} ({label}) at {src}"
            body_kind = self._kind(body)
            if body_kind == "group":
                self.diags.error(f"group '{fqn}': a body cannot itself be a group", src)
                return
            isrc = src.via(step)
            if body_kind == "template":
                self._template(inst, body, entry_tree, previous, isrc, unit or inst, chain + (step,))
            else:
                if "in" in body:
                    self.diags.error(f"group '{fqn}': a body takes its input from the group's chain; "
                                     f"write 'in' on the group, not in the body", src)
                    return
                raw = copy.deepcopy({k: v for k, v in body.items() if k not in ("in", "stage")})
                self.nodes.append(NodeDecl(inst, raw, previous, Source(**{**src.__dict__, "chain": chain + (step,)}),
                                           entry_tree.get("body") if isinstance(entry_tree, dict) else None,
                                           body.get("stage", unit or inst)))
            previous = [self._output_of(inst, body, inst)]
