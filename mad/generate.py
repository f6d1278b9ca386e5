"""The decode loop: `generate_step`, `stream_generate`, `generate`, and batches (`BatchGenerator`, `batch_generate`).

`stream_generate` yields `GenerationResponse`s (text segment, token, timing figures); `generate` returns
the whole text. The recurrent state is the cache: a prompt is read once, then one token per step, and the
final response carries the state, which a later call can continue from.

Each prompt of a batch is read on its own (batch 1), then the states are concatenated along the batch axis
and decoded one token per step; a finished sequence leaves (its row is sliced out), a new one joins after its
own prompt. A decode step runs at a few batch sizes only (`decode_bucket`: powers of two, with inert copies
of a row as padding) and a prompt is read in calls of a few shapes (`next_prompt_end`), so the compiled
program is traced a bounded number of times: whole blocks, then the rest in one call padded to a power of
two with inert positions (`Program`'s `valid`) where the model can, else in pieces of decreasing powers
of two (each of which reads every weight once more). Each row samples with its own parameters and PRNG key, so a
sequence gives the same tokens in a batch as alone.

Prompts are read in blocks of `PREFILL_BLOCK` tokens counted from the start (or from a cut the caller
names, such as the end of a chat's system part), whoever reads them (a solo run, a batch, the server, a
prompt cache): a state saved at a block boundary or a cut and continued gives exactly the numbers of a
prompt read from the start, because every forward call has the same shape in both cases (float32 rounding
depends on how a prompt is split into calls).

The model wrapper lives in `mad.model`, samplers in `mad.sampling`, tokenizers in `mad.tokenizers`; their
names are re-exported here so that `from mad.generate import LanguageModel, make_sampler, ...` keeps working.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import mlx.core as mx

from .errors import MadError
from .kernels.registry import inference
from .model import PREFILL_STEP, LanguageModel, check_prompt, check_state_arrays, state_spec
from .sampling import apply_repetition_penalty, check_sampling, filtered_logprobs, make_sampler
from .tokenizers import ByteTokenizer, HFTokenizer, StreamingDetokenizer

PREFILL_BLOCK = 256  # prompt tokens per forward call, counted from the start (module doc: why a fixed block)


def next_prompt_end(pos: int, total: int, block: int = PREFILL_BLOCK, cuts: Sequence[int] = (),
                    pad: bool = False) -> int:
    """Where the batch reader's next forward call over a prompt of `total` tokens ends, having read `pos`.

    The prompt is read in segments: from the start to the first of `cuts` (positions where a call must end,
    e.g. the end of a chat's system part), from there to the next, and so on to `total`. A segment is read
    in whole blocks of `block` tokens counted from its start, then the rest: in one call when `pad` (run
    at `padded_width` tokens, the positions after the rest inert), else in pieces of decreasing powers of
    two (200 = 128 + 64 + 8). Either way at most `block.bit_length()` distinct call shapes, so the compiled
    program is traced a bounded number of times however many prompt lengths come. The calls depend on
    (pos, total, cuts, pad) only, so a prompt continued from a snapshot at a `resume_points` position makes
    the calls, and gets the numbers, of one read from the start.
    """
    start = max((c for c in cuts if c <= pos), default=0)
    end = min((c for c in cuts if pos < c < total), default=total)
    whole = start + (end - start) // block * block
    if pos < whole:
        return min(whole, start + ((pos - start) // block + 1) * block)
    return end if pad else pos + (1 << ((end - pos).bit_length() - 1))


def padded_width(n: int) -> int:
    """The tokens of a call that reads `n` prompt tokens and pads the rest: the next power of two."""
    return 1 << (n - 1).bit_length()


def resume_points(total: int, cuts: Sequence[int] = (), block: int = PREFILL_BLOCK) -> list[int]:
    """The call ends before `total` (ascending) where reading can stop and later continue exactly: each cut,
    and each whole block counted from the start of its segment (`next_prompt_end`)."""
    points, start = [], 0
    for end in sorted({int(c) for c in cuts if 0 < c < total}) + [total]:
        points += range(start + block, end, block)
        if end < total:
            points.append(end)
        start = end
    return points


def decode_bucket(rows: int, max_batch: Optional[int] = None) -> int:
    """The batch size a decode step of `rows` sequences runs at: the next power of two, at most
    `max_batch` (when `rows` fits in it), so that a batch whose size keeps changing traces few shapes."""
    size = 1 << max(rows - 1, 0).bit_length()
    return max(rows, min(size, max_batch)) if max_batch else size


@dataclass
class GenerationResponse:
    """One step of `stream_generate`: the text that became printable, the token, and the running figures."""

    text: str
    token: Optional[int]  # None only on the one response of max_tokens=0 (the prompt was read, nothing generated)
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: Optional[str] = None
    state: Optional[dict] = None  # on the final response: the state that has read prompt and output


def generate_step(model: LanguageModel, prompt: mx.array, state: Optional[dict] = None,
                  sampler: Callable = make_sampler(), repetition_penalty: float = 1.0,
                  repetition_context: int = 20) -> Iterator[tuple[mx.array, dict]]:
    """Yield (token, state) forever: the prompt is read once, then one token per step.

    The next step is queued (`mx.async_eval`) before the current token is handed out, so the host
    never waits for the device between tokens. The yielded state has read the yielded token.
    The prompt (1-D ids) and a given state are checked once; the tokens fed back are the sampler's,
    always inside the vocabulary, so the steps skip the check (`check_tokens=False`).
    """
    check_sampling(repetition_penalty=repetition_penalty, repetition_context=repetition_context)
    if not isinstance(prompt, mx.array):
        try:
            prompt = mx.array(prompt)
        except Exception as e:  # noqa: BLE001
            raise MadError(f"prompt: cannot be read as an array of token ids ({e})") from None
    prompt = model.check_tokens(prompt[None] if prompt.ndim == 1 else prompt, "prompt")
    if prompt.shape[0] != 1:
        raise MadError(f"prompt: generate_step reads one sequence, got shape {tuple(prompt.shape)}")
    prompt = prompt[0].astype(mx.int32)
    history = prompt[-repetition_context:]

    def sample(logits: mx.array) -> mx.array:
        if repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, history[None, -repetition_context:], repetition_penalty)
        return sampler(logits)

    if state is not None:
        check_state_arrays(model.program.graph, state, batch=1, spec=getattr(model, "_state_spec", None))
    logits, state = model.prefill(prompt[None], state, PREFILL_BLOCK, check_tokens=False)  # checked above
    token = sample(logits)
    mx.async_eval(token, state)
    while True:
        if repetition_penalty != 1.0:
            history = mx.concatenate([history, token])[-repetition_context:]  # bounded, however long the run
        with inference():  # kernels run bare: no gradient of a decode step (kernels/registry.py)
            next_logits, next_state = model(token[:, None], state, check_tokens=False)
        next_token = sample(next_logits[:, -1])
        mx.async_eval(next_token, next_state)
        yield token, next_state
        token, state = next_token, next_state


def resolve_tokenizer(model: LanguageModel, tokenizer: Any) -> Any:
    """`tokenizer`, else the model's own, else bytes for a vocabulary of up to 256 ids (else a MadError)."""
    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    if tokenizer is None:
        if model.vocab_size > 256:
            raise MadError(f"no tokenizer for a model with a vocabulary of {model.vocab_size} ids (bytes cover "
                           "256): pass one (mad.load(..., tokenizer=FILE), HFTokenizer(FILE)), or ByteTokenizer() "
                           "to use raw bytes anyway")
        tokenizer = ByteTokenizer()
    return tokenizer


def prompt_ids(prompt: Any, tokenizer: Any) -> list[int]:
    """A prompt (text, or a sequence / 1-D array of integer ids) as a list of ids; a MadError otherwise."""
    if isinstance(prompt, str):
        return [int(t) for t in tokenizer.encode(prompt)]
    if isinstance(prompt, mx.array):
        if prompt.dtype == mx.bool_ or not mx.issubdtype(prompt.dtype, mx.integer) or prompt.ndim != 1:
            raise MadError(f"prompt: expected text or a 1-D array of integer token ids, got {prompt.dtype} "
                           f"array of shape {tuple(prompt.shape)}")
        return [int(t) for t in prompt.tolist()]
    if isinstance(prompt, (bytes, bytearray, dict)) or not hasattr(prompt, "__iter__"):
        raise MadError(f"prompt: expected text or a sequence of token ids, got {type(prompt).__name__}")
    import numpy as np

    ids = list(prompt)
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, (int, np.integer))]
    if bad:
        raise MadError(f"prompt: token ids must be integers, got {bad[0]!r}")
    return [int(t) for t in ids]


