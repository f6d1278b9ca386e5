"""`mad design` and `mad.tasks`: deterministic generators with the documented shapes and masks, hand-checked
answers, an end-to-end run on tiny settings, the SVG chart, and bad inputs (exit 2)."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mad import tasks as T
from mad.design import PLOT_MARK, DesignConfig, design, parse_lengths, table, task_settings
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
    "mqar": lambda s: s["seq_len"],
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
    assert m.sum() == 200 and (m.sum(axis=1) == 1).all()
    for row, label, msk in zip(x, y, m):
        q = int(np.flatnonzero(msk)[0])  # bits, QUERY (3), then PAD (2) to the end
        bits = row[:q]
        assert 3 <= len(bits) <= 20 and set(bits.tolist()) <= {0, 1} and row[q] == 3 and (row[q + 1:] == 2).all()
        assert label[q] == sum(int(b) for b in bits) % 2
    x, y, m = T.majority(0, 200, 21)
    for row, label, msk in zip(x, y, m):
        q = int(np.flatnonzero(msk)[0])
        ones = int(row[:q].sum())
        assert q % 2 == 1 and label[q] == (1 if ones > q - ones else 0)
    # lengths: min_len..max_len, padded to seq_len
    x, y, m = T.parity(1, 300, 41, min_len=13, max_len=40)
    q = m.argmax(axis=1)
    assert q.min() == 13 and q.max() == 40 and x.shape == (300, 41)
    assert T.parity(2, 50, 9, max_len=4)[2].argmax(axis=1).max() <= 4


def test_length_settings() -> None:
    """Training and held-out lengths of the formal tasks: the preset's, or --train-len / --test-len."""
    cfg = DesignConfig(preset="small")
    train, test = task_settings("parity", cfg)
    assert (train["min_len"], train["seq_len"]) == (3, 13) and (test["min_len"], test["seq_len"]) == (13, 41)
    train, test = task_settings("parity", DesignConfig(preset="mad"))
    assert (train["min_len"], train["seq_len"]) == (3, 41) and (test["min_len"], test["seq_len"]) == (40, 257)
    train, test = task_settings("majority", DesignConfig(train_len=(2, 7), test_len=(8, 30)))
    assert (train["min_len"], train["max_len"], train["seq_len"]) == (2, 7, 8)
    assert (test["min_len"], test["max_len"], test["seq_len"]) == (8, 30, 31)
    assert task_settings("compression", DesignConfig(train_len=(2, 7)))[0] == T.TASKS["compression"].settings("small")
    assert parse_lengths("3:40", "--x") == (3, 40) and parse_lengths("12", "--x") == (12, 12)


def test_mqar_answers() -> None:
    """Every key once in the context with its value, then once as a query; the target is that value."""
    x, y, m = T.mqar(5, 40, 64, 128, num_kv_pairs=8)
    assert x.shape == (40, 64) and (m.sum(axis=1) == 8).all()
    for row, tgt, msk in zip(x, y, m):
        keys, values = row[0:16:2], row[1:16:2]
        assert len(set(keys.tolist())) == 8 and len(set(values.tolist())) == 8
        assert ((keys >= 1) & (keys < 64)).all() and ((values >= 64) & (values < 128)).all()
        stored = dict(zip(keys.tolist(), values.tolist()))
        queries = np.flatnonzero(msk)
        assert (queries >= 16).all() and ((queries - 16) % 2 == 0).all()
        assert sorted(row[queries].tolist()) == sorted(keys.tolist())
        assert all(tgt[q] == stored[int(row[q])] for q in queries)


def test_mqar_zero_filler() -> None:
    """`random_non_queries=False` (Zoology's ICLR'24 figure 2): token 0 wherever no key, value or query
    stands, and otherwise the very sequences of the default."""
    x, y, m = T.mqar(5, 40, 64, 128, num_kv_pairs=8)
    x0, y0, m0 = T.mqar(5, 40, 64, 128, num_kv_pairs=8, random_non_queries=False)
    assert (y0 == y).all() and (m0 == m).all()
    kept = m0.copy()
    kept[:, :16] = True  # the key-value context
    assert (x0[kept] == x[kept]).all() and (x0[~kept] == 0).all() and (x[~kept] != 0).any()


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


