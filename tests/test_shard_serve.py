"""Tensor parallelism in the commands: `mad serve --tensor-parallel`, and members that hang.

`mad serve --tensor-parallel` runs as 2 members of a ring group on localhost (started with the environment
`mlx.launch -n 2 --backend ring` gives them, without its launcher: see tests/test_shard.py), serving the
tiny hf-tiny checkpoint; the official `openai` client is the client. At temperature 0 every answer is the
text a single process generates for the prompt alone (`stream_generate` in this process): completions,
several prompts with n > 1, a streamed chat, concurrent clients decoded together, stop strings, the prefix
cache. Sampled requests (seeded or not) leave the members together. Member 1 listens on no port of its own
but the ring's; stopping member 0 (SIGTERM) stops member 1 with exit code 0.

A member that is alive but never joins a collective (SIGSTOP: the whole process, its threads included,
stops where it is) must not hang the others: `mad run` and `mad serve` end with one message and exit code
2 within the group's timeout (`MAD_TP_TIMEOUT`, short here). The member stops itself right after loading,
before its first step, through this file's launcher (`python tests/test_shard_serve.py stall RANK mad ...`
runs the command with the member's `cli_io` load followed by SIGSTOP: a hook of this test only).

The bound: the sharded model is another float32 summation order of the same model (tests/test_shard.py);
greedy tokens equal the single process's unless two logits tie within that order's rounding, which the
hf-tiny prompts here do not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from serve_clients import concurrent_completions

ROOT = Path(__file__).resolve().parents[1]
HF_TINY = ROOT / "tests" / "fixtures" / "hf-tiny"
SYSTEM = "You are a helpful assistant who answers in short sentences. " * 12  # about 500 ids: two blocks
STALL_TIMEOUT = 10  # MAD_TP_TIMEOUT of the tests of members that hang (s)

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")


# ----------------------------------------------------------------------------------------- launching
def _env(**extra: str) -> dict:
    return dict(os.environ, MAD_BLAS="mlx", MLX_ENABLE_TF32="0", PYTHONPATH=str(ROOT), **extra)


def members(tmp: Path, n: int, command: list[str], stall: int | None = None, extra: dict | None = None,
            **env: str) -> SimpleNamespace:
    """Start `mad COMMAND` as the n members of a ring group on localhost (as mlx.launch starts them), output
    to files; with `stall`, that member stops itself (SIGSTOP) right after loading; `extra`: more arguments
    for some members, by rank."""
    from mad.shard import free_ports

    base = free_ports(n + 1)  # the members' ring ports, then the server's
    hosts = tmp / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{base + i}"] for i in range(n)]))
    if command[0] == "worker":  # this file's worker
        launcher = [sys.executable, str(Path(__file__))]
    elif stall is not None:
        launcher = [sys.executable, str(Path(__file__)), "stall", str(stall)]
    else:
        launcher = [sys.executable, "-m", "mad.cli"]
    procs, logs = [], []
    for r in range(n):
        out, err = open(tmp / f"out{r}.txt", "w"), open(tmp / f"err{r}.txt", "w")
        cmd = [arg.replace("{port}", str(base + n)) for arg in command + (extra or {}).get(r, [])]
        procs.append(subprocess.Popen(launcher + cmd, cwd=ROOT, stdout=out, stderr=err,
                                      env=_env(MLX_HOSTFILE=str(hosts), MLX_RANK=str(r), **env)))
        logs.append((out, err))
    return SimpleNamespace(procs=procs, port=base + n, ring=[base + i for i in range(n)], tmp=tmp, logs=logs)


def stderr(group: SimpleNamespace, rank: int) -> str:
    return (group.tmp / f"err{rank}.txt").read_text()


def finish(group: SimpleNamespace) -> None:
    for p in group.procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    for out, err in group.logs:
        out.close()
        err.close()


def wait_until_serving(group: SimpleNamespace, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        for r, p in enumerate(group.procs):
            assert p.poll() is None, f"member {r} exited with {p.returncode}:\n{stderr(group, r)[-3000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{group.port}/health", timeout=5) as reply:
                if json.loads(reply.read())["status"] == "ok":
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the server did not start:\n{stderr(group, 0)[-3000:]}")


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on (Linux: its socket inodes in /proc/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


# ----------------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def tp(tmp_path_factory):
    import mad

    group = members(tmp_path_factory.mktemp("tp-serve"), 2,
                    ["serve", str(HF_TINY), "--tensor-parallel", "--port", "{port}", "--max-tokens", "32",
                     "--log-level", "warning"], MAD_TP_TIMEOUT="120",
                    # member 1 takes member 0's engine settings: its batch sizes (the shapes of its forward
                    # calls) must be member 0's, whatever its own command line says
                    extra={0: ["--max-batch", "8"], 1: ["--max-batch", "3"]})
    try:
        wait_until_serving(group)
        model, tok = mad.load(HF_TINY)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{group.port}/v1", api_key="none", max_retries=0,
                               timeout=120)
        yield SimpleNamespace(group=group, model=model, tok=tok, client=client)
    finally:
        finish(group)


def solo(tp, prompt, max_tokens: int = 32) -> str:
    """The text one process generates for `prompt` alone, at temperature 0."""
    from mad.generate import stream_generate

    return "".join(r.text for r in stream_generate(tp.model, tp.tok, prompt, max_tokens=max_tokens))


def chat_prompt(messages) -> str:
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def health(tp) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{tp.group.port}/health", timeout=30) as reply:
        return json.loads(reply.read())


def test_completions_and_a_streamed_chat_are_one_process_s(tp):
    c = tp.client
    r = c.completions.create(model="hf-tiny", prompt="The xLSTM", max_tokens=20, temperature=0)
    assert r.choices[0].text == solo(tp, "The xLSTM", 20)
    ids = tp.tok.encode("Hello there")
    assert c.completions.create(model="hf-tiny", prompt=ids, max_tokens=12, temperature=0).choices[0].text == \
        solo(tp, ids, 12)
    r = c.completions.create(model="hf-tiny", prompt=["a b", "c d"], max_tokens=6, temperature=0, n=2)
    assert [ch.text for ch in r.choices] == [solo(tp, "a b", 6)] * 2 + [solo(tp, "c d", 6)] * 2
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    chunks = list(c.chat.completions.create(model="hf-tiny", messages=messages, max_tokens=16, temperature=0,
                                            stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == solo(tp, chat_prompt(messages), 16)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_concurrent_clients_get_their_solo_tokens(tp):
    # 3 rows: member 0 (--max-batch 8) decodes them as a batch of 4; member 1 (--max-batch 3) takes that
    # from member 0, or its forward calls would have other shapes than member 0's
    prompts = [f"Client {i} says: " + "la " * i for i in range(3)]
    expected = [solo(tp, p, 32) for p in prompts]
    assert concurrent_completions(tp.client, "hf-tiny", prompts, 32, timeout=180) == expected
    assert health(tp)["running"] == 0


def test_stops_the_prefix_cache_and_sampling_keep_the_members_together(tp):
    """What member 0 decides alone (a stop string ends a row, a prompt continues from a cached state, an
    unseeded sampled request draws its seed) reaches member 1: the answers stay the single process's."""
    c = tp.client
    full = solo(tp, "The xLSTM", 30)
    stop = full[5:7]
    r = c.completions.create(model="hf-tiny", prompt="The xLSTM", max_tokens=30, temperature=0, stop=[stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (full[:full.index(stop)], "stop")
    cached = []
    for question in ("What is an xLSTM?", "And a transformer?"):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        r = c.chat.completions.create(model="hf-tiny", messages=messages, max_tokens=12, temperature=0)
        assert r.choices[0].message.content == solo(tp, chat_prompt(messages), 12)
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
    assert cached[0] == 0 and cached[1] >= 256
    kw = dict(model="hf-tiny", prompt="Hello", max_tokens=16, temperature=1.0)
    a, b = (c.completions.create(seed=7, **kw).choices[0].text for _ in range(2))
    assert a == b
    c.completions.create(n=3, **kw)  # member 0 draws the seeds
    test_completions_and_a_streamed_chat_are_one_process_s(tp)
    assert health(tp)["running"] == 0


def test_member_1_opens_no_port(tp):
    if not Path("/proc/net/tcp").exists():
        pytest.skip("reads /proc (Linux)")
    leader, follower = (listening_ports(p.pid) for p in tp.group.procs)
    assert tp.group.port in leader
    assert follower <= set(tp.group.ring), follower  # the ring backend's own, nothing else


def test_stopping_member_0_stops_the_others(tp):
    group = tp.group
    group.procs[0].send_signal(signal.SIGTERM)
    for p in group.procs:
        p.wait(timeout=60)
    assert group.procs[1].returncode == 0, stderr(group, 1)[-3000:]
    assert group.procs[0].returncode in (0, -signal.SIGTERM), stderr(group, 0)[-3000:]  # uvicorn re-raises it
    assert "Traceback" not in stderr(group, 0) + stderr(group, 1)


# ----------------------------------------------------------------------------------------- tokens
def test_sampled_tokens_are_member_0s(tmp_path):
    """Member 1's own logits do not decide its tokens: with its logits negated (its argmax is another
    token), its generator still feeds back and hands out member 0's."""
    group = members(tmp_path, 2, ["worker", str(tmp_path)])
    try:
        for p in group.procs:
            p.wait(timeout=240)
        results = [json.loads((tmp_path / f"tokens{r}.json").read_text()) for r in range(2)]
    finally:
        finish(group)
    assert results[0]["tokens"] == results[1]["tokens"] and len(results[0]["tokens"]) == 12
    assert results[1]["own_first"] != results[0]["tokens"][0]  # the test can fail: member 1 would pick another


def _tokens_worker(out: Path) -> None:
    import mlx.core as mx

    import mad
    from mad import shard
    from mad.generate import SamplingParams
    from mad.shard_serve import MemberGenerator

    group = shard.init_group(timeout=60)
    rank = group.rank()
    model, _ = mad.load(HF_TINY, group=group)
    own: list = []

    class Negated:  # member 1's logits negated (its argmax: another token), the forward and collectives the same
        def __init__(self, m):
            self._m = m

        def __getattr__(self, name):
            return getattr(self._m, name)

        def __call__(self, *args, **kwargs):
            logits, state = self._m(*args, **kwargs)
            # every member evaluates the logits here: members must evaluate the same arrays at the same points,
            # or their collectives run in another order and no longer pair up
            mx.eval(logits)
            if rank == 0:
                return logits, state
            own.append(mx.argmax(-logits[:, -1], axis=-1).tolist())
            return -logits, state

    gen = MemberGenerator(Negated(model), group)
    gen.insert([1, 5, 9, 12, 3], [SamplingParams()], max_tokens=12)
    tokens: list = []
    while gen.busy:
        tokens += [r.token for r in gen.step()]
    (out / f"tokens{rank}.json").write_text(json.dumps({"tokens": tokens, "own_first": own[0][0] if own else None}))


# ----------------------------------------------------------------------------------------- members that hang
def _ends_with(group: SimpleNamespace, rank: int, message: str) -> None:
    """Member `rank` exits with code 2 and `message`, within the timeout of the moment the stalled member
    stopped (the time it wrote)."""
    deadline = time.time() + 240
    while not (group.tmp / "stalled").exists() and time.time() < deadline:
        assert group.procs[rank].poll() is None, stderr(group, rank)[-3000:]
        time.sleep(0.1)
    stalled = float((group.tmp / "stalled").read_text())
    group.procs[rank].wait(timeout=STALL_TIMEOUT + 60)
    took = time.time() - stalled
    err = stderr(group, rank)
    assert group.procs[rank].returncode == 2, err[-3000:]
    assert message in " ".join(err.split()), err[-3000:]
    assert "Traceback" not in err
    assert STALL_TIMEOUT - 2 <= took <= STALL_TIMEOUT + 30, took  # its last step began about as the other stopped


def test_a_member_that_hangs_ends_mad_run(tmp_path):
    group = members(tmp_path, 2, ["run", str(HF_TINY), "--prompt-ids", "1,5,9,12,3", "--tokenizer", "bytes", "-m",
                                  "6", "--tensor-parallel"], stall=1, MAD_TP_TIMEOUT=str(STALL_TIMEOUT))
    try:
        _ends_with(group, 0, f"error: tensor parallel: member 0 of 2: a step of the model took more than "
                             f"{STALL_TIMEOUT} s: member 1 did not take part")
    finally:
        finish(group)


@pytest.mark.parametrize("stall, rank, message", [
    (1, 0, "member 0 of 2: handing a step to the other members took more than {t} s: member 1 did not take part"),
    (0, 1, "member 1 of 2: waiting for the next step of member 0 (the server) took more than {t} s: member 0 did "
           "not take part"),
])
def test_a_member_that_hangs_ends_mad_serve(tmp_path, stall, rank, message):
    group = members(tmp_path, 2, ["serve", str(HF_TINY), "--tensor-parallel", "--port", "{port}", "--log-level",
                                  "warning"], stall=stall, MAD_TP_TIMEOUT=str(STALL_TIMEOUT))
    try:
        _ends_with(group, rank, "error: tensor parallel: " + message.format(t=STALL_TIMEOUT))
    finally:
        finish(group)


def _stall_main(rank: int, args: list[str]) -> None:
    """`mad ARGS` with member `rank` stopping itself (SIGSTOP) once its model is loaded: alive, and never
    in another collective."""
    import mad.shard as shard
    from mad.cli import main

    real = shard.cli_io

    def cli_io(tensor_parallel, timeout=None):
        load, load_state, save_state = real(tensor_parallel, timeout)

        def load_then_stall(*a, **kw):
            loaded = load(*a, **kw)
            if int(os.environ["MLX_RANK"]) == rank:
                (Path(os.environ["MLX_HOSTFILE"]).parent / "stalled").write_text(str(time.time()))
                os.kill(os.getpid(), signal.SIGSTOP)
            return loaded

        return load_then_stall, load_state, save_state

    shard.cli_io = cli_io
    sys.argv = ["mad", *args]
    main()


if __name__ == "__main__":
    if sys.argv[1] == "stall":
        _stall_main(int(sys.argv[2]), sys.argv[3:])
    elif sys.argv[1] == "worker":
        _tokens_worker(Path(sys.argv[2]))
