"""The parts of the CPU training step written for its speed, each held to what it replaces:

- variants with their own gradient (`register_variant(..., own_gradient=True)`): dispatch calls them as they
  are, and their VJPs (the CPU `linear`, exp, sigmoid, SiLU and the gates) give the reference's gradients
  without running the reference; the linear's weight gradient comes out contiguous;
- `backends.cpu.reuse_large_blocks`: glibc's malloc serves large blocks from its heap (in a subprocess: it
  is process-wide), and `Stepper` sets it on the CPU;
- `mad.train.AdamW`: MLX's AdamW, bit for bit, with the clipping factor fused into each update and the
  updates spread over CPU streams.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

import mad
from mad.kernels import registry
from mad.kernels.linear import linear_cpu

ROOT = Path(__file__).resolve().parents[1]


def rel(a: mx.array, b: mx.array) -> float:
    a, b = np.array(a, dtype=np.float64), np.array(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ----------------------------------------------------------------------------------------- own gradients
@pytest.fixture
def cpu_kernel(monkeypatch):
    """Register kernel "test_double" (reference 2x) on the CPU backend; yields the registration function."""
    monkeypatch.setattr(registry, "backend", lambda: "cpu")
    monkeypatch.delenv("MAD_KERNELS", raising=False)
    registry.register_kernel("test_double", lambda x: 2 * x)
    yield lambda fn, own: registry.register_variant("test_double", "cpu", fn, own_gradient=own)
    registry._KERNELS.pop("test_double")


def test_a_variant_with_its_own_gradient_is_called_as_it_is(cpu_kernel):
    """A variant whose VJP differs from its reference's (3x instead of 2x, on purpose): registered with
    `own_gradient`, its own VJP is the gradient; without, the reference's."""
    @mx.custom_function
    def variant(x):
        return 2 * x

    @variant.vjp
    def _(primals, cotangent, output):
        return 3 * cotangent

    x = mx.array([1.0, -2.0])
    for own, want in ((True, 3.0), (False, 2.0)):
        cpu_kernel(variant, own)
        fn = registry.dispatch("test_double")
        assert mx.array_equal(fn(x), 2 * x).item()
        assert mx.array_equal(mx.grad(lambda x: fn(x).sum())(x), mx.full((2,), want)).item(), own
    assert registry.get("test_double").own_gradient == set()


@pytest.fixture
def no_reference(monkeypatch):
    """`forbid(name)`: from then on the kernel's reference raises, so a gradient through dispatch that still
    runs it fails."""
    def forbid(name: str) -> None:
        def reference(*args, **kwargs):
            raise AssertionError(f"the reference of {name} ran")
        monkeypatch.setattr(registry.get(name), "reference", reference)
    return forbid


def _grads(fn, arrays, weights, compiled=False):
    def loss(*xs):
        out = fn(*xs)
        out = out if isinstance(out, list) else [out]
        return sum((w * o).sum() for w, o in zip(weights, out))
    g = mx.grad(loss, argnums=tuple(range(len(arrays))))
    return (mx.compile(g) if compiled else g)(*arrays)


