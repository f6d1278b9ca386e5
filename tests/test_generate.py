"""Generation on a real (tiny) xLSTM checkpoint: streaming, stopping, sampling, state reuse, bad input."""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mad
from mad.sampling import apply_repetition_penalty, make_sampler
from mad.tokenizers import ByteTokenizer, StreamingDetokenizer

HF_TINY = Path(__file__).parent / "fixtures" / "hf-tiny"


@pytest.fixture(scope="module")
def loaded():
    return mad.load(HF_TINY)


def test_greedy_generation_is_the_argmax_chain(loaded):
    model, tok = loaded
    ids = tok.encode("The xLSTM")
    out = [r.token for r in mad.stream_generate(model, tok, ids, max_tokens=6)]
    # recompute greedily with full forwards
    seq = list(ids)
    for _ in range(len(out)):
        logits, _ = model(mx.array([seq], dtype=mx.int32))
        seq.append(int(mx.argmax(logits[0, -1]).item()))
    expected = seq[len(ids):]
    eos = expected.index(2) + 1 if 2 in expected else len(expected)
    assert out == expected[:eos]


def test_final_state_continues_the_conversation(loaded):
    model, tok = loaded
    responses = list(mad.stream_generate(model, tok, "Hello", max_tokens=5))
    last = responses[-1]
    assert last.finish_reason in ("length", "stop") and last.state is not None
    # the final state has read prompt + all generated tokens: equal to one forward over all of them
    ids = tok.encode("Hello") + [r.token for r in responses]
    _, full_state = model(mx.array([ids], dtype=mx.int32))
    for node, entries in full_state.items():
        for name, arr in entries.items():
            assert np.abs(np.array(last.state[node][name]) - np.array(arr)).max() < 1e-4


def test_generate_text_and_stats(loaded, capsys):
    model, tok = loaded
    text = mad.generate(model, tok, "Hello", max_tokens=4, verbose=True)
    out = capsys.readouterr().out
    assert text in out and f"Prompt: {len(tok.encode('Hello'))} tokens" in out and "Generation:" in out and "Peak memory:" in out


def test_bad_prompts(loaded):
    model, tok = loaded
    with pytest.raises(mad.MadError, match="empty"):
        list(mad.stream_generate(model, tok, [], max_tokens=2))
    with pytest.raises(mad.MadError, match="outside the vocabulary"):
        list(mad.stream_generate(model, tok, [1, 300], max_tokens=2))


def test_samplers():
    mx.random.seed(0)
    logits = mx.array([[0.0, 1.0, 5.0, 2.0]])
    assert make_sampler(0.0)(logits).tolist() == [2]
    assert all(make_sampler(1.0, top_k=1)(logits).item() == 2 for _ in range(10))
    picks = {make_sampler(1.0, top_p=0.9)(logits).item() for _ in range(50)}
    assert picks <= {2, 3}  # top-p 0.9 keeps the two most likely tokens (0.94 of the mass)
    assert {make_sampler(1.0, min_p=0.1)(logits).item() for _ in range(50)} <= {2, 3}
    penalised = apply_repetition_penalty(mx.array([[2.0, -2.0, 1.0]]), mx.array([[0, 1]]), 2.0)
    assert penalised.tolist() == [[1.0, -4.0, 1.0]]


def test_streaming_detokenizer_waits_for_whole_characters():
    tok = ByteTokenizer()
    detok = StreamingDetokenizer(tok)
    pieces = []
    for b in "héllo €".encode():
        detok.add(b)
        pieces.append(detok.pop())
    pieces.append(detok.flush())
    assert "".join(pieces) == "héllo €"
    assert "\ufffd" not in "".join(pieces)


# ----------------------------------------------------------------------------------------- checked arguments
@pytest.mark.parametrize("kwargs, message", [
    ({"temp": -1.0}, "temp must be a number >= 0"),
    ({"temp": float("nan")}, "temp must be"),
    ({"top_p": 2.0}, "top_p must be a number in (0, 1]"),
    ({"top_p": 0.0}, "top_p must be"),
    ({"top_k": -5}, "top_k must be an integer >= 0"),
    ({"min_p": 2.0}, "min_p must be a number in [0, 1]"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be a number > 0"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty must be"),
    ({"max_tokens": -1}, "max_tokens must be an integer >= 0"),
    ({"nucleus": 0.5}, "unknown sampling argument 'nucleus'"),
])
def test_bad_sampling_arguments(loaded, kwargs, message):
    model, tok = loaded
    with pytest.raises(mad.MadError, match=re.escape(message)):
        list(mad.stream_generate(model, tok, "Hi", **kwargs))


def test_max_tokens_zero_reads_the_prompt(loaded):
    model, tok = loaded
    (only,) = list(mad.stream_generate(model, tok, "Hello", max_tokens=0))
    assert only.token is None and only.text == "" and only.generation_tokens == 0 and only.finish_reason == "length"
    _, state = model(mx.array([tok.encode("Hello")]))
    for node, entries in state.items():
        for name, arr in entries.items():
            assert np.abs(np.array(only.state[node][name]) - np.array(arr)).max() < 1e-5


def test_the_decode_loop_checks_tokens_once(loaded, monkeypatch):
    """The prompt is checked (one host read); the tokens the loop feeds back are not (no sync per step)."""
    from mad.model import LanguageModel

    model, tok = loaded
    calls = []
    real = LanguageModel.check_tokens
    monkeypatch.setattr(LanguageModel, "check_tokens", lambda self, t, what="tokens": calls.append(what) or real(self, t, what))
    list(mad.stream_generate(model, tok, "Hello", max_tokens=6, repetition_penalty=1.2))
    assert calls == ["prompt"]
    from mad.bench import bench

    calls.clear()
    bench(model, prompt_tokens=4, generation_tokens=3, trials=1, echo=lambda line: None)
    assert calls == []


def test_out_of_vocabulary_ids_never_reach_the_embedding(loaded):
    model, _ = loaded
    for bad in ([[1, 300]], [[-1]], [[2**31 - 1]]):
        with pytest.raises(mad.MadError, match="outside the vocabulary"):
            model(mx.array(bad))
    with pytest.raises(mad.MadError, match=r"token id 9223372036854775807 is outside the vocabulary \(0..299, vocab size 300\)"):
        model(mx.array([[2**63 - 1]], dtype=mx.int64))


def test_old_import_paths_still_work():
    """The split modules' names stay importable from mad.generate (as users and older scripts import them)."""
    import mad.model
    import mad.sampling
    import mad.tokenizers
    from mad.generate import (ByteTokenizer as B, HFTokenizer as H, LanguageModel as LM, check_sampling as cs,
                              make_sampler as ms)

    assert (B, H, LM, cs, ms) == (mad.tokenizers.ByteTokenizer, mad.tokenizers.HFTokenizer, mad.model.LanguageModel,
                                  mad.sampling.check_sampling, mad.sampling.make_sampler)
    assert callable(mad.generate) and callable(mad.stream_generate)
