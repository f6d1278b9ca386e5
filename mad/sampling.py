"""Sampling: logits -> token ids (temperature, top-p, top-k, min-p), repetition penalty, argument checks.

The checks live beside the samplers so that the CLI, `stream_generate` and a user's own loop reject the
same bad values with the same message.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import mlx.core as mx

from .errors import MadError


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "temp": ("a number >= 0 (0 is greedy)", lambda v: _number(v) and math.isfinite(v) and v >= 0),
    "top_p": ("a number in (0, 1]", lambda v: _number(v) and math.isfinite(v) and 0 < v <= 1),
    "top_k": ("an integer >= 0 (0 keeps every token)", lambda v: _integer(v) and v >= 0),
    "min_p": ("a number in [0, 1]", lambda v: _number(v) and math.isfinite(v) and 0 <= v <= 1),
    "repetition_penalty": ("a number > 0 (1 is none)", lambda v: _number(v) and math.isfinite(v) and v > 0),
    "repetition_context": ("an integer >= 1", lambda v: _integer(v) and v >= 1),
    "max_tokens": ("an integer >= 0", lambda v: _integer(v) and v >= 0),
}


def check_sampling(names: Optional[dict] = None, **args: Any) -> None:
    """Check sampling arguments (temp, top_p, top_k, min_p, repetition_penalty, repetition_context,
    max_tokens); a MadError names the first bad one, as `names` spells it (e.g. the CLI's `--temp`)."""
    names = names or {}
    for key, value in args.items():
        if key not in RULES:
            raise MadError(f"unknown sampling argument '{key}' (known: {', '.join(RULES)})")
        what, ok = RULES[key]
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
        return mx.random.categorical(filtered_logprobs(logits, temp, top_p, top_k, min_p))

    return sample


def filtered_logprobs(logits: mx.array, temp: float, top_p: float = 1.0, top_k: int = 0,
                      min_p: float = 0.0) -> mx.array:
    """The log-probabilities a sampler draws from (temp > 0): logits / temp, normalised, with the top-k,
    min-p and top-p filters applied (filtered tokens at -inf)."""
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
    return logprobs


def apply_repetition_penalty(logits: mx.array, history: mx.array, penalty: float) -> mx.array:
    """Divide positive (multiply negative) logits of tokens in `history` (B, N) by `penalty`."""
    picked = mx.take_along_axis(logits, history, axis=-1)
    picked = mx.where(picked > 0, picked / penalty, picked * penalty)
    return mx.put_along_axis(logits, history, picked, axis=-1)


__all__ = ["apply_repetition_penalty", "check_sampling", "make_sampler"]