def test_design_end_to_end(monkeypatch, capsys, tmp_path: Path) -> None:
    code, out, err = cli(monkeypatch, capsys, "design", MLSTM, "--task", "parity,compression", "--steps", "5")
    assert code == 0, err
    assert "parity" in out and "compression" in out and "design-mlstm.yaml" in out and "±" in out
    assert "(train 3..12, test 13..40)" in out and "at train lengths" in out and "at train lengths" in err
    plot = tmp_path / "acc.svg"
    code, out, err = cli(monkeypatch, capsys, "design", SLSTM, MLSTM, "--task", "majority", "--steps", "5",
                         "--seeds", "2", "--train-len", "3:7", "--test-len", "9:15", "--json", "-o", plot)
    assert code == 0, err
    summary = json.loads(out)
    assert [(Path(r["topology"]).name, r["task"]) for r in summary["results"]] == [
        ("design-slstm.yaml", "majority"), ("design-mlstm.yaml", "majority")]
    r = summary["results"][0]
    assert len(r["accuracies"]) == 2 and 0 <= r["mean"] <= 1 and len(r["in_dist_accuracies"]) == 2
    assert r["mean"] == pytest.approx(np.mean(r["accuracies"])) and r["std"] == pytest.approx(np.std(r["accuracies"]))
    majority = summary["tasks"]["majority"]
    assert majority["train"]["vocab_size"] == 4
    assert (majority["train"]["max_len"], majority["test"]["min_len"]) == (7, 9)
    check_chart(plot.read_text(), summary)
    # the chart is MAD's own: a second run replaces it
    code, out, err = cli(monkeypatch, capsys, "design", MLSTM, "--task", "compression", "--steps", "2", "-o", plot)
    assert code == 0, err
    assert plot.read_text().count("<circle") == 1


def check_chart(svg: str, summary: dict) -> None:
    """The chart against the summary: one dot per topology and task at its mean accuracy (the y axis runs
    from 0 at the bottom to 1 at the top of the plot area), a bar of ± std, a legend entry per topology."""
    assert PLOT_MARK in svg
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    circles = root.findall(f"{ns}circle")
    assert len(circles) == len(summary["results"])
    axis = [e for e in root.findall(f"{ns}line") if e.get("stroke") == "black"]
    bottom, top = float(axis[1].get("y2")), float(axis[1].get("y1"))  # the y axis: (ml, mt) to (ml, h - mb)
    ys = sorted(float(c.get("cy")) for c in circles)
    want = sorted(bottom - r["mean"] * (bottom - top) for r in summary["results"])
    assert ys == pytest.approx(want, abs=0.06)
    bars = [e for e in root.findall(f"{ns}line") if e.get("stroke") not in ("black", "#ddd")]
    spans = sorted(abs(float(b.get("y2")) - float(b.get("y1"))) for b in bars)
    assert spans == pytest.approx(sorted(2 * r["std"] * (bottom - top) for r in summary["results"] if r["std"] > 0),
                                  abs=0.11)
    texts = [t.text for t in root.findall(f"{ns}text")]
    assert all(Path(r["topology"]).name in texts for r in summary["results"])


def test_table_marks_diverged_runs() -> None:
    from rich.console import Console

    summary = {"steps": 1, "seeds": 2, "preset": "small", "tasks": {"compression": {"train": {}, "test": {}}},
               "results": [{"topology": "a/x.yaml", "task": "compression", "mean": 0.5, "std": 0.1,
                            "final_losses": [1.0, float("nan")]},
                           {"topology": "b/x.yaml", "task": "compression", "mean": 0.25, "std": 0.0,
                            "final_losses": [1.0, 2.0]}]}
    console = Console(width=200, record=True)
    console.print(table(summary))
    text = console.export_text()
    assert "0.500 ± 0.100 (NaN)" in text and "0.250 ± 0.000" in text and "0.250 ± 0.000 (NaN)" not in text
    assert "a/x.yaml" in text and "b/x.yaml" in text  # two files of one name: their paths


def test_design_repeatable() -> None:
    cfg = DesignConfig(steps=3)
    a = design([MLSTM], "parity,compression", cfg)["results"]
    b = design([MLSTM], "parity,compression", cfg)["results"]
    assert [(r["accuracies"], r["final_losses"]) for r in a] == [(r["accuracies"], r["final_losses"]) for r in b]
    assert "in_dist_accuracies" in a[0] and "in_dist_accuracies" not in a[1]  # compression: one held-out set


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
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
    (["--train-len", "5:3"], "--train-len must be MIN:MAX"),
    (["--test-len", "0:4"], "--test-len must be MIN:MAX"),
    (["--test-len", "a:b"], "--test-len must be MIN:MAX"),
    (["--train-len", "3:99999"], "--train-len must be MIN:MAX"),
    (["--task", "compression", "--train-len", "3:9"], "--train-len sets the lengths of the bit strings of parity"),
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


