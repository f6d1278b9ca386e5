"""Bad command lines: every bad flag or file is one clear message naming it, exit 2 with no traceback, and
nothing the user owns is overwritten, deleted or half-written.

`mad build -o` replaces only a folder MAD wrote (the `.mad-build` marker), builds racing into one folder
all end well, a killed build's temp folders are cleaned up; graph.mmd / graph.dot survive nasty node names;
`--save-state` takes any file name; sampling flags, seeds, devices, dtypes, prompts and state files are
checked before anything runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mad
from mad.errors import MadError
from mad.loading import load, load_state_file, save_state_file
from mad.report import MARKER, dot, mermaid, write_atomic_dir

from yaml_files import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "topologies" / "examples" / "tiny.yaml"
XTINY = ROOT / "topologies" / "xlstm-tiny.yaml"
HF_TINY = ROOT / "tests" / "fixtures" / "hf-tiny"


def pythonpath(*folders) -> str:
    """PYTHONPATH for a subprocess: these folders first, then what this process was given (where MLX may be)."""
    return os.pathsep.join([*map(str, folders), *filter(None, [os.environ.get("PYTHONPATH")])])


def mad_cli(*args, stdin: bytes | None = None, cwd: Path | None = None, umask: int | None = None):
    env = dict(os.environ, COLUMNS="200", PYTHONPATH=pythonpath(ROOT))
    pre = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([sys.executable, "-m", "mad.cli", *map(str, args)], capture_output=True, env=env,
                          input=stdin, timeout=120, cwd=cwd or ROOT, preexec_fn=pre)


def snapshot(path: Path) -> dict:
    """Every file under `path` (or the file itself): bytes, mode and mtime."""
    paths = [path] if path.is_file() else sorted(p for p in path.rglob("*"))
    return {str(p): (p.read_bytes() if p.is_file() else None, p.stat().st_mode, p.stat().st_mtime_ns) for p in paths}


def assert_clean_error(code: int, err: str, *expected: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    for e in expected:
        assert e in err, err


# ----------------------------------------------------------------------------------------- build -o
def test_build_refuses_a_users_folder(tmp_path, monkeypatch, capsys):
    mine = tmp_path / "mydir"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    before = snapshot(tmp_path)
    code, out, err = cli(monkeypatch, capsys, "build", TINY, "-o", mine)
    assert_clean_error(code, err, f"-o {mine}", "did not write", MARKER)
    assert snapshot(tmp_path) == before


def test_build_refuses_a_file(tmp_path, monkeypatch, capsys):
    model = tmp_path / "model.yaml"
    shutil.copy(TINY, model)
    before = snapshot(tmp_path)
    code, out, err = cli(monkeypatch, capsys, "build", model, "-o", model)
    assert_clean_error(code, err, f"-o {model}", "is not a folder")
    assert snapshot(tmp_path) == before


def test_build_refuses_dot_and_parents(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(TINY, work / "tiny.yaml")
    (work / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    for target in (".", "..", str(work), "sub/.."):
        proc = mad_cli("build", "tiny.yaml", "-o", target, cwd=work)
        assert_clean_error(proc.returncode, proc.stderr.decode(), f"-o {target}")
    assert snapshot(tmp_path) == before  # no ..old.* folders, nothing moved


def test_build_refuses_a_path_under_a_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "somefile").write_text("x")
    before = snapshot(tmp_path)
    code, _, err = cli(monkeypatch, capsys, "build", TINY, "-o", tmp_path / "somefile" / "x")
    assert_clean_error(code, err, "-o", "is not a folder")
    code, _, err = cli(monkeypatch, capsys, "build", TINY, "-o", tmp_path / "somefile" / "a" / "b")
    assert_clean_error(code, err, "-o", "is not a folder")
    assert snapshot(tmp_path) == before


def test_build_refuses_a_symlink(tmp_path, monkeypatch, capsys):
    target = tmp_path / "real"
    assert cli(monkeypatch, capsys, "build", TINY, "-o", target)[0] == 0
    (tmp_path / "link").symlink_to(target)
    code, _, err = cli(monkeypatch, capsys, "build", TINY, "-o", tmp_path / "link")
    assert_clean_error(code, err, "symbolic link")


def test_build_into_an_empty_folder_and_rebuild(tmp_path, monkeypatch, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    assert cli(monkeypatch, capsys, "build", TINY, "-o", out)[0] == 0
    assert (out / MARKER).is_file() and (out / "graph.json").is_file()
    assert cli(monkeypatch, capsys, "build", TINY, "-o", out, "--set", "dims.D=32")[0] == 0
    assert "  D: 32\n" in (out / "resolved.yaml").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_a_forged_marker_must_hold_the_tag(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text("something else")
    (out / "data").write_text("mine")
    before = snapshot(tmp_path)
    code, _, err = cli(monkeypatch, capsys, "build", TINY, "-o", out)
    assert_clean_error(code, err, "did not write")
    assert snapshot(tmp_path) == before


def test_build_checks_the_target_before_building(tmp_path, monkeypatch, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "x").write_text("x")
    bad = tmp_path / "bad.yaml"
    bad.write_text("mad: 1\nname: [\n")  # also broken: the -o error comes first, before any work
    code, out, err = cli(monkeypatch, capsys, "build", bad, "-o", tmp_path / "mine")
    assert_clean_error(code, err, "-o")
    assert "YAML" not in err


def test_build_files_respect_the_umask(tmp_path):
    for mask, dir_mode, file_mode in ((0o022, 0o755, 0o644), (0o077, 0o700, 0o600), (0o002, 0o775, 0o664)):
        out = tmp_path / f"out{mask:o}"
        proc = mad_cli("build", TINY, "-o", out, umask=mask)
        assert proc.returncode == 0, proc.stderr.decode()
        assert stat.S_IMODE(out.stat().st_mode) == dir_mode
        assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {file_mode}


def test_stale_temp_folders_of_a_killed_build_are_cleaned(tmp_path):
    out = tmp_path / "out"
    write_atomic_dir(out, {"a.txt": "1"})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that no longer runs
    stale_tmp = tmp_path / f".out.mad-tmp.{dead}.abc123"
    stale_tmp.mkdir()
    (stale_tmp / MARKER).write_text((out / MARKER).read_text())
    (stale_tmp / "a.txt").write_text("half")
    stale_old = tmp_path / f".out.mad-tmp.{dead}.zz9"
    shutil.copytree(out, stale_old / "out")
    stale_empty = tmp_path / f".out.mad-tmp.{dead}.e_1"
    stale_empty.mkdir()
    alive = tmp_path / f".out.mad-tmp.{os.getppid()}.live"  # a running process's temp folder: kept
    alive.mkdir()
    users = tmp_path / f".out.mad-tmp.{dead}.mine"  # MAD's name but no marker inside: not MAD's, kept
    users.mkdir()
    (users / "data").write_text("mine")
    other = tmp_path / ".out.backup"  # not MAD's name at all
    other.mkdir()
    write_atomic_dir(out, {"a.txt": "2"})
    assert (out / "a.txt").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", alive.name, users.name, other.name])


def test_concurrent_builds_into_one_folder(tmp_path):
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import sys
        from mad.report import write_atomic_dir
        for i in range(15):
            write_atomic_dir({str(out)!r}, {{"who.txt": sys.argv[1] * 1000, "n.txt": str(i)}})
    """)
    env = dict(os.environ, PYTHONPATH=pythonpath(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(k)], env=env, stderr=subprocess.PIPE)
             for k in range(4)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read().decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .out.* debris
    who = (out / "who.txt").read_text()
    assert who in {str(k) * 1000 for k in range(4)}  # one whole build, not a mix
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "who.txt", "n.txt"])


