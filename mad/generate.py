"""Text generation for any MAD language model: samplers, the decode loop, tokenizers.

Mirrors mlx-lm: `stream_generate` yields `GenerationResponse`s (text segment, token, timing figures);
`generate` returns the whole text. The recurrent state is the cache: a prompt is read once, then one
token per step, and the state can be saved and resumed (`save_state` / `load_state`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import mlx.core as mx

from .dims import shape_str
from .errors import Diagnostics, MadError, Source
from .program import Program


PREFILL_STEP = 4096  # prompt tokens per forward call when reading a long prompt


class LanguageModel:
    """A Program with one token input and a `logits` output: `logits, state = model(tokens, state=None)`.

    tokens: int32 (B, T); logits: float32 (B, T, V); state: {node: {name: float32 array}}.
    """

    def __init__(self, program: Program, tokenizer: Any = None):
        self.program = program
        self.tokenizer = tokenizer
        g = program.graph
        ints = [k for k, t in g.inputs.items() if t.dtype == "int32"]
        if len(g.inputs) != 1 or len(ints) != 1:
            raise MadError(f"'{g.name}' is not a language model: it needs exactly one int32 token input")
        self.input_name = ints[0]
        self.output_name = "logits" if "logits" in g.outputs else next(iter(g.outputs))
        self.vocab_size = int(g.g.nodes[g.outputs[self.output_name]]["type"].shape[-1])
        self._state_spec = state_spec(g)

    def __call__(self, tokens: mx.array, state: Optional[dict] = None, mode: str = "auto",
                 last_only: bool = False, check_tokens: bool = True) -> tuple[mx.array, dict]:
        """logits (B, T, V), or (B, 1, V) at the last position with `last_only`, and the new state.

        `check_tokens` (default on): the tokens must be a 2-D integer array of ids inside the vocabulary
        (one host read of their min and max: ids outside would read memory outside the embedding), and a
        given state must hold arrays of the declared shapes and float32 for as many sequences as the
        tokens. Loops that feed back tokens they sampled themselves (the decode loop of `generate_step`,
        `mad bench`) pass False, so no host synchronisation is added between steps. `Program.__call__`
        checks rank and dtype only; the value check lives here, where the vocabulary is known.
        """
        if check_tokens:
            tokens = self.check_tokens(tokens)
            if state is not None:
                check_state_arrays(self.program.graph, state, batch=tokens.shape[0], spec=self._state_spec)
        outputs, state = self.program({self.input_name: tokens}, state, mode=mode, last_only=last_only)
        return outputs[self.output_name].astype(mx.float32), state

    def check_tokens(self, tokens: Any, what: str = "tokens") -> mx.array:
        """`tokens` as an integer (B, T) array with every id in 0..vocab_size-1, else a MadError."""
        if not isinstance(tokens, mx.array):
            try:
                tokens = mx.array(tokens)
            except Exception as e:  # noqa: BLE001 - ragged lists, objects, ...
                raise MadError(f"{what}: cannot be read as an array of token ids ({e})") from None
        if tokens.dtype == mx.bool_ or not mx.issubdtype(tokens.dtype, mx.integer):
            raise MadError(f"{what}: token ids must be integers, got {tokens.dtype}")
        if tokens.ndim != 2:
            raise MadError(f"{what}: expected a (batch, sequence) array of token ids, got shape {tuple(tokens.shape)}")
        if tokens.size == 0:
            raise MadError(f"{what}: no tokens (shape {tuple(tokens.shape)})")
        lo, hi = mx.stack([tokens.min(), tokens.max()]).tolist()  # the one host read
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise MadError(f"{what}: token id {bad} is outside the vocabulary (0..{self.vocab_size - 1}, "
                           f"vocab size {self.vocab_size})")
        return tokens

    def init_state(self, batch: int = 1) -> dict:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise MadError(f"batch must be a positive integer, got {batch!r}")
        return self.program.init_state(batch)

    def prefill(self, tokens: mx.array, state: Optional[dict] = None,
                step_size: int = PREFILL_STEP, check_tokens: bool = True) -> tuple[mx.array, dict]:
        """Read a long prompt (B, T) in segments of `step_size` tokens, carrying the state.

        Returns the last position's logits (B, V) and the state. Each segment but the last is
        evaluated before the next is queued, so memory is bounded by one segment, whatever T is.
        Only the last position goes through the head (`last_only`): a prompt's other logits are
        never needed. The tokens (and a given state) are checked once, as `__call__` does, unless
        `check_tokens` is False.
        """
        if isinstance(step_size, bool) or not isinstance(step_size, int) or step_size < 1:
            raise MadError(f"step_size must be a positive integer, got {step_size!r}")
        if check_tokens:
            tokens = self.check_tokens(tokens)
            if state is not None:
                check_state_arrays(self.program.graph, state, batch=tokens.shape[0], spec=self._state_spec)
        total = tokens.shape[1]
        for start in range(0, total, step_size):
            logits, state = self(tokens[:, start:start + step_size], state, last_only=True, check_tokens=False)
            if start + step_size < total:
                mx.eval(state)
        return logits[:, -1], state


def state_spec(graph: Any) -> dict[str, dict[str, tuple]]:
    """{node: {name: (ndim, ((axis, size) fixed), (batch axes), dtype, shape text)}}: what `check_state_arrays`
    compares a state with, computed once per model (walking the graph per call would cost milliseconds)."""
    from .dims import Sym

    spec: dict[str, dict[str, tuple]] = {}
    for node in graph.state_nodes():
        for name, t in graph.g.nodes[node]["state"].items():
            fixed = tuple((i, int(d)) for i, d in enumerate(t.shape) if not isinstance(d, Sym))
            free = tuple(i for i, d in enumerate(t.shape) if isinstance(d, Sym))
            want = mx.float32 if t.dtype in ("float32", "float") else mx.int32
            spec.setdefault(node, {})[name] = (len(t.shape), fixed, free, want, shape_str(t.shape))
    return spec


def check_state_arrays(graph: Any, state: Any, batch: Optional[int] = None, where: str = "state",
                       spec: Optional[dict] = None) -> None:
    """A state's keys (`mad.graph.check_state`), then each entry: an MLX array of the declared rank, fixed
    sizes and dtype (float32), one batch size across entries (equal to `batch` when given)."""
    from .graph import check_state

    if not isinstance(state, dict) or not all(isinstance(v, dict) for v in state.values()):
        raise MadError(f"{where}: a state is a dict {{node: {{name: array}}}}, got {type(state).__name__}")
    spec = spec if spec is not None else state_spec(graph)
    if state.keys() != spec.keys() or any(state[n].keys() != names.keys() for n, names in spec.items()):
        check_state(graph, state, where=where)  # explains which keys are wrong
    diags = Diagnostics()
    seen: Optional[tuple[int, str]] = None
    for node, names in spec.items():
        entries = state[node]
        for name, (ndim, fixed, free, want, shape_text) in names.items():
            arr = entries[name]
            if type(arr) is not mx.array:
                diags.error(f"{where}: entry '{node}/{name}' is a {type(arr).__name__}, not an MLX array")
                continue
            shape = arr.shape
            if arr.dtype != want:
                diags.error(f"{where}: entry '{node}/{name}' has dtype {arr.dtype}, expected {want}")
            if len(shape) != ndim or any(shape[i] != d for i, d in fixed):
                diags.error(f"{where}: entry '{node}/{name}' has shape {tuple(shape)}, expected {shape_text}")
                continue
            for i in free:
                if seen is None:
                    seen = (shape[i], f"{node}/{name}")
                elif shape[i] != seen[0]:
                    diags.error(f"{where}: the entries hold different numbers of sequences: '{seen[1]}' "
                                f"{seen[0]}, '{node}/{name}' {shape[i]}", once="batch")
    if seen is not None and batch is not None and seen[0] != batch and not diags.items:
        diags.error(f"{where}: the state holds {seen[0]} sequence(s), the tokens {batch}")
    diags.raise_if_any()


# ----------------------------------------------------------------------------------------- sampling
def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_sampling(names: Optional[dict] = None, **args: Any) -> None:
    """Check sampling arguments (temp, top_p, top_k, min_p, repetition_penalty, repetition_context,
    max_tokens); a MadError names the first bad one, as `names` spells it (e.g. the CLI's `--temp`)."""
    import math

    names = names or {}
    rules = {
        "temp": ("a number >= 0 (0 is greedy)", lambda v: _number(v) and math.isfinite(v) and v >= 0),
        "top_p": ("a number in (0, 1]", lambda v: _number(v) and math.isfinite(v) and 0 < v <= 1),
        "top_k": ("an integer >= 0 (0 keeps every token)", lambda v: isinstance(v, int) and not isinstance(v, bool)
                  and v >= 0),
        "min_p": ("a number in [0, 1]", lambda v: _number(v) and math.isfinite(v) and 0 <= v <= 1),
        "repetition_penalty": ("a number > 0 (1 is none)", lambda v: _number(v) and math.isfinite(v) and v > 0),
        "repetition_context": ("an integer >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
        "max_tokens": ("an integer >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    }
    for key, value in args.items():
        if key not in rules:
            raise MadError(f"unknown sampling argument '{key}' (known: {', '.join(rules)})")
        what, ok = rules[key]
        if not ok(value):
            raise MadError(f"{names.get(key, key)} must be {what}, got {value!r}")


def make_sampler(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> Callable:
    """logits (B, V) -> token ids (B,). temp 0 is greedy; filters apply before sampling.

    temp >= 0, top_p in (0, 1], top_k >= 0 (0: off), min_p in [0, 1]; anything else (NaN, inf) is a MadError.
    """
    check_sampling(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p)

    def sample(logits: mx.array) -> mx.array:
        if temp == 0:
            return mx.argmax(logits, axis=-1)
        logprobs = logits / temp
        logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
        if top_k > 0 and top_k < logprobs.shape[-1]:
            kth = mx.sort(logprobs, axis=-1)[..., -top_k][..., None]
            logprobs = mx.where(logprobs < kth, -mx.inf, logprobs)
        if min_p > 0:
            threshold = mx.max(logprobs, axis=-1, keepdims=True) + mx.log(mx.array(min_p))
            logprobs = mx.where(logprobs < threshold, -mx.inf, logprobs)
        if top_p < 1.0:
            order = mx.argsort(-logprobs, axis=-1)
            sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
            cum = mx.cumsum(mx.exp(sorted_lp), axis=-1)
            keep_sorted = (cum - mx.exp(sorted_lp)) < top_p  # always keeps the most likely token
            keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
            logprobs = mx.where(keep, logprobs, -mx.inf)
        return mx.random.categorical(logprobs)

    return sample


def apply_repetition_penalty(logits: mx.array, history: mx.array, penalty: float) -> mx.array:
    """Divide positive (multiply negative) logits of tokens in `history` (B, N) by `penalty`."""
    picked = mx.take_along_axis(logits, history, axis=-1)
    picked = mx.where(picked > 0, picked / penalty, picked * penalty)
    return mx.put_along_axis(logits, history, picked, axis=-1)


@dataclass
class GenerationResponse:
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
    logits, state = model.prefill(prompt[None], state, check_tokens=False)  # checked just above
    token = sample(logits)
    mx.async_eval(token, state)
    while True:
        if repetition_penalty != 1.0:
            history = mx.concatenate([history, token])[-repetition_context:]  # bounded, however long the run
        next_logits, next_state = model(token[:, None], state, check_tokens=False)
        next_token = sample(next_logits[:, -1])
        mx.async_eval(next_token, next_state)
        yield token, next_state
        token, state = next_token, next_state


def _prompt_ids(prompt: Any, tokenizer: Any) -> list[int]:
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
    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    if tokenizer is None:
        if model.vocab_size > 256:
            raise MadError(f"no tokenizer for a model with a vocabulary of {model.vocab_size} ids (bytes cover "
                           "256): pass one (mad.load(..., tokenizer=FILE), HFTokenizer(FILE)), or ByteTokenizer() "
                           "to use raw bytes anyway")
        tokenizer = ByteTokenizer()
    check_sampling(max_tokens=max_tokens, **kwargs)
    ids = _prompt_ids(prompt, tokenizer)
    check_prompt(ids, model.vocab_size)
    if state is not None:
        check_state_arrays(model.program.graph, state, batch=1, spec=getattr(model, "_state_spec", None))
    sampler = make_sampler(**{k: kwargs.pop(k) for k in ("temp", "top_p", "top_k", "min_p") if k in kwargs})
    detok = StreamingDetokenizer(tokenizer)
    eos = set(getattr(tokenizer, "eos_token_ids", ()))
    start = time.perf_counter()
    if max_tokens == 0:
        _, state = model.prefill(mx.array([ids], dtype=mx.int32), state, check_tokens=False)
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


def print_stats(r: GenerationResponse, file: Any = None) -> None:
    print("=" * 10, file=file)
    print(f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec", file=file)
    print(f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec", file=file)
    print(f"Peak memory: {r.peak_memory:.3f} GB", file=file)


def check_prompt(ids: Sequence[int], vocab_size: int) -> None:
    if not ids:
        raise MadError("the prompt is empty: give at least one token")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise MadError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})"
                       + (f" ({len(bad)} such ids)" if len(bad) > 1 else ""))


# ----------------------------------------------------------------------------------------- tokenizers
class ByteTokenizer:
    """The default tokenizer: UTF-8 bytes, ids 0..255, no special tokens."""

    eos_token_ids: tuple[int, ...] = ()
    is_bytes = True

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizer.json` read with the `tokenizers` library; eos ids from the model config."""

    def __init__(self, path: str | Path, eos_token_ids: Sequence[int] = ()):
        from tokenizers import Tokenizer

        if not Path(path).is_file():
            raise MadError(f"no such tokenizer file: {path}", Source(str(path)))
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the library raises plain Exceptions
            raise MadError(f"cannot read tokenizer: {e}", Source(str(path))) from None
        bad = [t for t in eos_token_ids if not isinstance(t, int) or isinstance(t, bool) or t < 0]
        if bad:
            raise MadError(f"eos token ids must be integers >= 0, got {bad[0]!r}", Source(str(path)))
        self.eos_token_ids = tuple(eos_token_ids)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


class StreamingDetokenizer:
    """Emits text only once it is complete (no half UTF-8 characters), re-decoding a short window."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.offset = 0  # tokens before this are printed
        self.printed = ""  # text of tokens[offset:] already emitted

    def add(self, token: int) -> None:
        self.tokens.append(token)

    def pop(self) -> str:
        text = self.tokenizer.decode(self.tokens[self.offset:])
        if text.endswith("\ufffd"):
            return ""
        new = text[len(self.printed):]
        self.printed = text
        if len(self.tokens) - self.offset > 16 and text.endswith((" ", "\n")):
            self.offset, self.printed = len(self.tokens), ""
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.tokens[self.offset:])
        new = text[len(self.printed):]
        self.offset, self.printed = len(self.tokens), ""
        return new
