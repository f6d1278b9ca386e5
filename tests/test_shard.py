"""Tensor parallelism (`mad.shard`): the pass's decisions, and sharded models against single-process ones.

The pass is checked in this process on both families' tiny topologies (pure Python: which node splits how,
the inserted collectives, what a member holds). The sharded runs are groups of 2 and 4 processes over the
ring backend on localhost, each running this file as a worker (`python tests/test_shard.py worker ...`,
started with the environment `mlx.launch` gives its processes; `mad run --tensor-parallel` is run through
`mlx.launch` itself): every member loads the tiny checkpoints of both families (tests/fixtures/hf-tiny,
nxai-tiny) split over the group and, in the same process, the single-process model from the same files,
and compares their logits in every mode, prefill then steps, and state files both ways; each member writes
its results to a JSON file that the test reads.

The bound: a member computes the same sums as the single process, except that a dot product over a split
dim is summed in n partial sums, added by an all_sum, in another order: the sharded model is another
float32 evaluation order of the same model. On well-conditioned inputs (fresh weights) reordering moves the
logits by a few eps of their scale (about 1e-6 measured): BOUND = 64 eps of the scale. The fixtures'
gates are spread on purpose (tests/test_xlstm_hf.py), so that any float32 evaluation order differs from the
exact model by more: there, with e the single process's own float32 error on the same input (measured
against the fixture's float64 reference, golden.safetensors), two float32 orders may differ by up to about
2 e (each is about e from the exact model), and the bound is 2 e when that is larger. Real mistakes
(a head given to the wrong member, a bias added by every member, a fused projection cut in the wrong place)
move the logits by far more (`mutated plan is caught` checks one such mistake).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HF_TINY = ROOT / "tests" / "fixtures" / "hf-tiny"
NXAI_TINY = ROOT / "tests" / "fixtures" / "nxai-tiny"
EPS = 2.0 ** -23
BOUND = 64 * EPS


# ----------------------------------------------------------------------------------------- launching
def _env() -> dict:
    return dict(os.environ, MAD_BLAS="mlx", MLX_ENABLE_TF32="0", PYTHONPATH=str(ROOT))


def launch(n: int, out: Path, *case: str, timeout: float = 240) -> list[dict]:
    """Run this file's worker on the `n` members of a ring group on localhost; every member's results.

    The members are started as `mlx.launch -n N --backend ring` starts them (MLX_HOSTFILE, MLX_RANK; the
    test of `mad run --tensor-parallel` goes through mlx.launch itself), without its launcher process,
    whose I/O loop polls and takes a core of a 2-core machine from the members."""
    procs = spawn(n, list(range(n)), out, *case)
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for r in range(n):
        file = out / f"rank{r}.json"
        assert file.is_file(), f"member {r} wrote no results (exit {procs[r].returncode}):\n{outs[r][1][-3000:]}"
        results.append(json.loads(file.read_text()))
    return results


def spawn(n: int, ranks: list[int], out: Path, *case: str) -> list[subprocess.Popen]:
    """Start members `ranks` of a group of `n` with the environment mlx.launch gives them."""
    from mad.shard import free_ports

    base = free_ports(n)
    hosts = out / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{base + i}"] for i in range(n)]))
    return [subprocess.Popen([sys.executable, str(Path(__file__)), "worker", str(out), *case],
                             env=dict(_env(), MLX_HOSTFILE=str(hosts), MLX_RANK=str(r)), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in ranks]


def assert_all_ok(results: list[dict]) -> None:
    failed = [f"member {r}: {name}: {res['detail']}" for r, rs in enumerate(results)
              for name, res in rs["checks"].items() if not res["ok"]]
    assert not failed, "\n".join(failed)


# ----------------------------------------------------------------------------------------- the pass (in process)
def _graph(path: Path | str, *overrides: str):
    import mad

    return mad.build_graph(mad.load_topology(str(path), list(overrides)))


def test_plan_of_the_xlstm_7b_family():
    from mad.shard import FULL, PARTIAL, Split, plan_shards

    g = _graph(ROOT / "topologies" / "xlstm-tiny.yaml")  # D 64, NH 4, QK 32, VD 64, F 192
    plan = plan_shards(g, 2)
    how = {n: p.how for n, p in plan.nodes.items()}
    b = "backbone.blocks.1."
    for node in ("q", "k", "v", "ogate_preact", "igate_preact", "fgate_preact"):
        assert how[b + "mlstm_layer." + node] == "columns"
    assert plan.nodes[b + "mlstm_layer.q"].out == Split((32,))
    assert plan.nodes[b + "mlstm_layer.igate_preact"].out == Split((4,))
    assert how[b + "mlstm_layer.cell"] == how[b + "mlstm_layer.multihead_norm"] == "heads"
    assert set(plan.nodes[b + "mlstm_layer.cell"].state) == {"C", "n", "m"}
    assert how[b + "mlstm_layer.out_proj"] == how[b + "ffn.proj_down"] == "rows"
    assert plan.nodes[b + "ffn.proj_down"].out == PARTIAL
    assert how[b + "ffn.proj_up_gate"] == how[b + "ffn.proj_up"] == "columns"
    for node in ("backbone.embeddings", b + "norm_mlstm", b + "mlstm_residual", b + "norm_ffn",
                 "backbone.out_norm", "lm_head"):
        assert how[node] == "replicated" and plan.nodes[node].out == FULL
    # one all_sum after each projection out of the heads, nothing else: 2 a block
    assert sorted(c.kind for c in plan.conversions.values()) == ["all_sum"] * 4
    assert plan.summary()["payload_bytes_per_token"] == 4 * 64 * 4
    assert plan.fallbacks == {}


def test_plan_of_the_original_xlstm_stack():
    from mad.shard import PARTIAL, Split, plan_shards

    g = _graph(ROOT / "topologies" / "xlstm-v1-tiny.yaml")  # D 64, I 128, 4 heads, sLSTM at 1 and 3, F 128
    plan = plan_shards(g, 2)
    nodes = plan.nodes
    m, s = "xlstm_block_stack.blocks.0.xlstm.", "xlstm_block_stack.blocks.1."
    # the up-projection is cut in two segments, so that [x | z] slices give each member its halves of both
    assert nodes[m + "proj_up"].how == "columns" and nodes[m + "proj_up"].out == Split((128, 128))
    assert nodes[m + "x_mlstm"].out == nodes[m + "z"].out == Split((128,))
    assert nodes[m + "x_mlstm"].fields == {"start": 0, "size": 64}
    assert nodes[m + "z"].fields == {"start": 64, "size": 64}
    for node in ("conv1d", "conv_act_fn", "learnable_skip", "skip", "ogate_act_fn"):
        assert nodes[m + node].how == "channels", node
    for node in ("q_proj", "k_proj", "v_proj", "mlstm_cell.cell", "mlstm_cell.outnorm"):
        assert nodes[m + node].how == "heads", node
    assert nodes[m + "mlstm_cell.qkv"].out == Split((128, 128, 128))
    # the i/f gates read [q k v] of every head: a partial product each, summed; each member slices its heads
    for gate in ("igate", "fgate"):
        assert nodes[m + f"mlstm_cell.{gate}"].how == "rows" and nodes[m + f"mlstm_cell.{gate}"].out == PARTIAL
        assert f"{m}mlstm_cell.{gate}@all_sum@shard" in plan.conversions
    # the sLSTM layer: heads with their recurrent weights, gathered after the group norm (it joins the residual)
    for node in ("xlstm.fgate", "xlstm.igate", "xlstm.zgate", "xlstm.ogate", "xlstm.slstm_cell", "xlstm.group_norm"):
        assert nodes[s + node].how == "heads", node
    assert set(nodes[s + "xlstm.slstm_cell"].weights) == {"recurrent_kernel", "bias"}
    assert plan.conversions[s + "xlstm.group_norm@all_gather"].kind == "all_gather"
    assert nodes[s + "xlstm.conv1d"].how == "channels" and nodes[s + "xlstm.conv1d"].reads == [Split((64,))]
    assert nodes[s + "ffn.proj_up"].out == Split((128, 128)) and nodes[s + "ffn.proj_down"].how == "rows"
    # the i and f gates share one all_sum (of 2 NH values), each then takes its part
    joint = plan.conversions[m + "mlstm_cell.igate@joint_all_sum"]
    assert joint.reads == (m + "mlstm_cell.igate", m + "mlstm_cell.fgate")
    assert plan.conversions[m + "mlstm_cell.fgate@all_sum"].segments == (4, 4)
    kinds = sorted(c.kind for c in plan.conversions.values())
    assert kinds.count("all_sum") == 3 * 2 + 2 and kinds.count("all_gather") == 2


def test_heads_that_the_group_does_not_divide_are_an_error():
    from mad.errors import MadError
    from mad.shard import plan_shards

    for topology, node in (("xlstm-tiny.yaml", "backbone.blocks.0.mlstm_layer.cell"),
                           ("xlstm-v1-tiny.yaml", "xlstm_block_stack.blocks.0.xlstm.mlstm_cell.cell")):
        try:
            plan_shards(_graph(ROOT / "topologies" / topology), 3)
        except MadError as e:
            text = e.render()
            assert f"node '{node}' (mlstm_cell) has 4 heads, which 3 members cannot share" in text, text
            assert "group sizes that divide 4: 1, 2, 4" in text
        else:
            raise AssertionError(f"{topology} over 3 members should fail")


def test_sizes_that_do_not_divide_fall_back_to_replication():
    from mad.shard import plan_shards

    plan = plan_shards(_graph(ROOT / "topologies" / "examples" / "tiny.yaml"), 3)  # swiglu hidden 176
    assert plan.nodes["blocks.0.ffn"].how == "replicated"
    assert plan.fallbacks["blocks.0.ffn"] == "3 members cannot share its 176 hidden units"
    assert plan.conversions == {}
    split = plan_shards(_graph(ROOT / "topologies" / "examples" / "tiny.yaml"), 2)
    assert split.nodes["blocks.0.ffn"].how == "hidden" and split.fallbacks == {}


def test_a_plugin_block_splits_by_what_it_declares():
    """The pass knows no block class: a user's elementwise block with a weight per channel is split between
    two linears when it declares channels, run whole (and the linears too) when it declares nothing, and a
    declaration that does not fit its weights is an error naming the node."""
    import mlx.core as mx
    import mlx.nn as nn

    import mad
    from mad.block import Cut, SplitHeads
    from mad.errors import MadError
    from mad.shard import plan_shards
    from mad.testing import build_dict

    class Scale(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.scale = mx.ones((dim,))

        def __call__(self, x):
            return mx.tanh(x) * self.scale

    def block(name: str, weights: dict | None):
        @mad.register(name)
        class ScaledTanh(mad.Block):
            positionwise = True

            def infer(self, x):
                return x

            def build(self, x):
                return Scale(int(x.shape[-1]))

            def shard_rule(self, x):
                return None if weights is None else SplitHeads.channels(int(x.shape[-1]), weights)

        return ScaledTanh

    def plan(kind: str):
        topology = {"mad": 1, "name": "plugin", "dims": {"B": "batch", "T": "seq", "V": 16, "D": 8},
                    "inputs": {"tokens": {"shape": ["B", "T"], "dtype": "int32"}},
                    "nodes": {"embedding": {"type": "embedding", "vocab": "V", "dim": "D"},
                              "up": {"type": "linear", "out": 32}, "act": {"type": kind},
                              "down": {"type": "linear", "out": "D"}, "lm_head": {"type": "linear", "out": "V"}},
                    "outputs": {"logits": "lm_head"}}
        return plan_shards(build_dict(topology), 2)

    block("test_shard_channels", {"scale": Cut(0)})
    block("test_shard_nothing", None)
    block("test_shard_wrong", {"gain": Cut(0)})
    split = plan("test_shard_channels")
    assert [split.nodes[n].how for n in ("up", "act", "down")] == ["columns", "channels", "rows"]
    assert set(split.nodes["act"].weights) == {"scale"}
    whole = plan("test_shard_nothing")
    assert [whole.nodes[n].how for n in ("up", "act", "down")] == ["replicated"] * 3
    try:
        plan("test_shard_wrong")
    except MadError as e:
        assert "node 'act' (test_shard_wrong) declares a shard rule that does not fit it: weight 'gain' is not one " \
               "of its weights (scale)" in str(e), str(e)
    else:
        raise AssertionError("a declaration naming a weight the block lacks should fail")


def test_member_graphs_hold_the_slices_of_every_weight():
    """Every split weight of the members, put back together, is the whole weight; the member programs
    build from their graphs (no group needed to build)."""
    import mlx.core as mx
    import numpy as np

    from mad.program import Program
    from mad.shard import plan_shards

    g = _graph(ROOT / "topologies" / "xlstm-v1-tiny.yaml")
    full = Program(g, compile="none", fuse=False).parameters()
    n = 2
    plan = plan_shards(g, n)
    members = []
    for r in range(n):
        local = Program(plan.local_graph(r), compile="none")
        shapes = {k: tuple(v.shape) for k, v in local.parameters().items()}
        members.append(plan.shard_weights(dict(full), shapes, r))
    # independent slicing with numpy: proj_up [2I, D] -> rows of x then of z; the sLSTM bias [4 * NH * DH]
    # is gate-major: each member its heads of each of the four gates; the row-split gates' bias on member 0
    W = np.array(full["xlstm_block_stack.blocks.0.xlstm.proj_up.weight"])
    for r in range(n):
        want = np.concatenate([W[r * 64:(r + 1) * 64], W[128 + r * 64:128 + (r + 1) * 64]])
        np.testing.assert_array_equal(np.array(members[r]["xlstm_block_stack.blocks.0.xlstm.proj_up.weight"]), want)
    bias = np.array(full["xlstm_block_stack.blocks.1.xlstm.slstm_cell.bias"]).reshape(4, 4, 16)
    for r in range(n):
        want = bias[:, r * 2:(r + 1) * 2].reshape(-1)
        np.testing.assert_array_equal(np.array(members[r]["xlstm_block_stack.blocks.1.xlstm.slstm_cell.bias"]), want)
    gate = "xlstm_block_stack.blocks.0.xlstm.mlstm_cell.igate"
    assert f"{gate}.bias" in members[0] and f"{gate}.bias" not in members[1]
    # every member's params add up to the whole model's (split ones once, replicated ones on every member)
    for name, w in full.items():
        parts = [m[name] for m in members if name in m]
        if all(p.shape == w.shape for p in parts):
            for p in parts:
                assert mx.array_equal(p, w), name
        else:
            assert sum(p.size for p in parts) == w.size, name
    assert plan.member_params() == sum(v.size for v in members[0].values())


def test_take_and_assemble_are_inverse():
    """A member's pieces of an axis (several blocks, several segments) and their reassembly."""
    import mlx.core as mx

    from mad.block import Cut
    from mad.shard import assemble, pieces, take

    x = mx.arange(2 * 3 * 48).reshape(2, 48, 3)  # axis 1: 4 blocks (gates) x 6 heads of width 2
    n = 3
    parts = pieces(48, Cut(1, groups=4), 6, (3, 3), n)  # heads in two segments of 3: each member 1 + 1 heads
    members = [take(x, 1, parts, r) for r in range(n)]
    assert members[1].shape == (2, 16, 3)
    assert members[1][0, :4, 0].tolist() == [x[0, 2, 0].item(), x[0, 3, 0].item(), x[0, 8, 0].item(), x[0, 9, 0].item()]
    assert mx.array_equal(assemble(mx.stack(members), 1, parts, n), x)


