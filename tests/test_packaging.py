"""The repository layout against the import system (mad/__init__.py and pyproject.toml say how it works).

blocks/, backends/, kernels/ and topologies/ are MAD's `mad.blocks`, `mad.backends`, `mad.kernels` and
`mad.topologies`. With the repository root on sys.path (`python -m pytest`, `python -c` from the root)
they must not shadow installed packages of those names (transformers imports one called `kernels`), and
the same code must import as `mad.*` from a plain checkout (nothing installed), an editable install and
a wheel. Each case runs in a fresh interpreter.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("blocks", "backends", "kernels", "topologies")
# what the deps-only interpreter sees: the environment's site-packages, read as plain folders (no .pth
# files run, so no editable-install finder), after the entries a test puts first
SITE = [p for p in site.getsitepackages() if os.path.isdir(p)]


def python(code: str, cwd: Path, *flags: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    r = subprocess.run([sys.executable, *flags, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def ours(path: str) -> bool:
    """Whether `path` lies in one of the checkout's four folders (CI's venv lies in the checkout too)."""
    return any(Path(path).is_relative_to(ROOT / name) for name in FOLDERS)


def plain_copy(dest: Path) -> Path:
    """The package's part of the checkout (what setuptools maps), copied without caches or metadata."""
    dest.mkdir()
    for name in ("mad", *FOLDERS):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    return dest


def test_the_folders_are_namespace_portions():
    for name in FOLDERS:
        assert (ROOT / name).is_dir() and not (ROOT / name / "__init__.py").exists(), name


def test_installed_packages_win_over_the_folders(tmp_path):
    """(a) From the repository root (on sys.path first, as `python -m pytest` puts it), a regular package of
    the same name anywhere later on sys.path is the one imported (here: stand-ins appended to sys.path, or
    a real one such as transformers' `kernels` where installed)."""
    fake = tmp_path / "site"
    for name in FOLDERS:
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text("WHO = 'installed'\n")
    r = python(f"""
        import sys
        assert sys.path[0] == '', sys.path[:2]
        sys.path.append({str(fake)!r})
        import blocks, backends, kernels, topologies
        for m in (blocks, backends, kernels, topologies):
            print(m.__file__)  # a regular package's (a namespace package has None)
    """, ROOT)
    files = r.stdout.split()
    assert len(files) == 4 and not [f for f in files if ours(f) or f == "None"], files


def test_no_package_of_those_names_without_an_install(tmp_path):
    """(a) With none installed, `import kernels` from the root is an empty namespace package: no code, no
    `__file__`, no distribution; that is what transformers' probe (`find_spec`, the distribution's
    version, then `__file__`) reports as not installed. The checkout's modules are never run under the
    top-level names."""
    r = python("""
        import importlib.metadata
        for name in ('blocks', 'backends', 'kernels', 'topologies'):
            m = __import__(name)
            assert getattr(m, '__file__', None) is None and not [k for k in vars(m) if not k.startswith('__')], name
            try:
                importlib.metadata.version(name)
                raise AssertionError(f'a distribution named {name}')
            except importlib.metadata.PackageNotFoundError:
                pass
        print('ok')
    """, ROOT, "-S")
    assert r.stdout.strip() == "ok"


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_transformers_imports_its_kernels_package_from_the_root():
    """The CI failure: transformers' hub kernels integration, imported from the repository root."""
    r = python("""
        import transformers.integrations.hub_kernels as h, importlib.util
        spec = importlib.util.find_spec('kernels')
        print('kernels', spec.origin if spec else None)
    """, ROOT)
    origin = r.stdout.split("kernels ", 1)[1].strip()
    assert origin == "None" or not ours(origin), origin


