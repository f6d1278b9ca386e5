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
    python benchmarks/bench_shard.py --serve 4 --members 1,2 -p 64 -g 64   # mad serve, 4 concurrent clients

With `--serve CLIENTS`, `mad serve` runs instead (with `--tensor-parallel` for N members: member 0 serves,
the others run its steps): CLIENTS clients send a completion of -p prompt ids for -g tokens (temperature 0)
at once, -n times after a warmup; reported are the completion tokens per second of all clients together
(median over the rounds), what the exchanges of member 0's steps and the members' collectives cost beside
one process.
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


def launch(command: list[str], members: int, tmp: Path, first_port: int, stdout: int) -> list[subprocess.Popen]:
    """`command` as one plain process for 1 member, else as the members of a ring group on localhost with
    `--tensor-parallel` (ports from `first_port`), started as mlx.launch starts them (MLX_HOSTFILE, MLX_RANK)
    but without its launcher, whose I/O loop polls and would take CPU from the members."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if members == 1:
        return [subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)]
    hosts = tmp / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{first_port + r}"] for r in range(members)]))
    # each member its share of the cores for the BLAS's threads (OpenMP's default is every core: members
    # would oversubscribe them, and each collective wait for a time slice)
    threads = env.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // members))
    return [subprocess.Popen([*command, "--tensor-parallel"], stdout=stdout, stderr=subprocess.PIPE, text=True,
                             cwd=ROOT, env=dict(env, MLX_HOSTFILE=str(hosts), MLX_RANK=str(r), OMP_NUM_THREADS=threads))
            for r in range(members)]


def run(topology: str, members: int, args: argparse.Namespace) -> dict:
    """`mad bench --json` of `topology` on `members` processes (`launch`)."""
    bench = [sys.executable, "-m", "mad.cli", "bench", topology, "--json", "-p", str(args.prompt), "-g", str(args.gen),
             "-n", str(args.trials), "--dtype", args.dtype, *sum((["--set", s] for s in args.set), [])]
    with tempfile.TemporaryDirectory() as tmp:
        procs = launch(bench, members, Path(tmp), free_ports(members), subprocess.PIPE)
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


def serve_run(topology: str, members: int, args: argparse.Namespace) -> dict:
    """Completion tokens/s of `mad serve` on `members` processes, `args.serve` clients at once."""
    import random
    import statistics
    import threading
    import time
    import urllib.request

    base = free_ports(members + 1)
    port = base + members
    serve = [sys.executable, "-m", "mad.cli", "serve", topology, "--port", str(port), "--log-level", "warning",
             "--dtype", args.dtype, "--max-batch", str(max(args.serve, 1)), *sum((["--set", s] for s in args.set), [])]
    with tempfile.TemporaryDirectory() as tmp:
        procs = launch(serve, members, Path(tmp), base, subprocess.DEVNULL)
        try:
            deadline = time.time() + args.timeout
            while True:
                if any(proc.poll() is not None for proc in procs) or time.time() > deadline:
                    raise SystemExit(f"{topology}: the server on {members} member(s) did not start:\n"
                                     + procs[0].communicate(timeout=30)[1][-3000:])
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
                    break
                except OSError:
                    time.sleep(0.5)

            def complete(prompt: list[int], tokens: int) -> int:
                body = json.dumps({"prompt": prompt, "max_tokens": tokens, "temperature": 0}).encode()
                request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=args.timeout) as reply:
                    return json.loads(reply.read())["usage"]["completion_tokens"]

            rng = random.Random(0)
            prompts = [[rng.randrange(256) for _ in range(args.prompt)] for _ in range(args.serve)]
            complete(prompts[0], 4)  # warmup: traces the prompt and decode shapes
            rates = []
            for _ in range(args.trials):
                counts = [0] * args.serve

                def client(i: int) -> None:
                    counts[i] = complete(prompts[i], args.gen)

                start = time.perf_counter()
                workers = [threading.Thread(target=client, args=(i,)) for i in range(args.serve)]
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
                rates.append(sum(counts) / (time.perf_counter() - start))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
    return {"topology": topology, "members": members, "clients": args.serve, "tokens_per_s": statistics.median(rates)}


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
    p.add_argument("--serve", type=int, default=0, metavar="CLIENTS",
                   help="measure mad serve with this many concurrent clients instead of mad bench")
    args = p.parse_args()
    topologies = args.topologies.split(",") if args.topologies else TOPOLOGIES
    members = [int(m) for m in args.members.split(",")]
    if args.quick:
        topologies, members = [QUICK_TOPOLOGY], [1, 2]
        args.prompt, args.gen, args.trials = 16, 4, 1
    out = sys.stderr if args.json == "-" else sys.stdout
    if args.serve:
        print(f"{'topology':24} {'members':>7} {'clients':>7} {'completion tok/s':>16}", file=out, flush=True)
        rows = []
        for t in topologies:
            for m in members:
                r = serve_run(t, m, args)
                rows.append(r)
                print(f"{Path(t).stem:24} {m:>7} {r['clients']:>7} {r['tokens_per_s']:>16.2f}", file=out, flush=True)
        write_json({"prompt_tokens": args.prompt, "generation_tokens": args.gen, "trials": args.trials,
                    "dtype": args.dtype, "serve_runs": rows}, args.json)
        return
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
