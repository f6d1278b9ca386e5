"""Native CPU kernels: C++ MLX primitives that this package builds on first use, as MLX builds its own
compiled CPU kernels (with the system's C++ compiler, into a cache).

MLX's CPU backend runs a graph one small kernel at a time: a recurrence such as the sLSTM's is a few
kernels per time step, each paying MLX's dispatch and its compiled kernels' scalar transcendentals (see
benchmarks/RESULTS.md, "Why the original stack's CPU prefill target stays out of reach"). A native
primitive runs the whole recurrence in one task instead. The sources are in kernels/cpp/; `load()` compiles them into
one Python module, `_mad_native`, bound with nanobind as MLX's own Python module is, so MLX arrays pass in
and out and the primitive is a node of MLX's graph like any other (lazy, no host synchronisation).

    from mad.kernels import native
    module = native.load()       # the module, or None: native.reason() says why not

Where: `$MAD_CACHE` (default `$XDG_CACHE_HOME/mad`, i.e. `~/.cache/mad`) `/native/<key>/`, the key a hash
of everything the binary depends on (the sources, the compiler and its whole command line, which names the
MLX installation the module links to, the versions of MLX, nanobind and Python, the CPU's instruction set:
the build is for this machine, `-march=native`): two environments never share a binary. A build goes to a
temporary file renamed into place, so concurrent first uses (test workers) never load a half-written file.

What it needs: Linux, a C++20 compiler (`$CXX`, else `c++` or `g++`: MLX's own CPU compiler needs `g++`),
Python's headers, and nanobind (the `cpu` extra installs it) of the internals version MLX was built with
(MLX 0.32: nanobind 3). Whatever is missing, `load()` returns None with the reason, once, and the callers
run the pure-MLX reference. A module that builds but does not agree with the reference on a small input
(another nanobind ABI than MLX's, say) is not used either.

The environment variable `MAD_NATIVE`: unset or "1" builds and uses the native kernels where they apply,
"0" never does (the pure-MLX kernels run). `MAD_NATIVE_THREADS` sets the threads a kernel may use (default:
the CPUs this process may run on).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Optional

__all__ = ["ENV", "THREADS_ENV", "SOURCES", "load", "reason", "status", "threads", "cache_dir", "build_command"]

ENV = "MAD_NATIVE"
THREADS_ENV = "MAD_NATIVE_THREADS"
MODULE = "_mad_native"
SOURCES = (Path(__file__).resolve().parent / "cpp" / "slstm_cpu.cpp",)
FLAGS = ("-std=c++20", "-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math", "-fPIC", "-shared",
         "-fvisibility=hidden", "-DNDEBUG", "-DNB_DOMAIN=mlx", "-pthread")
BUILD_TIMEOUT_S = 600
_STATE: dict = {"reason": None}


def enabled() -> bool:
    """Whether `MAD_NATIVE` allows native kernels ("0" forbids them; any other value but "1" is an error)."""
    value = os.environ.get(ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def threads() -> int:
    """Threads a native kernel may use: `MAD_NATIVE_THREADS`, else the CPUs this process may run on."""
    value = os.environ.get(THREADS_ENV)
    if value is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{THREADS_ENV} must be a whole number >= 1, got {value!r}")
    return int(value)


def reason() -> Optional[str]:
    """Why `load()` returned None (None after a successful load, or before any)."""
    return _STATE["reason"]


def cache_dir() -> Path:
    root = os.environ.get("MAD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mad")
    return Path(root) / "native"


def _compiler() -> Optional[str]:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx)
    return shutil.which("c++") or shutil.which("g++")


def _cpu_flags() -> str:
    """The CPU's instruction-set flags (the build is `-march=native`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build_command(compiler: str, output: Path) -> list[str]:
    """The compiler's command line that builds the module into `output`."""
    import mlx.core as mx  # noqa: F401 (the package's location)
    import mlx
    import nanobind

    mlx_dir = Path(mlx.__path__[0])
    nb_dir = Path(nanobind.__file__).resolve().parent
    includes = [sysconfig.get_paths()["include"], nanobind.include_dir(), str(nb_dir / "ext" / "robin_map" / "include"),
                str(mlx_dir / "include")]
    return [compiler, *FLAGS, *(f"-I{d}" for d in includes), *(str(s) for s in SOURCES),
            str(Path(nanobind.source_dir()) / "nb_combined.cpp"), f"-L{mlx_dir / 'lib'}", "-lmlx",
            f"-Wl,-rpath,{mlx_dir / 'lib'}", "-o", str(output)]