def test_a_group_of_one_is_the_single_process(on_cpu):
    """Over a group of one member (this process), the pass still runs and inserts its all_sums: the model
    is the single process's, the same float32 operations in the same order."""
    import mlx.core as mx

    import mad
    from mad import shard

    group = mx.distributed.init()  # not launched: a group of one
    assert group.size() == 1
    single, _ = mad.load(NXAI_TINY)
    sharded, _ = shard.load_sharded(NXAI_TINY, group)
    assert any(n.endswith("@all_sum") for n in sharded.program.nodes)
    tokens = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    for mode in ("parallel", "step"):
        assert mx.array_equal(single(tokens, mode=mode)[0], sharded(tokens, mode=mode)[0]).item(), mode
    s = shard.sharding_of(sharded)
    assert s.weight_bytes == sum(w.nbytes for w in single.program.parameters().values())


def test_mad_build_prints_the_plan(monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "tests"))
    from yaml_files import cli

    code, out, err = cli(monkeypatch, capsys, "build", str(ROOT / "topologies" / "xlstm-v1-tiny.yaml"), "--shard", "2")
    assert code == 0, err
    assert "xlstm-v1-tiny over 2 members (tensor parallel)" in out
    assert "heads + all_gather" in out and "rows + all_sum" in out
    assert "per token: all_sum x8, all_gather x2" in " ".join(out.split())
    # a quantized checkpoint splits where every member multiplies whole groups: I / 2 = 64 inputs at most
    assert "quantized (mad convert -q), it splits in groups of 16, 32 or 64 inputs" in " ".join(out.split())
    code, out, err = cli(monkeypatch, capsys, "build", str(ROOT / "topologies" / "xlstm-tiny.yaml"), "--shard", "3")
    assert code == 2 and "Traceback" not in err
    assert "has 4 heads, which 3 members cannot share" in err
    code, out, err = cli(monkeypatch, capsys, "build", str(ROOT / "topologies" / "xlstm-tiny.yaml"), "--shard", "0")
    assert code == 2 and "--shard must be at least 1, got 0" in err


