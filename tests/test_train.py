"""`mad train` and `mad.save`: training tiny models on a small corpus, the checkpoint folder they write,
exact resumption, and every bad input (a clear MadError / exit 2, nothing of the user's lost)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import pytest

import mad
from mad.errors import MadError
from mad.train import TrainConfig, train

from yaml_files import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "topologies" / "examples" / "tiny.yaml"
XTINY = ROOT / "topologies" / "xlstm-tiny.yaml"
HF_TINY = ROOT / "tests" / "fixtures" / "hf-tiny"
TEXT = "the cat sat on the mat. the dog sat on the log. " * 60


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    f = tmp_path / "corpus.txt"
    f.write_text(TEXT)
    return f


def run(source, data, out, resume=False, stop_after=None, **kw):
    cfg = dict(steps=12, batch=4, seq=32, lr=3e-3, eval_every=6, save_every=0)
    cfg.update(kw)
    return train(source, data, out, TrainConfig(**cfg), resume=resume, given=set(kw), echo=None, progress=False,
                 stop_after=stop_after)


def weights(folder: Path) -> dict:
    return mx.load(str(folder / "model.safetensors"))


def optimizer(folder: Path) -> dict:
    return mx.load(str(folder / "training" / "optimizer.safetensors"))


@pytest.mark.parametrize("topology", [TINY, XTINY], ids=["tiny", "xlstm-tiny"])
def test_train_loss_decreases_and_the_folder_loads(topology, corpus, tmp_path):
    out = tmp_path / "out"
    summary = run(topology, corpus, out, steps=24, eval_every=8)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 25))
    for r in records:
        assert {"step", "loss", "lr", "tokens_per_sec"} <= r.keys()
    assert [r["step"] for r in records if "eval_loss" in r] == [8, 16, 24]
    first, last = records[0]["loss"], records[-1]["loss"]
    assert first > 4.5 and last < 0.5 * first, (first, last)  # a repetitive corpus: learnt fast
    assert summary["step"] == 24 and math.isfinite(summary["eval_loss"])
    assert (out / "loss.svg").read_text().startswith("<svg")
    assert json.loads((out / "training" / "state.json").read_text())["step"] == 24
    model, tok = mad.load(out)
    assert getattr(tok, "is_bytes", False)
    text = mad.generate(model, tok, "the cat", max_tokens=12)
    assert len(text) > 0
    # the trained weights, not fresh ones
    fresh, _ = mad.load(topology)
    x = mx.array([list(b"the cat sat")])
    assert not mx.allclose(model(x)[0], fresh(x)[0]).item()


def test_resume_is_exact_constant_schedule_extended(corpus, tmp_path):
    """2N steps in one run == N steps, then --resume to 2N: bitwise equal weights and optimizer state."""
    a, b = tmp_path / "a", tmp_path / "b"
    run(TINY, corpus, a, steps=8, schedule="constant", warmup=2)
    run(TINY, corpus, b, steps=4, schedule="constant", warmup=2)
    run(None, corpus, b, resume=True, steps=8)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert mx.array_equal(wa[k], wb[k]).item(), k
    oa, ob = optimizer(a), optimizer(b)
    for k in oa:
        assert mx.array_equal(oa[k], ob[k]).item(), k
    ma = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in ma] == [r["loss"] for r in mb]


def test_resume_is_exact_after_an_interruption_cosine(corpus, tmp_path):
    """A cosine run stopped after 5 of 10 steps and resumed equals the uninterrupted run, bitwise (xLSTM)."""
    a, b = tmp_path / "a", tmp_path / "b"
    run(XTINY, corpus, a, steps=10, warmup=3, eval_every=0)
    run(XTINY, corpus, b, steps=10, warmup=3, eval_every=0, stop_after=5)
    assert json.loads((b / "training" / "state.json").read_text())["step"] == 5
    run(None, corpus, b, resume=True)
    wa, wb = weights(a), weights(b)
    for k in wa:
        assert mx.array_equal(wa[k], wb[k]).item(), k


def test_eval_every_zero_evaluates_at_the_end_only(corpus, tmp_path):
    """--eval-every 0: one held-out loss, on the last step's record (the flag's help: "0: at the end only")."""
    out = tmp_path / "run"
    run(TINY, corpus, out, steps=4, eval_every=0)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [4]


def test_save_load_round_trip(tmp_path):
    model, tok = mad.load(XTINY)
    mad.save(model, tmp_path / "ck")
    again, tok2 = mad.load(tmp_path / "ck")
    x = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    assert mx.array_equal(model(x)[0], again(x)[0]).item()
    assert getattr(tok2, "is_bytes", False)
    mad.save(again, tmp_path / "ck")  # its own folder: replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(MadError, match="did not write"):
        mad.save(model, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_a_build_never_replaces_trained_weights(tmp_path, monkeypatch, capsys):
    model, _ = mad.load(TINY)
    mad.save(model, tmp_path / "ck")
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()
    code, _, err = cli(monkeypatch, capsys, "build", TINY, "-o", tmp_path / "ck")
    assert code == 2 and "is a MAD checkpoint" in err
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before


def test_fine_tune_a_checkpoint_keeps_its_tokenizer(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": "hello world " * 20, "id": i}) for i in range(20)) + "\n")
    out = tmp_path / "ft"
    run(HF_TINY, data, out, steps=2, seq=16, batch=2, eval_every=0)
    assert (out / "tokenizer.json").read_bytes() != b""
    model, tok = mad.load(out)
    assert not getattr(tok, "is_bytes", False) and tok.encode("hello") == mad.load(HF_TINY)[1].encode("hello")
    assert json.loads((out / "mad.json").read_text())["eos_token_ids"] == [2]


def test_folder_of_text_files(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(TEXT)
    (folder / "sub" / "b.md").write_text(TEXT)
    (folder / ".hidden").write_bytes(b"\xff\xfe")  # skipped
    out = tmp_path / "out"
    run(TINY, folder, out, steps=2)
    meta = json.loads((out / "data" / "tokens.json").read_text())
    assert meta["tokens"] == 2 * len(TEXT)


def test_cli_train_then_run(corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cli"
    code, stdout, err = cli(monkeypatch, capsys, "train", TINY, "--data", corpus, "-o", out, "--steps", "3",
                            "--batch", "2", "--seq", "16", "--eval-every", "3")
    assert code == 0, err
    assert "held-out loss" in stdout and (out / "model.safetensors").is_file()
    code, stdout, err = cli(monkeypatch, capsys, "run", out, "-p", "the", "-m", "5")
    assert code == 0, err


# ----------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--batch", "0"], "--batch must be an integer >= 1"),
    (["--seq", "-3"], "--seq must be an integer >= 1"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--steps", "5", "--warmup", "6"], "--warmup 6 is more than --steps 5"),
    (["--schedule", "linear"], "--schedule must be cosine or constant"),
    (["--dtype", "float16"], "--dtype must be float32 or bfloat16"),
    (["--grad-clip", "-1"], "--grad-clip must be a finite number >= 0"),
])
def test_bad_flags(flags, message, corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code, _, err = cli(monkeypatch, capsys, "train", TINY, "--data", corpus, "-o", out, *flags)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not out.exists()


def test_bad_malloc_setting(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MAD_MALLOC", "off")
    out = tmp_path / "out"
    code, _, err = cli(monkeypatch, capsys, "train", TINY, "--data", corpus, "-o", out, "--steps", "1")
    assert code == 2 and "MAD_MALLOC must be 'default' or unset, got 'off'" in err and "Traceback" not in err, err
    assert not out.exists()


def bad_data(tmp_path: Path, name: str, content: bytes) -> Path:
    f = tmp_path / name
    f.write_bytes(content)
    return f


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"", "the corpus is empty"),
    ("short.txt", b"too short", "shorter than one training sequence"),
    ("latin1.txt", b"caf\xe9 au lait\n" * 10, "not UTF-8 text (byte 0xe9 at offset 3)"),
    ("no_text.jsonl", b'{"text": "fine"}\n{"body": "no text here"}\n', "line 2 has no \"text\" field"),
    ("bad.jsonl", b'{"text": "fine"}\n{not json\n', "line 2 is not JSON"),
])
def test_bad_corpus(name, content, message, tmp_path):
    data = bad_data(tmp_path, name, content)
    out = tmp_path / "out"
    with pytest.raises(MadError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(TINY, data, out, steps=2)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".mad-tmp." in p.name]  # no staging folder left behind


def test_missing_data_and_user_folder(corpus, tmp_path):
    with pytest.raises(MadError, match="no such file or folder"):
        run(TINY, tmp_path / "nothing.txt", tmp_path / "out")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(MadError, match="did not write"):
        run(TINY, corpus, mine)
    assert (mine / "thesis.tex").read_text() == "years of work"
    with pytest.raises(MadError, match="not a checkpoint folder written by `mad train`"):
        run(None, corpus, tmp_path / "absent", resume=True)


def test_seq_too_large(corpus, tmp_path):
    with pytest.raises(MadError, match="more than the .* elements"):
        run(TINY, corpus, tmp_path / "out", batch=1 << 20, seq=1 << 20)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(corpus, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(MadError, match=r"step \d+: the loss is (nan|inf).*no checkpoint was written"):
        run(TINY, corpus, out, steps=40, lr=1e30, warmup=0, save_every=0, eval_every=0)
    assert not out.exists()
    # saving every step: the weights turn non-finite before the loss does; the last finite checkpoint stays
    with pytest.raises(MadError, match=r"step (\d+): the (loss is|weights hold) .*the checkpoint of step (\d+) .* is "
                       r"kept") as e:
        run(TINY, corpus, out, steps=40, lr=1e30, warmup=0, save_every=1, eval_every=0)
    import re

    bad, kept = map(int, re.search(r"step (\d+): .* step (\d+) ", str(e.value)).groups())
    assert kept == bad - 1
    assert json.loads((out / "training" / "state.json").read_text())["step"] == kept
    mad.load(out)
    assert all(mx.isfinite(w).all().item() for w in weights(out).values())


def test_resume_refuses_changed_settings(corpus, tmp_path):
    out = tmp_path / "out"
    run(TINY, corpus, out, steps=2, eval_every=0)
    with pytest.raises(MadError, match="--batch 8 \\(saved: 4\\)"):
        run(None, corpus, out, resume=True, steps=4, batch=8)
    with pytest.raises(MadError, match="--steps 2 is reached"):
        run(None, corpus, out, resume=True)
