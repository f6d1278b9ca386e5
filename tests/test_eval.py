"""`mad eval` and `mad.evaluate`: the loss against a direct cross-entropy of the model called window by window,
the held-out split against `mad train`'s held-out loss, and every bad input (a clear MadError / exit 2)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mad
from mad.errors import MadError
from mad.data import iter_windows as windows
from mad.evaluate import evaluate, evaluate_data
from mad.tokenizers import ByteTokenizer

from yaml_files import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "topologies" / "examples" / "tiny.yaml"
XTINY = ROOT / "topologies" / "xlstm-tiny.yaml"
TEXT = "the cat sat on the mat. the dog sat on the log. " * 40


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    f = tmp_path / "corpus.txt"
    f.write_text(TEXT)
    return f


def direct_loss(model, ids: np.ndarray, seq: int, count: int) -> float:
    """The mean next-token cross-entropy over windows ids[k*seq : k*seq+seq+1], k < count: the model called
    on each window alone, the log-softmax taken in float64 with numpy."""
    total = 0.0
    for k in range(count):
        w = ids[k * seq:k * seq + seq + 1].astype(np.int64)
        z = np.array(model(mx.array(w[None, :-1].astype(np.int32)))[0][0], dtype=np.float64)
        z -= z.max(axis=-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        total -= logp[np.arange(seq), w[1:]].sum()
    return total / (count * seq)


@pytest.mark.parametrize("topology", [TINY, XTINY], ids=["tiny", "xlstm-tiny"])
def test_loss_equals_a_direct_cross_entropy(topology):
    mx.random.seed(3)
    model, _ = mad.load(topology)
    ids = np.frombuffer(TEXT.encode(), dtype=np.uint8).astype(np.uint16)[:300]
    seq = 16
    count = (ids.size - 1) // seq  # 18 windows: batches of 4, 4, 4, 4, 2
    result = evaluate(model, ids, seq=seq, batch=4, tokenizer=ByteTokenizer())
    want = direct_loss(model, ids, seq, count)
    assert result["windows"] == count and result["tokens"] == count * seq
    assert result["loss"] == pytest.approx(want, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(want / math.log(2), rel=1e-5)
    assert result["tokens_per_sec"] > 0
    limited = evaluate(model, list(ids), seq=seq, batch=3, max_tokens=5 * seq + 7)  # whole windows: 5
    assert limited["windows"] == 5 and limited["bits_per_byte"] is None  # no tokenizer given, none in the model
    assert limited["loss"] == pytest.approx(direct_loss(model, ids, seq, 5), rel=1e-5)


def test_windows_read_one_batch_at_a_time(tmp_path):
    ids = np.arange(1000, dtype=np.uint16)
    ids.tofile(tmp_path / "t.bin")
    mm = np.memmap(tmp_path / "t.bin", dtype=np.uint16, mode="r")
    batches = list(windows(mm, 7, 4, 10))
    assert [b.shape for b in batches] == [(4, 8), (4, 8), (2, 8)] and all(b.dtype == np.int32 for b in batches)
    rows = np.concatenate(batches)
    np.testing.assert_array_equal(rows, np.stack([ids[k * 7:k * 7 + 8] for k in range(10)]))


def test_splits(corpus):
    """held-out: the last 5% of the tokens (at least seq + 1), as `mad train` holds them out; all: everything."""
    mx.random.seed(0)
    model, _ = mad.load(TINY)
    ids = np.frombuffer(TEXT.encode(), dtype=np.uint8)
    seq = 32
    n_held = max(int(ids.size * 0.05), seq + 1)
    held = evaluate_data(model, corpus, seq=seq, batch=4)
    assert held["split"] == "held-out" and held["corpus_tokens"] == ids.size
    tail = ids[ids.size - n_held:]
    assert held["loss"] == pytest.approx(direct_loss(model, tail, seq, (n_held - 1) // seq), rel=1e-5)
    whole = evaluate_data(model, corpus, seq=seq, batch=4, split="all")
    assert whole["windows"] == (ids.size - 1) // seq and whole["bits_per_byte"] is not None
    assert whole["loss"] == pytest.approx(direct_loss(model, ids, seq, whole["windows"]), rel=1e-5)


def test_mad_eval_gives_mad_trains_held_out_loss(corpus, tmp_path, monkeypatch, capsys):
    from mad.train import TrainConfig, train

    out = tmp_path / "out"
    train(TINY, corpus, out, TrainConfig(steps=2, batch=4, seq=32, eval_every=2, save_every=0), echo=None,
          progress=False)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    code, text, err = cli(monkeypatch, capsys, "eval", out, "--data", corpus, "--seq", "32", "--batch", "4", "--json")
    assert code == 0, err
    result = json.loads(text)
    assert result["loss"] == pytest.approx(record["eval_loss"], rel=1e-5)
    assert result["model"] == str(out) and result["dtype"] == "float32"
    code, text, err = cli(monkeypatch, capsys, "eval", "--model", out, "--data", corpus, "--seq", "32")
    assert code == 0, err
    assert text.startswith("held-out: ") and f"Loss: {result['loss']:.4f} nats/token, perplexity " in text
    assert "bits per byte" in text and "tokens/s" in text


def test_bad_inputs(corpus, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("a few bytes")
    cases = [
        (["--data", empty], "error: --data {}: the corpus is empty (no tokens)".format(empty)),
        (["--data", short, "--seq", "32"], f"error: --data {short}: the corpus has 11 tokens, shorter than one"),
        (["--data", tmp_path / "nope.txt"], f"error: --data {tmp_path / 'nope.txt'}: no such file or folder"),
        (["--data", corpus, "--seq", "0"], "error: --seq must be an integer >= 1, got 0"),
        (["--data", corpus, "--batch", "-1"], "error: --batch must be an integer >= 1, got -1"),
        (["--data", corpus, "--seq", "64", "--max-tokens", "10"], "error: --max-tokens 10 is less than one sequence"),
        (["--data", corpus, "--split", "test"], "error: --split must be held-out or all, got 'test'"),
        (["--data", corpus, "--seq", str(2**30)], "error: --batch 8 x --seq 1073741824 x vocabulary 256"),
        (["--data", corpus, "--seq", "1000"], f"error: --data {corpus}: the corpus has 1,920 tokens, too few to hold "
                                              "out a sequence of --seq 1000"),
        (["--data", corpus, "--dtype", "float8"], "error: --dtype must be one of"),
        (["--data", corpus, "--revision", ""], "error: --revision must be a branch, a tag or a commit sha"),
    ]
    for args, message in cases:
        code, out, err = cli(monkeypatch, capsys, "eval", TINY, *args)
        assert code == 2 and "Traceback" not in err, (args, err)
        assert err.startswith(message), (args, err)
    code, out, err = cli(monkeypatch, capsys, "eval", TINY, "--data", corpus, "--seq", "1000", "--split", "all")
    assert code == 0, err
    code, out, err = cli(monkeypatch, capsys, "eval", "--data", corpus)
    assert code == 2 and err.startswith("error: give a checkpoint folder, a Hugging Face repo id or a topology file")
    code, out, err = cli(monkeypatch, capsys, "eval", TINY)
    assert code == 2 and "--data" in err  # a usage error of the command line


def test_bad_api_inputs():
    mx.random.seed(0)
    model, _ = mad.load(TINY)
    ids = np.arange(100) % 256
    with pytest.raises(MadError, match="no tokens to evaluate: the data is empty"):
        evaluate(model, [], seq=8)
    with pytest.raises(MadError, match="token id 256 is outside the vocabulary"):
        evaluate(model, np.full(50, 256), seq=8)
    with pytest.raises(MadError, match="expected a 1-D sequence of integer token ids"):
        evaluate(model, ids.reshape(10, 10), seq=8)
    with pytest.raises(MadError, match="expected a model from mad.load"):
        evaluate(object(), ids, seq=8)
    object.__setattr__(model.program.graph, "max_seq", 16)  # a model that bounds its sequence length
    with pytest.raises(MadError, match=r"--seq 32 is longer than the model allows \(16\)"):
        evaluate(model, ids, seq=32)
    object.__delattr__(model.program.graph, "max_seq")
    model.update({"embedding": {"weight": mx.full((256, 64), float("nan"))}})
    with pytest.raises(MadError, match="the loss is nan .not finite."):
        evaluate(model, ids, seq=8)