# ----------------------------------------------------------------------------------------- sharded runs
def _other_checkpoints(tmp: Path) -> tuple[Path, Path]:
    """hf-tiny with one replicated weight changed (same shapes), and a folder that does not exist."""
    import mlx.core as mx

    other = tmp / "hf-other"
    shutil.copytree(HF_TINY, other)
    w = mx.load(str(other / "model.safetensors"))
    w["backbone.embeddings.weight"] = w["backbone.embeddings.weight"] * 1.001
    mx.save_safetensors(str(other / "model.safetensors"), w)
    return other, tmp / "missing"


def test_two_members_match_the_single_process_model(tmp_path):
    other, missing = _other_checkpoints(tmp_path)
    results = launch(2, tmp_path, "main", "fresh", "mutation", "collectives", f"errors={other},{missing}")
    assert_all_ok(results)
    # the errors every member raised, as the user sees them
    errors = [r["errors"] for r in results]
    for e in errors:  # every member raises, naming the member that differs (and its own path)
        assert "member(s) 1 loaded other weights (the checkpoints differ) than member 0" in e["content"]
    assert "member(s) 1 loaded other model (sizes, weights' names and shapes, dtype)" in errors[0]["dtype"]
    assert "no such file or folder" in errors[1]["missing"]
    assert "member(s) 1 of 2 could not load" in errors[0]["missing"]