def test_concurrent_cli_builds(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=pythonpath(ROOT))
    procs = [subprocess.Popen([sys.executable, "-m", "mad.cli", "build", str(TINY), "-o", str(out)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT) for _ in range(4)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read().decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / MARKER).is_file() and json.loads((out / "plan.json").read_text())["name"] == "tiny"


# ----------------------------------------------------------------------------------------- graph files
NASTY = ['a"b', "back\\slash", "<b>bold</b>", "pipe|x", "#hash;", "semi;colon", "{brace}", "x\\\"y", "end\\",
         "-->", "]]", "é ✓"]


def nasty_topology(tmp_path: Path) -> Path:
    import yaml

    nodes = {"embedding": {"type": "embedding", "vocab": "V", "dim": "D"}}
    prev = "embedding"
    for name in NASTY:
        nodes[name] = {"type": "rmsnorm", "in": prev}
        prev = name
    nodes["lm_head"] = {"type": "linear", "out": "V", "in": prev}
    doc = {"mad": 1, "name": 'na"me\\', "dims": {"B": "batch", "T": "seq", "V": 16, "D": 8},
           "inputs": {"tokens": {"shape": ["B", "T"], "dtype": "int32"}}, "nodes": nodes,
           "outputs": {'lo"gits|<x>': "lm_head"}}
    path = tmp_path / "nasty.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False))
    return path


def parse_dot(text: str) -> tuple[str, list[str], list[tuple[str, str]]]:
    """A small reader of the DOT we write: quoted strings with \\" and \\\\ escapes."""
    token = r'"((?:[^"\\]|\\.)*)"'

    def unq(s: str) -> str:
        return re.sub(r'\\(["\\])', r"\1", s)

    name = unq(re.match(r"digraph " + token, text).group(1))
    nodes, edges = [], []
    for line in text.splitlines()[2:-1]:
        m = re.fullmatch(r"  " + token + r" -> " + token + r" \[label=" + token + r"\];", line)
        if m:
            edges.append((unq(m.group(1)), unq(m.group(2))))
            continue
        m = re.fullmatch(r"  " + token + r" \[label=" + token + r"\];", line)
        assert m, f"unparseable DOT line: {line!r}"
        nodes.append(unq(m.group(1)))
    return name, nodes, edges


def test_graph_files_escape_nasty_names(tmp_path):
    graph = mad.build(nasty_topology(tmp_path)).graph
    text = dot(graph)
    name, nodes, edges = parse_dot(text)
    assert text.count("\n") == len(graph.g.nodes) + len(graph.g.edges) + 3  # one line each: no raw newline
    assert len(set(nodes)) == len(graph.g.nodes)
    assert set(nodes) == set(graph.g.nodes)  # every node, once, read back as written
    assert len(edges) == len(graph.g.edges)
    mmd = mermaid(graph)
    lines = mmd.splitlines()
    assert len(lines) == 1 + len(graph.g.nodes) + len(graph.g.edges) + 2 * len(graph.outputs)
    for line in lines[1:]:
        inner = re.findall(r'"([^"]*)"', line)
        for label in inner:  # only our markup and entity codes; none of the name's own specials
            plain = re.sub(r"#\d+;", "", label.replace("<br/>", "").replace("<i>", "").replace("</i>", ""))
            assert not set(plain) & set('"<>|\\#;'), line
        assert line.count('"') % 2 == 0
    assert "#34;" in mmd and "#92;" in mmd and "#60;b#62;bold" in mmd and "#35;hash#59;" in mmd
    code = subprocess.run(["dot", "-Tsvg"], input=text.encode(), capture_output=True) if shutil.which("dot") else None
    if code is not None:
        assert code.returncode == 0, code.stderr.decode()


def test_escaping_of_control_characters():
    from mad.report import dot_string, mermaid_text

    assert dot_string('a"b\\c\nd\te') == '"a\\"b\\\\c\\nd\\\\x09e"'
    assert mermaid_text('a"b\nc<|>#') == "a#34;b#10;c#60;#124;#62;#35;"
    names = ["a\nb", "a\\nb", "a\\\nb", 'a"b', 'a\\"b']
    assert len({dot_string(n) for n in names}) == len(names)  # distinct names stay distinct IDs


def test_cli_build_writes_nasty_names(tmp_path, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "build", nasty_topology(tmp_path), "-o", tmp_path / "out")
    assert code == 0, err
    parse_dot((tmp_path / "out" / "graph.dot").read_text())


# ----------------------------------------------------------------------------------------- state files
def test_save_state_any_name_round_trip(tmp_path, monkeypatch, capsys):
    state_file = tmp_path / "state.bin"
    code, out, err = cli(monkeypatch, capsys, "run", TINY, "--prompt-ids", "1,2,3", "-m", "2",
                         "--save-state", state_file)
    assert code == 0, err
    assert state_file.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]  # no .state.bin.*.safetensors beside it
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o666 & ~_umask()
    code, out, err = cli(monkeypatch, capsys, "run", TINY, "--prompt-ids", "4", "-m", "2", "--load-state", state_file)
    assert code == 0, err


