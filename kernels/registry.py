"""Kernel registry: every device kernel next to the pure-MLX reference it is tested against.

The registry owns the built-in kernels: `BUILTIN` lists their modules, and the first lookup (`dispatch`,
`get`, `kernels`) imports them, so a caller asks the registry for a kernel by name and never imports a
kernel module for what its import registers. (kernels/ has no `__init__.py`, see mad/__init__.py, so
this module, not the package, is where loading happens.)

A kernel is registered under a name with its reference function; variants register for a backend
("cuda", "metal", or "cpu" for MLX's CPU device) with the same call signature. `dispatch(name)`
returns the function to call, chosen when a model is traced (never per step at run time):

    policy "reference"  -> the reference, always (environment: MAD_KERNELS=reference)
    policy "auto"       -> the variant of the backend that runs the default device (a GPU's
                           mx.cuda.is_available() / mx.metal.is_available(), or "cpu"), else the
                           reference

    from mad.kernels.registry import dispatch, use_reference
    step = dispatch("mlstm_step")             # same signature as kernels.mlstm.mlstm_step
    with use_reference():                     # force the reference (tests, debugging)
        ...

A variant may decline an input it does not support (a dtype, a too-large head) by raising
`Unsupported`; `dispatch` then falls back to the reference for that call. The decision depends on
shapes and dtypes only, so it is made once while tracing.

Under autodiff a variant's gradient is its reference's (`with_reference_gradient`), unless the variant
was registered with `own_gradient=True`: it is then differentiable itself (an `mx.custom_function` with a
VJP written for it, held to the reference's gradient by tests/test_grad.py) and is called as it is.
Inside `inference()` (generation, serving, benchmarks, evaluation) no gradient is taken: variants run bare,
without the custom function around each call, whose graph node a decode step would otherwise pay for at
every kernel call; the numbers are the same. A `Program` keys its compiled functions by `gradients()`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import mlx.core as mx

__all__ = ["BUILTIN", "Unsupported", "register_kernel", "register_variant", "register_device_kernel", "dispatch", "get",
           "chosen_variant", "run_variant", "listed", "backend", "use_reference", "set_policy", "policy", "kernels", "load_builtin",
           "inference", "gradients"]

GPU_BACKENDS = ("cuda", "metal")
BACKENDS = (*GPU_BACKENDS, "cpu")

# The modules of this package that register kernels (references first; a variant's module imports its
# reference's module itself, so the order does not matter). tests/test_registry.py checks it names them all.
BUILTIN = ("activations", "fold", "linear", "linear_device", "mlstm", "mlstm_device", "mlstm_chunk_device",
           "norm_device", "qlinear", "qlinear_device", "qlinear_mma", "slstm", "slstm_device", "slstm_native")


class Unsupported(Exception):
    """Raised by a device variant for inputs it does not handle; the reference runs instead."""


_GRADIENTS: contextvars.ContextVar[bool] = contextvars.ContextVar("mad_gradients", default=True)


def gradients() -> bool:
    """Whether calls traced now may be differentiated (False inside `inference()`)."""
    return _GRADIENTS.get()


@contextlib.contextmanager
def inference() -> Iterator[None]:
    """Trace and run without gradients in this thread (module doc): variants run bare. Taking a gradient
    of something traced inside fails (`[Primitive::vjp]` of a custom kernel)."""
    token = _GRADIENTS.set(False)
    try:
        yield
    finally:
        _GRADIENTS.reset(token)


@dataclass
class Kernel:
    name: str
    reference: Callable
    variants: dict[str, Callable] = field(default_factory=dict)
    own_gradient: set[str] = field(default_factory=set)  # backends whose variant carries its own VJP


_KERNELS: dict[str, Kernel] = {}
_POLICY: dict[str, Optional[str]] = {"policy": None}  # None: from the environment
_LOADING = {"started": False}


def load_builtin() -> None:
    """Import the `BUILTIN` kernel modules (once; every lookup calls this first)."""
    if _LOADING["started"]:
        return  # loaded, or loading now: a module being imported may itself register or look up
    _LOADING["started"] = True
    try:
        for module in BUILTIN:
            importlib.import_module(f"{__package__}.{module}")
    except BaseException:
        _LOADING["started"] = False  # the next lookup raises the import error again
        raise


def register_kernel(name: str, reference: Callable) -> Kernel:
    """Register `reference` (pure MLX, runs everywhere) as kernel `name`."""
    _KERNELS[name] = Kernel(name, reference)
    return _KERNELS[name]


def register_variant(name: str, backend_name: str, fn: Callable, *, own_gradient: bool = False) -> None:
    """Register a variant of kernel `name` (built in, or registered before) for backend "cuda", "metal" or
    "cpu". `own_gradient`: `fn` is differentiable as it is (its own VJP); else the reference's VJP is used."""
    if backend_name not in BACKENDS:
        raise ValueError(f"unknown backend {backend_name!r}; expected one of {BACKENDS}")
    kernel = _KERNELS[name] if name in _KERNELS else get(name)
    kernel.variants[backend_name] = fn
    if own_gradient:
        kernel.own_gradient.add(backend_name)
    else:
        kernel.own_gradient.discard(backend_name)