def test_four_members_match_the_single_process_model(tmp_path):
    results = launch(4, tmp_path, "main", "no-state-files")  # the files' logic does not depend on n
    assert_all_ok(results)
    assert len(results[3]["checks"]) == 6


def test_a_member_that_dies_or_never_starts_is_an_error_not_a_hang(tmp_path):
    def finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
        try:
            return [p.communicate(timeout=timeout) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()

    outs = finish(spawn(2, [0, 1], tmp_path, "die"), 120)
    lost = json.loads((tmp_path / "rank0.json").read_text())["lost"]
    assert "connection to a peer was lost" in lost, (lost, outs)
    # a group whose second member never starts: joining it times out, with the reason
    (tmp_path / "rank0.json").unlink()
    procs = spawn(2, [0], tmp_path, "alone")
    ((out, err),) = finish(procs, 60)
    assert procs[0].returncode != 0 and not (tmp_path / "rank0.json").exists()
    assert "joining the group took more than 2 s: a member of the group did not start" in err, err


def test_a_lost_member_ends_a_command_with_a_mad_error():
    """The backend's error for a lost member, raised anywhere in a `--tensor-parallel` command, is printed
    as a MAD error with exit code 2 and no traceback."""
    code = ("from mad.shard import _report_lost_members; _report_lost_members(); "
            "raise RuntimeError('[ring] connection to a peer was lost')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=_env())
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("error: tensor parallel: a member of the group was lost ([ring] connection to a peer "
                                "was lost)")


def test_mad_run_tensor_parallel_and_its_state_file(tmp_path):
    """`mad run --tensor-parallel` on two members prints what a single process prints, and its state file
    is the single process's (read by `mad.loading.load_state_file` against the single-process model)."""
    import mlx.core as mx

    from mad.loading import load, load_state_file
    from mad.shard import free_ports

    state = tmp_path / "state.safetensors"
    launcher = Path(sys.executable).with_name("mlx.launch")
    args = ["run", str(HF_TINY), "--prompt-ids", "1,5,9,12,3", "--tokenizer", "bytes", "-m", "6"]
    cmd = [str(launcher), "-n", "2", "--backend", "ring", "--starting-port", str(free_ports(2)), "--python",
           sys.executable, "--", "-m", "mad.cli", *args, "--tensor-parallel", "--save-state", str(state)]
    tp = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT, env=_env())
    assert tp.returncode == 0, tp.stderr
    single = subprocess.run([sys.executable, "-m", "mad.cli", *args, "--save-state", str(tmp_path / "own.safetensors")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT, env=_env())
    assert single.returncode == 0, single.stderr
    assert tp.stderr.count("Tensor parallel: 2 members; weights per member") == 1  # member 0 reports
    assert tp.stdout.splitlines()[0] == single.stdout.splitlines()[0]  # the same ids, printed once
    model, _ = load(HF_TINY)
    theirs, own = load_state_file(state, model), load_state_file(tmp_path / "own.safetensors", model)
    for node, entries in own.items():
        for k, v in entries.items():  # two float32 orders of the same steps (about 10 eps apart, measured)
            scale = max(1.0, float(mx.abs(v).max()))
            assert float(mx.abs(theirs[node][k] - v).max()) <= BOUND * scale, (node, k)


def test_bench_shard_quick(tmp_path):
    """benchmarks/bench_shard.py --quick: `mad bench --tensor-parallel --json` on 2 members beside one process
    (timings are not checked: what the members hold and what a token's collectives cost are)."""
    out = tmp_path / "shard.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_shard.py"), "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=_env())
    assert r.returncode == 0, r.stderr
    one, two = json.loads(out.read_text())["runs"]
    assert (one["members"], two["members"]) == (1, 2)
    assert two["collectives_per_token"] == 3 * 2 + 2 + 2  # xlstm-v1-tiny: see test_plan_of_the_original_xlstm_stack
    assert len(two["weight_gb_per_member"]) == 2 and max(two["weight_gb_per_member"]) < one["weight_gb_per_member"][0]
    assert one["prompt_tps"] > 0 and two["generation_tps"] > 0


def test_bench_shard_serve_quick(tmp_path):
    """benchmarks/bench_shard.py --quick --serve: `mad serve` on one process and on 2 members (`--tensor-parallel`),
    2 clients at once; only that every round completes is checked (and that the clients got tokens)."""
    import pytest

    pytest.importorskip("uvicorn")
    out = tmp_path / "serve.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_shard.py"), "--quick", "--serve", "2", "--json",
                        str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT, env=_env())
    assert r.returncode == 0, r.stderr
    runs = json.loads(out.read_text())["serve_runs"]
    assert [(x["members"], x["clients"]) for x in runs] == [(1, 2), (2, 2)]
    assert all(x["tokens_per_s"] > 0 for x in runs)


