"""The topology language's file models (pydantic) and the resolved form an expansion produces.

`TopologyFile` and its parts (`InputSpec`, `GroupSpec`, `TemplateSpec`) validate the structure of a
file; block fields are validated later, in `mad.graph`, by each block type's own model. `Resolved`
(a flat list of `NodeDecl`) is what `mad.topology.load_topology` returns and `mad.graph` builds from;
it writes itself back as YAML (`to_yaml`), so the YAML writer lives here too.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from .errors import Source
from .yamlio import plain

Strict = ConfigDict(extra="forbid", populate_by_name=True)

MAX_NODES = 100_000
"""The most nodes a topology may expand to: far above any real model, low enough that a small file cannot
ask for unbounded work. The expander and the pattern parser read it here when they run, so one assignment
(a test's smaller limit) changes both."""


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


def one_line(value: Any) -> str:
    """One value as one line of flow YAML (for messages)."""
    return yaml.dump(plain(value), Dumper=_Dumper, default_flow_style=True, width=float("inf"), sort_keys=False,
                     allow_unicode=True).strip().removesuffix("\n...")


__all__ = ["DimSpec", "EveryRule", "GROUP_KEYS", "GroupSpec", "InputSpec", "Int", "MAX_NODES", "NodeDecl", "Resolved",
           "Strict", "TemplateSpec", "TopologyFile", "check_as", "one_line"]
