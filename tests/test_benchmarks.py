"""The benchmark scripts run here, in their `--quick` mode (tiny sizes, one trial, no pauses), so that none
can rot unnoticed; their timings mean nothing and are not checked, only that each runs to the end, that
its correctness check passes (each script stops when MAD and its reference disagree) and what its JSON
holds.

Maintained (quoted in README.md, benchmarks/README.md or a test, CPU): bench_framework.py, bench_hf.py and
bench_nxai.py (with mad_worker.py and common.py), cpu_parts.py; and the CPU probes
benchmarks/probes/probe_mkl_torch.py and benchmarks/probes/probe_float32_orders.py. The PyTorch ones run
where torch, transformers and xlstm are installed (CI installs them) and carry the `reference` mark.
GPU-only scripts (benchmarks/README.md's GPU table and the GPU probes of benchmarks/probes/README.md) run
with small arguments where MLX has a GPU, and are skipped elsewhere; every script of benchmarks/ and
benchmarks/probes/ is at least compiled. A new script must be listed below (by its path under benchmarks/).

Each runs in a subprocess with the repository root first on PYTHONPATH (the checkout's MAD, installed
or not) and the CPU BLAS a user gets (`MAD_BLAS` unset; tests/conftest.py pins MLX's own for this
process only).
"""

from __future__ import annotations

import importlib.util
import json
import os
import py_compile
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

# script (its path under benchmarks/) -> the modules it needs besides MAD
CPU = {"bench_framework.py": (), "cpu_parts.py": (), "probes/probe_float32_orders.py": (),
       "bench_hf.py": ("torch", "transformers"), "bench_nxai.py": ("torch", "xlstm"),
       "bench_train.py": ("torch", "transformers", "xlstm", "mlstm_kernels"),
       "bench_quant.py": (), "bench_serve.py": ("uvicorn", "starlette", "openai"), "bench_shard.py": (),
       "probes/probe_mkl_torch.py": ("torch", "xlstm"), "probes/ttft_cache.py": (), "probes/cpu_limits.py": (),
       "probes/host_graph.py": ()}
HELPERS = {"common.py", "mad_worker.py"}
# needs nvcc (a CUDA toolkit), not a GPU: compiles a kernel body as MLX would hand it to NVRTC
NVCC = {"probes/nvcc_check.py": ["kernels.qlinear_mma:QMMA_KERNEL", "--inputs", "x:bfloat16", "w:uint32",
                                 "scales:bfloat16", "biases:bfloat16", "bias:float32", "cap:float32", "g:bfloat16",
                                 "normp:float32", "res:float32", "--outputs", "y:bfloat16", "--template",
                                 "T=bfloat16", "S=bfloat16", "HALF=false", "M=2", "K=4096", "N=12288", "GROUP_SIZE=64", "SPLIT=8",
                                 "AHEAD=2", "HAS_BIAS=false", "HAS_CAP=false", "NORM=true", "PAIR=true", "ACT=2",
                                 "RESIDUAL=false"]}
