"""`mad design` and `mad.tasks`: deterministic generators with the documented shapes and masks, hand-checked
answers, an end-to-end run on tiny settings, and bad inputs (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mad import tasks as T
from mad.design import DesignConfig, design
from mad.errors import MadError

from yaml_files import cli

ROOT = Path(__file__).resolve().parents[1]
MLSTM = ROOT / "topologies" / "examples" / "design-mlstm.yaml"
SLSTM = ROOT / "topologies" / "examples" / "design-slstm.yaml"

# task -> (small settings, expected T)
SHAPES = {
    "in-context-recall": lambda s: s["seq_len"] - 1,
    "noisy-in-context-recall": lambda s: s["seq_len"] - 1,
    "fuzzy-in-context-recall": lambda s: s["seq_len"],
    "selective-copying": lambda s: s["seq_len"],
    "compression": lambda s: 2 * s["seq_len"] - 2,
    "memorization": lambda s: s["seq_len"],
    "parity": lambda s: s["seq_len"],
    "majority": lambda s: s["seq_len"],
}


@pytest.mark.parametrize("name", list(T.TASKS))
@pytest.mark.parametrize("train", [False, True])
def test_generators_deterministic_shapes(name: str, train: bool) -> None:
    task = T.TASKS[name]
    s = task.settings("small")
    a = task.make(7, 16, train=train, **s)
    b = task.make(7, 16, train=train, **s)
    c = task.make(8, 16, train=train, **s)
    x, y, m = a
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    assert x.dtype == np.int32 and y.dtype == np.int32 and m.dtype == bool
    assert x.shape == y.shape == m.shape == (16, SHAPES[name](s))
    assert x.min() >= 0 and x.max() < task.vocab("small") and y.max() < task.vocab("small")
    assert m.any(axis=1).all() and (y[~m] == 0).all()
    # the mad-lab defaults generate too
    d = task.settings("mad")
    assert task.make(0, 2, train=train, **d)[0].shape == (2, SHAPES[name](d))


def test_parity_and_majority_labels() -> None:
    x, y, m = T.parity(0, 200, 21)
    assert (m[:, -1]).all() and m.sum() == 200 and (x[:, -1] == 3).all()
    for row, label in zip(x, y[:, -1]):
        bits = row[:-1][row[:-1] != 2]
        assert 3 <= len(bits) <= 20 and set(bits.tolist()) <= {0, 1}
        assert label == bits.sum() % 2
    x, y, m = T.majority(0, 200, 21)
    for row, label in zip(x, y[:, -1]):
        bits = row[:-1][row[:-1] != 2]
        assert len(bits) % 2 == 1 and label == int(bits.sum() > len(bits) / 2)


def test_recall_answers_are_stored_values() -> None:
    for make, vocab, keys in ((T.in_context_recall, 16, 8), (T.noisy_in_context_recall, 32, 8)):
        x, y, m = make(3, 50, 64, vocab)
        assert m[:, -1].all() and not m[:, 1::2].any()  # the final probe is scored; only key positions are
        for row, tgt, msk in zip(x, y, m):
            stored: dict = {}
            for t in range(0, len(row), 2):  # pairs (key, value); position t predicts the value of key row[t]
                k = int(row[t])
                if msk[t]:
                    assert k in stored and stored[k] == tgt[t]
                if k < keys and t + 1 < len(row):
                    assert stored.setdefault(k, int(row[t + 1])) == row[t + 1]  # one value per key
    # by hand: the last answer is the value stored earlier for the probed key
    x, y, m = T.in_context_recall(11, 1, 16)
    row = x[0]
    stored = {int(row[t]): int(row[t + 1]) for t in range(0, len(row) - 1, 2)}
    assert m[0, -1] and y[0, -1] == stored[int(row[-1])]


def test_copying_compression_memorization_targets() -> None:
    x, y, m = T.selective_copying(0, 5, 64, 16, num_tokens_to_copy=8)
    for row, tgt, msk in zip(x, y, m):
        assert msk.sum() == 8 and msk[-8:].all() and row[-9] == 15 and (row[-8:] == 14).all()
        tokens = row[:-9][row[:-9] != 14]
        assert np.array_equal(tokens, tgt[-8:])
    x, y, m = T.compression(0, 5, 16, 16)
    for row, tgt, msk in zip(x, y, m):
        assert (row[:15] < 15).all() and (row[15:] == 15).all() and np.array_equal(tgt[msk], row[:15])
        assert msk[15:].all() and not msk[:15].any()  # from the compression token on: x_1 .. x_15
    mapping = T.kv_map(64)
    x, y, m = T.memorization(0, 5, 32, 64)
    assert (x[:, 1::2] == 63).all() and m[:, 1::2].all() and not m[:, ::2].any()
    assert all(mapping[int(k)] == int(v) for k, v in zip(x[:, ::2].ravel(), y[:, 1::2].ravel()))
    assert np.array_equal(T.memorization(5, 2, 32, 64)[1][m[:2]] >= 31, np.ones(32, bool))


def test_design_end_to_end(monkeypatch, capsys) -> None:
    code, out, err = cli(monkeypatch, capsys, "design", MLSTM, "--task", "parity,compression", "--steps", "5")
    assert code == 0, err
    assert "parity" in out and "compression" in out and "design-mlstm.yaml" in out and "±" in out
    code, out, err = cli(monkeypatch, capsys, "design", SLSTM, "--task", "majority", "--steps", "5", "--seeds", "2",
                         "--json")
    assert code == 0, err
    summary = json.loads(out)
    (r,) = summary["results"]
    assert r["task"] == "majority" and len(r["accuracies"]) == 2 and 0 <= r["mean"] <= 1
    assert summary["tasks"]["majority"]["vocab_size"] == 4


def test_design_repeatable() -> None:
    cfg = DesignConfig(steps=3)
    a = design([MLSTM], "parity", cfg)["results"][0]
    b = design([MLSTM], "parity", cfg)["results"][0]
    assert a["accuracies"] == b["accuracies"] and a["final_losses"] == b["final_losses"]


NOT_LM = """mad: 1
name: not-lm
dims: {B: batch, T: seq, D: 8}
inputs:
  x: {shape: [B, T, D], dtype: float32}