def test_design_plot_never_replaces_other_files(monkeypatch, capsys, tmp_path: Path) -> None:
    mine = tmp_path / "notes.svg"
    mine.write_text("<svg>my own drawing</svg>")
    code, out, err = cli(monkeypatch, capsys, "design", MLSTM, "--task", "compression", "--steps", "1", "-o", mine)
    assert code == 2 and "not a chart written by mad design" in err, err
    assert mine.read_text() == "<svg>my own drawing</svg>"
    code, out, err = cli(monkeypatch, capsys, "design", MLSTM, "--task", "compression", "--steps", "1", "--plot",
                         tmp_path)
    assert code == 2 and "--plot" in err and "folder" in err, err


def test_scored_positions_alone_give_the_masked_loss_and_gradients() -> None:
    """MaskedStepper runs the head at the scored positions alone (`positions`): the same loss and gradients
    as the cross-entropy over every position with the mask applied, to float32 rounding. Rounding's size
    is measured, not assumed: the same masked loss over the batch's rows in reverse order (the same sums in
    another order) moves a gradient whose entries cancel (the input gate's bias: a sum over every position)
    by up to ~5e-5 of itself; the picked positions may differ by ten times that spread, and by 1e-5 of the
    parameter's largest entry where the reordering moves nothing."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    import mad

    x, y, m = T.mqar(3, 4, 64, 128, num_kv_pairs=8, train=True)
    m[1, np.flatnonzero(m[1])[:3]] = False  # rows with different counts: padded with unscored positions
    mx.random.seed(0)
    model, _ = mad.load("topologies/examples/design-recall-mlstm.yaml", overrides=["dims.V=128"])

    def full(rows):
        def loss(model):
            logits = model(mx.array(x[rows].copy()), check_tokens=False)[0]
            ce = nn.losses.cross_entropy(logits, mx.array(y[rows].copy()), reduction="none")
            w = mx.array(m[rows].astype(np.float32))
            return (ce * w).sum() / w.sum()
        return loss

    p = np.argsort(~m, axis=1, kind="stable")[:, :int(m.sum(axis=1).max())]
    w_at = mx.array(np.take_along_axis(m, p, 1).astype(np.float32))

    def picked(model):
        logits = model(mx.array(x), positions=mx.array(p.astype(np.int32)))[0]
        assert logits.shape == (4, 8, 128)
        ce = nn.losses.cross_entropy(logits, mx.array(np.take_along_axis(y, p, 1)), reduction="none")
        return (ce * w_at).sum() / w_at.sum()

    losses = (full(slice(None)), full(slice(None, None, -1)), picked)
    (a, ga), (_, gr), (b, gb) = (nn.value_and_grad(model, f)(model) for f in losses)
    assert abs(a.item() - b.item()) <= 1e-6 * abs(a.item())
    for (name, u), (_, v), (_, w) in zip(tree_flatten(ga), tree_flatten(gb), tree_flatten(gr)):
        spread = mx.abs(u - w).max().item()
        assert mx.abs(u - v).max().item() <= max(1e-5 * mx.abs(u).max().item(), 10 * spread), name


def test_positions_bad_input() -> None:
    import mad

    model, _ = mad.load("topologies/xlstm-tiny.yaml")
    x = mx.zeros((2, 8), dtype=mx.int32)
    for bad, words in ((mx.zeros((3, 2), mx.int32), "shape (batch 2"), (mx.zeros((2,), mx.int32), "shape (batch 2"),
                       (mx.zeros((2, 2)), "integer array"), (mx.full((2, 2), 8, mx.int32), "0..7"),
                       (mx.full((2, 2), -1, mx.int32), "got -1..-1"), (mx.zeros((2, 2), mx.bool_), "integer array")):
        with pytest.raises(MadError, match=re.escape(words)):
            model(x, positions=bad)
    with pytest.raises(MadError, match="last_only"):
        model(x, positions=mx.zeros((2, 1), mx.int32), last_only=True)