# GPU-only scripts and small arguments for a smoke run
GPU = {
    "probes/gpu_decode_probe.py": ["--topology", "topologies/xlstm-125m.yaml", "--set", "dims.L=2", "--steps", "2"],
    "probes/gpu_float32_trace.py": [],
    "probes/gpu_gemv.py": [],
    "probes/gpu_qmv.py": ["--quick"],
    "probes/gpu_qmv_ncu.py": [],
    "probes/gpu_quant_memory.py": ["--topology", "topologies/xlstm-tiny.yaml", "--group-size", "32", "--prompt", "16",
                                   "--generate", "4"],
    "gpu_targets.py": ["--topology", "topologies/xlstm-tiny.yaml", "--quick"],
    "gpu_long_context.py": ["--topology", "topologies/xlstm-125m.yaml", "--set", "dims.L=2", "--tokens", "512",
                            "--step", "256", "--prefix", "33"],
    "gpu_mlstm_cell.py": ["--tokens", "256", "--heads", "2", "--dqk", "64", "--dv", "64", "--chunks", "64",
                          "--dtypes", "float32", "--trials", "1", "--no-limits"],
    "probes/gpu_mlstm_float32.py": [],
    "probes/gpu_mqar.py": ["--set", "dims.D=32", "--steps", "3", "--eval-every", "3", "--budget", "60"],
    "gpu_slstm.py": ["layer", "--batch", "1", "--tokens", "64", "--trials", "1"],
    "probes/gpu_step_kernels.py": ["--topology", "topologies/xlstm-125m.yaml", "--set", "dims.L=2"],
    "probes/gpu_prefill_overlap.py": ["--topology", "topologies/xlstm-125m.yaml", "--set", "dims.L=2", "--prompt",
                                      "1024", "--step", "256", "--rounds", "1"],
    "probes/gpu_tf32_probe.py": [],
    "probes/probe_slstm.py": ["--batches", "1", "--tokens", "64", "--trials", "1"],
    "probes/sweep_chunk_outputs.py": [],
    "probes/sweep_chunk_states.py": ["--tokens", "512"],
    "probes/sweep_mlstm_step.py": ["--batch", "1", "--chain", "2", "--trials", "1"],
}
BY_HAND = {"gpu_hf_reference.py": "builds HF's xLSTM-7B in PyTorch on a CUDA GPU (minutes, ~15 GB): run by hand"}


def has_gpu() -> bool:
    return mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())


