"""The native CPU kernels (kernels/native.py, kernels/cpp/): built where they can be, the sLSTM loop equal to
the pure-MLX loop to float32 rounding on every path (threads, fresh and continued states, batches, odd head
sizes, gradients, inside a model), and their absence or failure leaving the pure-MLX kernels in charge."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

import mlx.core as mx
import numpy as np
import pytest

from mad.kernels import native, slstm
from mad.kernels.registry import dispatch, inference, use_reference

CAN_BUILD = (sys.platform == "linux" and importlib.util.find_spec("nanobind") is not None
             and (shutil.which(os.environ.get("CXX", "")) or shutil.which("c++") or shutil.which("g++")))
needs_module = pytest.mark.skipif(not CAN_BUILD, reason="needs Linux, nanobind and a C++ compiler")


@pytest.fixture(autouse=True)
def _fresh_load(monkeypatch):
    """Each test loads under its own environment (load() caches its answer for the process)."""
    native._load.cache_clear()
    yield
    native._load.cache_clear()


@needs_module
def test_the_module_builds_where_it_can():
    """Where a compiler and nanobind are, the module builds, loads and passes its own check: a silent fallback
    here would hide a broken native build behind the reference's numbers."""
    assert native.load() is not None, native.reason()
    assert native.reason() is None


def _ulps(got, want: np.ndarray) -> float:
    got = np.asarray(got, dtype=np.float32).astype(np.float64)
    spacing = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    return float(np.max(np.abs(got - want) / np.maximum(spacing, np.finfo(np.float32).tiny)))


@needs_module
def test_transcendentals_are_within_3_ulp():
    module = native.load()
    rng = np.random.default_rng(0)
    x = np.concatenate([-np.abs(rng.normal(0, 30, 20000)), -rng.uniform(0, 1e-3, 2000),
                        np.linspace(-87.3, 0, 20000), [0.0, -1e-30, -87.3, -87.4, -200.0]]).astype(np.float32)
    assert _ulps(module.math("exp_nonpositive", x.tolist()), np.exp(x.astype(np.float64))) <= 3
    u = np.concatenate([rng.uniform(0, 1, 20000), rng.uniform(0, 1e-6, 2000), [0.0, 1.0]]).astype(np.float32)
    assert _ulps(module.math("log1p_unit", u.tolist()), np.log1p(u.astype(np.float64))) <= 3
    z = np.concatenate([rng.normal(0, 5, 20000), rng.normal(0, 1e-3, 2000), np.linspace(-30, 30, 20000),
                        [0.0, 0.625, -0.625, 100.0, -100.0]]).astype(np.float32)
    zd = z.astype(np.float64)
    assert _ulps(module.math("log_sigmoid", z.tolist()), -np.logaddexp(0, -zd)) <= 3
    assert _ulps(module.math("sigmoid", z.tolist()), 1 / (1 + np.exp(-zd))) <= 3
    assert _ulps(module.math("tanh", z.tolist()), np.tanh(zd)) <= 3
    with pytest.raises(ValueError, match="unknown function"):
        module.math("cosh", [1.0])


def _loop_inputs(T, NH, B, DH, fresh, seed):
    keys = mx.random.split(mx.random.key(seed), 8)
    wx = 2 * mx.random.normal((T, 4, NH, B, DH), key=keys[0])
    R = 0.3 * mx.random.normal((NH, 4 * DH, DH), key=keys[1]) / np.sqrt(DH / 8)
    bh = mx.random.normal((4, NH, 1, DH), key=keys[2])
    if fresh:
        state = [mx.zeros((1, NH, B, DH)) for _ in range(4)]
    else:
        y, c, m = (mx.random.normal((1, NH, B, DH), key=keys[k]) for k in (3, 4, 5))
        state = [y, c, mx.abs(mx.random.normal((1, NH, B, DH), key=keys[6])) + 0.5, m]
    return wx, R, bh, state


def _close(got, want, what):
    """Equal to float32 rounding: R y's sums run in another order than the BLAS's, and the cell's
    transcendentals differ from MLX's by a few ulp; the recurrence carries such differences along."""
    scale = float(mx.abs(want).max()) + 1e-30
    err = float(mx.abs(got - want).max())
    assert err <= 2e-5 * scale, (what, err, scale)


