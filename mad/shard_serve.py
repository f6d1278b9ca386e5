"""`mad serve --tensor-parallel`: one OpenAI-compatible server over the members of a group.

Member 0 runs the HTTP server and its engine (`mad.serve.Engine`); the other members open no port. Every
member holds an engine of its own and runs the same engine steps, because the model's collectives need
every member in every forward call: member 0's engine decides each step (the prompts it queues, the rows
it drops, whether to step) and hands that description to the others before it steps, and the others
replay it on their own `BatchGenerator` and step too, so that all members make the same forward calls in
the same order and evaluate the same arrays at the same points (a member that evaluated a part of a
step's lazy graph early would run that part's collectives in another order than the others: they would no
longer pair up, and the group would hang).

Each exchange is one `all_gather` of a small header per member (the size of what follows and flags from
member 0; from every member its count of running rows and queued prompts after the previous step, so a
member that no longer runs member 0's steps is an error, not silent garbage), then, when member 0 has
calls to hand over, one `all_sum` of their JSON bytes (member 0's, zeros from the others). The calls are
the generator's own (`insert` with every argument, `remove`, and a fresh generator after a failed step),
so the replay is the generator's code, whatever it does with them (the prompt cache included: every
member's cache sees the same prompts and states of the same sizes, so it keeps and drops the same ones);
the first message also carries member 0's engine settings (batch size, prompt cache bytes), which the
others take for theirs, since a generator's batch sizes are the shapes of its forward calls.

The sampled tokens come from member 0: `MemberGenerator` sums member 0's tokens with zeros from the others
(one collective of B integers a step, inside the step's lazy graph: no host sync), so the members never
diverge, even where their logits would differ in a last bit.

When member 0 has nothing to do it still exchanges every `IDLE_TICK` seconds (an empty step), and the
others sleep between those: an idle group wakes ten times a second instead of spinning in a collective
(the ring backend's receive spins a core), and the command's watchdog (`mad.shard.Watchdog`) sees progress
as long as member 0 is alive: a member 0 that hangs ends the others after the group's timeout, and the
other way round. Stopping member 0's server (SIGINT, SIGTERM) hands the others a last message: they
return, and their command exits with code 0. A member lost mid-step ends every member with exit code 2
(`mad.shard.exit_lost`).
"""

from __future__ import annotations

import inspect
import json
import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import asdict, replace
from typing import Any, Optional

import mlx.core as mx
import numpy as np

from .errors import MadError
from .generate import BatchGenerator, SamplingParams
from .shard import exit_lost, is_backend_error, sharding_of, watchdog

IDLE_TICK = 0.1  # seconds between member 0's exchanges while it has nothing to do
STEP, IDLE, STOP, RESET = 1, 2, 4, 8  # header flags from member 0 (a header: payload bytes, flags, then
                                      # the member's running rows and queued prompts, int32)


class MemberGenerator(BatchGenerator):
    """A `BatchGenerator` of one member: every sampled token is member 0's (an all_sum of member 0's tokens
    and zeros from the others, in the step's lazy graph), so that the members feed the same tokens back and
    make the same decisions (an eos, a finished row) whatever their own logits. (It overrides the
    generator's `_sample`: where the generator samples, whatever else it does around it.)"""

    def __init__(self, model: Any, group: Any, **kwargs: Any):
        super().__init__(model, **kwargs)
        self._group = group
        self._leader = group.rank() == 0

    def _sample(self, logits: mx.array, rows: list, want: bool = False) -> tuple[mx.array, Optional[tuple]]:
        tokens, logprobs = super()._sample(logits, rows, want)
        # the others add zeros computed from their own tokens, not constant ones: the sum must come after
        # the step's forward in every member's graph, or a member could run it before the forward's
        # collectives, and the members' collectives would no longer pair up
        mine = tokens if self._leader else tokens * 0
        return mx.distributed.all_sum(mine, group=self._group), logprobs