# ----------------------------------------------------------------------------------------- the worker
def _worker(out: Path, cases: list[str]) -> None:
    """One member: run the cases, write rank{r}.json (checks: {name: {ok, detail}}, plus raw messages)."""
    import mlx.core as mx
    import numpy as np

    import mad
    from mad import shard
    from mad.errors import MadError
    from mad.loading import load_state_file, save_state_file

    results: dict = {"checks": {}, "errors": {}}
    rank = int(os.environ.get("MLX_RANK", "0"))

    def write() -> None:
        (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))

    if cases == ["alone"]:
        shard.init_group(timeout=2)  # ended by the watchdog
        results["alone"] = "joined"
        write()
        return
    group = shard.init_group(timeout=60)
    n = group.size()

    def barrier() -> None:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))

    def check(name: str, fn) -> None:
        try:
            results["checks"][name] = {"ok": True, "detail": fn()}
        except Exception as e:  # noqa: BLE001 - reported to the test
            results["checks"][name] = {"ok": False, "detail": f"{type(e).__name__}: {e}"}

    def close(a, b, what="", spread=0.0) -> str:
        """a and b agree within BOUND of their scale, or within `spread` (relative to the scale)."""
        a, b = np.array(a, dtype=np.float32), np.array(b, dtype=np.float32)
        scale = max(1.0, float(np.abs(a).max()))
        bound = max(BOUND, spread) * scale
        diff = float(np.abs(a - b).max())
        assert a.shape == b.shape, f"{what}: shapes {a.shape} vs {b.shape}"
        assert diff <= bound, f"{what}: differs by {diff:.3g}, bound {bound:.3g}"
        return f"{what} {diff:.2g} <= {bound:.2g}"

    def same_on_every_member(x) -> None:
        every = mx.distributed.all_gather(x[None], group=group)
        assert all(mx.array_equal(every[r], every[0]).item() for r in range(n)), "members disagree"

    def flat(state: dict) -> dict:
        return {f"{k}/{j}": v for k, e in state.items() for j, v in e.items()}

    mx.random.seed(1)
    tokens = mx.random.randint(0, 100, (2, 20)).astype(mx.int32)

    def compare(name: str, folder: Path, single, sharded) -> None:
        from safetensors.numpy import load_file

        golden = load_file(str(folder / "golden.safetensors"))
        tokens = mx.array(golden["tokens"])
        exact = golden["logits64"]
        outputs = {mode: single(tokens, mode=mode)[0] for mode in ("parallel", "chunkwise", "step")}
        # two float32 orders: each about the single process's own error e from the exact model, 2 e apart
        spread = 2 * max(float(np.abs(np.array(a) - exact).max()) for a in outputs.values()) / np.abs(exact).max()

        def modes():
            lines = [f"spread {spread:.2g}"]
            for mode, a in outputs.items():
                b, _ = sharded(tokens, mode=mode)
                same_on_every_member(b)
                lines.append(close(a, b, mode, spread))
            return "; ".join(lines)

        check(f"{name}: logits in every mode", modes)
        steps = tokens[:, 13:17]

        def prefill_then_steps():
            la, sa = single.prefill(tokens[:, :13], step_size=5)
            lb, sb = sharded.prefill(tokens[:, :13], step_size=5)
            lines = [close(la, lb, "prefill", spread)]
            for t in range(steps.shape[1]):
                la, sa = single(steps[:, t:t + 1], sa)
                lb, sb = sharded(steps[:, t:t + 1], sb)
                lines.append(close(la, lb, f"step {t}", spread))
            whole = shard.gather_state(sharded, sb)
            for k, v in flat(sa).items():
                lines.append(close(v, flat(whole)[k], k, spread))
            for k, v in flat(shard.shard_state(sharded, sa)).items():
                close(v, flat(sb)[k], f"member's {k}", spread)
            return "; ".join(lines[:6])

        check(f"{name}: prefill then steps, and the state", prefill_then_steps)
        if "no-state-files" in cases:
            return
        la, sa = single.prefill(tokens[:, :13], step_size=5)
        lb, sb = sharded.prefill(tokens[:, :13], step_size=5)
        path = out / f"{name}-sharded.safetensors"
        shard.save_state_file(path, sb, sharded)  # member 0 writes it, every member returns after

        def continue_from(model, state):
            logits = []
            for t in range(steps.shape[1]):
                step, state = model(steps[:, t:t + 1], state)
                logits.append(step)
            return mx.concatenate(logits, axis=1)

        own = continue_from(single, sa)
        check(f"{name}: a sharded run's state file in a single process",
              lambda: close(own, continue_from(single, load_state_file(path, single)), "continued", spread))
        path = out / f"{name}-single.safetensors"
        if rank == 0:
            save_state_file(path, sa)
        barrier()
        check(f"{name}: a single process's state file in a sharded run",
              lambda: close(own, continue_from(sharded, shard.load_state_file(path, sharded)), "continued", spread))

    if "main" in cases:
        for name, folder in (("hf-tiny", HF_TINY), ("nxai-tiny", NXAI_TINY)):
            single, _ = mad.load(folder)
            sharded, _ = mad.load(folder, group=group)  # the public API: mad.load over a group
            compare(name, folder, single, sharded)

            def weights():  # the members' slices put together are the checkpoint's weights, exactly
                whole, own = shard.gather_weights(sharded), single.program.parameters()
                assert whole.keys() == own.keys()
                assert all(mx.array_equal(whole[k], own[k]).item() for k in own), "weights differ"
                return f"{len(own)} weights"

            check(f"{name}: the members' weights make the whole model's", weights)

    if "fresh" in cases:  # a topology: fresh weights, drawn as mad.build draws them
        topology = ROOT / "topologies" / "xlstm-v1-tiny.yaml"
        mx.random.seed(3)
        single = mad.model.LanguageModel(mad.build(topology))
        mx.random.seed(3)
        sharded = mad.model.LanguageModel(mad.build(topology, group=group))

        def fresh():
            mx.random.seed(3)
            staged = mad.model.LanguageModel(shard.build_sharded(topology, group, compile="stage"))
            return "; ".join([close(single(tokens, mode=m)[0], sharded(tokens, mode=m)[0], m)
                              for m in ("parallel", "step")] + [close(single(tokens)[0], staged(tokens)[0], "stages")])

        check("fresh xlstm-v1-tiny: logits, one program or stage by stage", fresh)

        if "mutation" in cases:  # the check can fail: a proj_up cut in one segment instead of [x | z]
            from mad.program import Program
            from mad.shard import Cutting

            plan = shard.sharding_of(sharded).plan
            node = "xlstm_block_stack.blocks.0.xlstm.proj_up"
            plan.nodes[node].weights["weight"] = Cutting(plan.nodes[node].weights["weight"].cut, 256, (256,))
            wrong = Program(plan.local_graph(rank, group), compile="none")
            shapes = {k: tuple(v.shape) for k, v in wrong.parameters().items()}
            wrong.load_weights(plan.shard_weights(single.program.parameters(), shapes, rank))
            a, b = single(tokens)[0], mad.model.LanguageModel(wrong)(tokens)[0]
            diff = float(mx.abs(a - b).max())

            def caught():
                assert diff > 100 * BOUND * max(1.0, float(mx.abs(a).max())), f"only {diff}"
                return f"differs by {diff:.3g}"

            check("mutated plan is caught", caught)

    if "collectives" in cases:  # the inserted nodes on their own, exact
        from mad.blocks.parallel import AllGatherBlock, ShardBlock
        from mad.block import TensorType

        def gather_shard():
            x = mx.random.normal((2, 3, 6 * n + 10 * n), key=mx.random.key(5))
            t = TensorType((2, 3, 16 * n))
            mine = ShardBlock(segments=(6 * n, 10 * n), rank=rank, group=group, members=n).build(t)(x)
            back = AllGatherBlock(segments=(6 * n, 10 * n), group=group, members=n).build(TensorType((2, 3, 16)))(mine)
            assert mx.array_equal(back, x).item()
            want = mx.concatenate([x[..., rank * 6:(rank + 1) * 6],
                                   x[..., 6 * n + rank * 10:6 * n + (rank + 1) * 10]], axis=-1)
            assert mx.array_equal(mine, want).item()
            return "exact"

        check("all_gather of a shard is the value", gather_shard)

    if any(c.startswith("errors=") for c in cases):
        other, missing = next(c for c in cases if c.startswith("errors=")).split("=", 1)[1].split(",")
        for what, kwargs in (("content", {"path": HF_TINY if rank == 0 else Path(other)}),
                             ("dtype", {"path": HF_TINY, "dtype": "float32" if rank == 0 else "bfloat16"}),
                             ("missing", {"path": HF_TINY if rank == 0 else Path(missing)})):
            try:
                shard.load_sharded(kwargs.pop("path"), group, timeout=60, **kwargs)
                results["errors"][what] = "loaded"
            except MadError as e:
                results["errors"][what] = str(e)
        barrier()

    if any(c.startswith("quantized=") for c in cases):  # `mad convert -q` checkpoints, split
        for folder in next(c for c in cases if c.startswith("quantized=")).split("=", 1)[1].split(","):
            folder = Path(folder)
            single, _ = mad.load(folder)
            sharded, _ = mad.load(folder, group=group)

            def quantized_modes():
                lines = []
                for mode in ("parallel", "chunkwise", "step"):
                    b, _ = sharded(tokens, mode=mode)
                    same_on_every_member(b)
                    lines.append(close(single(tokens, mode=mode)[0], b, mode))
                la, sa = single.prefill(tokens[:, :13], step_size=5)
                lb, sb = sharded.prefill(tokens[:, :13], step_size=5)
                lines.append(close(la, lb, "prefill"))
                for t in range(13, 17):
                    la, sa = single(tokens[:, t:t + 1], sa)
                    lb, sb = sharded(tokens[:, t:t + 1], sb)
                    lines.append(close(la, lb, f"step {t}"))
                for k, v in flat(sa).items():
                    close(v, flat(shard.gather_state(sharded, sb))[k], k)
                return "; ".join(lines)

            check(f"{folder.name}: quantized logits in every mode, prefill then steps", quantized_modes)

            def packed():  # the members' packed slices put together are the checkpoint's arrays, exactly
                whole, own = shard.gather_weights(sharded), single.program.parameters()
                assert whole.keys() == own.keys()
                assert all(mx.array_equal(whole[k], own[k]).item() for k in own), "weights differ"
                mine = sharded.program.parameters()
                packed = [k for k, v in mine.items() if v.dtype == mx.uint32]
                assert packed and all(k in own for k in packed)
                cut = [k for k in packed if mine[k].shape != own[k].shape]
                assert any(mine[k].shape[1] * n == own[k].shape[1] for k in cut), "no matrix is cut by its inputs"
                assert any(mine[k].shape[0] * n == own[k].shape[0] for k in cut), "no matrix is cut by its outputs"
                return f"{len(packed)} packed weights, {len(cut)} of them cut"

            check(f"{folder.name}: the members' packed weights make the checkpoint's", packed)

    if cases == ["die"]:
        sharded, _ = shard.load_sharded(HF_TINY, group)
        mx.eval(sharded(tokens)[0])
        if rank == 1:
            os._exit(3)  # a member dies
        try:
            for _ in range(50):
                mx.eval(sharded(tokens)[0])
                time.sleep(0.05)
            results["lost"] = "no error"
        except RuntimeError as e:
            results["lost"] = str(e)
    write()


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "worker":
        _worker(Path(sys.argv[2]), sys.argv[3:])


