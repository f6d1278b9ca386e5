"""`mad serve` under load: N concurrent streaming clients against one, and the first token after a cached prefix.

Starts the server in this process (a thread on 127.0.0.1, a free port) on a model (a topology with fresh
weights, or a checkpoint) and talks to it with the official `openai` client, streaming, at temperature 0:

1. solo: each of the N client prompts alone, one after another: generated tokens / request time of one
   client (the median over the N), and each client's tokens.
2. concurrent: the N prompts at once from N threads: all generated tokens / wall time (from the common
   start to the last client's end); every client's tokens must equal its solo tokens.
3. prefix: a long prefix (`--prefix` tokens) and a short question (`--suffix`): time to the first streamed
   token on a miss (a prefix never seen) and on a hit (a prefix sent once before, with another question),
   median over `--trials` (one more of each runs first, untimed: it traces the compiled shapes). Twice:
   as a chat, the prefix being the system message (the server cuts the prompt's reading at its end and
   keeps the state there, so a hit reads only the question), and as a plain completion prompt (no cut:
   a hit continues from the last whole block of the prefix and reads the rest of it too).

Prompts are random token ids and the server decodes with a tokenizer that writes each id as `<id>` and has
no end token, so every client generates exactly `--max-tokens` tokens and texts compare token by token;
the chat template joins the messages' contents (so a chat's prompt is its messages' ids, nothing added).
The targets (the issue's): concurrent / solo >= 4 with identical tokens, miss / hit time to first token >= 10.
Also reported: the traces of the compiled program (MLX calls the Python function once per new input shape;
counted by wrapping it), in all and during the timed parts, where a bounded server traces nothing new.

    python benchmarks/bench_serve.py --quick                                  # seconds, a tiny model
    python benchmarks/bench_serve.py --device gpu                             # xLSTM-7B shape, bfloat16
    python benchmarks/bench_serve.py --model path/to/xLSTM-7b --device gpu --json out.json
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mad  # noqa: E402  (before mlx.core: the CPU BLAS, see backends/cpu.py)
import mlx.core as mx  # noqa: E402


class IdTokenizer:
    """Each id as the text `<id>`, no end token: every token shows and compares exactly."""

    eos_token_ids: tuple = ()

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.replace("<", " ").replace(">", " ").split()]

    def decode(self, ids) -> str:
        return "".join(f"<{int(i)}>" for i in ids)


JOIN_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # a chat's ids are its messages' ids


def count_traces(model) -> list:
    """The program's trace log (`Program.traces`), emptied, with the compiled functions dropped so that earlier
    traces do not hide new ones: it grows by one per trace from here on."""
    model.program.clear_compiled()
    model.program.traces.clear()
    return model.program.traces


def start_server(model, tok, args):
    import uvicorn

    from mad.serve import ChatTemplate, Engine, ServerConfig, create_app

    engine = Engine(model, tok, max_batch=args.max_batch, prompt_cache_bytes=args.prompt_cache_bytes)
    app = create_app(model, tok, ServerConfig("bench", max_tokens=args.max_tokens, max_body_bytes=64 << 20),
                     chat_template=ChatTemplate(JOIN_TEMPLATE), engine=engine)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return server, thread, engine, sock.getsockname()[1]


def request(client, prompt: list[int], max_tokens: int) -> dict:
    """One streaming completion: its text, tokens, cached prompt tokens, time to first token and total time."""
    start = time.perf_counter()
    first, text, usage = None, "", None
    stream = client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            first = first or time.perf_counter()
            text += chunk.choices[0].text
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    return {"text": text, "tokens": usage.completion_tokens, "cached": usage.prompt_tokens_details.cached_tokens,
            "ttft": first - start, "seconds": end - start}


def chat(client, system: list[int], question: list[int]) -> dict:
    """One streamed chat turn of one token: a system message of `system` ids and a user message of `question`
    ids; time to first token and cached prompt tokens."""
    ids = IdTokenizer().decode
    start = time.perf_counter()
    first, usage = None, None
    stream = client.chat.completions.create(
        model="bench", messages=[{"role": "system", "content": ids(system)}, {"role": "user", "content": ids(question)}],
        max_tokens=1, temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
    return {"cached": usage.prompt_tokens_details.cached_tokens, "ttft": first - start}


def concurrent(client, prompts: list[list[int]], max_tokens: int) -> tuple[list[dict], float]:
    results: list = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts) + 1)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = request(client, prompts[i], max_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "topologies" / "xlstm-7b.yaml"), help="topology or checkpoint")
    p.add_argument("--dtype", default=None, help="default: bfloat16 (float32 with --quick)")
    p.add_argument("--set", action="append", default=[], help="topology override (repeatable)")
    p.add_argument("--device", default=None, help="cpu or gpu")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=128, help="each client's prompt")
    p.add_argument("--max-tokens", type=int, default=256, help="generated per client")
    p.add_argument("--prefix", type=int, default=4000, help="tokens of the long shared prefix")
    p.add_argument("--suffix", type=int, default=32, help="tokens of the question after it")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--prompt-cache-bytes", type=int, default=8 << 30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a tiny model and small sizes: a smoke run in seconds")
    p.add_argument("--json", nargs="?", const="-", default=None, help="write the figures as JSON (to a file, or -)")
    args = p.parse_args()
    if args.quick:
        args.model = str(ROOT / "topologies" / "xlstm-tiny.yaml") if args.model.endswith("xlstm-7b.yaml") else args.model
        args.clients, args.prompt_tokens, args.max_tokens = min(args.clients, 4), 16, 24
        args.prefix, args.suffix, args.trials = 600, 8, 1
    import openai
    import numpy as np

    if args.device:
        mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    dtype = args.dtype or ("float32" if args.quick else "bfloat16")
    model, _ = mad.load(args.model, dtype=dtype, overrides=args.set)
    tok = IdTokenizer()
    traces = count_traces(model)
    server, thread, engine, port = start_server(model, tok, args)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)
    rng = np.random.default_rng(args.seed)

    def ids(n: int) -> list[int]:
        return rng.integers(0, model.vocab_size, n).tolist()

    prompts = [ids(args.prompt_tokens) for _ in range(args.clients)]
    try:
        concurrent(client, [ids(args.prompt_tokens) for _ in range(args.clients)], 8)  # warm-up: traces the shapes
        concurrent(client, [ids(args.prompt_tokens) for _ in range(args.clients)], 8)
        warm_traces = len(traces)
        solo = [request(client, prompt, args.max_tokens) for prompt in prompts]
        together, wall = concurrent(client, prompts, args.max_tokens)
        timed_traces = len(traces) - warm_traces
        mismatches = [i for i, (a, b) in enumerate(zip(solo, together)) if a["text"] != b["text"]]
        solo_tps = statistics.median(r["tokens"] / r["seconds"] for r in solo)
        total_tps = sum(r["tokens"] for r in together) / wall

        prefix_hit = ids(args.prefix)
        request(client, prefix_hit + ids(args.suffix), 1)  # leaves the prefix's snapshots in the cache
        miss, hit = [], []
        for _ in range(args.trials + 1):
            miss.append(request(client, ids(args.prefix) + ids(args.suffix), 1))
            hit.append(request(client, prefix_hit + ids(args.suffix), 1))
        miss, hit = miss[1:], hit[1:]
        # untimed prefix round first: the tail pieces of its lengths are traced there

        system_hit = ids(args.prefix)
        chat(client, system_hit, ids(args.suffix))  # leaves the state after the system message in the cache
        chat_miss, chat_hit = [], []
        for _ in range(args.trials + 1):
            chat_miss.append(chat(client, ids(args.prefix), ids(args.suffix)))
            chat_hit.append(chat(client, system_hit, ids(args.suffix)))
        chat_miss, chat_hit = chat_miss[1:], chat_hit[1:]
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    ttft_miss = statistics.median(r["ttft"] for r in miss)
    ttft_hit = statistics.median(r["ttft"] for r in hit)
    chat_ttft_miss = statistics.median(r["ttft"] for r in chat_miss)
    chat_ttft_hit = statistics.median(r["ttft"] for r in chat_hit)
    result = {
        "model": args.model, "dtype": dtype, "device": str(mx.default_device()), "clients": args.clients,
        "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
        "solo_tokens_per_s": solo_tps, "concurrent_tokens_per_s": total_tps, "speedup": total_tps / solo_tps,
        "max_batch_seen": engine.generator.max_batch_seen, "identical_to_solo": not mismatches,
        "mismatched_clients": mismatches, "prefix_tokens": args.prefix, "suffix_tokens": args.suffix,
        "ttft_miss_s": ttft_miss, "ttft_hit_s": ttft_hit, "ttft_ratio": ttft_miss / ttft_hit,
        "cached_tokens_hit": [r["cached"] for r in hit], "cached_tokens_miss": [r["cached"] for r in miss],
        "chat_ttft_miss_s": chat_ttft_miss, "chat_ttft_hit_s": chat_ttft_hit,
        "chat_ttft_ratio": chat_ttft_miss / chat_ttft_hit,
        "chat_cached_tokens_hit": [r["cached"] for r in chat_hit],
        "chat_cached_tokens_miss": [r["cached"] for r in chat_miss],
        "traces": len(traces), "traces_in_solo_and_concurrent": timed_traces,
        "traced_shapes": sorted({f"{s}{' last' if last else ''}" for s, last in traces}),
    }
    lines = [f"model {args.model} ({dtype}, {result['device']})",
             f"solo: {solo_tps:,.1f} tokens/s per client (median of {args.clients})",
             f"{args.clients} concurrent: {total_tps:,.1f} tokens/s in all, {result['speedup']:.2f}x solo "
             f"(target >= 4), largest batch {result['max_batch_seen']}, tokens identical to solo: "
             f"{'yes' if not mismatches else 'NO, clients ' + str(mismatches)}",
             f"chat, first token after a {args.prefix}-token system message + {args.suffix}: miss "
             f"{chat_ttft_miss * 1e3:.1f} ms, hit {chat_ttft_hit * 1e3:.1f} ms "
             f"({result['chat_cached_tokens_hit'][0]} tokens cached): {result['chat_ttft_ratio']:.1f}x (target >= 10)",
             f"completion, first token after a {args.prefix}-token prefix + {args.suffix}: miss "
             f"{ttft_miss * 1e3:.1f} ms, hit {ttft_hit * 1e3:.1f} ms ({result['cached_tokens_hit'][0]} tokens "
             f"cached): {result['ttft_ratio']:.1f}x",
             f"traces of the compiled program: {len(traces)} in all, {timed_traces} during solo + concurrent "
             f"(shapes: {', '.join(result['traced_shapes'])})"]
    print("\n".join(lines), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json == "-":
        print(json.dumps(result, indent=1))
    elif args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
