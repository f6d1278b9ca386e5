"""The decode loop: `generate_step`, `stream_generate`, `generate` (as in mlx-lm).

`stream_generate` yields `GenerationResponse`s (text segment, token, timing figures); `generate` returns
the whole text. The recurrent state is the cache: a prompt is read once, then one token per step, and the
final response carries the state, which a later call can continue from.

The model wrapper lives in `mad.model`, samplers in `mad.sampling`, tokenizers in `mad.tokenizers`; their
names are re-exported here so that `from mad.generate import LanguageModel, make_sampler, ...` keeps working.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import mlx.core as mx

from .errors import MadError
from .model import PREFILL_STEP, LanguageModel, check_prompt, check_state_arrays, state_spec
from .sampling import apply_repetition_penalty, check_sampling, make_sampler
from .tokenizers import ByteTokenizer, HFTokenizer, StreamingDetokenizer


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
    """The mlx-lm summary lines: prompt and generation tokens and tokens-per-second, peak memory."""
    print("=" * 10, file=file)
    print(f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec", file=file)
    print(f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec", file=file)
    print(f"Peak memory: {r.peak_memory:.3f} GB", file=file)


__all__ = ["ByteTokenizer", "GenerationResponse", "HFTokenizer", "LanguageModel", "PREFILL_STEP",
           "StreamingDetokenizer", "apply_repetition_penalty", "check_prompt", "check_sampling",
           "check_state_arrays", "generate", "generate_step", "make_sampler", "print_stats", "state_spec",
           "stream_generate"]