def test_save_state_on_an_xlstm_model_round_trips(tmp_path, monkeypatch, capsys):
    state_file = tmp_path / "chat.state"
    code, _, err = cli(monkeypatch, capsys, "run", XTINY, "--prompt-ids", "1,2,3", "-m", "0",
                       "--save-state", state_file)
    assert code == 0, err
    mx.random.seed(0)  # the weights `mad run` drew (fresh weights, --seed 0)
    model, _ = load(XTINY)
    state = load_state_file(state_file, model)
    _, direct = model(mx.array([[1, 2, 3]]))
    for node in direct:
        for name in direct[node]:
            assert np.allclose(np.array(state[node][name]), np.array(direct[node][name]), atol=1e-6)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


@pytest.mark.parametrize("target, message", [
    ("{tmp}", "is a folder"),
    ("{tmp}/somefile/x", "is not a folder"),
    ("{tmp}/somefile/a/b", "is not a folder"),
])
def test_save_state_bad_targets_fail_before_generating(tmp_path, monkeypatch, capsys, target, message):
    (tmp_path / "somefile").write_text("mine")
    before = snapshot(tmp_path)
    code, out, err = cli(monkeypatch, capsys, "run", TINY, "--prompt-ids", "1", "-m", "2",
                         "--save-state", target.format(tmp=tmp_path))
    assert_clean_error(code, err, "--save-state", message)
    assert "Generation" not in out
    assert snapshot(tmp_path) == before