def stream_generate(model: LanguageModel, tokenizer: Any, prompt: str | Sequence[int] | mx.array,
                    max_tokens: int = 256, state: Optional[dict] = None, **kwargs: Any) -> Iterator[GenerationResponse]:
    """Generate from `prompt` (text or ids), yielding text segments as they become printable.

    kwargs: temp, top_p, top_k, min_p, repetition_penalty, repetition_context (checked: a MadError names
    a bad one). `tokenizer` None: the model's own, else (for a vocabulary of up to 256 ids) bytes; a
    larger vocabulary without a tokenizer is a MadError (pass `ByteTokenizer()` to want bytes anyway).
    `max_tokens=0` reads the prompt and yields one response with no token (`token` None) that carries
    the state.
    """
    tokenizer = resolve_tokenizer(model, tokenizer)
    check_sampling(max_tokens=max_tokens, **kwargs)
    ids = prompt_ids(prompt, tokenizer)
    check_prompt(ids, model.vocab_size)
    if state is not None:
        check_state_arrays(model.program.graph, state, batch=1, spec=getattr(model, "_state_spec", None))
    sampler = make_sampler(**{k: kwargs.pop(k) for k in ("temp", "top_p", "top_k", "min_p") if k in kwargs})
    detok = StreamingDetokenizer(tokenizer)
    eos = set(getattr(tokenizer, "eos_token_ids", ()))
    start = time.perf_counter()
    if max_tokens == 0:
        _, state = model.prefill(mx.array([ids], dtype=mx.int32), state, PREFILL_BLOCK, check_tokens=False)
        mx.eval(state)
        prompt_tps = len(ids) / max(time.perf_counter() - start, 1e-9)
        yield GenerationResponse("", None, len(ids), prompt_tps, 0, 0.0, mx.get_peak_memory() / 1e9, "length", state)
        return
    prompt_tps = gen_start = 0.0
    for n, (token, step_state) in enumerate(generate_step(model, mx.array(ids, dtype=mx.int32), state, sampler, **kwargs), 1):
        tok = int(token.item())  # the one host sync per token, after the next step was queued
        if n == 1:
            gen_start = time.perf_counter()
            prompt_tps = len(ids) / max(gen_start - start, 1e-9)
        done = tok in eos or n >= max_tokens
        if tok not in eos:
            detok.add(tok)
        tps = (n - 1) / max(time.perf_counter() - gen_start, 1e-9) if n > 1 else 0.0
        reason = ("stop" if tok in eos else "length") if done else None
        yield GenerationResponse(detok.flush() if done else detok.pop(), tok, len(ids), prompt_tps, n, tps,
                                 mx.get_peak_memory() / 1e9, reason, step_state if done else None)
        if done:
            break