@needs_module
@pytest.mark.parametrize("T, NH, B, DH", [(1, 1, 1, 1), (3, 2, 3, 20), (40, 4, 2, 17), (17, 3, 1, 33), (24, 4, 1, 64)])
@pytest.mark.parametrize("fresh", [True, False])
def test_loop_is_the_pure_mlx_loop(T, NH, B, DH, fresh):
    """Every output of the loop (all steps' y, c, n, m and R y), on one thread and on several (T >= 16 runs
    its heads on threads), in the zero state and a continued one."""
    module = native.load()
    wx, R, bh, state = _loop_inputs(T, NH, B, DH, fresh, seed=T + NH + B + DH)
    want = slstm._loop(wx, slstm.recurrent_to_matmul(R), bh, *state)
    for threads in (1, 2, 3):
        got = module.slstm_loop(wx, R, bh, *state, threads=threads)
        for name, g, w in zip(("Y", "C", "N", "M", "RY"), got, want):
            assert g.shape == w.shape and g.dtype == mx.float32
            _close(g, w, (name, threads))


@needs_module
def test_loop_refuses_shapes_that_do_not_fit():
    module = native.load()
    wx, R, bh, state = _loop_inputs(3, 2, 1, 8, True, seed=0)
    bad = [((wx[:, :3], R, bh, *state), "wx must be"), ((wx, R[:, :-1], bh, *state), "R must be"),
           ((wx, R, bh[:, :1], *state), "R must be"), ((wx, R, bh, state[0][:, :1], *state[1:]), "state arrays"),
           ((wx[:0], R, bh, *state), "at least 1")]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            module.slstm_loop(*args, threads=1)


@needs_module
def test_loop_takes_views_and_other_dtypes():
    """Transposed, sliced and bfloat16 inputs are made contiguous float32 before the loop reads them."""
    module = native.load()
    wx, R, bh, state = _loop_inputs(5, 2, 2, 12, False, seed=3)
    want = slstm._loop(wx, slstm.recurrent_to_matmul(R), bh, *state)
    R_view = mx.contiguous(R.transpose(0, 2, 1)).transpose(0, 2, 1)       # R's values, column-major
    wx_wide = mx.concatenate([wx, wx], axis=-1)[..., :12]                  # a strided view
    got = module.slstm_loop(wx_wide, R_view, bh, *state, threads=2)
    for g, w in zip(got, want):
        _close(g, w, "views")
    got16 = module.slstm_loop(wx.astype(mx.bfloat16), R, bh, *state, threads=1)
    want16 = slstm._loop(wx.astype(mx.bfloat16).astype(mx.float32), slstm.recurrent_to_matmul(R), bh, *state)
    _close(got16[0], want16[0], "bfloat16")


@needs_module
@pytest.mark.parametrize("T", [5, 20])
def test_sequence_variant_and_its_gradient_are_the_reference(T):
    """`slstm_sequence`'s CPU variant: outputs and gradients (threads at T = 20) against the reference."""
    from mad.kernels.slstm_native import slstm_sequence_native

    B, NH, DH = 2, 3, 10
    keys = mx.random.split(mx.random.key(T), 4)
    gates = [mx.random.normal((B, NH, T, DH), key=keys[0]) * (g + 1) for g in range(4)]
    R = 0.3 * mx.random.normal((NH, 4 * DH, DH), key=keys[1])
    b = mx.random.normal((4 * NH * DH,), key=keys[2])
    state = tuple(mx.random.normal((B, NH, DH), key=k) for k in mx.random.split(keys[3], 4))
    state = (state[0], state[1], mx.abs(state[2]) + 0.5, state[3])
    for given in (None, state):
        (h_ref, s_ref), (h, s) = (fn(*gates, R, b, given) for fn in (slstm.slstm_sequence, slstm_sequence_native))
        for got, want in zip((h, *s), (h_ref, *s_ref)):
            _close(got, want, "forward")

        def loss(fn):
            def f(R, b, *g):
                h, (y, c, n, m) = fn(*g, R, b, given)
                return (h * h).sum() + (c * 0.3).sum() + n.sum() - m.sum()
            return mx.grad(f, argnums=(0, 1, 2, 3, 4, 5))

        for got, want in zip(loss(slstm_sequence_native)(R, b, *gates), loss(slstm.slstm_sequence)(R, b, *gates)):
            _close(got, want, "gradient")


@needs_module
def test_dispatch_picks_the_native_variant_on_the_cpu():
    assert dispatch("slstm_sequence").__name__ == "slstm_sequence[cpu]"
    with use_reference():
        assert dispatch("slstm_sequence") is slstm.slstm_sequence