def test_plain_checkout_runs_the_cli(tmp_path):
    """(b) `python -m mad.cli build topologies/examples/tiny.yaml` from a plain copy of the checkout, with only
    the dependencies importable: no PYTHONPATH, site-packages as plain folders (-S: no .pth file runs, so
    an installed or editable MAD is not found first)."""
    copy = plain_copy(tmp_path / "checkout")
    r = python(f"""
        import runpy, sys
        sys.path[1:1] = {SITE!r}
        import mad, mad.kernels.registry, mad.blocks.core, mad.formats.xlstm, mad.topologies, mad.backends
        here = {str(copy)!r}
        for m in (mad, mad.kernels.registry, mad.blocks.core, mad.formats.xlstm):
            assert m.__file__.startswith(here), m.__file__
        assert list(mad.backends.__path__) == [here + '/backends'], mad.backends.__path__
        assert list(mad.topologies.__path__) == [here + '/topologies'], mad.topologies.__path__
        assert not [m for m in sys.modules if 'editable' in m], 'an editable finder ran'
        from mad.block import block_types
        assert {{'mlstm_cell', 'swiglu', 'slstm_cell', 'linear'}} <= set(block_types())
        sys.argv = ['mad', 'build', 'topologies/examples/tiny.yaml']
        runpy.run_module('mad.cli', run_name='__main__', alter_sys=True)
    """, copy, "-S")
    assert "Parameters: 84,160" in r.stdout, r.stdout


@pytest.mark.skipif(not any(d.metadata["Name"] == "mad-mlx" for d in importlib.metadata.distributions()),
                    reason="mad-mlx is not installed in this environment")
def test_installed_package_exposes_the_subpackages(tmp_path):
    """(c) The installed MAD (CI: editable), imported away from the checkout: `mad.kernels` etc. and the shipped
    topology files as package data."""
    r = python("""
        import importlib.resources, mad, mad.kernels.registry, mad.blocks.core, mad.formats.xlstm, mad.backends
        assert (importlib.resources.files('mad.topologies') / 'xlstm-7b.yaml').is_file()
        assert (importlib.resources.files('mad.topologies') / 'examples' / 'tiny.yaml').is_file()
        print(mad.__file__)
    """, tmp_path)
    assert r.stdout.strip().endswith("__init__.py")


def test_wheel_holds_the_subpackages_and_runs(tmp_path):
    """(c) A regular wheel built from the checkout: the four folders under `mad/` (modules and YAML package
    data), nothing at the top level but `mad`; installed into a folder of its own, it runs `mad build`."""
    try:
        import setuptools
        ok = tuple(int(x) for x in setuptools.__version__.split(".")[:2]) >= (68, 0)
    except ImportError:
        ok = False
    if not ok:
        pytest.skip("needs setuptools >= 68 in this environment (the build runs without isolation, offline)")
    src = plain_copy(tmp_path / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp_path / "wheel"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("mad_mlx-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("mad/__init__.py", "mad/kernels/registry.py", "mad/kernels/mlstm.py", "mad/blocks/core.py",
                 "mad/formats/xlstm.py", "mad/formats/nxai_xlstm.py", "mad/topologies/xlstm-7b.yaml", "mad/topologies/examples/tiny.yaml",
                 "mad/backends/cpu.py", "mad/backends/cuda.py", "mad/backends/metal.py", "mad/kernels/cpp/slstm_cpu.cpp"):
        assert name in names, name
    top = {n.split("/")[0] for n in names} - {"mad"}
    assert len(top) == 1 and top.pop().endswith(".dist-info"), names
    target = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = python(f"""
        import runpy, sys
        sys.path[1:1] = [{str(target)!r}, *{SITE!r}]
        import mad, mad.kernels.registry, mad.backends
        assert mad.__file__.startswith({str(target)!r}) and mad.__path__ == [{str(target / 'mad')!r}], mad.__path__
        sys.argv = ['mad', 'build', {str(src / 'topologies' / 'examples' / 'tiny.yaml')!r}]
        runpy.run_module('mad.cli', run_name='__main__', alter_sys=True)
    """, elsewhere, "-S")
    assert "Parameters: 84,160" in r.stdout, r.stdout