# ------------------------------------------------------------------------------------------- messages
def _encode(value: Any) -> Any:
    """A generator call's argument as JSON (SamplingParams tagged; every float exactly, as JSON's repr)."""
    if isinstance(value, SamplingParams):
        return {"SamplingParams": asdict(value)}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_encode(v) for v in (sorted(value) if isinstance(value, (set, frozenset)) else value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise MadError(f"tensor parallel serving cannot hand a {type(value).__name__} to the other members")


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        return SamplingParams(**value["SamplingParams"])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _exchange(group: Any, flags: int, payload: bytes, status: list[int]) -> tuple[list[list[int]], bytes]:
    """Every member's header row, and member 0's payload (a collective: every member calls it; only member
    0's `flags` and `payload` count)."""
    rows = mx.distributed.all_gather(mx.array([[len(payload), flags, *status]], dtype=mx.int32), group=group)
    rows = rows.tolist()
    size = rows[0][0]
    if not size:
        return rows, b""
    mine = mx.array(np.frombuffer(payload, dtype=np.uint8)) if group.rank() == 0 else mx.zeros((size,), mx.uint8)
    return rows, np.array(mx.distributed.all_sum(mine, group=group)).tobytes()


def _check_rows(rows: list[list[int]], rank: int) -> None:
    """Every member ran member 0's steps: the same running rows and queued prompts after the last one."""
    if rows[0][1] & RESET:  # a fresh generator on every member: the counts before it do not matter
        return
    differ = [r for r, row in enumerate(rows) if row[2:] != rows[0][2:]]
    if differ:
        _fatal(rank, f"member(s) {', '.join(map(str, differ))} no longer run member 0's steps (running rows and "
                     f"queued prompts: {', '.join(f'member {r} {rows[r][2:]}' for r in [0] + differ)})")


def _fatal(rank: int, message: str) -> None:
    print(f"error: tensor parallel: member {rank}: {message}", file=sys.stderr, flush=True)
    os._exit(2)


def _guarded(rank: int, fn, *args: Any) -> Any:
    """`fn(*args)`, a lost member (the backend's error) ending this member with exit code 2."""
    try:
        return fn(*args)
    except RuntimeError as e:
        if is_backend_error(e):
            exit_lost(e)
        raise


# ------------------------------------------------------------------------------------------- member 0
class _Channel:
    """Member 0's side of the exchanges: the generator calls made since the last one, sent with the next.
    The first message carries member 0's engine settings (`settings`), which the others take for theirs:
    a generator's batch sizes decide the shapes of its forward calls, so they must be member 0's."""

    def __init__(self, group: Any, settings: dict):
        self.group, self.rank = group, group.rank()
        self.ops: list = [["settings", settings]]
        self.status = [0, 0]  # running rows, queued prompts after the last step
        self.last = time.monotonic()
        self.closed = False
        self.generators = 0
        self.thread: Optional[threading.Thread] = None  # the thread that exchanges (the engine's)

    def due(self) -> bool:
        return not self.closed and time.monotonic() - self.last >= IDLE_TICK

    def send(self, flags: int) -> None:
        ops, self.ops = self.ops, []
        if any(op[0] == "reset" for op in ops):
            flags |= RESET
        payload = json.dumps(ops).encode() if ops else b""
        self.thread = threading.current_thread()
        watch = watchdog()
        if watch is not None:
            watch.waiting("handing a step to the other members")
        rows, _ = _guarded(self.rank, _exchange, self.group, flags, payload, self.status)
        _check_rows(rows, self.rank)
        if watch is not None:
            watch.waiting("a step of the model")
        self.last = time.monotonic()

    def close(self) -> None:
        """The last message: the other members return (once)."""
        if self.closed:
            return
        self.send(STOP)
        self.closed = True
        watch = watchdog()
        if watch is not None:
            watch.stop()


class Leader:
    """Member 0's generator for its engine (`Engine(make_generator=...)`): a `MemberGenerator` whose calls
    (`insert`, `remove`) are recorded and handed to the other members with the next `step`, which exchanges
    first and then steps. While the generator has no work, `busy` turns true every `IDLE_TICK` seconds
    (the engine wakes that often: `wake_every`) and `step` sends an empty step. `close` (the engine's
    thread, as it ends) releases the other members. Everything else is the generator's."""

    wake_every = IDLE_TICK

    def __init__(self, channel: _Channel, inner: MemberGenerator):
        self._channel, self._inner = channel, inner
        if channel.generators:  # a failed step: the engine starts a fresh generator, and so do the others
            channel.ops = [op for op in channel.ops if op[0] == "settings"] + [["reset"]]
        channel.generators += 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def busy(self) -> bool:
        return self._inner.busy or self._channel.due()

    def insert(self, prompt: Any, *args: Any, **kwargs: Any) -> list[int]:
        bound = inspect.signature(BatchGenerator.insert).bind(self._inner, prompt, *args, **kwargs)
        bound.apply_defaults()
        arguments = {k: v for k, v in bound.arguments.items() if k != "self"}
        if arguments.get("state") is not None:
            raise MadError("tensor parallel serving reads every prompt from the start (no state to continue from)")
        # a sampled row without a seed would draw its own key on every member: member 0 draws it for all
        arguments = {k: _seeded(v) for k, v in arguments.items()}
        message = {k: _encode(v) for k, v in arguments.items()}  # first: what cannot be sent changes nothing
        uids = self._inner.insert(**arguments)
        self._channel.ops.append(["insert", message, list(uids)])
        return uids

    def remove(self, uid: int) -> None:
        self._inner.remove(uid)
        self._channel.ops.append(["remove", int(uid)])

    def step(self) -> list:
        inner, channel = self._inner, self._channel
        if not inner.busy:
            channel.send(IDLE)
            channel.status = [inner.running, inner.waiting]
            return []
        channel.send(STEP)
        results = _guarded(channel.rank, inner.step)
        channel.status = [inner.running, inner.waiting]
        return results

    def close(self) -> None:
        self._channel.close()


def _seeded(value: Any) -> Any:
    if isinstance(value, SamplingParams) and value.temp > 0 and value.seed is None:
        return replace(value, seed=secrets.randbits(63))
    if isinstance(value, (list, tuple)):
        return type(value)(_seeded(v) for v in value)
    return value


# ------------------------------------------------------------------------------------------- the others
def follow(model: Any, tokenizer: Any) -> None:
    """Run member 0's engine steps on this member until member 0 stops (then return), with member 0's
    engine settings (its first message). SIGINT is ignored: a Ctrl-C reaches every member of a terminal's
    group, and this member stops when member 0 does."""
    from .serve import Engine

    s = sharding_of(model)
    group, rank, n = s.group, s.rank, s.n
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    made: dict = {}

    def make(model: Any, **kwargs: Any) -> MemberGenerator:
        made["kwargs"] = kwargs
        return MemberGenerator(model, group, **kwargs)

    def start(settings: dict) -> MemberGenerator:
        # an engine as member 0's (never started: its generator and prompt cache are what this member runs)
        engine = Engine(model, tokenizer, settings["max_batch"], settings["prompt_cache_bytes"], make_generator=make)
        if mx.default_device() == mx.gpu:  # the kernels member 0's engine thread chooses
            from .kernels.linear_device import MAX_INVARIANT_ROWS, batch_invariant

            batch_invariant(min(settings["max_batch"], MAX_INVARIANT_ROWS))
        return engine.generator

    gen: Any = None
    watch = watchdog()
    status = [0, 0]
    while True:
        if watch is not None:
            watch.waiting("waiting for the next step of member 0 (the server)",
                          "member 0" if n == 2 else "member 0 or another member")
        rows, data = _guarded(rank, _exchange, group, 0, b"", status)
        _check_rows(rows, rank)
        flags = rows[0][1]
        for op in json.loads(data) if data else []:
            if op[0] == "settings":
                gen = start(op[1])
            elif op[0] == "insert":
                uids = gen.insert(**{k: _decode(v) for k, v in op[1].items()})
                if list(uids) != op[2]:
                    _fatal(rank, f"its generator numbered a prompt's rows {list(uids)}, member 0's {op[2]}")
            elif op[0] == "remove":
                gen.remove(op[1])
            else:  # reset: member 0's engine failed a step and started a fresh generator
                gen = make(model, **made["kwargs"])
        if flags & STOP:
            if watch is not None:
                watch.stop()
            return
        if flags & STEP:
            if watch is not None:
                watch.waiting("a step of the model")
            try:
                gen.step()
            except Exception as e:  # noqa: BLE001 - member 0 fails the same step and starts afresh (a reset)
                if is_backend_error(e):
                    exit_lost(e)
        status = [gen.running, gen.waiting] if gen is not None else status
        if flags & IDLE:
            time.sleep(IDLE_TICK)


def serve_sharded(model: Any, tokenizer: Any, **kwargs: Any) -> None:
    """`mad serve --tensor-parallel` on this member: member 0 serves (`mad.serve.serve`'s arguments), the
    others follow it (`follow`)."""
    from .serve import serve

    s = sharding_of(model)
    if s.rank != 0:
        follow(model, tokenizer)
        return
    channel = _Channel(s.group, {"max_batch": kwargs["max_batch"], "prompt_cache_bytes": kwargs["prompt_cache_bytes"]})

    def make(model: Any, **generator_kwargs: Any) -> Leader:
        return Leader(channel, MemberGenerator(model, s.group, **generator_kwargs))

    try:
        serve(model, tokenizer, make_generator=make, **kwargs)
    finally:
        # the server stopped without its engine releasing the others (it never started: a port in use, a
        # bad chat template): release them from here, unless the engine's thread still runs
        if not channel.closed and (channel.thread is None or not channel.thread.is_alive()):
            channel.close()


__all__ = ["IDLE_TICK", "Leader", "MemberGenerator", "follow", "serve_sharded"]