@pytest.mark.parametrize("rows", [(2, 9), (1, 1)], ids=["rows", "one-row"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_cpu_linear_has_its_own_gradient(rows, bias, on_cpu, no_reference):
    """The CPU `linear` (fused parts, a soft-capped part, a bias) differentiates without its reference, to
    the reference's gradient within float32 rounding, compiled or not; the weight's gradient is one
    contiguous product (autodiff of x @ w.T leaves a transposed view)."""
    keys = mx.random.split(mx.random.key(5), 5)
    x = mx.random.normal((*rows, 24), key=keys[0])
    w = mx.random.normal((30, 24), key=keys[1]) * 0.3
    b = mx.random.normal((30,), key=keys[2])
    splits, caps = (8, 13), (None, 1.5, None)
    arrays = (x, w, b) if bias else (x, w)
    weights = [mx.random.normal((*rows, n), key=k) for n, k in zip((8, 5, 17), mx.random.split(keys[3], 3))]
    reference = registry.get("linear").reference
    want = _grads(lambda *a: reference(*a, *([] if bias else [None]), splits, caps), arrays, weights)
    dispatched = registry.dispatch("linear")
    no_reference("linear")
    for compiled in (False, True):
        got = _grads(lambda *a: dispatched(*a, *([] if bias else [None]), splits, caps), arrays, weights, compiled)
        assert len(got) == len(want)
        for g, r in zip(got, want):
            assert g.shape == r.shape and rel(g, r) <= 1e-5, compiled
        assert memoryview(got[1]).c_contiguous
    assert not memoryview(mx.grad(lambda w: (x @ w.T).sum())(w)).c_contiguous  # what the VJP avoids


def test_cpu_linear_soft_cap_derivative_is_one_minus_tanh_squared(on_cpu):
    """A capped part's derivative is 1 - t^2 with t = output / cap, as PyTorch's tanh backward computes it
    from its output (MLX's is 1 / cosh^2): within float32 rounding of float64, and exactly 0 where tanh
    rounds to 1 in float32 (z / cap = 10 here), as in PyTorch, where 1 / cosh^2 is 8e-9."""
    x = mx.random.normal((3, 16), key=mx.random.key(2)) * 4.0
    w = mx.random.normal((6, 16), key=mx.random.key(3))
    dx, dw = _grads(lambda x, w: linear_cpu(x, w, None, (), (2.0,)), (x, w), [mx.ones((3, 6))])
    y = np.array(x, np.float64) @ np.array(w, np.float64).T
    dy = 1.0 - np.tanh(y / 2.0) ** 2
    assert rel(dx, dy @ np.array(w, np.float64)) <= 1e-5
    assert rel(dw, dy.T @ np.array(x, np.float64)) <= 1e-5
    x, w = mx.array([[1.0]]), mx.array([[20.0], [1.0]])
    _, dw = _grads(lambda x, w: linear_cpu(x, w, None, (), (2.0,)), (x, w), [mx.ones((1, 2))])
    _, autodiff = _grads(lambda x, w: registry.get("linear").reference(x, w, None, (), (2.0,)), (x, w),
                         [mx.ones((1, 2))])
    assert dw[0, 0].item() == 0.0 and 0 < autodiff[0, 0].item() < 1e-8
    assert abs(dw[1, 0].item() - (1 - np.tanh(0.5) ** 2)) <= 1e-7


@pytest.mark.parametrize("name", ["exp", "sigmoid", "silu", "sigmoid_mul", "silu_mul"])
def test_cpu_activations_have_their_own_gradient(name, on_cpu, no_reference):
    """The CPU activations and gates differentiate without their references (MLX's CPU exp), to the
    references' gradients within float32 rounding, compiled or not."""
    n = 2 if name.endswith("_mul") else 1
    keys = mx.random.split(mx.random.key(9), n + 1)
    arrays = tuple(mx.random.normal((4, 7, 33), key=keys[i]) * 4.0 for i in range(n))
    weights = [mx.random.normal((4, 7, 33), key=keys[n])]
    want = _grads(registry.get(name).reference, arrays, weights)
    dispatched = registry.dispatch(name)
    no_reference(name)
    for compiled in (False, True):
        for g, r in zip(_grads(dispatched, arrays, weights, compiled), want):
            assert rel(g, r) <= 1e-5, compiled


# ----------------------------------------------------------------------------------------- malloc
MALLINFO = """
    import ctypes, sys

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype, libc.malloc.restype = Info, ctypes.c_void_p
    libc.malloc.argtypes, libc.free.argtypes = (ctypes.c_size_t,), (ctypes.c_void_p,)

    def mmapped(n=64 << 20):
        # whether a block of n bytes is served by mmap (glibc counts those in hblks)
        before = libc.mallinfo2().hblks
        p = libc.malloc(n)
        try:
            return libc.mallinfo2().hblks > before
        finally:
            libc.free(p)
"""


def _python(code: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k not in ("MAD_MALLOC", "GLIBC_TUNABLES")
               and not k.startswith("MALLOC_")}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(MALLINFO) + textwrap.dedent(code)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**environ, "MAD_BLAS": "mlx", **env})
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


