"""Views derived from the graph: summary table, graph.json / .mmd / .dot, plan.json, atomic build dirs."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import networkx as nx
from rich.console import Console
from rich.table import Table

from .dims import DimVal, shape_str
from .graph import Graph, summary_rows
from .program import Program


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def totals(graph: Graph) -> str:
    return (f"Parameters: {graph.param_count():,}    "
            f"Recurrent state: {human_bytes(graph.state_bytes())} per sequence (float32, {graph.state_bytes():,} bytes)")


def summary_table(graph: Graph) -> Table:
    table = Table(title=f"{graph.name}", show_lines=False)
    for col, just in (("node", "left"), ("type", "left"), ("shape", "left"), ("concrete", "left"),
                      ("params", "right"), ("state", "right")):
        table.add_column(col, justify=just)
    for r in summary_rows(graph):
        table.add_row(r["node"], r["type"], r["shape"], r["concrete"], f"{r['params']:,}" if r["params"] else "",
                      human_bytes(r["state_bytes"]) if r["state_bytes"] else "")
    table.caption = totals(graph)
    return table


def summary_text(graph: Graph) -> str:
    console = Console(file=io.StringIO(), width=160, color_system=None, force_terminal=False)
    console.print(summary_table(graph))
    return console.file.getvalue()


def _plain(value: Any) -> Any:
    if isinstance(value, DimVal):
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def graph_json(graph: Graph) -> dict:
    """networkx node-link data with JSON-safe attributes."""
    h = nx.DiGraph()
    for n, d in graph.g.nodes(data=True):
        attrs = {"kind": d.get("kind", "block"), "source": str(d["source"]), "shape": shape_str(d["type"].shape),
                 "dtype": d["type"].dtype}
        if d.get("kind") == "block":
            attrs.update(block_type=d["block_type"], stage=d["stage"],
                         spec=_plain(d["spec"].model_dump(by_alias=True, exclude_none=True)),
                         params={k: list(v) for k, v in d["params"].items()},
                         state={k: {"shape": shape_str(t.shape), "dtype": t.dtype} for k, t in d["state"].items()})
        h.add_node(n, **attrs)
    for u, v, d in graph.g.edges(data=True):
        h.add_edge(u, v, ports=d["ports"], shape=shape_str(d["type"].shape), dtype=d["type"].dtype)
    data = nx.node_link_data(h, edges="edges")
    data["graph"] = {"name": graph.name, "outputs": graph.outputs}
    return data


def _ids(graph: Graph) -> dict[str, str]:
    return {n: f"n{i}" for i, n in enumerate(graph.g.nodes)}


def mermaid(graph: Graph) -> str:
    ids = _ids(graph)
    lines = ["flowchart TD"]
    for n, d in graph.g.nodes(data=True):
        kind = d.get("block_type", "input")
        lines.append(f'  {ids[n]}["{n}<br/><i>{kind}</i>"]')
    for u, v, d in graph.g.edges(data=True):
        lines.append(f'  {ids[u]} -->|"{shape_str(d["type"].shape)}"| {ids[v]}')
    for name, node in graph.outputs.items():
        lines.append(f'  out_{name}(["{name}"])')
        lines.append(f"  {ids[node]} --> out_{name}")
    return "\n".join(lines) + "\n"


def dot(graph: Graph) -> str:
    lines = [f'digraph "{graph.name}" {{', "  rankdir=TB; node [shape=box, fontname=Helvetica];"]
    for n, d in graph.g.nodes(data=True):
        lines.append(f'  "{n}" [label="{n}\\n{d.get("block_type", "input")}"];')
    for u, v, d in graph.g.edges(data=True):
        lines.append(f'  "{u}" -> "{v}" [label="{shape_str(d["type"].shape)}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_atomic_dir(out: str | Path, files: dict[str, str]) -> None:
    """Write files into a temp folder beside `out`, then swap it in: never a half-written build."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, text in files.items():
            (tmp / name).write_text(text)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_files(program: Program) -> dict[str, str]:
    graph = program.graph
    return {
        "resolved.yaml": graph.resolved.to_yaml(),
        "graph.json": json.dumps(graph_json(graph), indent=1),
        "graph.mmd": mermaid(graph),
        "graph.dot": dot(graph),
        "plan.json": json.dumps(program.plan(), indent=1),
        "summary.txt": summary_text(graph),
    }


def write_atomic_file(path: str | Path, write) -> None:
    """Call `write(tmp_path)` then rename onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


