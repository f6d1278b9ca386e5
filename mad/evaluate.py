"""`mad eval`: a model's next-token loss and perplexity on text (a quantized model against bf16, a fine-tune
against its base).

The text is read as `mad train` reads it (`mad.data`): tokenised once into a memory-mapped token file (in a
temporary folder), of which the held-out part (the last 5%, what `mad train` evaluates on) or all is
evaluated. The loss is `mad train`'s held-out loss (`train.compile_eval`: the next-token cross-entropy of
the model run on whole sequences from a zero state, in float32) over the non-overlapping windows of
`seq + 1` tokens that `Corpus.eval_batches` reads, taken from the memory map one batch at a time: memory
holds a batch or two, whatever the size of the corpus.

    model, tok = mad.load("out/run")
    result = evaluate(model, tokens, seq=256, batch=8)      # tokens: 1-D ids (list, numpy, memmap)
    result["loss"], result["perplexity"], result["tokens_per_sec"]
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import numpy as np

from .data import iter_windows
from .errors import MadError
from .train import compile_eval

SPLITS = ("held-out", "all")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise MadError(f"{name} must be an integer >= 1, got {value!r}")


def check_settings(model: Any, seq: int, batch: int, max_tokens: Optional[int] = None) -> None:
    """The window settings, before any data is read: sizes >= 1, `max_tokens` at least one window; with a
    model (None: the sizes only), `seq` no longer than it allows and one batch's logits within MAD's tensor
    limit."""
    from .graph import MAX_TENSOR
    from .model import LanguageModel

    _positive("--seq", seq)
    _positive("--batch", batch)
    if max_tokens is not None:
        _positive("--max-tokens", max_tokens)
        if max_tokens < seq:
            raise MadError(f"--max-tokens {max_tokens} is less than one sequence (--seq {seq}): the loss is taken over "
                           "whole windows of --seq tokens")
    if model is None:
        return
    if not isinstance(model, LanguageModel):
        raise MadError(f"evaluate: expected a model from mad.load, got {type(model).__name__}")
    limit = getattr(model.program.graph, "max_seq", None)
    if limit is not None and seq > int(limit):
        raise MadError(f"--seq {seq} is longer than the model allows ({limit})")
    if batch * seq * model.vocab_size > MAX_TENSOR:
        raise MadError(f"--batch {batch} x --seq {seq} x vocabulary {model.vocab_size} = "
                       f"{batch * seq * model.vocab_size:,} logits, more than the {MAX_TENSOR:,} elements MAD allows "
                       "in one tensor; lower --batch or --seq")


def _as_ids(tokens: Any, vocab_size: int) -> np.ndarray:
    """`tokens` as a 1-D integer numpy array (a memmap stays a memmap), not empty, every id inside the
    vocabulary."""
    if isinstance(tokens, mx.array):
        tokens = np.array(tokens)
    try:
        ids = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
    except (TypeError, ValueError) as e:
        raise MadError(f"tokens: cannot be read as token ids ({e})") from None
    if ids.size == 0:
        raise MadError("no tokens to evaluate: the data is empty")
    if ids.ndim != 1 or ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
        raise MadError(f"tokens: expected a 1-D sequence of integer token ids, got {ids.dtype} of shape {ids.shape}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise MadError(f"tokens: token id {lo if lo < 0 else hi} is outside the vocabulary (0..{vocab_size - 1})")
    return ids


def evaluate(model: Any, tokens: Any, seq: int = 256, batch: int = 8, max_tokens: Optional[int] = None,
             tokenizer: Any = None) -> dict:
    """The mean next-token loss of `model` (from `mad.load`) over `tokens` (1-D ids: a list, a numpy array or
    memmap, an MLX array), read as non-overlapping windows of `seq` inputs and their next-token targets
    (see `windows`), `batch` windows per forward call; `max_tokens`: at most this many targets (whole
    windows).

    Returns {"loss": nats per token, "perplexity": exp(loss) (None beyond float range), "bits_per_byte":
    loss / ln 2 when the tokenizer (`tokenizer`, else the model's) is bytes (else None), "tokens": targets
    scored, "windows", "seq", "batch", "seconds" and "tokens_per_sec" of the evaluation (the first batch's
    compilation included), "dtype"}. A corpus shorter than one window, or a non-finite loss, is a MadError.
    """
    check_settings(model, seq, batch, max_tokens)
    ids = _as_ids(tokens, model.vocab_size)
    if ids.size < seq + 1:
        raise MadError(f"the data has {ids.size:,} tokens, shorter than one sequence (--seq {seq} needs {seq + 1} "
                       f"tokens: {seq} inputs and their next-token targets); give more text or a smaller --seq")
    count = (ids.size - 1) // seq
    if max_tokens is not None:
        count = min(count, max_tokens // seq)
    loss_fn = compile_eval(model)
    sums: list[mx.array] = []
    tic = time.perf_counter()
    for rows in iter_windows(ids, seq, batch, count):
        b = mx.array(rows)
        sums.append(loss_fn(b[:, :-1], b[:, 1:]))
        mx.async_eval(sums[-1])
        if len(sums) > 1:
            mx.eval(sums[-2])  # at most two batches in flight: memory stays bounded, the device stays busy
    mx.eval(sums)
    seconds = time.perf_counter() - tic
    scored = count * seq
    loss = float(np.array(mx.stack(sums)).astype(np.float64).sum()) / scored  # batch sums added in float64
    if not math.isfinite(loss):
        raise MadError(f"the loss is {loss} (not finite): the model's logits hold NaN or infinite values on this "
                       "data (float32 may help: --dtype float32)")
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 709 else None,
            "bits_per_byte": loss / math.log(2) if getattr(tok, "is_bytes", False) else None,
            "tokens": scored, "windows": count, "seq": seq, "batch": batch, "seconds": seconds,
            "tokens_per_sec": scored / max(seconds, 1e-9), "dtype": str(model.program.dtype).rsplit(".", 1)[-1]}


def evaluate_data(model: Any, data: str | Path, tokenizer: Any = None, seq: int = 256, batch: int = 8,
                  max_tokens: Optional[int] = None, split: str = "held-out") -> dict:
    """`evaluate` on text: `data` is what `mad train --data` takes (a text file, a folder of them, JSONL),
    tokenised with `tokenizer` (else the model's; bytes for a vocabulary of up to 256 ids) into a temporary
    token file; `split` "held-out" scores the last 5% (`mad.data.open_corpus`), "all" the whole corpus.
    The result also holds "split" and "corpus_tokens"."""
    from .data import data_files, open_corpus, tokenise
    from .tokenizers import ByteTokenizer

    if split not in SPLITS:
        raise MadError(f"--split must be {' or '.join(SPLITS)}, got {split!r}")
    check_settings(model, seq, batch, max_tokens)
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        if model.vocab_size > 256:
            raise MadError(f"the model has a vocabulary of {model.vocab_size} ids and no tokenizer; bytes cover 256 "
                           "ids: give a tokenizer (--tokenizer FILE)")
        tok = ByteTokenizer()
    files = data_files(Path(data))
    with tempfile.TemporaryDirectory(prefix="mad-eval-") as tmp:
        meta = tokenise(files, tok, model.vocab_size, Path(tmp))
        corpus = open_corpus(Path(tmp), meta, seq, 0, str(data))
        if split == "held-out" and corpus.held.size < seq + 1:
            raise MadError(f"--data {data}: the corpus has {meta['tokens']:,} tokens, too few to hold out a sequence "
                           f"of --seq {seq} beside a training part (the last 5%, at least {seq + 1} tokens, of a "
                           "corpus with room for two); give more text, a smaller --seq, or --split all")
        result = evaluate(model, corpus.held if split == "held-out" else corpus.tokens, seq, batch, max_tokens, tok)
        del corpus  # the memory map, before its folder goes
    result.update(split=split, corpus_tokens=int(meta["tokens"]))
    return result


__all__ = ["SPLITS", "check_settings", "evaluate", "evaluate_data", "windows"]
