"""The JSON Schema of the topology language accepts every shipped topology and rejects unknown fields."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from mad.schema import topology_schema

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "topologies").glob("**/*.yaml"))


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = topology_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_there_are_shipped_topologies():
    assert ROOT / "topologies" / "examples" / "tiny.yaml" in SHIPPED


def test_schema_is_json_and_names_every_block():
    from mad.block import block_types

    schema = json.loads(json.dumps(topology_schema()))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False
    refs = {r["$ref"] for r in schema["$defs"]["Node"]["anyOf"]}
    assert {f"#/$defs/block.{name}" for name in block_types()} <= refs
    assert {"#/$defs/TemplateInstance", "#/$defs/Group"} <= refs
    assert schema["$defs"]["block.linear"]["properties"]["type"] == {"const": "linear"}


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_shipped_topology_is_valid(validator, path):
    doc = load(path)
    if "name" not in doc:
        pytest.skip("a template library, not a topology")
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    assert errors == []


@pytest.mark.parametrize("mutate, where", [
    (lambda d: d.__setitem__("nodez", {}), ""),
    (lambda d: d["nodes"]["lm_head"].__setitem__("bais", True), "nodes/lm_head"),
    (lambda d: d["nodes"]["blocks"].__setitem__("reapeat", 3), "nodes/blocks"),
    (lambda d: d["templates"]["block"]["nodes"]["norm"].__setitem__("epss", 1e-5), "templates/block/nodes/norm"),
    (lambda d: d["inputs"]["tokens"].__setitem__("dtyp", "int32"), "inputs/tokens"),
    (lambda d: d["templates"]["block"].__setitem__("outputs", "ffn"), "templates/block"),
])
def test_unknown_field_is_rejected(validator, mutate, where):
    doc = load(ROOT / "topologies" / "examples" / "tiny.yaml")
    assert list(validator.iter_errors(doc)) == []
    bad = copy.deepcopy(doc)
    mutate(bad)
    errors = list(validator.iter_errors(bad))
    assert len(errors) == 1
    assert "/".join(map(str, errors[0].absolute_path)) == where


def test_wrong_values_are_rejected(validator):
    doc = load(ROOT / "topologies" / "examples" / "tiny.yaml")
    for mutate in (lambda d: d.__setitem__("mad", 2),
                   lambda d: d["inputs"]["tokens"].__setitem__("dtype", "int64"),
                   lambda d: d["nodes"]["lm_head"].__setitem__("bias", "maybe"),
                   lambda d: d.pop("name")):
        bad = copy.deepcopy(doc)
        mutate(bad)
        assert list(validator.iter_errors(bad)), bad


def test_committed_schema_is_current(monkeypatch):
    """`mad.schema.json` (referenced by the shipped topologies for editors) equals `mad schema`
    (with MAD's own blocks only: other tests register theirs)."""
    import mad.block

    own = {k: v for k, v in mad.block.block_types().items() if v.__module__.startswith("mad.blocks")}
    monkeypatch.setattr(mad.block, "BLOCKS", own)
    committed = json.loads((Path(__file__).parent.parent / "mad.schema.json").read_text())
    assert committed == topology_schema(), "run: mad schema > mad.schema.json"
