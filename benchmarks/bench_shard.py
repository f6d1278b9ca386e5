"""Tensor parallelism on the CPU: prompt and decode tokens/s of a model on 1, 2 and 4 processes.

For each topology and each group size, `mad bench --json` runs the model: in one process for 1 member,
as the N members of a ring group on localhost with `--tensor-parallel` for N (started as `mlx.launch -n N
--backend ring` starts them; fresh weights, seed 0, the same on every member). Reported per run: prompt
and generation tokens/s (medians over the trials, member 0's clock), member 0's peak memory, the weights
each member holds, and what the collectives of one token cost (`mad.shard`'s plan: their count, the bytes
they make whole, the bytes each member sends over a ring). Members are processes of one machine: each gets
its share of the cores for the BLAS's threads (OMP_NUM_THREADS = cores / members, unless set), the ring's
messages go through the kernel's loopback, and a collective's latency is a round trip between processes
(scheduled among whatever else runs).

    python benchmarks/bench_shard.py                                  # xlstm-125m and the 1.3B stack, 1 2 4
    python benchmarks/bench_shard.py --topologies topologies/xlstm-125m.yaml --members 1,2 -p 256 -g 64
    python benchmarks/bench_shard.py --quick --json -                 # a tiny model, 1 and 2 members (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import write_json  # noqa: E402

from mad.shard import free_ports  # noqa: E402

TOPOLOGIES = ["topologies/xlstm-125m.yaml", "topologies/xlstm-v1-1.3b.yaml"]
QUICK_TOPOLOGY = "topologies/xlstm-v1-tiny.yaml"  # mLSTM and sLSTM blocks: every kind of split


def whole_bytes(topology: str, args: argparse.Namespace) -> int:
    """The weights of the whole model (what one process holds)."""
    import mad
    from mad.program import dtype_of

    graph = mad.build_graph(mad.load_topology(str(ROOT / topology), list(args.set)))
    return graph.param_count() * dtype_of(args.dtype).size


def run(topology: str, members: int, args: argparse.Namespace) -> dict:
    """`mad bench --json` of `topology` on `members` processes: one plain process for 1, else the members
    of a ring group on localhost with `--tensor-parallel`, started as mlx.launch starts them (MLX_HOSTFILE,
    MLX_RANK) but without its launcher, whose I/O loop polls and would take CPU from the members."""
    bench = [sys.executable, "-m", "mad.cli", "bench", topology, "--json", "-p", str(args.prompt), "-g", str(args.gen),
             "-n", str(args.trials), "--dtype", args.dtype, *sum((["--set", s] for s in args.set), [])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        if members == 1:
            procs.append(subprocess.Popen(bench, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                          env=env))
        else:
            base = free_ports(members)
            hosts = Path(tmp) / "hosts.json"
            hosts.write_text(json.dumps([[f"127.0.0.1:{base + r}"] for r in range(members)]))
            # each member its share of the cores for the BLAS's threads (OpenMP's default is every core:
            # members would oversubscribe them, and each collective wait for a time slice)
            threads = env.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // members))
            for r in range(members):
                procs.append(subprocess.Popen([*bench, "--tensor-parallel"], stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                              env=dict(env, MLX_HOSTFILE=str(hosts), MLX_RANK=str(r),
                                                       OMP_NUM_THREADS=threads)))
        try:
            outs = [proc.communicate(timeout=args.timeout) for proc in procs]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
    if any(proc.returncode for proc in procs):
        raise SystemExit(f"{topology} on {members} member(s) failed:\n" + "\n".join(err[-3000:] for _, err in outs))
    stdout = outs[0][0]
    result = json.loads(stdout[stdout.index("{"):])
    tp = result.get("tensor_parallel") or {"weight_bytes": [whole_bytes(topology, args)]}
    return {"topology": topology, "members": members, "prompt_tps": result["medians"]["prompt_tps"],
            "generation_tps": result["medians"]["generation_tps"], "peak_memory_gb": result["medians"]["peak_memory"],
            "weight_gb_per_member": [w / 1e9 for w in tp.get("weight_bytes", [])],
            "collectives_per_token": tp.get("collectives_per_token", 0),
            "payload_bytes_per_token": tp.get("payload_bytes_per_token", 0),
            "sent_bytes_per_token": tp.get("sent_bytes_per_token", 0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topologies", default=None, help="comma-separated topology files")
    p.add_argument("--members", default="1,2,4", help="group sizes, comma-separated")
    p.add_argument("-p", "--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("-g", "--gen", type=int, default=32, help="generated tokens")
    p.add_argument("-n", "--trials", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--set", action="append", default=[], help="topology override, as mad bench --set")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument("--quick", action="store_true", help="a tiny model, 1 and 2 members, a few tokens (a smoke run)")
    p.add_argument("--json", nargs="?", const="-", default=None, help="write the results (- : stdout)")
    args = p.parse_args()
    topologies = args.topologies.split(",") if args.topologies else TOPOLOGIES
    members = [int(m) for m in args.members.split(",")]
    if args.quick:
        topologies, members = [QUICK_TOPOLOGY], [1, 2]
        args.prompt, args.gen, args.trials = 16, 4, 1
    out = sys.stderr if args.json == "-" else sys.stdout
    print(f"{'topology':24} {'members':>7} {'prompt tok/s':>12} {'decode tok/s':>12} {'weights/member GB':>17} "
          f"{'peak GB':>8} {'coll/token':>10} {'B whole/token':>13} {'B sent/token':>12}", file=out, flush=True)
    rows = []
    for t in topologies:
        for m in members:
            r = run(t, m, args)
            rows.append(r)
            print(f"{Path(r['topology']).stem:24} {r['members']:>7} {r['prompt_tps']:>12.1f} "
                  f"{r['generation_tps']:>12.2f} {max(r['weight_gb_per_member']):>17.3f} {r['peak_memory_gb']:>8.3f} "
                  f"{r['collectives_per_token']:>10} {r['payload_bytes_per_token']:>13,} "
                  f"{r['sent_bytes_per_token']:>12,}", file=out, flush=True)
    write_json({"prompt_tokens": args.prompt, "generation_tokens": args.gen, "trials": args.trials,
                "dtype": args.dtype, "runs": rows}, args.json)


if __name__ == "__main__":
    main()