nodes:
  norm: {type: rmsnorm, dim: D, in: x}
outputs: {y: norm}
"""


@pytest.mark.parametrize("args, message", [
    (["--task", "nope"], "unknown task 'nope'"),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--seeds", "0"], "--seeds must be an integer >= 1"),
    (["--preset", "huge"], "--preset must be"),
])
def test_design_bad_flags(monkeypatch, capsys, args, message) -> None:
    code, out, err = cli(monkeypatch, capsys, "design", MLSTM, *args)
    assert code == 2 and message in err, err


def test_design_bad_topologies(monkeypatch, capsys, tmp_path: Path) -> None:
    bad = tmp_path / "not-lm.yaml"
    bad.write_text(NOT_LM)
    code, out, err = cli(monkeypatch, capsys, "design", bad, "--task", "parity", "--steps", "1")
    assert code == 2 and "not a language model" in err, err
    code, out, err = cli(monkeypatch, capsys, "design", tmp_path / "missing.yaml", "--steps", "1")
    assert code == 2, err
    # no dim V and a vocabulary smaller than the task's
    small = tmp_path / "small-vocab.yaml"
    small.write_text((ROOT / "topologies" / "examples" / "tiny.yaml").read_text()
                     .replace("V: 256, ", "").replace("vocab: V", "vocab: 8").replace("out: V", "out: 8")
                     .replace('constraints: ["V >= 256"]\n', ""))
    code, out, err = cli(monkeypatch, capsys, "design", small, "--task", "memorization", "--steps", "1")
    assert code == 2 and "vocabulary of 64 tokens" in err, err
    with pytest.raises(MadError):
        design([MLSTM], [], DesignConfig())
