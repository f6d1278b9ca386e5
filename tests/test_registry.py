"""The kernel registry loads the built-in kernels itself: a lookup by name works in a fresh interpreter that
has imported no block and no kernel module (each case runs in a subprocess, since this one has both)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from mad.kernels import registry

KERNELS_DIR = Path(registry.__file__).resolve().parent

# every kernel the built-in modules register, and the backends of their variants
EXPECTED = {
    "exp": {"cpu"}, "sigmoid": {"cpu"}, "silu": {"cpu"}, "sigmoid_mul": {"cpu"}, "silu_mul": {"cpu"},
    "linear": {"cpu", "cuda", "metal"}, "quantized_linear": {"cpu", "cuda"}, "folded_linear": {"cuda"}, "head_norm_gate": {"cuda"},
    "mlstm_step": {"cuda", "metal"}, "mlstm_chunk_recurrence": {"cuda", "metal"},
    "mlstm_chunk_states": {"cuda"}, "mlstm_chunk_outputs": {"cuda"},
    "slstm_sequence": {"cpu", "cuda"},
}


def lookup(package: str) -> str:
    """Code that looks every kernel up, after checking that no kernel module of `package` is imported yet."""
    return f"""
        kernel_modules = lambda: sorted(m for m in sys.modules if m.startswith("{package}.")
                                        and m.rsplit(".", 1)[-1] in {registry.BUILTIN!r})
        assert not kernel_modules(), kernel_modules()
        for name in {sorted(EXPECTED)!r}:
            assert callable(dispatch(name)), name
        print(kernel_modules())
        print(sorted((name, sorted(k.variants)) for name, k in kernels().items()))
    """


def python(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "MAD_BLAS": "mlx"}, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout


def check(stdout: str, package: str) -> None:
    modules, found = stdout.splitlines()[-2:]
    assert modules == str(sorted(f"{package}.{m}" for m in registry.BUILTIN))
    assert found == str(sorted((name, sorted(backends)) for name, backends in EXPECTED.items()))


def test_lookup_through_mad_needs_no_block_import():
    """`mad.kernels.registry` alone, with MAD's block modules kept out (importing one fails)."""
    out = python("""
        import importlib.abc, sys

        class NoBlocks(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.startswith("mad.blocks."):
                    raise ImportError(f"{name} imported")

        sys.meta_path.insert(0, NoBlocks())
        from mad.kernels.registry import dispatch, kernels
    """ + lookup("mad.kernels"))
    check(out, "mad.kernels")


def test_lookup_without_mad():
    """The kernels folder as a package of its own: nothing but the registry is imported before the lookup."""
    out = python(f"""
        import sys, types
        package = types.ModuleType("madkernels")
        package.__path__ = [{str(KERNELS_DIR)!r}]
        sys.modules["madkernels"] = package
        from madkernels.registry import dispatch, kernels
    """ + lookup("madkernels"))
    check(out, "madkernels")


def test_builtin_lists_every_kernel_module():
    """A new kernel module in kernels/ is loaded only if `BUILTIN` names it (registry, device and native are
    helpers the kernel modules import: they register nothing)."""
    modules = {p.stem for p in KERNELS_DIR.glob("*.py")} - {"registry", "device", "native"}
    assert modules == set(registry.BUILTIN)


def test_unknown_kernel_names_the_registered_ones():
    try:
        registry.dispatch("no_such_kernel")
    except KeyError as e:
        assert "no_such_kernel" in str(e) and "mlstm_step" in str(e)
    else:
        raise AssertionError("dispatch of an unknown kernel did not raise")