def test_save_refuses_one_members_part(tmp_path):
    """mad.save of a member's part would write slices under whole-weight names: refused, nothing written."""
    import pytest

    import mad
    from mad.errors import MadError

    model, _ = mad.load(HF_TINY)
    model.program.shard = object()  # what load_sharded leaves on a member's program (mad.shard.sharding_of)
    out = tmp_path / "saved"
    with pytest.raises(MadError, match="one member's part of a tensor-parallel model"):
        mad.save(model, out)
    assert not out.exists()


def _quantized(tmp: Path, topology: str, group_size: int) -> Path:
    """A `mad convert -q` checkpoint (4-bit affine, fresh weights, seed 0) of a topology."""
    from mad.quantize import convert

    out = tmp / f"{Path(topology).stem}-q{group_size}"
    convert(ROOT / "topologies" / topology, out, quantize=True, bits=4, group_size=group_size, echo=lambda *_: None)
    return out


def test_quantized_checkpoints_split_exactly(tmp_path):
    """Quantized checkpoints of both families over 2 members: the packed weights, scales and biases are cut
    as their float matrices (by output rows, and by inputs at group boundaries), and the logits are the
    single process's quantized model's within float32 summation order, in every mode."""
    folders = [_quantized(tmp_path, t, 32) for t in ("xlstm-tiny.yaml", "xlstm-v1-tiny.yaml")]
    results = launch(2, tmp_path, "quantized=" + ",".join(map(str, folders)))
    assert_all_ok(results)
    assert len(results[1]["checks"]) == 4


