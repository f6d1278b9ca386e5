"""JSON Schema of the topology language, generated from the pydantic models and the block registry."""

from __future__ import annotations

import copy

from .block import block_types
from .spec import GroupSpec, TemplateSpec, TopologyFile

_IN = {"description": "source node(s): a name, a list, or {port: name}",
       "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}},
                 {"type": "object", "additionalProperties": {"type": "string"}}]}
_STAGE = {"type": "string", "description": "stage this node runs in (default: its top-level entry)"}


def _model(model, defs: dict) -> dict:
    schema = model.model_json_schema(by_alias=True, ref_template="#/$defs/{model}")
    defs.update(schema.pop("$defs", {}))
    return schema


def topology_schema(trust_plugins: bool = False) -> dict:
    """A draft 2020-12 schema; node entries are a block (by `type`), a template instance or a group.

    The blocks are those registered in this process; with `trust_plugins`, also those of the installed
    `mad.blocks` entry points (imported, which runs their code)."""
    defs: dict = {}
    schema = _model(TopologyFile, defs)
    blocks = block_types(trust_plugins=trust_plugins)
    node_kinds = []
    for name, cls in sorted(blocks.items()):
        s = _model(cls, defs)
        s["properties"]["type"] = {"const": name}
        s["properties"]["in"] = _IN
        s["properties"]["stage"] = _STAGE
        s["required"] = sorted(set(s.get("required", [])) | {"type"})
        s["additionalProperties"] = False
        defs[f"block.{name}"] = s
        node_kinds.append({"$ref": f"#/$defs/block.{name}"})
    defs["TemplateInstance"] = {
        "type": "object", "description": "an instance of a template (type: template name)",
        "properties": {"type": {"type": "string", "not": {"enum": sorted(blocks)}}, "in": _IN, "stage": _STAGE},
        "required": ["type"], "additionalProperties": False,
    }
    group = _model(GroupSpec, defs)
    group["anyOf"] = [{"required": ["repeat"]}, {"required": ["pattern"]}]
    defs["Group"] = group
    defs["Node"] = {"anyOf": node_kinds + [{"$ref": "#/$defs/TemplateInstance"}, {"$ref": "#/$defs/Group"}]}
    schema["properties"]["nodes"] = {"type": "object", "additionalProperties": {"$ref": "#/$defs/Node"}}
    template = copy.deepcopy(_model(TemplateSpec, defs))
    template["properties"]["nodes"] = {"type": "object", "additionalProperties": {"$ref": "#/$defs/Node"}}
    defs["TemplateSpec"] = template
    schema["$defs"] = defs
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "MAD topology"
    return schema
