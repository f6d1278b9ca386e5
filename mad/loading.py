"""Loading models: a topology file or build folder (fresh weights), or a checkpoint folder.

A checkpoint folder is recognised by a `CheckpointFormat` (registered by a model family): it reads the
folder's config, names the shipped topology and the `--set` overrides that describe this model, and
maps the checkpoint's weight names to node names when they differ. Loading is strict.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from .errors import Diagnostic, Diagnostics, MadError, Source
from .generate import LanguageModel
from .graph import build_graph, check_state
from .program import Program
from .topology import load_topology


@dataclass
class CheckpointFormat:
    """How to read one family's checkpoint folders.

    Args:
        name: shown in messages.
        detect: config mapping -> True if this format reads it.
        topology: config -> (topology file, overrides such as ["dims.D=4096"]).
        sanitize: (weights, config) -> weights named as the topology's nodes (e.g. split fused weights).
        tokenizer: (folder, config) -> tokenizer or None.
    """

    name: str
    detect: Callable[[dict], bool]
    topology: Callable[[dict], tuple[Path, list[str]]]
    sanitize: Callable[[dict, dict], dict] = lambda weights, config: weights
    tokenizer: Optional[Callable[[Path, dict], Any]] = None
    config_files: tuple[str, ...] = ("config.json",)


FORMATS: list[CheckpointFormat] = []


def register_format(fmt: CheckpointFormat) -> CheckpointFormat:
    FORMATS.append(fmt)
    return fmt


def load(path: str | Path, dtype: Optional[str] = None, overrides: list[str] = (),
         compile: str = "program", fuse: bool | str = "auto") -> tuple[LanguageModel, Any]:
    """Load a model from a topology file, a `mad build` folder or a checkpoint folder.

    Returns (model, tokenizer); tokenizer is None when there is none (the byte tokenizer is the default).
    """
    path = Path(path)
    if path.is_file():
        return _fresh(path, dtype, overrides, compile, fuse), None
    if path.is_dir() and (path / "resolved.yaml").is_file() and not (path / "config.json").exists():
        return _fresh(path / "resolved.yaml", dtype, overrides, compile, fuse), None
    if not path.exists():
        raise MadError(f"no such file or folder: {path}")
    return load_checkpoint(path, dtype, compile, fuse)


def _fresh(file: Path, dtype: Optional[str], overrides: list[str], compile: str, fuse: bool | str) -> LanguageModel:
    program = Program(build_graph(load_topology(file, list(overrides))), dtype=dtype or "float32", compile=compile,
                      fuse=fuse)
    _materialise(program)
    return LanguageModel(program)


def read_config(folder: Path) -> tuple[dict, Path]:
    import yaml

    import mad.topologies.formats  # noqa: F401 - the shipped families register their formats

    names = dict.fromkeys(n for f in FORMATS for n in f.config_files) or {"config.json": None}
    for name in names:
        file = folder / name
        if file.is_file():
            try:
                text = file.read_text()
                config = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
            except (OSError, ValueError, yaml.YAMLError) as e:
                raise MadError(f"cannot parse {name}: {e}", Source(str(file))) from None
            if not isinstance(config, dict):
                raise MadError(f"{name} must hold a mapping", Source(str(file)))
            return config, file
    raise MadError(f"{folder} is not a model folder: no {' or '.join(names)} (and no resolved.yaml)",
                   Source(str(folder)))


def _materialise(program: Program) -> None:
    """Evaluate the weights one array at a time, so that the pieces of a fused group are freed as
    soon as they are copied (peak: the checkpoint plus one group, not the fused weights twice)."""
    for _, w in tree_flatten(program.root.parameters()):
        mx.eval(w)


def load_checkpoint(folder: Path, dtype: Optional[str] = None, compile: str = "program",
                    fuse: bool | str = "auto") -> tuple[LanguageModel, Any]:
    config, config_file = read_config(folder)
    fmt = next((f for f in FORMATS if f.detect(config)), None)
    if fmt is None:
        kind = config.get("model_type", "unknown")
        known = ", ".join(f.name for f in FORMATS) or "none"
        raise MadError(f"unsupported model: model_type '{kind}' (MAD reads: {known})", Source(str(config_file)))
    with _located(config_file):
        topology, overrides = fmt.topology(config)
    weights, file_dtype = read_safetensors(folder)
    with _located(folder / "model.safetensors" if (folder / "model.safetensors").is_file() else folder):
        weights = fmt.sanitize(weights, config)
    program = Program(build_graph(load_topology(topology, overrides)), dtype=dtype or file_dtype, compile=compile,
                      fuse=fuse)
    program.load_weights(weights, where=str(folder))
    del weights
    _materialise(program)
    tokenizer = fmt.tokenizer(folder, config) if fmt.tokenizer else None
    return LanguageModel(program, tokenizer), tokenizer


@contextmanager
def _located(file: Path):
    """Errors a format raises without a position point at `file` (the config or the weights)."""
    try:
        yield
    except MadError as e:
        raise MadError([d if d.source else Diagnostic(d.message, Source(str(file)), d.notes)
                        for d in e.diagnostics]) from None


def read_safetensors(folder: Path) -> tuple[dict[str, mx.array], str]:
    """All tensors of `model.safetensors` or the shards of `model.safetensors.index.json` (lazily mapped).

    Returns (weights, dtype name of the floating weights).
    """
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise MadError(f"cannot read shard index: {e}", Source(str(index))) from None
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise MadError(f"{folder}: no model.safetensors or model.safetensors.index.json", Source(str(folder)))
    weights: dict[str, mx.array] = {}
    from rich.progress import Progress

    with Progress(transient=True, disable=len(files) < 2) as progress:
        task = progress.add_task("loading shards", total=len(files))
        for name in files:
            file = folder / name
            if not file.is_file():
                raise MadError(f"shard '{name}' named in the index is missing", Source(str(file)))
            try:
                weights.update(mx.load(str(file)))
            except Exception as e:  # noqa: BLE001 - mlx raises RuntimeError/ValueError for bad files
                raise MadError(f"cannot read safetensors file (truncated or corrupt?): {e}", Source(str(file))) from None
            progress.advance(task)
    floats = [v.dtype for v in weights.values() if mx.issubdtype(v.dtype, mx.floating)]
    dtype = {mx.bfloat16: "bfloat16", mx.float16: "float16"}.get(floats[0] if floats else mx.float32, "float32")
    return weights, dtype


# ----------------------------------------------------------------------------------------- state files
def save_state_file(path: str | Path, state: dict) -> None:
    """Save a state ({node: {name: array}}) as safetensors, keys `node/name`, written atomically."""
    from .report import write_atomic_file

    flat = {f"{node}/{name}": arr for node, entries in state.items() for name, arr in entries.items()}
    mx.eval(flat)
    write_atomic_file(path, lambda tmp: mx.save_safetensors(tmp, flat, metadata={"format": "mad-state"}))


def load_state_file(path: str | Path, model: LanguageModel | Program) -> dict:
    """Read a state file and check it against the model (every key must have an owner)."""
    program = model.program if isinstance(model, LanguageModel) else model
    try:
        flat = mx.load(str(path))
    except Exception as e:  # noqa: BLE001
        raise MadError(f"cannot read state file: {e}", Source(str(path))) from None
    state: dict = {}
    diags = Diagnostics()
    for key, arr in flat.items():
        node, sep, name = key.rpartition("/")
        if not sep:
            diags.error(f"state file: key '{key}' is not 'node/name'", Source(str(path)))
            continue
        state.setdefault(node, {})[name] = arr
    diags.raise_if_any()
    check_state(program.graph, state, where=str(path))
    return state
