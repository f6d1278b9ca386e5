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

from .errors import MadError
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

    def __call__(self, tokens: mx.array, state: Optional[dict] = None, mode: str = "auto",
                 last_only: bool = False) -> tuple[mx.array, dict]:
        """logits (B, T, V), or (B, 1, V) at the last position with `last_only`, and the new state."""
        outputs, state = self.program({self.input_name: tokens}, state, mode=mode, last_only=last_only)
        return outputs[self.output_name].astype(mx.float32), state

    def init_state(self, batch: int = 1) -> dict:
        return self.program.init_state(batch)

    def prefill(self, tokens: mx.array, state: Optional[dict] = None,
                step_size: int = PREFILL_STEP) -> tuple[mx.array, dict]:
        """Read a long prompt (B, T) in segments of `step_size` tokens, carrying the state.

        Returns the last position's logits (B, V) and the state. Each segment but the last is
        evaluated before the next is queued, so memory is bounded by one segment, whatever T is.
        Only the last position goes through the head (`last_only`): a prompt's other logits are
        never needed.
        """
        total = tokens.shape[1]
        for start in range(0, total, step_size):
            logits, state = self(tokens[:, start:start + step_size], state, last_only=True)
            if start + step_size < total:
                mx.eval(state)
        return logits[:, -1], state


# ----------------------------------------------------------------------------------------- sampling
def make_sampler(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> Callable:
    """logits (B, V) -> token ids (B,). temp 0 is greedy; filters apply before sampling."""

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
    token: int
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
    """
    history = prompt[-repetition_context:]

    def sample(logits: mx.array) -> mx.array:
        if repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, history[None, -repetition_context:], repetition_penalty)
        return sampler(logits)

    logits, state = model.prefill(prompt[None], state)
    token = sample(logits)
    mx.async_eval(token, state)
    while True:
        if repetition_penalty != 1.0:
            history = mx.concatenate([history, token])
        next_logits, next_state = model(token[:, None], state)
        next_token = sample(next_logits[:, -1])
        mx.async_eval(next_token, next_state)
        yield token, next_state
        token, state = next_token, next_state


def stream_generate(model: LanguageModel, tokenizer: Any, prompt: str | Sequence[int] | mx.array,
                    max_tokens: int = 256, state: Optional[dict] = None, **kwargs: Any) -> Iterator[GenerationResponse]:
    """Generate from `prompt` (text or ids), yielding text segments as they become printable.

    kwargs: temp, top_p, top_k, min_p, repetition_penalty, repetition_context.
    """
    tokenizer = tokenizer or ByteTokenizer()
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt.tolist()] \
        if isinstance(prompt, mx.array) else [int(t) for t in prompt]
    check_prompt(ids, model.vocab_size)
    sampler = make_sampler(**{k: kwargs.pop(k) for k in ("temp", "top_p", "top_k", "min_p") if k in kwargs})
    detok = StreamingDetokenizer(tokenizer)
    eos = set(getattr(tokenizer, "eos_token_ids", ()))
    start = time.perf_counter()
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

        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the library raises plain Exceptions
            raise MadError(f"cannot read tokenizer: {e}", None) from None
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