def register_device_kernel(name: str, fn: Callable) -> None:
    """Register `fn(..., backend=...)` as the variant of kernel `name` on every GPU backend (the CUDA
    and Metal builds of one kernel body)."""
    for backend_name in GPU_BACKENDS:
        register_variant(name, backend_name, functools.partial(fn, backend=backend_name))


def get(name: str) -> Kernel:
    """Kernel `name`: its reference and its variants."""
    load_builtin()
    if name not in _KERNELS:
        raise KeyError(f"no kernel {name!r}; registered: {', '.join(sorted(_KERNELS))}")
    return _KERNELS[name]


def kernels() -> dict[str, Kernel]:
    """Every registered kernel by name."""
    load_builtin()
    return dict(_KERNELS)


def policy() -> str:
    """"reference" or "auto": set_policy() wins over the MAD_KERNELS environment variable."""
    chosen = _POLICY["policy"] or os.environ.get("MAD_KERNELS", "auto")
    if chosen not in ("auto", "reference"):
        raise ValueError(f"MAD_KERNELS must be 'auto' or 'reference', got {chosen!r}")
    return chosen


def set_policy(value: Optional[str]) -> None:
    """Set the policy for this process ("auto", "reference", or None to follow MAD_KERNELS)."""
    if value not in (None, "auto", "reference"):
        raise ValueError(f"kernel policy must be 'auto' or 'reference', got {value!r}")
    _POLICY["policy"] = value


@contextlib.contextmanager
def use_reference(on: bool = True) -> Iterator[None]:
    """Within the block, dispatch returns references (on=True) or follows "auto" (on=False)."""
    before = _POLICY["policy"]
    _POLICY["policy"] = "reference" if on else "auto"
    try:
        yield
    finally:
        _POLICY["policy"] = before


def backend() -> Optional[str]:
    """The kernel backend of the default device: "cuda", "metal", "cpu", or None (a GPU of neither)."""
    if mx.default_device() != mx.gpu:
        return "cpu"
    if mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return None


def chosen_variant(name: str) -> tuple[Kernel, Optional[str], Optional[Callable]]:
    """(kernel `name`, the backend whose variant the current policy and device choose, that variant): the
    backend and variant are None where the reference runs."""
    kernel = get(name)
    chosen = backend() if policy() == "auto" else None
    variant = kernel.variants.get(chosen) if chosen else None
    return kernel, (chosen if variant is not None else None), variant


def run_variant(kernel: Kernel, chosen: str, variant: Callable, args: tuple, kwargs: dict) -> Any:
    """`variant(*args, **kwargs)` (the variant `chosen_variant` chose), differentiable: as it is where it
    carries its own gradient or inside `inference()`, else through the reference's VJP
    (`with_reference_gradient`). `Unsupported` propagates: the caller decides what runs instead."""
    if chosen in kernel.own_gradient or not _GRADIENTS.get():
        return variant(*args, **kwargs)
    return with_reference_gradient(variant, kernel.reference, args, kwargs)


