"""Hugging Face Hub references (`mad.load("org/name")`, `mad run org/name`), with no network: a Hugging Face
cache built in a temporary folder in huggingface_hub's own layout, read in offline mode; the Hub's error
answers come from a local stand-in server."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mad
from mad import hub
from mad.errors import MadError

from yaml_files import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "topologies" / "examples" / "tiny.yaml"
HF_TINY = ROOT / "tests" / "fixtures" / "hf-tiny"
SHA_OLD, SHA_NEW = "1" * 40, "2" * 40


def cache_snapshot(cache: Path, repo_id: str, folder: Path, sha: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put the files of `folder` into `cache` as huggingface_hub lays out a download: each file a blob
    named by its content hash, linked from snapshots/<sha>/, and refs/<ref> holding the commit sha."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / sha
    for file in sorted(p for p in folder.iterdir() if p.is_file() and p.name != "golden.safetensors"):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        snapshot.mkdir(parents=True, exist_ok=True)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(sha)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache in tmp_path, named by HF_HUB_CACHE, with offline mode on."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # relative `org/name` paths are looked for here: none exist
    return cache


def saved_tiny(folder: Path, seed: int) -> Path:
    mx.random.seed(seed)
    model, _ = mad.load(TINY)
    mad.save(model, folder)
    return folder


def logits(model, ids=(3, 17, 101, 42, 7, 255)) -> np.ndarray:
    return np.array(model(mx.array([list(ids)]))[0])


def test_the_cache_has_huggingface_hubs_layout(offline_cache):
    """The stand-in cache is what huggingface_hub itself reads: its cache scanner and file lookup find it."""
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    cache_snapshot(offline_cache, "org/hf-tiny", HF_TINY, SHA_OLD, refs=("main", "v1"))
    info = scan_cache_dir(offline_cache)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == "org/hf-tiny" and {r.commit_hash for r in repo.revisions} == {SHA_OLD}
    assert set(repo.refs) == {"main", "v1"}
    found = try_to_load_from_cache("org/hf-tiny", "config.json", cache_dir=str(offline_cache))
    assert Path(found).read_bytes() == (HF_TINY / "config.json").read_bytes()


def test_load_repo_id_equals_the_folder_hf_checkpoint(offline_cache):
    snapshot = cache_snapshot(offline_cache, "org/hf-tiny", HF_TINY, SHA_OLD)
    assert hub.resolve("org/hf-tiny") == snapshot
    direct, tok_direct = mad.load(HF_TINY)
    from_hub, tok_hub = mad.load("org/hf-tiny")
    np.testing.assert_array_equal(logits(from_hub), logits(direct))
    assert tok_hub.encode("Hello world") == tok_direct.encode("Hello world")
    assert tok_hub.eos_token_ids == tok_direct.eos_token_ids


def test_load_repo_id_equals_the_folder_mad_checkpoint(offline_cache, tmp_path):
    """A MAD checkpoint in the cache (every file a link into blobs) loads its weights, not fresh ones."""
    folder = saved_tiny(tmp_path / "saved", seed=1)
    cache_snapshot(offline_cache, "org/mad-tiny", folder, SHA_OLD)
    direct, _ = mad.load(folder)
    mx.random.seed(2)  # fresh weights would differ from the saved ones
    from_hub, tok = mad.load("org/mad-tiny")
    np.testing.assert_array_equal(logits(from_hub), logits(direct))
    assert getattr(tok, "is_bytes", False)
    mx.random.seed(3)  # the snapshot folder given as a path: the same weights
    snapshot, _ = mad.load(hub.resolve("org/mad-tiny"))
    np.testing.assert_array_equal(logits(snapshot), logits(direct))


def test_mad_run_repo_id_equals_the_folder(offline_cache, monkeypatch, capsys):
    cache_snapshot(offline_cache, "org/hf-tiny", HF_TINY, SHA_OLD)
    args = ["--prompt", "Hello", "--max-tokens", "12", "--device", "cpu"]
    code, direct, err = cli(monkeypatch, capsys, "run", HF_TINY, *args)
    assert code == 0, err
    code, from_hub, err = cli(monkeypatch, capsys, "run", "org/hf-tiny", *args)
    assert code == 0, err
    code, with_flag, err = cli(monkeypatch, capsys, "run", "--model", "org/hf-tiny", *args)
    assert code == 0, err
    assert direct.split("=" * 10)[0] == from_hub.split("=" * 10)[0] == with_flag.split("=" * 10)[0]
    assert direct.split("=" * 10)[0].strip()


def test_revision_pinning(offline_cache, tmp_path, monkeypatch, capsys):
    """Two commits of one repo: main is the new one; a commit sha or a tag pins the old one."""
    old = saved_tiny(tmp_path / "old", seed=1)
    new = saved_tiny(tmp_path / "new", seed=2)
    cache_snapshot(offline_cache, "org/tiny", old, SHA_OLD, refs=("v1",))
    cache_snapshot(offline_cache, "org/tiny", new, SHA_NEW, refs=("main",))
    want_old, want_new = logits(mad.load(old)[0]), logits(mad.load(new)[0])
    assert not np.allclose(want_old, want_new)
    np.testing.assert_array_equal(logits(mad.load("org/tiny")[0]), want_new)
    np.testing.assert_array_equal(logits(mad.load("org/tiny", revision=SHA_OLD)[0]), want_old)
    np.testing.assert_array_equal(logits(mad.load("org/tiny", revision="v1")[0]), want_old)
    np.testing.assert_array_equal(logits(mad.load("org/tiny", revision=SHA_NEW)[0]), want_new)
    args = ["--prompt-ids", "1,2,3", "--max-tokens", "16", "--temp", "1", "--device", "cpu"]  # samples differ by weight
    outs = {}
    for name, source, extra in (("old", old, []), ("pinned", "org/tiny", ["--revision", SHA_OLD]),
                                ("new", new, []), ("main", "org/tiny", [])):
        code, out, err = cli(monkeypatch, capsys, "run", source, *args, *extra)
        assert code == 0, err
        outs[name] = out.split("=" * 10)[0]
    assert outs["old"] == outs["pinned"] and outs["new"] == outs["main"] and outs["old"] != outs["new"]


def test_hf_home_names_the_cache(tmp_path, monkeypatch):
    home = tmp_path / "hf-home"
    snapshot = cache_snapshot(home / "hub", "org/hf-tiny", HF_TINY, SHA_OLD)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert hub.cache_dir() == str(home / "hub")
    assert hub.resolve("org/hf-tiny") == snapshot


def test_offline_and_not_in_the_cache(offline_cache, monkeypatch, capsys):
    cache_snapshot(offline_cache, "org/hf-tiny", HF_TINY, SHA_OLD)
    with pytest.raises(MadError) as e:
        mad.load("org/missing")
    assert e.value.render() == (
        f"error: org/missing is not in the Hugging Face cache ({offline_cache}), and offline mode is on "
        "(HF_HUB_OFFLINE=1)\n  fetch it once with network access: `hf download org/missing`, or run again without "
        "HF_HUB_OFFLINE")
    code, out, err = cli(monkeypatch, capsys, "run", "org/missing", "--max-tokens", "1")
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: org/missing is not in the Hugging Face cache") and "hf download org/missing" in err
    sha = "0" * 40
    code, out, err = cli(monkeypatch, capsys, "run", "org/hf-tiny", "--revision", sha, "--max-tokens", "1")
    assert code == 2 and f"org/hf-tiny (revision {sha}) is not in the Hugging Face cache" in err
    assert f"hf download org/hf-tiny --revision {sha}" in err


def test_paths_that_are_not_repo_ids(offline_cache, monkeypatch, capsys):
    """A missing path that is no repository id keeps the "no such file" error; no repository is looked for."""
    for ref in ("missing", "a/b/c", "./org/name", "topologies/tny.yaml", "org/name--x", "/abs/path"):
        assert not hub.is_repo_id(ref), ref
        with pytest.raises(MadError, match="^error: no such file or folder: "):
            mad.load(ref)
    code, out, err = cli(monkeypatch, capsys, "run", "topologies/tny.yaml")
    assert code == 2 and err.strip() == "error: no such file or folder: topologies/tny.yaml"
    assert hub.is_repo_id("org/name") and hub.is_repo_id(Path("org/name"))
    (offline_cache.parent / "org" / "name").mkdir(parents=True)  # an existing folder is a path, not a repository
    assert not hub.is_repo_id("org/name")


def test_bad_revisions(offline_cache, monkeypatch, capsys):
    with pytest.raises(MadError, match="a revision .'v1'. applies to Hugging Face repositories; .* is a local file"):
        mad.load(TINY, revision="v1")
    for bad in ("", 3):
        with pytest.raises(MadError, match="revision must be a branch, a tag or a commit sha"):
            mad.load("org/name", revision=bad)
    code, out, err = cli(monkeypatch, capsys, "run", TINY, "--revision", "")
    assert code == 2 and err.startswith("error: --revision must be a branch, a tag or a commit sha")


class FakeHub(http.server.BaseHTTPRequestHandler):
    """The Hub's error answers, by repository name (huggingface_hub reads the X-Error-Code header)."""

    ANSWERS = {"/org/missing/": (404, "RepoNotFound"), "/org/gated/": (403, "GatedRepo"),
               "/org/private/": (401, None), "/revision/nope": (404, "RevisionNotFound")}

    def do_GET(self):
        code, error = next((v for k, v in self.ANSWERS.items() if k in self.path), (500, None))
        self.send_response(code)
        if error:
            self.send_header("X-Error-Code", error)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def online(tmp_path, monkeypatch):
    """Online mode against a local stand-in for the Hub (its endpoint); yields a function to stop it."""
    from huggingface_hub import constants

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("ref, revision, message", [
    ("org/missing", None, "no such file or folder: org/missing, and no Hugging Face repository org/missing\n"
                          "  if it is private or gated, log in first"),
    ("org/gated", None, "org/gated is a gated Hugging Face repository: accept its conditions on "
                        "https://huggingface.co/org/gated, then log in"),
    ("org/private", None, "org/private: the Hugging Face Hub refused access (401)"),
    ("org/name", "nope", "org/name: the Hugging Face repository has no revision 'nope'"),
    ("org/down", None, "cannot fetch org/down from the Hugging Face Hub (HfHubHTTPError: Server error '500"),
])
def test_hub_errors(online, ref, revision, message):
    with pytest.raises(MadError) as e:
        hub.resolve(ref, revision)
    assert e.value.render().startswith("error: " + message), e.value.render()


def test_no_network(online, monkeypatch, capsys):
    from huggingface_hub import constants

    online.shutdown()
    online.server_close()
    code, out, err = cli(monkeypatch, capsys, "run", "org/name", "--max-tokens", "1")
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: cannot fetch org/name from the Hugging Face Hub (ConnectError"), err
    assert "offline mode (HF_HUB_OFFLINE=1) loads models already in the cache" in err
    assert constants.ENDPOINT.startswith("http://127.0.0.1:")  # nothing left the machine
