"""MAD: declarative block wiring for recurrent language models on MLX."""

import os

# float32 means float32: MLX would take float32 matmuls in TF32 on GPUs that have it (CUDA, Apple M5);
# `--tf32` or MLX_ENABLE_TF32=1 opts in. Set before mlx.core is imported anywhere (MLX reads it then).
os.environ.setdefault("MLX_ENABLE_TF32", "0")


def _checkout_layout() -> None:
    """Serve `mad.blocks`, `mad.backends`, `mad.kernels`, `mad.topologies` from a plain checkout.

    Installed (wheel or editable), setuptools' package-dir mapping puts those folders under `mad`. In a
    plain checkout (`python -m mad.cli` from the repository root, nothing installed) they are siblings of
    `mad/`: the repository root joins `mad.__path__`, so `mad.kernels` is `<root>/kernels`. Only where
    `mad/kernels` etc. are not already there (a wheel), next to MAD's pyproject.toml and all four folders.

    The four folders have no `__init__.py` on purpose: they are namespace-package portions, which the
    import system ranks below a regular package of the same name anywhere on sys.path, so with the
    repository root on sys.path (`python -m pytest`, `python -c` from the root) `import kernels` still
    finds the installed `kernels` package transformers imports; with none installed it yields an empty
    namespace (no `__file__`), which transformers' probe reports as not installed. For the same reason
    the built-in block types are registered by `mad.block.block_types()`, not by `blocks/__init__.py`."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    subpackages = ("blocks", "backends", "kernels", "topologies")
    if any(os.path.isdir(os.path.join(here, name)) for name in subpackages):
        return  # installed as a wheel: mad/kernels etc. are real subfolders
    try:
        with open(os.path.join(root, "pyproject.toml"), encoding="utf-8") as f:
            ours = 'name = "mad-mlx"' in f.read()
    except OSError:
        ours = False
    if ours and all(os.path.isdir(os.path.join(root, name)) for name in subpackages):
        __path__.append(root)  # noqa: F821  (the package's own __path__)


_checkout_layout()

from .backends import cpu as _cpu  # noqa: E402

_cpu.select_blas()  # before mlx.core is imported: see backends/cpu.py

from .block import Block, Dim, OptDim, ShapeError, TensorType, register  # noqa: E402
from .errors import MadError  # noqa: E402
from .graph import Graph, build_graph  # noqa: E402
from .kernels.registry import inference  # noqa: E402
from .program import Program  # noqa: E402
from .topology import load_topology  # noqa: E402
from .generate import generate, stream_generate  # noqa: E402  (functions shadow the module name, as in mlx-lm)
from .loading import load  # noqa: E402
from .save import save  # noqa: E402

__version__ = "0.1.0"


def build(path, overrides=(), dtype="float32", compile="program", fuse="auto", trust_plugins: bool = False,
          group=None) -> Program:
    """Load a topology file, check it and compile it into a `Program` (freshly initialised weights).
    `trust_plugins`: let the file import the Python modules it names (see `load_topology`). `group` (an
    `mx.distributed` group): this member's part, split by tensor parallelism (`mad.shard`)."""
    if group is not None:
        from .shard import build_sharded

        return build_sharded(path, group, overrides, dtype, compile, fuse, trust_plugins)
    return Program(build_graph(load_topology(path, list(overrides), trust_plugins=trust_plugins)), dtype=dtype,
                   compile=compile, fuse=fuse)


__all__ = ["Block", "Dim", "OptDim", "Graph", "MadError", "Program", "ShapeError", "TensorType", "build",
           "build_graph", "generate", "inference", "load", "load_topology", "register", "save", "stream_generate"]