def test_save_state_into_a_read_only_folder(tmp_path, monkeypatch, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, out, err = cli(monkeypatch, capsys, "run", TINY, "--prompt-ids", "1", "-m", "2",
                             "--save-state", ro / "s")
        assert_clean_error(code, err, "--save-state", "not writable")
    finally:
        ro.chmod(0o700)


@pytest.fixture(scope="module")
def xmodel():
    return load(XTINY)[0]


def test_state_file_checks(tmp_path, xmodel):
    good = xmodel.init_state(1)
    node = next(iter(good))
    path = tmp_path / "s.safetensors"

    def broken(change) -> str:
        state = {n: dict(e) for n, e in good.items()}
        change(state)
        save_state_file(path, state)
        with pytest.raises(MadError) as info:
            load_state_file(path, xmodel)
        return info.value.render()

    assert "entry '%s/C' has shape (1, 4, 8)" % node in broken(lambda s: s[node].update(C=mx.zeros((1, 4, 8))))
    assert "expected (B, NH=4, 8, 16)" in broken(lambda s: s[node].update(C=mx.zeros((1, 4, 8, 3))))
    text = broken(lambda s: s[node].update(C=mx.zeros((2, 4, 8, 16))))
    assert f"the entries hold different numbers of sequences: '{node}/C' 2, '{node}/n' 1" in text
    assert "has dtype mlx.core.int32, expected mlx.core.float32" in broken(
        lambda s: s[node].update(m=mx.zeros(good[node]["m"].shape, dtype=mx.int32)))
    assert "has dtype mlx.core.float16" in broken(lambda s: s[node].update(m=s[node]["m"].astype(mx.float16)))
    assert f"entry '{node}/n' holds NaN or infinite values" in broken(
        lambda s: s[node].update(n=mx.full(good[node]["n"].shape, float("nan"))))
    assert "holds NaN or infinite" in broken(lambda s: s[node].update(m=mx.full(good[node]["m"].shape, float("inf"))))
    (tmp_path / "junk").write_bytes(b"\x00" * 40)
    with pytest.raises(MadError, match="not safetensors, truncated or corrupt"):
        load_state_file(tmp_path / "junk", xmodel)
    with pytest.raises(MadError, match="it is a folder"):
        load_state_file(tmp_path, xmodel)


def test_cli_state_from_another_model(tmp_path, monkeypatch, capsys):
    state_file = tmp_path / "s"
    assert cli(monkeypatch, capsys, "run", XTINY, "--prompt-ids", "1", "-m", "1", "--save-state", state_file)[0] == 0
    code, _, err = cli(monkeypatch, capsys, "run", XTINY, "--set", "dims.D=32", "--prompt-ids", "1", "-m", "1",
                       "--load-state", state_file)
    assert_clean_error(code, err, str(state_file), "has shape")
    code, _, err = cli(monkeypatch, capsys, "run", XTINY, "--prompt-ids", "1", "--load-state", tmp_path / "nope")
    assert_clean_error(code, err, "--load-state", "no such file")


# ----------------------------------------------------------------------------------------- flags
@pytest.mark.parametrize("flags, message", [
    (["--temp", "-1"], "--temp must be a number >= 0"),
    (["--temp", "nan"], "--temp must be a number >= 0 (0 is greedy), got nan"),
    (["--temp", "inf"], "--temp must be"),
    (["--top-p", "2"], "--top-p must be a number in (0, 1], got 2.0"),
    (["--top-p", "0"], "--top-p must be"),
    (["--top-p", "-0.5"], "--top-p must be"),
    (["--top-p", "nan"], "--top-p must be"),
    (["--min-p", "2"], "--min-p must be a number in [0, 1], got 2.0"),
    (["--min-p", "-1"], "--min-p must be"),
    (["--top-k", "-5"], "--top-k must be an integer >= 0"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be a number > 0"),
    (["--repetition-penalty", "-1"], "--repetition-penalty must be"),
    (["--repetition-penalty", "inf"], "--repetition-penalty must be"),
    (["--max-tokens", "-1"], "--max-tokens must be an integer >= 0"),
    (["--seed", "-1"], "--seed must be an integer in 0.."),
    (["--seed", str(2**64)], "--seed must be"),
    (["--dtype", "float64"], "--dtype must be one of float32, bfloat16, float16, got 'float64'"),
    (["--device", "tpu"], "--device must be cpu or gpu"),
    (["--prompt-ids", "1,99999999999999999999"], "token id 99999999999999999999 is outside the vocabulary"),
    (["--prompt-ids", "-3"], "token id -3 is outside the vocabulary"),
    (["--prompt-ids", ","], "the prompt is empty"),
    (["--tokenizer", "/nonexistent/tok.json"], "no such tokenizer file"),
    (["--prompt", "x", "--prompt-ids", "1"], "give only one of"),
])
def test_bad_run_flags(monkeypatch, capsys, flags, message):
    code, out, err = cli(monkeypatch, capsys, "run", TINY, *flags)
    assert_clean_error(code, err, message)
    assert "Generation" not in out


def test_device_gpu_without_a_gpu(monkeypatch, capsys):
    from mad.cli import gpu_available

    if gpu_available():
        pytest.skip("this machine has a GPU")
    code, _, err = cli(monkeypatch, capsys, "run", TINY, "--device", "gpu", "--prompt-ids", "1", "-m", "1")
    assert_clean_error(code, err, "--device gpu: MLX finds no GPU here")


def test_max_tokens_zero_reads_the_prompt_only(tmp_path, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "run", TINY, "--prompt-ids", "1,2,3", "-m", "0",
                         "--save-state", tmp_path / "s")
    assert code == 0, err
    assert "Prompt: 3 tokens" in out and "Generation: 0 tokens" in out
    model, tok = load(TINY)
    assert [r.token for r in mad.stream_generate(model, tok, "Hi", max_tokens=0)] == [None]
    assert mad.generate(model, tok, "Hi", max_tokens=0) == ""


def test_prompt_file_and_stdin_not_utf8(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "prompt.txt"
    bad.write_bytes(b"caf\xe9 au lait")
    code, out, err = cli(monkeypatch, capsys, "run", TINY, "--prompt-file", bad, "-m", "1")
    assert_clean_error(code, err, f"--prompt-file {bad} is not UTF-8 text (byte 0xe9 at offset 3)")
    code, out, err = cli(monkeypatch, capsys, "run", TINY, "--prompt-file", tmp_path, "-m", "1")
    assert_clean_error(code, err, "--prompt-file", "folder")
    proc = mad_cli("run", TINY, "--prompt", "-", "-m", "1", stdin=b"\xff\xfe\xfa")
    assert_clean_error(proc.returncode, proc.stderr.decode(), "the prompt on standard input is not UTF-8 text")
    proc = mad_cli("run", TINY, "--prompt", "-", "-m", "1", stdin="héllo".encode())
    assert proc.returncode == 0, proc.stderr.decode()


def test_chat_skips_a_line_that_is_not_utf8(tmp_path):
    proc = mad_cli("chat", TINY, "-m", "2", "--save-state", tmp_path / "c.state", stdin=b"hi\n\xff\xfe\nyo\n")
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "line 2 of standard input is not UTF-8 text" in err and "Traceback" not in err
    assert (tmp_path / "c.state").stat().st_size > 0


def test_chat_bad_flags(monkeypatch, capsys, tmp_path):
    for flags, message in ((["--temp", "-2"], "--temp must be"), (["--top-p", "5"], "--top-p must be"),
                           (["--save-state", tmp_path], "--save-state"), (["--dtype", "int8"], "--dtype must be")):
        code, _, err = cli(monkeypatch, capsys, "chat", TINY, *flags)
        assert_clean_error(code, err, message)


def test_bench_bad_flags(monkeypatch, capsys):
    for flags, message in ((["-p", "0"], "--prompt-tokens must be at least 1"), (["-g", "-1"], "--generation-tokens"),
                           (["--kernels", "fast"], "--kernels must be"), (["--dtype", "x"], "--dtype must be"),
                           (["-b", "100000000", "-p", "100000000"], "need about")):
        code, _, err = cli(monkeypatch, capsys, "bench", TINY, *flags)
        assert_clean_error(code, err, message)


@pytest.mark.parametrize("name, value, message", [("MAD_KERNELS", "fast", "MAD_KERNELS must be 'auto' or 'reference'"),
                                                  ("MAD_NATIVE", "yes", "MAD_NATIVE must be 0 or 1"),
                                                  ("MAD_NATIVE_THREADS", "0", "MAD_NATIVE_THREADS must be a whole number")])
def test_bad_kernel_settings_in_the_environment(monkeypatch, capsys, name, value, message):
    monkeypatch.setenv(name, value)
    code, _, err = cli(monkeypatch, capsys, "run", TINY, "--prompt-ids", "1,2", "--max-tokens", "1")
    assert_clean_error(code, err, "environment: " + message)


def test_tf32_flag_sets_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("MLX_ENABLE_TF32", "0")  # restored after the test (the flag sets it for the process)
    code, out, err = cli(monkeypatch, capsys, "run", TINY, "--tf32", "--prompt-ids", "1", "-m", "1")
    assert code == 0, err
    assert os.environ["MLX_ENABLE_TF32"] == "1"
    code, out, _ = cli(monkeypatch, capsys, "run", "--help")
    assert "--tf32" in out and "--trust-plugins" in out and "--no-memory-check" in out


# ----------------------------------------------------------------------------------------- API arguments
def test_sampling_arguments_through_the_api(xmodel):
    from mad.sampling import make_sampler
    from mad.tokenizers import ByteTokenizer

    tok = ByteTokenizer()
    for kwargs, message in (({"temp": -1}, "temp must be"), ({"top_p": 0}, "top_p must be"),
                            ({"top_k": 2.5}, "top_k must be"), ({"min_p": float("nan")}, "min_p must be"),
                            ({"repetition_penalty": 0}, "repetition_penalty must be"),
                            ({"repetition_context": 0}, "repetition_context must be"),
                            ({"max_tokens": -1}, "max_tokens must be"), ({"tempp": 1}, "unknown sampling argument")):
        with pytest.raises(MadError, match=message):
            list(mad.stream_generate(xmodel, tok, [1, 2], **kwargs))
    with pytest.raises(MadError, match="temp must be"):
        make_sampler(temp=float("inf"))


def test_token_checks_in_the_model(xmodel):
    for tokens, message in ((mx.array([[1, 2, 3000]]), "token id 3000 is outside the vocabulary"),
                            (mx.array([[-1]]), "token id -1 is outside"),
                            (mx.array([[2**40]], dtype=mx.int64), f"token id {2**40} is outside"),
                            (mx.array([[1.0, 2.0]]), "token ids must be integers"),
                            (mx.array([[True]]), "token ids must be integers"),
                            (mx.array([1, 2]), "expected a (batch, sequence) array"),
                            (mx.zeros((1, 0), dtype=mx.int32), "no tokens")):
        with pytest.raises(MadError, match=re.escape(message)):
            xmodel(tokens)
    state = xmodel.init_state(2)
    with pytest.raises(MadError, match="the state holds 2 sequence"):
        xmodel(mx.array([[1, 2]]), state=state)
    with pytest.raises(MadError, match="outside the vocabulary"):
        xmodel.prefill(mx.array([[1, 5000]]))
    logits, _ = xmodel(mx.array([[1, 2]], dtype=mx.uint8))  # any integer dtype in range is fine
    assert logits.shape == (1, 2, xmodel.vocab_size)
    logits, _ = xmodel(mx.array([[1, 2]]), check_tokens=False)
    assert logits.shape == (1, 2, xmodel.vocab_size)


# ----------------------------------------------------------------------------------------- --trust-plugins
PLUGIN_TOPOLOGY = """\
mad: 1
name: custom
plugins: [plugins_example]
dims: {B: batch, T: seq, V: 256, D: 8}
inputs:
  tokens: {shape: [B, T], dtype: int32}
nodes:
  embedding: {type: embedding, vocab: V, dim: D}
  act: {type: scaled_tanh, scale: 2.0, dim: D}
  lm_head: {type: linear, out: V}
outputs: {logits: lm_head}
"""


def test_trust_plugins_flag(tmp_path):
    path = tmp_path / "custom.yaml"
    path.write_text(PLUGIN_TOPOLOGY)
    env = dict(os.environ, PYTHONPATH=pythonpath(ROOT, ROOT / "tests"))
    commands = {"build": ["-o", str(tmp_path / "out")], "run": ["--prompt-ids", "1,2", "-m", "1"],
                "bench": ["-p", "2", "-g", "1", "-n", "1"], "chat": ["-m", "1"]}
    for command, extra in commands.items():
        base = [sys.executable, "-m", "mad.cli", command, str(path), *extra]
        proc = subprocess.run(base, capture_output=True, env=env, input=b"hi\n", timeout=120, cwd=ROOT)
        assert_clean_error(proc.returncode, proc.stderr.decode(), "--trust-plugins")
        proc = subprocess.run(base + ["--trust-plugins"], capture_output=True, env=env, input=b"hi\n", timeout=120,
                              cwd=ROOT)
        assert proc.returncode == 0, (command, proc.stderr.decode())
    with pytest.raises(MadError, match="trust_plugins=True"):
        load(path)


def test_save_state_never_overwrites_other_files(tmp_path, monkeypatch, capsys):
    mine = tmp_path / "notes.txt"
    mine.write_text("my notes")
    before = snapshot(tmp_path)
    code, out, err = cli(monkeypatch, capsys, "run", TINY, "--prompt-ids", "1", "-m", "1", "--save-state", mine)
    assert_clean_error(code, err, f"--save-state {mine}: the file exists and is not a MAD state file")
    assert "Generation" not in out and snapshot(tmp_path) == before
    state = tmp_path / "s.state"
    assert cli(monkeypatch, capsys, "run", TINY, "--prompt-ids", "1", "-m", "1", "--save-state", state)[0] == 0
    assert cli(monkeypatch, capsys, "run", TINY, "--prompt-ids", "2", "-m", "1", "--save-state", state)[0] == 0
    (tmp_path / "empty").touch()
    assert cli(monkeypatch, capsys, "run", TINY, "--prompt-ids", "2", "-m", "1", "--save-state", tmp_path / "empty")[0] == 0
    with pytest.raises(MadError, match="not a MAD state file"):
        save_state_file(mine, load(TINY)[0].init_state(1))
    assert mine.read_text() == "my notes"


def test_chat_goes_on_after_a_bad_turn(tmp_path):
    nxai = ROOT / "tests" / "fixtures" / "nxai-tiny"  # vocabulary 101: bytes above 100 are not in it
    proc = mad_cli("chat", nxai, "-m", "1", "--save-state", tmp_path / "c", stdin="é\nA1\n".encode())
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "outside the vocabulary" in err and "Traceback" not in err
    assert (tmp_path / "c").stat().st_size > 0