needs_glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                                 reason="glibc's malloc")


@needs_glibc
@pytest.mark.parametrize("env,set_", [({}, True), ({"MAD_MALLOC": "default"}, False),
                                      ({"MALLOC_TRIM_THRESHOLD_": "131072"}, False),
                                      ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}, False)],
                         ids=["set", "opt-out", "user-trim", "user-tunable"])
def test_reuse_large_blocks_serves_them_from_the_heap(env, set_):
    """A 64 MiB block is mmapped by default and comes from the heap once set; the user's own thresholds
    (or MAD_MALLOC=default) leave malloc as it is."""
    out = _python("""
        from mad.backends import cpu
        before = mmapped()
        print(before, cpu.reuse_large_blocks(), mmapped(), cpu.reuse_large_blocks())
    """, **env)
    assert out == ["True", str(set_), str(not set_), str(set_)]


@needs_glibc
def test_a_cpu_stepper_reuses_large_blocks():
    out = _python(f"""
        import mad, mlx.core as mx
        from mad.train import Stepper, TrainConfig, make_optimizer
        mx.set_default_device(mx.cpu)
        model, _ = mad.load({str(ROOT / "topologies" / "xlstm-tiny.yaml")!r})
        before = mmapped()
        Stepper(model, make_optimizer(TrainConfig().check()), 1.0)
        print(before, mmapped())
    """)
    assert out == ["True", "False"]


# ----------------------------------------------------------------------------------------- AdamW
def test_adamw_is_mlx_adamw_with_the_scale_fused_and_spread_over_streams(on_cpu, monkeypatch):
    """Two steps of `mad.train.AdamW.update(model, grads, scale)` over 3 CPU streams give MLX's AdamW on the
    scaled gradients bit for bit (weights and moments), compiled or not; the parameters are spread so that
    the streams' loads differ by at most the largest parameter."""
    import mad.train as train
    from mad.backends import cpu

    monkeypatch.setattr(cpu, "STREAMS", 3)
    mx.random.seed(0)
    model, _ = mad.load(ROOT / "topologies" / "xlstm-tiny.yaml")
    start = model.trainable_parameters()
    grads = [tree_map(lambda p, k=k: mx.random.normal(p.shape, key=mx.random.key(k)) * 0.1, start) for k in (1, 2)]
    scale = mx.array(0.37)

    def run(optimizer, ours, compiled):
        model.update(start)
        optimizer.init(model.trainable_parameters())
        state = [model.state, optimizer.state]

        def step(g):
            if ours:
                optimizer.update(model, g, scale)
            else:
                optimizer.update(model, tree_map(lambda a: (a * scale).astype(a.dtype), g))
            return mx.array(0.0)

        fn = mx.compile(step, inputs=state, outputs=state) if compiled else step
        for g in grads:
            mx.eval(fn(g), state)
        return dict(tree_flatten(model.trainable_parameters())), dict(tree_flatten(optimizer.state))

    for compiled in (False, True):
        ours = train.AdamW(learning_rate=1e-2, weight_decay=0.1)
        got = run(ours, True, compiled)
        want = run(optim.AdamW(learning_rate=1e-2, weight_decay=0.1), False, compiled)
        for g, w in zip(got, want):
            assert g.keys() == w.keys()
            for k in w:
                assert mx.array_equal(g[k], w[k]).item(), (k, compiled)
        assert len(ours._load) == 3 and sum(ours._load) == sum(p.size for _, p in tree_flatten(start))
        assert max(ours._load) - min(ours._load) <= max(p.size for _, p in tree_flatten(start))