def test_a_quantized_split_inside_groups_is_one_clear_error(tmp_path):
    """A member must hold whole quantization groups: where K / members is not a multiple of the group size,
    one error names the node and the member counts that work, before any member reads a weight."""
    import pytest

    from mad import shard
    from mad.errors import MadError
    from mad.loading import read_mad_meta, read_safetensors

    folder = _quantized(tmp_path, "xlstm-tiny.yaml", 32)  # out_proj: 64 inputs, proj_down: 192
    graph = _graph(folder / "resolved.yaml")
    quantization = read_mad_meta(folder)["quantization"]
    shard._check_quantized(shard.plan_shards(graph, 2), read_safetensors(folder)[0], quantization, str(folder))
    with pytest.raises(MadError) as e:
        shard._check_quantized(shard.plan_shards(graph, 4), read_safetensors(folder)[0], quantization, str(folder))
    text = e.value.render()
    assert ("node 'backbone.blocks.0.mlstm_layer.out_proj' (linear) is quantized in groups of 32 inputs, and 4 "
            "members would each multiply 16 of its 64 inputs, not whole groups") in " ".join(text.split()), text
    assert "member counts that split this checkpoint: 1, 2" in text
    assert len(e.value.diagnostics) == 1
    # in groups of 64, two members are too many already
    bad = _quantized(tmp_path, "xlstm-tiny.yaml", 64)  # 2 members: 32 of out_proj's 64 inputs each
    with pytest.raises(MadError, match="is quantized in groups of 64 inputs, and 2 members would each multiply 32"):
        shard._check_quantized(shard.plan_shards(_graph(bad / "resolved.yaml"), 2), read_safetensors(bad)[0],
                               read_mad_meta(bad)["quantization"], str(bad))