def missing(modules) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def run(script: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MAD_BLAS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    r = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"{script} {' '.join(args)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def scripts() -> list[str]:
    """Every script of benchmarks/ and benchmarks/probes/, by its path under benchmarks/."""
    return sorted(p.relative_to(BENCH).as_posix() for pattern in ("*.py", "probes/*.py") for p in BENCH.glob(pattern))


def test_every_script_is_listed():
    listed = set(CPU) | HELPERS | set(GPU) | set(BY_HAND) | set(NVCC)
    assert set(scripts()) == listed


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (a CUDA toolkit)")
@pytest.mark.parametrize("script", sorted(NVCC))
def test_nvcc_check_builds_a_kernel(script):
    """The offline compile of the tensor-core kernel (a norm and a gated pair folded in): it builds, and
    ptxas reports its registers and no spills."""
    out = run(script, *NVCC[script], timeout=300).stdout
    assert "Used " in out and "registers" in out and "0 bytes spill stores" in out, out


def test_nvcc_check_counts_sass_opcodes():
    """`nvcc_check.py --sass`'s count of a `cuobjdump -sass` listing: opcodes without their modifiers,
    predicated instructions counted, the encoding lines and labels not."""
    spec = importlib.util.spec_from_file_location("nvcc_check", BENCH / "probes" / "nvcc_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    listing = """
        /*0c50*/                   LOP3.LUT R42, R42, 0x41800000, RZ, 0xfc, !PT ;   /* 0x4180000022227812 */
                                                                                    /* 0x000fe400078efcff */
        /*0c60*/                   FFMA R33, R40, R30.reuse, R31 ;
        /*0c70*/              @!P0 BRA 0x1ab0 ;
        /*0c80*/               @P1 LOP3.LUT R59, R32, 0x78000, R39, 0xea, !PT ;
.L_x_12:
        /*0c90*/                   SHF.R.U32.HI R31, RZ, 0x1, R12 ;
"""
    assert module.opcode_counts(listing) == "5 instructions: 2 LOP3, 1 FFMA, 1 BRA, 1 SHF"


@pytest.mark.parametrize("script", scripts())
def test_compiles(script, tmp_path):
    py_compile.compile(str(BENCH / script), cfile=str(tmp_path / "x.pyc"), doraise=True)


@pytest.mark.parametrize("args", [["--fuse", "both"], ["--dtype", "bfloat16"]], ids=["fuse-both", "bfloat16"])
def test_bench_framework_quick(args, tmp_path):
    out = tmp_path / "framework.json"
    run("bench_framework.py", "--quick", *args, "--json", str(out))
    res = json.loads(out.read_text())
    checks = [res["check"]] if len(res["fuse"]) == 1 else list(res["check"].values())  # one per MAD model
    assert len(checks) == (2 if "both" in args else 1)
    if res["dtype"] == "float32":  # the same kernels, products and order as MAD: the same float32 results
        assert all(c["prefill_logits"] == c["decode_logits"] == c["state"] == 0.0 for c in checks), checks
    assert set(res["benchmarks"]) == {"decode", "decode call", "forward32"}


def test_cpu_parts_quick():
    r = run("cpu_parts.py", "--quick")
    assert "GFLOP/s" in r.stdout and "mLSTM cell" in r.stdout


@pytest.mark.parametrize("bits", [None, 4])
def test_host_graph_of_a_cuda_decode_step(bits, tmp_path):
    """A block of the CUDA decode step's graph, built on this machine (a 2-block model against a 1-block one,
    wide enough that only the gates are a narrow unit):
    a launch per folded linear, the mLSTM step and the norm-and-gate kernel (6, the 16-wide gate linear a 7th
    at 4 bits, which folds its norm), MLX's RMS norms the wide float kernels do not fold (bf16), and no other
    node: no split (the fused projections' parts are their kernels' own outputs), no reshape or other view
    (the kernels read the parts as they lie)."""
    graphs = []
    for layers in (1, 2):
        out = tmp_path / f"graph{layers}.json"
        run("probes/host_graph.py", "--set", f"dims.L={layers}", "--set", "dims.D=512", "--set", "dims.V=96",
            "--calls", "2", "--json", str(out), *(["--bits", str(bits)] if bits else []))
        graphs.append(json.loads(out.read_text()))
    one, two = graphs
    block = {k: two["other nodes"].get(k, 0) - one["other nodes"].get(k, 0) for k in two["other nodes"]}
    assert two["kernel launches"] - one["kernel launches"] == (7 if bits else 6), graphs
    assert two["MLX fast norms"] - one["MLX fast norms"] == (0 if bits else 2), graphs
    assert {k: n for k, n in block.items() if n} == {}, graphs
    assert two["call ms (median)"] > 0


def test_ttft_cache_small():
    r = run("probes/ttft_cache.py", "--topology", "topologies/xlstm-tiny.yaml", "--system", "300", "--question", "8",
            "--rounds", "2", "--dtype", "float32", "--device", "cpu")
    res = json.loads(r.stdout)
    assert all(res[k]["miss_ms"] > 0 and res[k]["hit_ms"] > 0 for k in ("pad=True", "pad=False"))


def test_probe_float32_orders_quick():
    r = run("probes/probe_float32_orders.py", "--quick")
    assert "2 random orders, max |diff|" in r.stdout


@pytest.mark.reference
@pytest.mark.skipif(bool(missing(CPU["bench_hf.py"])), reason=f"needs {', '.join(CPU['bench_hf.py'])}")
def test_bench_hf_quick(tmp_path):
    out = tmp_path / "hf.json"
    run("bench_hf.py", "--quick", "--json", str(out))
    res = json.loads(out.read_text())
    assert res["check"]["prefill_logits"] < 1e-4 and res["check"]["decode_logits"] < 1e-4, res["check"]
    assert res["check"]["same_argmax_prefill"]


@pytest.mark.reference
@pytest.mark.skipif(bool(missing(CPU["bench_nxai.py"])), reason=f"needs {', '.join(CPU['bench_nxai.py'])}")
def test_bench_nxai_quick(tmp_path):
    out = tmp_path / "nxai.json"
    run("bench_nxai.py", "--quick", "--json", str(out))
    res = json.loads(out.read_text())
    # MAD within a few times NX-AI's own float32 distance from its float64 logits
    assert res["check"]["mad_vs_nxai_float64"] < 10 * max(res["check"]["nxai_float32_vs_float64"], 1e-6), res["check"]
    assert res["slstm_only_max_abs_diff_h"] < 1e-5


def test_bench_quant_quick(tmp_path):
    out = tmp_path / "quant.json"
    run("bench_quant.py", "--quick", "--json", str(out))
    v = json.loads(out.read_text())["variants"]
    assert list(v) == ["bfloat16", "4-bit", "8-bit"]
    assert v["4-bit"]["weight_bytes"] < v["8-bit"]["weight_bytes"] < v["bfloat16"]["weight_bytes"]
    assert 0 < v["8-bit"]["agreement"]["mean_abs_diff"] < v["4-bit"]["agreement"]["mean_abs_diff"]


@pytest.mark.skipif(bool(missing(CPU["bench_serve.py"])), reason=f"needs {', '.join(CPU['bench_serve.py'])}")
def test_bench_serve_quick(tmp_path):
    out = tmp_path / "serve.json"
    run("bench_serve.py", "--quick", "--json", str(out))
    res = json.loads(out.read_text())
    assert res["identical_to_solo"] and res["concurrent_tokens_per_s"] > 0 and res["cached_tokens_hit"][0] > 0
    assert res["chat_cached_tokens_hit"][0] == res["prefix_tokens"]  # the whole system message, where it was cut


@pytest.mark.reference
@pytest.mark.skipif(bool(missing(CPU["bench_train.py"])), reason=f"needs {', '.join(CPU['bench_train.py'])}")
def test_bench_train_quick(tmp_path):
    out = tmp_path / "train.json"
    run("bench_train.py", "--quick", "--json", str(out))
    res = json.loads(out.read_text())
    assert set(res["benchmarks"]) == {"7b", "v1"}
    for family, b in res["benchmarks"].items():
        # the same weights and batch: the first step's loss and gradient norm are the reference's (float32)
        assert b["check"]["loss_rel_diff"] < 1e-5 and b["check"]["grad_norm_rel_diff"] < 1e-4, (family, b["check"])
        assert b["mad"]["steps"] == b["ref"]["steps"] == 2 and b["mad"]["tokens_per_s"] > 0


@pytest.mark.reference
@pytest.mark.skipif(bool(missing(CPU["probes/probe_mkl_torch.py"])),
                    reason=f"needs {', '.join(CPU['probes/probe_mkl_torch.py'])}")
def test_probe_mkl_torch_quick():
    r = run("probes/probe_mkl_torch.py", "--quick")
    assert "after one MLX product" in r.stdout


def test_prefill_overlap_runs_on_the_cpu():
    """The probe is the GPU's question but runs anywhere: both ways of reading a prompt give the same logits."""
    out = run("probes/gpu_prefill_overlap.py", "--topology", "topologies/xlstm-tiny.yaml", "--prompt", "96",
              "--step", "32", "--rounds", "1").stdout
    assert "largest difference between the two: 0.0" in out and "median: waited" in out, out


def test_mqar_probe_goes_on_exactly_from_its_state(tmp_path):
    """A run stopped after 3 of 6 steps and continued from its --state folder ends with the weights, loss and
    accuracy of one uninterrupted 6-step run; a continuation with other settings, or from a folder whose
    files were saved at different steps (a save cut short), is refused."""
    import mlx.core as mx

    args = ["--preset", "small", "--set", "dims.D=16", "--steps", "6", "--batch", "8", "--eval-every", "100",
            "--budget", "1e9"]
    whole, parts, mixed = tmp_path / "whole", tmp_path / "parts", tmp_path / "mixed"
    last = lambda r: json.loads(r.stdout.strip().splitlines()[-1])
    one = last(run("probes/gpu_mqar.py", *args, "--state", str(whole)))
    first = last(run("probes/gpu_mqar.py", *args, "--state", str(parts), "--stop-after", "3"))
    weights_at_3 = (parts / "weights.safetensors").read_bytes()
    second = last(run("probes/gpu_mqar.py", *args, "--state", str(parts)))
    assert first["step"] == 3 and one["step"] == second["step"] == 6
    assert (one["loss"], one["accuracy"]) == (second["loss"], second["accuracy"])
    a, b = mx.load(str(whole / "weights.safetensors")), mx.load(str(parts / "weights.safetensors"))
    assert a.keys() == b.keys() and all(bool(mx.array_equal(a[k], b[k])) for k in a)
    assert "other settings" in refused("probes/gpu_mqar.py", *args[:-4], "--lr", "1e-2", "--state", str(parts))
    mixed.mkdir()
    for name in ("state.json", "optimizer.safetensors", "order.safetensors"):
        (mixed / name).write_bytes((parts / name).read_bytes())
    (mixed / "weights.safetensors").write_bytes(weights_at_3)
    assert "saved at step 3" in refused("probes/gpu_mqar.py", *args, "--state", str(mixed))


def refused(script: str, *args: str) -> str:
    """A probe's bad arguments: exit 2 and one line naming the argument, no traceback, before any work."""
    env = {k: v for k, v in os.environ.items() if k != "MAD_BLAS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    r = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    return r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("script,args,names", [
    ("probes/cpu_limits.py", ["--only", "slstm,nope"], "'nope'"),
    ("probes/gpu_qmv.py", ["--configs", "mma:x"], "'mma:x'"),
    ("probes/gpu_qmv.py", ["--configs", "fma", "1:2"], "'1:2'"),
    ("probes/gpu_qmv.py", ["--configs", "mma:1:2:3"], "'mma:1:2:3'"),
    ("probes/gpu_qmv.py", ["--configs", "4:1:4:2"], "'4:1:4:2'"),
    ("probes/gpu_qmv.py", ["--configs", "4:-1:4"], "'4:-1:4'"),
    ("probes/gpu_mqar.py", ["--preset", "big"], "'big'"),
    ("probes/gpu_mqar.py", ["--stop-after", "-1"], "--stop-after -1"),
    ("probes/gpu_mqar.py", ["--state", "pyproject.toml"], "not a folder"),
    ("probes/gpu_mqar.py", ["--state", "topologies"], "no saved run"),
    ("probes/gpu_mqar.py", ["--seq-len", "7"], "--seq-len/--kv-pairs"),
    ("probes/gpu_mqar.py", ["--preset", "small", "--kv-pairs", "100"], "num_kv_pairs 100"),
    ("gpu_targets.py", ["--prefill-step", "4096,0"], "--prefill-step '4096,0'"),
    ("gpu_targets.py", ["--setting", "SHARED_X"], "'SHARED_X' is not MODULE.NAME=VALUE"),
    ("gpu_targets.py", ["--setting", "nosuch.X=1"], "no module nosuch"),
    ("gpu_targets.py", ["--setting", "mad.kernels.linear_device.NOPE=1"], "mad.kernels.linear_device has no NOPE"),
    ("gpu_targets.py", ["--setting", "mad.kernels.linear_device.SHARED_X=yes"], "not a Python literal"),
    ("probes/gpu_decode_probe.py", ["--compare-setting", "mad.kernels.mlstm_device.SPLITS=1,x"],
     "not a Python literal"),
    ("probes/gpu_decode_probe.py", ["--compare-setting", "mad.kernels.mlstm_device.SPLITS=1,4", "--compare-setting",
                                    "mad.kernels.linear_device.SHARED_X=True"], "the same number of values"),
    ("probes/gpu_decode_probe.py", ["--profile-steps", "0"], "--profile-steps must be 1 or more"),
    ("probes/host_graph.py", ["--calls", "0"], "--batch and --calls must be 1 or more"),
    ("probes/host_graph.py", ["--batch", "-2"], "--batch and --calls must be 1 or more"),
    ("probes/host_graph.py", ["--setting", "mad.kernels.linear_device.NOPE=1"], "mad.kernels.linear_device has no NOPE"),
    ("probes/host_graph.py", ["--bits", "7"], "--bits"),
    ("probes/host_graph.py", ["--topology", "nope.yaml"], "no such file or folder: nope.yaml"),
    ("probes/host_graph.py", ["--set", "dims.NOPE=1"], "NOPE"),
    ("probes/gpu_step_kernels.py", ["--bits", "7"], "--bits"),
    ("probes/sweep_chunk_states.py", ["--tokens", "100"], "--tokens 100"),
    ("probes/sweep_chunk_states.py", ["--widths", "64,16"], "'64,16'"),
    ("probes/nvcc_check.py", ["nosuch:X", "--inputs", "x:float32", "--outputs", "y:float32"], "'nosuch:X'"),
    ("probes/nvcc_check.py", ["kernels.qlinear_mma:MAX_ROWS", "--inputs", "x:float32", "--outputs", "y:float32"],
     "not a kernels.device.DeviceKernel"),
    ("probes/nvcc_check.py", ["kernels.qlinear_mma:QMMA_KERNEL", "--inputs", "x:int4", "--outputs", "y:float32"],
     "'int4'"),
    ("probes/nvcc_check.py", ["kernels.qlinear_mma:QMMA_KERNEL", "--inputs", "x", "--outputs", "y:float32"],
     "'x' is not NAME=VALUE"),
    ("probes/nvcc_check.py", ["kernels.linear_device:LINEAR_KERNEL", "--parts", "0", "--inputs", "x:float32",
                              "--outputs", "y:float32"], "--parts 0: parts must be an integer of 1 or more"),
    ("probes/nvcc_check.py", ["kernels.qlinear_mma:QMMA_KERNEL", "--parts", "2", "--inputs", "x:float32",
                              "--outputs", "y0:float32", "y1:float32"], "does not write its output through STORE"),
])
def test_probe_arguments_are_checked(script, args, names):
    if script.endswith("nvcc_check.py") and shutil.which("nvcc") is None:
        pytest.skip("needs nvcc (a CUDA toolkit): without it the script stops at that first")
    assert names in refused(script, *args)


