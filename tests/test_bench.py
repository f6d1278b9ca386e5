"""`mad bench`: the mlx_lm.benchmark output format, --json, and argument errors."""

from __future__ import annotations

import json

import pytest
from yaml_files import cli

from mad.kernels import registry


@pytest.fixture(autouse=True)
def restore_kernel_policy():
    yield
    registry.set_policy(None)  # --kernels sets it for the process

TINY = "topologies/examples/tiny.yaml"


def test_bench_text_output(monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "bench", TINY, "-p", "9", "-g", "3", "-n", "2", "--prefill-step", "4")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == "Running warmup.."
    assert lines[1] == "Timing with prompt_tokens=9, generation_tokens=3, batch_size=1."
    for i, line in enumerate(lines[2:4], 1):
        assert line.startswith(f"Trial {i}:  prompt_tps=") and "generation_tps=" in line and "peak_memory=" in line
    assert lines[4].startswith("Averages: prompt_tps=") and lines[5].startswith("Medians:  prompt_tps=")


def test_bench_json(monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "bench", TINY, "-p", "5", "-g", "2", "-b", "3", "-n", "3", "--json",
                         "--kernels", "reference", "--dtype", "bfloat16")
    assert code == 0, err
    result = json.loads(out)
    assert result["batch_size"] == 3 and len(result["trials"]) == 3 and result["kernels"] == "reference"
    assert result["dtype"] == "mlx.core.bfloat16"
    for key in ("prompt_tps", "generation_tps", "peak_memory"):
        values = sorted(t[key] for t in result["trials"])
        assert result["medians"][key] == values[1] and values[0] > 0


def test_bench_bad_arguments(monkeypatch, capsys):
    for args, message in ((("-p", "0"), "--prompt-tokens must be at least 1"),
                          (("--kernels", "fast"), "--kernels must be auto or reference"),
                          (("-g", "-1"), "--generation-tokens must be at least 0")):
        code, _, err = cli(monkeypatch, capsys, "bench", TINY, *args)
        assert code == 2 and message in err and "Traceback" not in err


def test_bench_profile(monkeypatch, capsys):
    """--profile: a table per stage and per block type after the figures; --json carries the same numbers,
    whose parameters and state bytes add up to the graph's."""
    from mad.graph import build_graph
    from mad.topology import load_topology

    code, out, err = cli(monkeypatch, capsys, "bench", TINY, "-p", "6", "-g", "2", "-n", "1", "--profile")
    assert code == 0, err
    assert out.index("Medians:") < out.index("Time per stage: prompt of 6 tokens") < out.index("Time per block type")
    for name in ("embedding", "blocks.0", "lm_head", "swiglu", "rmsnorm", "total"):
        assert name in out

    topology = "topologies/xlstm-tiny.yaml"
    code, out, err = cli(monkeypatch, capsys, "bench", topology, "-p", "5", "-g", "1", "-n", "1", "-b", "2",
                         "--profile", "--json")
    assert code == 0, err
    result = json.loads(out)
    profile = result["profile"]
    graph = build_graph(load_topology(topology))
    assert profile["prompt_tokens"] == 5 and profile["batch_size"] == 2 and result["medians"]
    assert [e["stage"] for e in profile["stages"]] == [name for name, _ in graph.stages()]
    assert sum(e["params"] for e in profile["stages"]) == graph.param_count()
    assert sum(e["state_bytes"] for e in profile["stages"]) == graph.state_bytes() > 0
    assert sum(t["params"] for t in profile["block_types"].values()) == graph.param_count()
    assert sum(t["nodes"] for t in profile["block_types"].values()) == len(graph.blocks())
    assert profile["block_types"]["mlstm_cell"]["state_bytes"] == graph.state_bytes()
    assert all(e["seconds"] > 0 for e in profile["stages"])
    assert abs(sum(t["seconds"] for t in profile["block_types"].values()) - profile["seconds"]) < 1e-9


@pytest.mark.parametrize("topology, tied", [(TINY, True), ("topologies/xlstm-tiny.yaml", False)])
def test_bench_limits(monkeypatch, capsys, topology, tied):
    """--limits: the device rates, and fractions that follow from the medians and the model's sizes: a decode
    step reads every weight but an untied embedding's (only its rows are read; a tied head reads it all), and
    a prompt token costs two FLOPs per such weight."""
    from mad.graph import build_graph
    from mad.topology import load_topology

    code, out, err = cli(monkeypatch, capsys, "bench", topology, "-p", "6", "-g", "3", "-n", "1", "-b", "2",
                         "--limits", "--json", "--dtype", "bfloat16")
    assert code == 0, err
    result = json.loads(out)
    graph = build_graph(load_topology(topology))
    g = graph.g
    embedding = [n for n in graph.blocks() if g.nodes[n]["block_type"] == "embedding"]
    vocab, dim = g.nodes[embedding[0]]["spec"].vocab, g.nodes[embedding[0]]["spec"].dim
    read = graph.param_count() - (0 if tied else vocab * dim)
    costs, lim, frac, med = result["costs"], result["limits"], result["fractions"], result["medians"]
    assert costs["weight_bytes"] == 2 * read  # bfloat16
    assert costs["flops_per_token"] == 2 * read
    assert costs["state_bytes"] == graph.state_bytes()
    step = costs["weight_bytes"] + 2 * 2 * costs["state_bytes"]
    assert frac["decode_bytes_per_step"] == step
    assert abs(frac["decode_fraction"] - step * med["generation_tps"] / 2 / lim["copy_bytes_per_s"]) < 1e-12
    assert abs(frac["prefill_fraction"] - med["prompt_tps"] * costs["flops_per_token"] / lim["matmul_flops_per_s"]) < 1e-12
    assert lim["copy_bytes_per_s"] > 0 and lim["matmul_flops_per_s"] > 0 and lim["matmul_dtype"] == "bfloat16"

    code, out, err = cli(monkeypatch, capsys, "bench", topology, "-p", "4", "-g", "2", "-n", "1", "--limits")
    assert code == 0, err
    assert "Device: copy " in out and "% of the copy rate" in out and "% of the matmul rate" in out