def _key(compiler: str) -> str:
    """A hash of what the binary depends on: the sources, the compiler, the whole command line (which names
    the MLX and nanobind installations it builds against and links to), the versions and the CPU."""
    import mlx.core as mx
    import nanobind

    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    digest = hashlib.sha256()
    for part in (*(s.read_bytes() for s in SOURCES), version.encode(), "\0".join(build_command(compiler, Path())).encode(),
                 mx.__version__.encode(), nanobind.__version__.encode(), sys.version.encode(),
                 sysconfig.get_config_var("EXT_SUFFIX").encode(), _cpu_flags().encode()):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:20]


def _build(compiler: str) -> Path:
    """The module's file, built now unless the cache has it."""
    target_dir = cache_dir() / _key(compiler)
    target = target_dir / (MODULE + sysconfig.get_config_var("EXT_SUFFIX"))
    if target.is_file():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target_dir, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run(build_command(compiler, Path(tmp)), capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise RuntimeError(f"the compiler failed (exit {done.returncode}):\n{tail}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _import(path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(MODULE, str(path))
    spec = importlib.util.spec_from_file_location(MODULE, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _agrees(module: ModuleType) -> bool:
    """The module's sLSTM loop against the pure-MLX loop on a small input (a 2-step, 2-head sequence)."""
    import mlx.core as mx

    from .slstm import _loop, recurrent_to_matmul

    key = mx.random.key(0)
    T, NH, B, DH = 2, 2, 1, 20
    parts = mx.random.split(key, 4)
    wx = mx.random.normal((T, 4, NH, B, DH), key=parts[0])
    R = 0.1 * mx.random.normal((NH, 4 * DH, DH), key=parts[1])
    bh = mx.random.normal((4, NH, 1, DH), key=parts[2])
    state = [mx.zeros((1, NH, B, DH)) for _ in range(4)]
    ours = module.slstm_loop(wx, R, bh, *state, threads=2)
    theirs = _loop(wx, recurrent_to_matmul(R), bh, *state)
    return all(bool(mx.allclose(a, b, rtol=1e-5, atol=1e-6)) for a, b in zip(ours, theirs))


@functools.lru_cache(maxsize=1)
def _load() -> Optional[ModuleType]:
    if not enabled():
        _STATE["reason"] = f"{ENV}=0"
        return None
    if sys.platform != "linux":
        _STATE["reason"] = "native CPU kernels are built on Linux only"
        return None
    if importlib.util.find_spec("nanobind") is None:
        _STATE["reason"] = "nanobind is not installed (pip install nanobind, or the `cpu` extra)"
        return None
    compiler = _compiler()
    if compiler is None:
        _STATE["reason"] = "no C++ compiler found ($CXX, c++ or g++)"
        return None
    try:
        module = _import(_build(compiler))
        if not _agrees(module):
            _STATE["reason"] = "the native module disagrees with the pure-MLX kernels on a test input"
            return None
    except Exception as error:  # noqa: BLE001: any failure means the pure-MLX kernels run
        _STATE["reason"] = f"the native module could not be built or loaded: {error}"
        return None
    _STATE["reason"] = None
    return module


def load() -> Optional[ModuleType]:
    """The native module (built on first use), or None; `reason()` then says why."""
    return _load()


def status() -> str:
    """For reports: "unused" (nothing asked for the module yet), "loaded", or why it is not available.
    Never builds."""
    if _load.cache_info().currsize == 0:
        return "unused"
    return "loaded" if _load() is not None else f"not available: {reason()}"