def test_cpu_limits_quick():
    lines = [json.loads(line) for line in run("probes/cpu_limits.py", "--quick").stdout.splitlines()]
    parts = {k: v for line in lines for k, v in line.items()}
    assert set(parts) == {"transcendentals", "slstm", "mlstm", "prompt", "torch"}
    assert all(t["alone_ns"] > 0 for t in parts["transcendentals"].values())
    assert parts["slstm"]["slstm_sequence_us"] > 0 and parts["mlstm"]["parallel_ms"] > 0
    assert "mlstm_cell" in parts["prompt"]["ms"]


@pytest.mark.skipif(not has_gpu(), reason="GPU-only script (benchmarks/README.md, GPU scripts): MLX has no GPU here")
@pytest.mark.parametrize("script", sorted(GPU))
def test_gpu_script_smoke(script):
    run(script, *GPU[script], timeout=600)


PENDING = BENCH / "probes" / "pending_settings.sh"


def test_pending_settings_script_names_what_exists():
    """benchmarks/probes/pending_settings.sh (the GPU runs that decide the settings still off): valid bash,
    every `$L.NAME`, `$Q.NAME`, `$S.NAME` setting it passes is an attribute of its module, every script it
    runs is in the repository, and every test file it runs exists."""
    text = PENDING.read_text()
    subprocess.run(["bash", "-n", str(PENDING)], check=True)
    modules = dict(re.findall(r"\b([LQS])=(mad\.kernels\.\w+)", text))
    assert set(modules) == {"L", "Q", "S"}
    named = re.findall(r"\$([LQS])\.(\w+)=", text)
    assert len(named) >= 10
    for var, name in named:
        assert hasattr(importlib.import_module(modules[var]), name), f"{modules[var]} has no {name}"
    for path in re.findall(r"\b((?:benchmarks|tests)/[\w/]+\.py)", text):
        assert (ROOT / path).is_file(), path
    probe = re.search(r"PROBE=(\S+)", text).group(1)
    assert (ROOT / probe).is_file()


@pytest.mark.parametrize("out,budget,parts,message", [
    ("results", "570", ["tests", "nosuch"], "unknown part 'nosuch'"),
    ("", "570", ["tests"], "set OUT"),
    ("results", "ten", ["tests"], "BUDGET must be a number of seconds, got 'ten'"),
    ("results", "-5", ["tests"], "BUDGET must be a number of seconds, got '-5'"),
])
def test_pending_settings_script_refuses_bad_input(tmp_path, out, budget, parts, message):
    """A bad part, a missing OUT or a BUDGET that is no number: exit 2 with the reason, before anything
    runs or is written (OUT is not even made)."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("needs bash")
    target = tmp_path / out if out else None
    env = {**os.environ, "OUT": str(target) if target else "", "BUDGET": budget}
    done = subprocess.run([bash, str(PENDING), *parts], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and message in done.stderr and "line" not in done.stderr
    assert target is None or not target.exists()