def dispatch(name: str) -> Callable:
    """The function to run kernel `name` with under the current policy and device."""
    kernel, chosen, variant = chosen_variant(name)
    if variant is None:
        return kernel.reference

    def run(*args, **kwargs):
        try:
            return run_variant(kernel, chosen, variant, args, kwargs)
        except Unsupported:
            return kernel.reference(*args, **kwargs)

    run.__name__ = f"{name}[{chosen}]"
    return run


# ----------------------------------------------------------------------------------------- gradients
class _Slot:
    """Where the i-th array of a flattened argument (or result) tree goes back."""

    __slots__ = ("i",)

    def __init__(self, i: int):
        self.i = i


def _flatten(tree: Any, leaves: list) -> Any:
    """`tree` with every MLX array replaced by a `_Slot` (the arrays appended to `leaves`); lists, tuples
    and dicts are walked, anything else (ints, floats, None, strings) is kept as it is."""
    if isinstance(tree, mx.array):
        leaves.append(tree)
        return _Slot(len(leaves) - 1)
    if isinstance(tree, (list, tuple)):
        walked = [_flatten(t, leaves) for t in tree]
        return type(tree)(*walked) if hasattr(tree, "_fields") else type(tree)(walked)
    if isinstance(tree, dict):
        return {k: _flatten(v, leaves) for k, v in tree.items()}
    return tree


def _fill(skeleton: Any, leaves: Sequence[mx.array]) -> Any:
    if isinstance(skeleton, _Slot):
        return leaves[skeleton.i]
    if isinstance(skeleton, (list, tuple)):
        walked = [_fill(t, leaves) for t in skeleton]
        return type(skeleton)(*walked) if hasattr(skeleton, "_fields") else type(skeleton)(walked)
    if isinstance(skeleton, dict):
        return {k: _fill(v, leaves) for k, v in skeleton.items()}
    return skeleton


def listed(xs: Any) -> list[mx.array]:
    """A custom function's primals, tangents or cotangents as a list (MLX passes one array bare)."""
    return list(xs) if isinstance(xs, (list, tuple)) else [xs]


def with_reference_gradient(variant: Callable, reference: Callable, args: tuple, kwargs: dict) -> Any:
    """`variant(*args, **kwargs)`, differentiable: an `mx.custom_function` whose forward is the variant and
    whose VJP is the reference's, `mx.vjp(reference, primals, cotangents)` at the same arrays.

    The arrays anywhere in the arguments (a state tuple included) are the primals; the other arguments
    (splits, caps, eps) are fixed for the call. The forward runs the variant alone: the reference runs
    only when a gradient is taken (its forward again, then its backward: the reference's exact gradient,
    evaluated at the variant's cotangents). Under `mx.compile` this wrapping happens once, while tracing.
    `Unsupported` raised by the variant propagates (dispatch then calls the reference). Forward-mode
    (`mx.jvp`) is not covered: MLX's custom functions did not take a JVP here (MLX 0.32)."""
    arrays: list[mx.array] = []
    skeleton = _flatten((args, kwargs), arrays)
    if not arrays:  # nothing to differentiate (and MLX's custom functions need an array input)
        return variant(*args, **kwargs)
    result: dict[str, Any] = {}

    def flat(fn: Callable) -> Callable:
        def call(*xs: mx.array) -> list[mx.array]:
            a, kw = _fill(skeleton, xs)
            out: list[mx.array] = []
            result["skeleton"] = _flatten(fn(*a, **kw), out)
            return out
        return call

    forward = mx.custom_function(flat(variant))

    @forward.vjp
    def _vjp(primals, cotangents, outputs):
        return tuple(mx.vjp(flat(reference), listed(primals), listed(cotangents))[1])

    out = forward(*arrays)
    return _fill(result["skeleton"], out if isinstance(out, (list, tuple)) else [out])
