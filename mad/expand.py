"""The expander: templates, `repeat`, `pattern`, `at` and `every` -> one flat, ordered list of `NodeDecl`.

Sizes are checked arithmetically before anything is expanded: a topology expands to at most
`mad.spec.MAX_NODES` nodes (a `repeat` count, a `pattern` or nested templates beyond that are errors
at the group), so a small file cannot ask for unbounded work.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import ValidationError

from . import spec as _spec  # MAX_NODES is read when used (see mad.spec)
from .errors import Diagnostics, Source, did_you_mean, short
from .pattern import parse_pattern
from .spec import GROUP_KEYS, GroupSpec, NodeDecl, Resolved, TopologyFile, one_line
from .validation import report_validation
from .yamlio import YDict, YList, plain


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
        if count > _spec.MAX_NODES:
            shown = f"{value} = {count:,}" if isinstance(value, str) else f"{count:,}"
            dims_tree = self.tree.get("dims")
            notes = [f"{d} is set at {self._pos(dims_tree, d, self.tree.pos)}" for d in sorted(names_in(value))
                     if isinstance(dims_tree, YDict) and d in dims_tree]
            raise _GroupError(f"repeat: {shown} instances are more than the limit of {_spec.MAX_NODES:,}", notes)
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
                    total = min(total + self._size(sub_entry, f"{fqn}.{sub}", depth + 1), _spec.MAX_NODES + 1)
                self._sizes[name] = total
            return self._sizes[name]
        try:
            group = GroupSpec.model_validate(plain(entry))
            bodies = self._group_bodies(fqn.rpartition(".")[2] or fqn, group, fqn)
        except (ValidationError, ValueError, _Skip):
            return 0
        total = 0
        for inst, body in bodies:
            total = min(total + self._size(body, inst, depth + 1), _spec.MAX_NODES + 1)
            if total > _spec.MAX_NODES:
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
            if total > _spec.MAX_NODES:
                where = self._pos(nodes_tree, name, tree.pos)
                self.diags.error(f"the topology expands to more than {_spec.MAX_NODES:,} nodes (the limit), at "
                                 f"'{short(name)}'", where)
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
            if target not in known and total <= _spec.MAX_NODES and not self.incomplete:
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
                self.diags.error(f"node name {one_line(name)} is empty or has a control character (a newline?)", src,
                                 once=("name", src.file, src.line, src.col))
                previous = local[name]
                continue
            if not isinstance(entry, dict):
                self.diags.error(f"node '{fqn}' must be a mapping with a 'type'", src,
                                 once=("mapping", src.file, src.line, src.col))
                continue
            stage = entry.get("stage")
            if stage is not None and (not isinstance(stage, str) or not stage or not stage.isprintable()):
                self.diags.error(f"node '{fqn}': stage must be a name, got {short(one_line(stage))}",
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
                self.diags.error(f"node '{fqn}': input must be a node name, got {short(one_line(ref))}", src,
                                 once=("input", src.file, src.line, src.col, one_line(ref)))
                return one_line(ref)
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
                self.diags.error(f"group '{fqn}': instance name {one_line(inst)} has a control character", src,
                                 once=("inst name",) + once)
                return
            label = body.get("type") if isinstance(body, dict) else body
            label = label if isinstance(label, str) else one_line(label)
            step = f"{'pattern' if group.pattern else 'repeat'} '{fqn}' i={i} ({short(label)}) at {src}"
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
                    self.diags.error(f"group '{fqn}': stage must be a name, got {short(one_line(stage))}", src,
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


__all__ = ["Expander"]
