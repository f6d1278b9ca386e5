"""MAD: declarative block wiring for recurrent language models on MLX."""

from . import blas

blas.select()  # before any matmul: see mad/blas.py

from .block import Block, Dim, OptDim, ShapeError, TensorType, register
from .errors import MadError
from .graph import Graph, build_graph
from .program import Program
from .topology import load_topology
from .generate import generate, stream_generate  # noqa: E402  (functions shadow the module name, as in mlx-lm)
from .loading import load

__version__ = "0.1.0"


def build(path, overrides=(), dtype="float32", compile="program", fuse="auto") -> Program:
    """Load a topology file, check it and compile it into a `Program` (freshly initialised weights)."""
    return Program(build_graph(load_topology(path, list(overrides))), dtype=dtype, compile=compile, fuse=fuse)


__all__ = ["Block", "Dim", "OptDim", "Graph", "MadError", "Program", "ShapeError", "TensorType", "build",
           "build_graph", "generate", "load", "load_topology", "register", "stream_generate"]
