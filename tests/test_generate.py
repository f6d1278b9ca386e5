"""Generation on a real (tiny) xLSTM checkpoint: streaming, stopping, sampling, state reuse, bad input."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mad
from mad.generate import ByteTokenizer, StreamingDetokenizer, apply_repetition_penalty, make_sampler

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