def test_disabled_or_unbuildable_means_the_reference(monkeypatch, tmp_path):
    """MAD_NATIVE=0, a compiler that fails, or no compiler: load() is None with the reason, nothing half-built
    is left in the cache, and the variant declines so that the reference runs."""
    from mad.kernels.slstm_native import slstm_sequence_native
    from mad.kernels.registry import Unsupported

    monkeypatch.setenv("MAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(native.ENV, "0")
    assert native.load() is None and native.reason() == "MAD_NATIVE=0"
    gates = [mx.ones((1, 1, 2, 3))] * 4
    with pytest.raises(Unsupported, match="MAD_NATIVE=0"):
        slstm_sequence_native(*gates, mx.zeros((1, 12, 3)), mx.zeros((12,)))
    monkeypatch.setenv(native.ENV, "1")
    if sys.platform == "linux" and importlib.util.find_spec("nanobind") is not None:
        native._load.cache_clear()
        monkeypatch.setenv("CXX", "false")                 # a compiler that always fails
        assert native.load() is None and "compiler failed" in native.reason()
        leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
        assert leftovers == []
        native._load.cache_clear()
        monkeypatch.setenv("CXX", "no-such-compiler-here")
        assert native.load() is None and "no C++ compiler" in native.reason()


@needs_module
def test_a_cache_that_is_not_a_folder_means_the_reference(monkeypatch, tmp_path):
    """MAD_CACHE naming a file of the user's: no build, the reason given, the file as it was."""
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    monkeypatch.setenv("MAD_CACHE", str(mine))
    assert native.load() is None and "could not be built or loaded" in native.reason()
    assert mine.read_text() == "mine"


def test_status_reports_without_building(monkeypatch):
    assert native.status() == "unused"
    monkeypatch.setenv(native.ENV, "0")
    native.load()
    assert native.status() == "not available: MAD_NATIVE=0"


def test_bad_settings_are_refused(monkeypatch):
    monkeypatch.setenv(native.ENV, "yes")
    with pytest.raises(ValueError, match="MAD_NATIVE must be 0 or 1"):
        native.load()
    monkeypatch.setenv(native.ENV, "1")
    for bad in ("0", "-2", "two"):
        monkeypatch.setenv(native.THREADS_ENV, bad)
        with pytest.raises(ValueError, match="MAD_NATIVE_THREADS"):
            native.threads()
    monkeypatch.setenv(native.THREADS_ENV, "3")
    assert native.threads() == 3


@needs_module
def test_a_second_load_uses_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MAD_CACHE", str(tmp_path / "cache"))
    assert native.load() is not None
    (built,) = (tmp_path / "cache").rglob("_mad_native*")
    stamp = built.stat().st_mtime_ns
    compiler = native._compiler()
    assert native._build(compiler) == built and built.stat().st_mtime_ns == stamp
    assert not [p for p in built.parent.iterdir() if p.name.startswith(".build-")]


@needs_module
def test_the_cache_key_names_the_installation(monkeypatch):
    """Another MLX or nanobind installation (another virtual environment) gets a binary of its own: the cached
    one links to the libmlx it was built against."""
    compiler = native._compiler()
    key = native._key(compiler)
    assert native._key(compiler) == key
    built_with = native.build_command
    monkeypatch.setattr(native, "build_command",
                        lambda c, out: [a.replace("/mlx/", "/other-env/mlx/") for a in built_with(c, out)])
    assert native._key(compiler) != key


@needs_module
def test_a_model_with_slstm_blocks_is_the_same_with_the_native_loop():
    """The NX-AI fixture (mLSTM + sLSTM blocks): a 40-token forward, and its prompt read then stepped, with the
    native loop against the pure-MLX one (tests/test_xlstm_nxai.py holds both to NX-AI's own numbers)."""
    from pathlib import Path

    from mad.loading import load

    import yaml

    fixture = Path(__file__).parent / "fixtures" / "nxai-tiny"
    model = load(fixture)[0]
    vocab = yaml.safe_load((fixture / "config.yaml").read_text())["vocab_size"]
    tokens = mx.random.randint(0, vocab, (2, 40), key=mx.random.key(5))
    with use_reference():
        want, want_state = model(tokens)
    got, state = model(tokens)
    _close(got, want, "logits")
    with inference():
        pre, state = model(tokens[:, :30])
        steps = []
        for t in range(30, 40):
            out, state = model(tokens[:, t:t + 1], state=state)
            steps.append(out)
    _close(mx.concatenate([pre, *steps], axis=1), want, "prompt then steps")
    for node, entries in want_state.items():
        for name, arr in entries.items():
            _close(state[node][name], arr, (node, name))