def generate(model: LanguageModel, tokenizer: Any, prompt: str | Sequence[int], max_tokens: int = 256,
             verbose: bool = False, **kwargs: Any) -> str:
    """The generated text as one string (prints it as it streams when verbose)."""
    text = ""
    last = None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs):
        text += last.text
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print_stats(last)
    return text


# ----------------------------------------------------------------------------------------------- batches
MAX_TOP_LOGPROBS = 20  # as OpenAI's API


@dataclass(frozen=True)
class SamplingParams:
    """One sequence's sampling: `temp` (0 is greedy), `top_p`, `top_k`, `min_p` as `make_sampler` takes them,
    and `seed`, the sequence's own PRNG key: a seeded sequence draws the same tokens in any batch, and the
    same as `stream_generate` after `mx.random.seed(seed)`. `logprobs`: None for none, 0 for the chosen
    token's log-probability, k > 0 for the k most likely tokens as well (at most `MAX_TOP_LOGPROBS`)."""

    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    logprobs: Optional[int] = None

    def check(self) -> "SamplingParams":
        """Self, or a MadError naming the first bad field."""
        check_sampling(temp=self.temp, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**64):
            raise MadError(f"seed must be an integer in 0..{2**64 - 1}, got {self.seed!r}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise MadError(f"logprobs must be an integer in 0..{MAX_TOP_LOGPROBS}, got {self.logprobs!r}")
        return self


@dataclass
class BatchResult:
    """One token of one sequence (`uid`), as `BatchGenerator.step` hands it out."""

    uid: int
    token: int
    finish_reason: Optional[str] = None  # "stop" (an eos token), "length" (max_tokens), None: more to come
    logprob: Optional[float] = None  # log-probability of `token` under the model (before temperature), if asked
    top_logprobs: Optional[list[tuple[int, float]]] = None  # the k most likely (id, log-probability), if asked
    cached_tokens: int = 0  # prompt tokens this sequence took from the prompt cache


@dataclass(eq=False)
class _Row:
    uid: int
    params: SamplingParams
    max_tokens: int
    eos: frozenset
    key: Optional[mx.array]  # PRNG key, split once per sampled token
    generated: int = 0
    cached_tokens: int = 0


@dataclass(eq=False)
class _Prompt:
    """A queued prompt: `pos` of its `ids` are read into `state` (a batch of 1)."""

    ids: list[int]
    rows: list[_Row]
    state: Optional[dict]
    cacheable: bool  # read from the start (no state given): its snapshots are keyed by its ids
    cuts: tuple[int, ...]  # positions where a forward call ends (`next_prompt_end`)
    pos: int = 0
    started: bool = False
    resumable: set = field(default_factory=set)  # `resume_points`: where the state is evaluated
    snapshots: set = field(default_factory=set)  # those of them the cache keeps
    logits: Optional[mx.array] = None  # (1, V) after the last prompt token


class BatchGenerator:
    """Decode many sequences as one batch, one token per `step()`; sequences join and leave at any step.

    `insert` queues a prompt with one or more sampling rows (n completions share one reading of the
    prompt); `step` reads queued prompts in blocks (up to `prefill_budget` tokens per step, so that running
    sequences keep going while a long prompt is read; None: every queued prompt), then decodes every
    running row by one token and returns the tokens that became known. The next step is queued before the
    current tokens are read (`mx.async_eval`), so the host does not wait for the device between steps.

    `prompt_cache` (a `mad.prompt_cache.PromptCache`): a prompt continues from the longest cached prefix
    and leaves snapshots for later prompts; the tokens are the same with and without it (see the module
    doc on blocks). Not thread-safe: the server gives it one thread of its own.

    `pad_prompts`: read the rest of a prompt after its whole blocks in one padded call (`next_prompt_end`);
    None (default): where the model can (`pads_exactly`), False: in power-of-two pieces.
    """

    def __init__(self, model: LanguageModel, *, prefill_block: int = PREFILL_BLOCK,
                 prefill_budget: Optional[int] = PREFILL_STEP, prompt_cache: Any = None,
                 max_batch: Optional[int] = None, pad_prompts: Optional[bool] = None):
        for name, value in (("prefill_block", prefill_block), ("prefill_budget", prefill_budget),
                            ("max_batch", max_batch)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise MadError(f"{name} must be a positive integer, got {value!r}")
        if prompt_cache is not None and prompt_cache.block != prefill_block:
            raise MadError(f"the prompt cache keeps states every {prompt_cache.block} tokens and the generator "
                           f"reads prompts in blocks of {prefill_block}: they must agree")
        if pad_prompts is not None and not isinstance(pad_prompts, bool):
            raise MadError(f"pad_prompts must be True, False or None, got {pad_prompts!r}")
        can_pad = bool(getattr(model, "pads_exactly", False))
        if pad_prompts and not can_pad:
            raise MadError("pad_prompts: this model cannot end a call in inert padding (a stateful block "
                           "without it, e.g. sLSTM)")
        self.model = model
        self.pad = can_pad if pad_prompts is None else pad_prompts
        self.block = prefill_block
        self.budget = prefill_budget
        self.max_batch = max_batch
        self.cache = prompt_cache
        # the batch axis of each state entry: its one symbolic (batch) dim
        self._axes = {node: {name: entry[2][0] for name, entry in names.items()}
                      for node, names in model._state_spec.items()}
        self._waiting: deque[_Prompt] = deque()
        self._rows: list[_Row] = []  # the running rows, in batch order (then inert padding rows)
        self._tokens: Optional[mx.array] = None  # (bucket,): each row's sampled token, not yet handed out
        self._logprobs: Optional[tuple] = None  # (chosen (B,), top ids (B, K), top values (B, K)) of those
        self._state: Optional[dict] = None  # has read everything before `_tokens`
        self._removed: set[int] = set()
        self._next_uid = 0
        self.max_batch_seen = 0  # the largest batch decoded so far (tests and benchmarks read it)
        self.call_shapes: set[tuple] = set()  # (tokens shape, last_only) of every forward call: what is traced

    def insert(self, prompt: Sequence[int], params: Sequence[SamplingParams] = (SamplingParams(),),
               max_tokens: int = 256, eos: Sequence[int] = (), state: Optional[dict] = None,
               cuts: Sequence[int] = ()) -> list[int]:
        """Queue a prompt of ids with one row per entry of `params`; returns the rows' uids.

        `state` (batch 1): continue from it (the prompt cache is then not used: its keys are prompts read
        from the start). `cuts`: positions in the prompt where a forward call ends and the cache keeps a
        snapshot (the end of a chat's system part): a later prompt with the same part and the same cut
        continues exactly there. Every argument is checked here (a MadError), nothing inside `step`.
        """
        if isinstance(prompt, str):
            raise MadError("insert: the prompt is token ids (tokenize text first, or use batch_generate)")
        ids = prompt_ids(prompt, None)
        check_prompt(ids, self.model.vocab_size)
        check_sampling(max_tokens=max_tokens)
        if max_tokens < 1:
            raise MadError(f"max_tokens must be at least 1, got {max_tokens}")
        if not params:
            raise MadError("insert: give at least one SamplingParams")
        params = [p.check() for p in params]
        if state is not None:
            check_state_arrays(self.model.program.graph, state, batch=1, spec=self.model._state_spec)
        eos = frozenset(int(e) for e in eos)
        rows = []
        for p in params:
            key = mx.random.key(p.seed if p.seed is not None else secrets.randbits(63)) if p.temp > 0 else None
            rows.append(_Row(self._next_uid, p, max_tokens, eos, key))
            self._next_uid += 1
        if isinstance(cuts, (str, bytes)) or not all(isinstance(c, int) and not isinstance(c, bool) for c in cuts):
            raise MadError(f"cuts: expected positions in the prompt (integers), got {cuts!r}")
        cuts = tuple(sorted({c for c in cuts if 0 < c < len(ids)}))  # at the ends a cut changes nothing
        self._waiting.append(_Prompt(ids, rows, state, state is None, cuts))
        return [r.uid for r in rows]

    def remove(self, uid: int) -> None:
        """Stop a sequence (its client left, a stop string was seen): it leaves at the next step."""
        self._removed.add(uid)

    @property
    def busy(self) -> bool:
        """Whether `step` has work: prompts to read or rows to decode."""
        return bool(self._waiting or self._rows)

    @property
    def running(self) -> int:
        """Rows being decoded."""
        return len(self._rows)

    @property
    def waiting(self) -> int:
        """Prompts queued or being read."""
        return len(self._waiting)

    def step(self) -> list[BatchResult]:
        """Read queued prompts (within the budget), decode one token of every row; the tokens now known."""
        self._drop_removed()
        self._read_prompts()
        if not self._rows:
            return []
        rows, tokens, logprobs = self._rows, self._tokens, self._logprobs
        logits, self._state = self._forward(tokens[:, None], self._state)
        self._tokens, self._logprobs = self._sample(logits[:, -1], rows)
        mx.async_eval(self._tokens, self._state, *(self._logprobs or ()))  # step t+1 queued before t is read
        self.max_batch_seen = max(self.max_batch_seen, len(rows))
        results = self._results(rows, tokens, logprobs)  # the host reads this step's tokens: the next is queued
        done = {r.uid for r in results if r.finish_reason is not None}
        if done:
            self._keep([i for i, row in enumerate(rows) if row.uid not in done])
        return results

    def _drop_removed(self) -> None:
        if not self._removed:
            return
        for p in list(self._waiting):
            p.rows = [r for r in p.rows if r.uid not in self._removed]
            if not p.rows:
                self._waiting.remove(p)
        keep = [i for i, row in enumerate(self._rows) if row.uid not in self._removed]
        if len(keep) < len(self._rows):
            self._keep(keep)
        self._removed.clear()

    def _forward(self, tokens: mx.array, state: Optional[dict], last_only: bool = False,
                 valid: Optional[int] = None) -> tuple[mx.array, dict]:
        self.call_shapes.add((tuple(tokens.shape), last_only))
        with inference():  # kernels run bare: no gradient of generation (kernels/registry.py)
            return self.model(tokens, state, last_only=last_only, check_tokens=False, valid=valid)

    def _prompt_call(self, ids: list[int], state: Optional[dict]) -> tuple[mx.array, dict]:
        """Read `ids` (one call's piece of a prompt; `next_prompt_end`), padded with inert positions (token 0)
        to `padded_width` when the generator pads: the last real position's logits and the state."""
        width = padded_width(len(ids)) if self.pad else len(ids)
        tokens = mx.array([ids + [0] * (width - len(ids))], dtype=mx.int32)
        return self._forward(tokens, state, last_only=True, valid=len(ids) if self.pad else None)

    def _keep(self, keep: list[int]) -> None:
        """Keep only these rows of the batch, in this order (then padding, see `_gather`)."""
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._tokens = self._logprobs = self._state = None
            return
        self._gather(keep, self._tokens, self._logprobs, self._state)

    def _gather(self, keep: list[int], tokens: mx.array, logprobs: Optional[tuple], state: dict) -> None:
        """The batch = rows `keep` of these arrays, padded to the decode bucket with copies of the first row.

        A padding row decodes like the row it copies and nothing reads its outputs; no operation of a decode
        step mixes rows (tests/test_batch_generate.py checks it), so it changes no other row's numbers."""
        idx = keep + keep[:1] * (decode_bucket(len(keep), self.max_batch) - len(keep))
        if idx != list(range(tokens.shape[0])):
            at = mx.array(idx, dtype=mx.int32)
            tokens, state = tokens[at], {n: {k: mx.take(a, at, axis=self._axes[n][k]) for k, a in e.items()}
                                         for n, e in state.items()}
            logprobs = tuple(a[at] for a in logprobs) if logprobs is not None else None
        self._tokens, self._logprobs, self._state = tokens, logprobs, state

    def _read_prompts(self) -> None:
        """Read waiting prompts block by block until the budget is spent; a prompt read whole joins the batch."""
        budget = self.budget
        while self._waiting and (budget is None or budget > 0):
            p = self._waiting[0]
            if not p.started:
                self._start(p)
            total = len(p.ids)
            while p.pos < total and (budget is None or budget > 0):
                end = next_prompt_end(p.pos, total, self.block, p.cuts, self.pad)
                out, p.state = self._prompt_call(p.ids[p.pos:end], p.state)
                budget = None if budget is None else budget - (end - p.pos)
                p.pos = end
                if end == total:
                    p.logits = out[:, -1]
                elif end in p.resumable:
                    mx.eval(p.state)  # memory bounded by one block, however long the prompt
                    if end in p.snapshots:
                        self.cache.add(p.ids[:end], p.state, cuts=p.cuts)
            if p.pos < total:
                return
            self._waiting.popleft()
            if self.cache is not None and p.cacheable:
                self.cache.add(p.ids, p.state, p.logits, cuts=p.cuts)
            self._join(p)

    def _start(self, p: _Prompt) -> None:
        """Take the longest cached prefix of the prompt; plan where to leave snapshots."""
        p.started = True
        p.resumable = set(resume_points(len(p.ids), p.cuts, self.block))
        if self.cache is None or not p.cacheable:
            return
        hit, state, logits = self.cache.lookup(p.ids, p.cuts)
        if hit:
            p.pos, p.state, p.logits = hit, state, logits
            for r in p.rows:
                r.cached_tokens = hit
        p.snapshots = self.cache.plan(p.ids, p.pos, p.cuts)

    def _join(self, p: _Prompt) -> None:
        """The prompt's rows join the batch: its state once per row, each row's first token sampled."""
        n = len(p.rows)
        want = self._logprobs is not None
        tokens, logprobs = self._sample(mx.repeat(p.logits, n, axis=0) if n > 1 else p.logits, p.rows, want)
        state = p.state if n == 1 else {node: {k: mx.repeat(a, n, axis=self._axes[node][k]) for k, a in e.items()}
                                        for node, e in p.state.items()}
        if not self._rows:
            keep = list(range(n))
        else:
            size = self._tokens.shape[0]  # running rows, then padding
            keep = list(range(len(self._rows))) + list(range(size, size + n))
            if logprobs is not None and self._logprobs is None:  # the rows already running asked for none
                self._logprobs = _no_logprobs(size)
            tokens = mx.concatenate([self._tokens, tokens])
            if logprobs is not None:
                logprobs = tuple(mx.concatenate([a, b]) for a, b in zip(self._logprobs, logprobs))
            state = {node: {k: mx.concatenate([a, state[node][k]], axis=self._axes[node][k])
                            for k, a in e.items()} for node, e in self._state.items()}
        self._rows.extend(p.rows)
        self._gather(keep, tokens, logprobs, state)
        mx.async_eval(self._tokens, self._state, *(self._logprobs or ()))

    def _sample(self, logits: mx.array, rows: list[_Row], want: bool = False) -> tuple[mx.array, Optional[tuple]]:
        """Each row's next token (B,) with its own parameters and key, and log-probabilities when a row
        asks (or `want`): the chosen token's and the `MAX_TOP_LOGPROBS` most likely."""
        tokens = mx.argmax(logits, axis=-1)
        picked = [i for i, r in enumerate(rows) if r.params.temp > 0]
        if picked:
            draws = []
            for i in picked:
                r = rows[i]
                r.key, sub = mx.random.split(r.key)
                p = r.params
                lp = filtered_logprobs(logits[i:i + 1], p.temp, p.top_p, p.top_k, p.min_p)
                draws.append(mx.random.categorical(lp, key=sub))
            tokens[mx.array(picked, dtype=mx.int32)] = mx.concatenate(draws).astype(tokens.dtype)
        if not (want or any(r.params.logprobs is not None for r in rows)):
            return tokens, None
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        chosen = mx.take_along_axis(logprobs, tokens[:, None].astype(mx.int32), axis=-1)[:, 0]
        k = min(MAX_TOP_LOGPROBS, logits.shape[-1])
        top = mx.argpartition(-logprobs, k - 1, axis=-1)[:, :k].astype(mx.int32)
        return tokens, (chosen, top, mx.take_along_axis(logprobs, top, axis=-1))

    def _results(self, rows: list[_Row], tokens: mx.array, logprobs: Optional[tuple]) -> list[BatchResult]:
        toks = tokens.tolist()
        lp = [a.tolist() for a in logprobs] if logprobs is not None else None
        results = []
        for i, (row, tok) in enumerate(zip(rows, toks)):
            row.generated += 1
            reason = "stop" if tok in row.eos else ("length" if row.generated >= row.max_tokens else None)
            res = BatchResult(row.uid, tok, reason, cached_tokens=row.cached_tokens)
            if row.params.logprobs is not None:
                res.logprob = lp[0][i]
                top = sorted(zip(lp[1][i], lp[2][i]), key=lambda t: -t[1])
                res.top_logprobs = top[:row.params.logprobs]
            results.append(res)
        return results


def _no_logprobs(n: int) -> tuple:
    k = MAX_TOP_LOGPROBS
    return mx.zeros((n,)), mx.zeros((n, k), dtype=mx.int32), mx.zeros((n, k))


@dataclass
class BatchResponse:
    """What `batch_generate` returns: per prompt the text, the token ids and why it ended, and the figures."""

    texts: list[str]
    tokens: list[list[int]]
    finish_reasons: list[str]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    cached_tokens: list[int] = field(default_factory=list)  # per prompt: tokens taken from the prompt cache


def batch_generate(model: LanguageModel, tokenizer: Any, prompts: Sequence[str | Sequence[int]],
                   max_tokens: int = 256, *, seed: Optional[int] = None, state: Optional[dict] = None,
                   prompt_cache: Any = None, cuts: Sequence[int] = (), verbose: bool = False,
                   **kwargs: Any) -> BatchResponse:
    """Generate from several prompts (texts or ids) as one batch; each gives the tokens it gives alone.

    kwargs: temp, top_p, top_k, min_p (as `stream_generate`). `seed`: every prompt samples with the key of
    this seed, as `stream_generate` does after `mx.random.seed(seed)` (None: a fresh seed per prompt).
    `state` (batch 1): every prompt continues from it. `prompt_cache` and `cuts` (the same for every
    prompt): see `BatchGenerator`. Generation stops at an eos token of the
    tokenizer or after `max_tokens`.
    """
    tokenizer = resolve_tokenizer(model, tokenizer)
    unknown = set(kwargs) - {"temp", "top_p", "top_k", "min_p"}
    if unknown:
        raise MadError(f"batch_generate: unknown argument '{sorted(unknown)[0]}' (known: temp, top_p, top_k, min_p)")
    check_sampling(max_tokens=max_tokens, **kwargs)
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__iter__"):
        raise MadError(f"prompts: expected a list of prompts, got {type(prompts).__name__}")
    ids = [prompt_ids(p, tokenizer) for p in prompts]
    if not ids:
        raise MadError("prompts: the list is empty")
    for i, one in enumerate(ids):
        try:
            check_prompt(one, model.vocab_size)
        except MadError as e:
            raise MadError(f"prompt {i + 1}: {e.diagnostics[0].message}") from None
    params = SamplingParams(**kwargs, seed=seed).check()
    eos = getattr(tokenizer, "eos_token_ids", ())
    gen = BatchGenerator(model, prefill_budget=None, prompt_cache=prompt_cache)
    start = time.perf_counter()
    uids = [gen.insert(one, [params], max(max_tokens, 1), eos, state, cuts)[0] for one in ids]
    out: dict[int, list[int]] = {u: [] for u in uids}
    reasons: dict[int, str] = {}
    cached: dict[int, int] = {}
    gen_start = None
    while len(reasons) < len(uids):
        results = gen.step()
        if gen_start is None:
            gen_start = time.perf_counter()  # every prompt was read in the first step (no budget)
        if max_tokens == 0:  # only read the prompts (and leave their snapshots in the cache)
            results, reasons = [], {u: "length" for u in uids}
        for r in results:
            cached[r.uid] = r.cached_tokens
            out[r.uid].append(r.token)
            if r.finish_reason:
                reasons[r.uid] = r.finish_reason
    end = time.perf_counter()
    eos_set = set(eos)
    texts = [tokenizer.decode([t for t in out[u] if t not in eos_set]) for u in uids]
    n_prompt = sum(len(one) for one in ids)
    n_read = n_prompt - sum(cached.get(u, 0) for u in uids)  # the rate counts the tokens read, not those reused
    n_gen = sum(len(out[u]) for u in uids)
    response = BatchResponse(texts, [out[u] for u in uids], [reasons[u] for u in uids], n_prompt,
                             n_read / max(gen_start - start, 1e-9), n_gen, n_gen / max(end - gen_start, 1e-9),
                             mx.get_peak_memory() / 1e9, [cached.get(u, 0) for u in uids])
    if verbose:
        for i, text in enumerate(texts):
            print(f"[{i + 1}] {text}")
        print_stats(response)
    return response


def print_stats(r: GenerationResponse, file: Any = None) -> None:
    """The mlx-lm summary lines: prompt and generation tokens and tokens-per-second, peak memory."""
    print("=" * 10, file=file)
    print(f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec", file=file)
    print(f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec", file=file)
    print(f"Peak memory: {r.peak_memory:.3f} GB", file=file)


__all__ = ["BatchGenerator", "BatchResponse", "BatchResult", "ByteTokenizer", "GenerationResponse", "HFTokenizer",
           "LanguageModel", "MAX_TOP_LOGPROBS", "PREFILL_BLOCK", "PREFILL_STEP", "SamplingParams",
           "StreamingDetokenizer", "apply_repetition_penalty", "batch_generate", "check_prompt", "check_sampling",
           "check_state_arrays", "decode_bucket", "generate", "generate_step", "make_sampler", "next_prompt_end",
           "padded_width", "print_stats", "prompt_ids", "resolve_tokenizer", "resume_points", "state_spec",
           "stream_generate"]
