"""Loading models: a topology file or build folder (fresh weights), or a checkpoint folder.

A checkpoint folder is read by its family's format module (`mad.formats.<model_type>`, see
`mad/formats/__init__.py`): it reads the folder's config, names the shipped topology and the `--set`
overrides that describe this model, and maps the checkpoint's weight names to node names when they
differ. Loading is strict.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from .errors import Diagnostic, Diagnostics, MadError, Source
from .formats import CheckpointFormat, all_formats, config_files, find_format, register_format  # noqa: F401
from .graph import build_graph
from .model import LanguageModel, check_state_arrays
from .program import Program, dtype_of
from .quantize import describe_quantization
from .tokenizers import tokenizer_of
from .topology import load_topology


def _load_topology(file: Path, overrides: list[str], trust_plugins: bool):
    """`load_topology`, passing `trust_plugins` (plugins in a topology file are imported only when trusted)."""
    return load_topology(file, list(overrides), trust_plugins=bool(trust_plugins))


def _check_load_args(path: Any, dtype: Any, overrides: Any, compile: Any, fuse: Any, tokenizer: Any,
                     revision: Any = None) -> None:
    from .hub import check_revision

    if not isinstance(path, (str, os.PathLike)):
        raise MadError(f"path must be a file or folder name or a Hugging Face repository id, got "
                       f"{type(path).__name__}")
    check_revision(revision)
    if dtype is not None and not isinstance(dtype, mx.Dtype):
        dtype_of(dtype)  # a MadError naming the choices
    if isinstance(overrides, (str, bytes)) or not all(isinstance(o, str) for o in overrides):
        raise MadError(f"overrides must be a list of 'key=value' strings, got {overrides!r}")
    if compile not in ("program", "stage", "none"):
        raise MadError(f"compile must be 'program', 'stage' or 'none', got {compile!r}")
    if not (isinstance(fuse, bool) or (isinstance(fuse, str) and fuse == "auto")):
        raise MadError(f"fuse must be True, False or 'auto', got {fuse!r}")
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)) and not hasattr(tokenizer, "encode"):
        raise MadError(f"tokenizer must be 'bytes', a tokenizer.json file or a tokenizer, got {tokenizer!r}")


def load(path: str | Path, dtype: Optional[str] = None, overrides: list[str] = (),
         compile: str = "program", fuse: bool | str = "auto", *, tokenizer: Any = None,
         trust_plugins: bool = False, memory_check: bool = True,
         revision: Optional[str] = None, group: Any = None) -> tuple[LanguageModel, Any]:
    """Load a model from a topology file, a `mad build` folder, a checkpoint folder, or a Hugging Face
    repository id (`org/name`, when no such path exists; see `mad.hub`).

    Returns (model, tokenizer). `tokenizer`: None (the checkpoint's `tokenizer.json`; None when there is
    none, and for topologies), "bytes" (the byte tokenizer), a `tokenizer.json` path, or a tokenizer
    object. `overrides` (`--set`) apply to checkpoint folders too, after the format's own: what contradicts
    the weights fails with the weight-shape errors. `trust_plugins`: import the `plugins:` a topology
    names (off: such a file is an error). `memory_check`: refuse (MadError) a model whose weights clearly
    do not fit in the available memory, before anything is materialised. `revision`: the branch, tag or
    commit sha of a repository (default: main); files already in the Hugging Face cache are not fetched
    again, and `HF_HUB_OFFLINE=1` reads the cache only. `group` (an `mx.distributed` group): this member's
    part of the model split by tensor parallelism (`mad.shard`), each member reading only its slices.
    """
    from .hub import resolve

    _check_load_args(path, dtype, overrides, compile, fuse, tokenizer, revision)
    if group is not None:
        from .shard import load_sharded

        return load_sharded(resolve(path, revision), group, dtype, overrides, compile, fuse, tokenizer=tokenizer,
                            trust_plugins=trust_plugins, memory_check=memory_check)
    tok = tokenizer_of(tokenizer)
    path = resolve(path, revision)  # the path as given, or the repository's snapshot folder in the cache
    if path.is_file():
        model = _fresh(path, dtype, overrides, compile, fuse, trust_plugins, memory_check)
        model.tokenizer = tok
        return model, tok
    if _is_mad_checkpoint(path):  # what `mad train` / `mad.save` wrote: the resolved topology and its weights
        return load_mad_checkpoint(path, dtype, compile, fuse, overrides=overrides, trust_plugins=trust_plugins,
                                   memory_check=memory_check, tokenizer=tok)
    if path.is_dir() and (path / "resolved.yaml").is_file() and not (path / "config.json").exists():
        model = _fresh(path / "resolved.yaml", dtype, overrides, compile, fuse, trust_plugins, memory_check)
        model.tokenizer = tok
        return model, tok
    if not path.is_dir():
        raise MadError(f"{path} is not a topology file or a model folder", Source(str(path)))
    model, own = load_checkpoint(path, dtype, compile, fuse, overrides=overrides, trust_plugins=trust_plugins,
                                 memory_check=memory_check, tokenizer=tok)
    return model, own


def is_checkpoint_folder(path: str | Path) -> bool:
    """A folder `load` reads as a checkpoint (not a topology file or a build folder)."""
    path = Path(path)
    if _is_mad_checkpoint(path):
        return True
    return path.is_dir() and not ((path / "resolved.yaml").is_file() and not (path / "config.json").exists())


def _is_mad_checkpoint(path: Path) -> bool:
    from .save import is_mad_checkpoint

    return is_mad_checkpoint(path)


def load_mad_checkpoint(folder: Path, dtype: Optional[str] = None, compile: str = "program",
                        fuse: bool | str = "auto", overrides: list[str] = (), trust_plugins: bool = False,
                        memory_check: bool = True, tokenizer: Any = None) -> tuple[LanguageModel, Any]:
    """Read a MAD checkpoint folder (`mad train -o`, `mad.save`; see `mad.save`): the topology from its
    resolved.yaml (plus `overrides`), the weights of model.safetensors checked by name, shape and dtype, the
    tokenizer its mad.json names (`tokenizer` instead, when given)."""
    from .save import MAD_JSON

    folder = Path(folder)
    meta = read_mad_meta(folder)
    graph = build_graph(_load_topology(folder / "resolved.yaml", list(overrides), trust_plugins))
    weights, file_dtype = read_safetensors(folder)
    program = _checked_program(graph, weights, folder, dtype or file_dtype, compile, fuse, memory_check,
                               quantization=meta.get("quantization"), config_file=folder / MAD_JSON)
    if tokenizer is None:
        tokenizer = mad_checkpoint_tokenizer(folder, meta)
    model = LanguageModel(program, tokenizer)
    if meta.get("source") is not None:
        object.__setattr__(model, "checkpoint_source", recorded_source(folder, meta["source"]))
    return model, tokenizer


def recorded_source(folder: Path, entry: Any) -> Any:
    """The `CheckpointSource` a MAD checkpoint recorded (mad.json's "source" and the files of its source/
    folder: the config and companion files of the checkpoint the model was first loaded from), so that a
    model fine-tuned from a family's checkpoint can be saved back in that family's format."""
    from .formats import COMPANION_FILES
    from .save import MAD_JSON, SOURCE_DIR, SOURCE_NAMES

    where = Source(str(folder / MAD_JSON))
    if not isinstance(entry, dict) or not isinstance(entry.get("format"), str) or not isinstance(entry.get("config"), str):
        raise MadError(f'{MAD_JSON}: "source" must be {{"format": NAME, "config": FILE}}', where)
    fmt = next((f for f in all_formats() if f.name == entry["format"]), None)
    if fmt is None:
        raise MadError(f"{MAD_JSON}: unknown source format '{entry['format']}' (MAD reads: "
                       f"{', '.join(f.name for f in all_formats())})", where)
    src = folder / SOURCE_DIR
    config, config_file = read_config(src)
    if config_file.name != entry["config"]:
        raise MadError(f"{MAD_JSON}: the source config is {entry['config']}, but {SOURCE_DIR}/ holds "
                       f"{config_file.name}", where)
    names = None
    if (src / SOURCE_NAMES).is_file():
        listed = _read_json(src / SOURCE_NAMES, f"{SOURCE_DIR}/{SOURCE_NAMES}")
        if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
            raise MadError(f"{SOURCE_DIR}/{SOURCE_NAMES}: expected a list of weight names", Source(str(src / SOURCE_NAMES)))
        names = frozenset(listed)
    source = checkpoint_source(src, config, config_file, fmt, names)
    source.companions = {k: v for k, v in source.companions.items() if k in COMPANION_FILES}
    return source


def read_mad_meta(folder: Path) -> dict:
    """A MAD checkpoint's mad.json ({} when it has none), checked to be one."""
    from .save import CHECKPOINT_FORMAT, MAD_JSON

    if not (folder / MAD_JSON).is_file():
        return {}
    meta = _read_json(folder / MAD_JSON, MAD_JSON)
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise MadError(f"{MAD_JSON}: not a MAD checkpoint description (expected \"format\": "
                       f"\"{CHECKPOINT_FORMAT}\")", Source(str(folder / MAD_JSON)))
    return meta


def mad_checkpoint_tokenizer(folder: Path, meta: dict) -> Any:
    """The tokenizer a MAD checkpoint's mad.json names: bytes, its tokenizer.json, or None."""
    from .save import MAD_JSON
    from .tokenizers import ByteTokenizer, HFTokenizer, eos_token_ids

    kind = meta.get("tokenizer", "tokenizer.json" if (folder / "tokenizer.json").is_file() else None)
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "tokenizer.json":
        with _located(folder / MAD_JSON):
            return HFTokenizer(folder / "tokenizer.json", eos_token_ids(meta.get("eos_token_ids") or [],
                                                                        "eos_token_ids"))
    if kind is not None:
        raise MadError(f"{MAD_JSON}: unknown tokenizer {kind!r} (expected 'bytes', 'tokenizer.json' or null)",
                       Source(str(folder / MAD_JSON)))
    return None


def _fresh(file: Path, dtype: Optional[str], overrides: list[str], compile: str, fuse: bool | str,
           trust_plugins: bool = False, memory_check: bool = True) -> LanguageModel:
    graph = build_graph(_load_topology(file, list(overrides), trust_plugins))
    if memory_check:
        check_memory(graph, dtype or "float32", str(file))
    program = Program(graph, dtype=dtype or "float32", compile=compile, fuse=fuse)
    _materialise(program)
    return LanguageModel(program)


MAX_CONFIG_BYTES = 16 << 20  # a config is a few KB


def read_config(folder: Path) -> tuple[dict, Path]:
    """The folder's config (the first file any format reads: config.json, config.yaml, ...) and its path."""
    names = config_files()
    for name in names:
        file = folder / name
        if file.is_file():
            if file.suffix == ".json":
                config = _read_json(file, name)
            else:
                from .yamlio import load_yaml_data

                config = load_yaml_data(file, what=name)
            if not isinstance(config, dict):
                raise MadError(f"{name} must hold a mapping", Source(str(file)))
            return config, file
    raise MadError(f"{folder} is not a model folder: no {' or '.join(names)} (and no resolved.yaml)",
                   Source(str(folder)))


def _read_json(file: Path, what: str) -> Any:
    """A JSON file, bounded in size, as plain data; any problem is a MadError naming the file."""
    try:
        with open(file, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise MadError(f"cannot read {what}: {e.strerror or e}", Source(str(file))) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise MadError(f"{what} is too large: more than {MAX_CONFIG_BYTES >> 20} MiB", Source(str(file)))
    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise MadError(f"cannot parse {what}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})",
                       Source(str(file))) from None
    except RecursionError:
        raise MadError(f"cannot parse {what}: nested too deeply", Source(str(file))) from None
    except ValueError as e:
        raise MadError(f"cannot parse {what}: {e}", Source(str(file))) from None


def _checked_program(graph, weights: dict, folder: Path, dtype: str, compile: str, fuse, memory_check: bool,
                     quantization: Any = None, config_file: Optional[Path] = None) -> Program:
    """A Program holding a checkpoint's weights: names, shapes and dtypes checked against the graph and
    the memory estimated before any module is built, then loaded and evaluated one array at a time.
    Consumes `weights` (emptied once loaded, so the checkpoint's arrays are not kept alive beside the
    program's while they are evaluated).

    With a `quantization` config (mad.json's, `config_file`; see `mad.quantize`) the program is built and
    quantized first (nothing is computed: the modules' arrays stay lazy), and the weights are checked
    against its parameters: packed weights, scales and biases of the shapes and dtypes the config gives."""
    if quantization is None:
        check_weights(graph, weights, str(folder))
        if memory_check:
            check_memory(graph, dtype, str(folder))
    program = Program(graph, dtype=dtype, compile=compile, fuse=fuse)
    if quantization is not None:
        with _located(config_file or folder):
            program.quantize(quantization)
        expected = program.parameters()
        try:
            check_weights(graph, weights, str(folder), expected)
        except MadError as e:
            note = (f"the weights are quantized as {config_file.name if config_file else 'the config'} says "
                    f"({describe_quantization(program.quantization)}): a packed weight is uint32 "
                    "[out, in * bits / 32], its scales (and affine biases) [out, in / group_size]")
            raise MadError([Diagnostic(d.message, d.source, d.notes + [note]) for d in e.diagnostics]) from None
        if memory_check:
            check_memory(graph, dtype, str(folder), weight_bytes=sum(a.nbytes for a in expected.values()))
    program.load_weights(weights, where=str(folder))
    weights.clear()
    _materialise(program)
    return program


def _materialise(program: Program) -> None:
    """Evaluate the weights one array at a time, so that the pieces of a fused group are freed as
    soon as they are copied (peak: the checkpoint plus one group, not the fused weights twice)."""
    for _, w in tree_flatten(program.root.parameters()):
        mx.eval(w)


# ----------------------------------------------------------------------------------------- memory
def available_memory() -> tuple[Optional[int], str]:
    """(bytes the weights may take, where that figure comes from), or (None, why) when unknown.

    Linux: MemAvailable of /proc/meminfo, lowered to the cgroup's limit (a container's memory.max)
    when there is one. Elsewhere (macOS): the physical memory (MLX's unified memory holds the weights).
    On a GPU with memory of its own (CUDA), the smaller of that and the host's.
    """
    found: list[tuple[int, str]] = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append((int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"))
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip() or 0)
            found.append((max(int(limit) - used, 0), "the container's memory limit (cgroup memory.max)"))
    except (OSError, ValueError):
        pass
    if not found:
        try:
            found.append((os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "physical memory"))
        except (OSError, ValueError, AttributeError):
            pass
    try:
        if mx.default_device().type == mx.DeviceType.gpu and sys.platform != "darwin":
            info = mx.device_info() if hasattr(mx, "device_info") else {}
            free, size = info.get("free_memory"), info.get("memory_size") or info.get("total_memory")
            if free:  # CUDA: the device's free memory (MLX's own cache counts as used)
                found.append((int(free) + int(mx.get_cache_memory()), "the GPU's free memory"))
            elif size:
                found.append((int(size) - int(mx.get_active_memory()), "the GPU's memory"))
    except Exception:  # noqa: BLE001 - device queries differ between MLX versions and backends
        pass
    if not found:
        return None, "unknown"
    return min(found)


def check_memory(graph: Any, dtype: Any, where: str, extra_bytes: int = 0,
                 weight_bytes: Optional[int] = None) -> None:
    """Refuse (MadError) a model whose weights (parameter count x dtype size, or `weight_bytes` when given:
    a quantized model's, plus `extra_bytes`) clearly do not fit in the available memory, before anything
    is allocated. Unknown memory: no check."""
    need = (graph.param_count() * dtype_of(dtype).size if weight_bytes is None else weight_bytes) + extra_bytes
    avail, source = available_memory()
    if avail is None or need <= avail:
        return
    name = str(dtype_of(dtype)).rsplit(".", 1)[-1]
    what = f"in {name}" if weight_bytes is None else "quantized"
    raise MadError([Diagnostic(
        f"the model needs about {need / 1e9:.1f} GB ({graph.param_count():,} parameters {what}"
        f"{', plus the run' if extra_bytes else ''}), but only {avail / 1e9:.1f} GB are available ({source})",
        Source(where), ["a smaller --dtype (bfloat16 halves float32) may fit; --no-memory-check (memory_check=False "
                        "in mad.load) tries anyway"])])


@dataclass
class FamilyCheckpoint:
    """What a family's checkpoint folder holds, read but not evaluated: the graph of its topology, its weights
    (memory-mapped, renamed by the format), their dtype, the tokenizer, and where they came from."""

    graph: Any
    weights: dict
    dtype: str
    tokenizer: Any
    config: dict
    config_file: Path
    fmt: CheckpointFormat
    source_names: frozenset


def read_family_checkpoint(folder: Path, overrides: list[str] = (), trust_plugins: bool = False,
                           tokenizer: Any = None) -> FamilyCheckpoint:
    """Config -> topology (the format's overrides, then the user's), checked and sized before a weight is
    read; the weights memory-mapped and renamed by the format (nothing is read yet); the tokenizer:
    `tokenizer` (an `HFTokenizer` without eos ids gets the config's) or the folder's own (None if none)."""
    config, config_file = read_config(folder)
    fmt = find_format(config)
    if fmt is None:
        kind = config.get("model_type", "unknown")
        known = ", ".join(f.name for f in all_formats()) or "none"
        raise MadError(f"unsupported model: model_type '{kind}' (MAD reads: {known})", Source(str(config_file)))
    with _located(config_file):
        topology, fmt_overrides = fmt.topology(config)
    try:
        graph = build_graph(_load_topology(topology, list(fmt_overrides) + list(overrides), trust_plugins))
    except MadError as e:  # the sizes came from the config: say so
        note = f"the model's sizes come from {config_file} (as --set overrides of {Path(topology).name})"
        raise MadError([Diagnostic(d.message, d.source, d.notes + [note]) for d in e.diagnostics]) from None
    weights, file_dtype = read_safetensors(folder)  # memory-mapped: nothing is read yet
    source_names = frozenset(weights)
    with _located(folder / "model.safetensors" if (folder / "model.safetensors").is_file() else folder):
        weights = fmt.sanitize(weights, config)
    with _located(config_file):
        if tokenizer is None:
            tokenizer = fmt.tokenizer(folder, config)
        elif not getattr(tokenizer, "is_bytes", False) and not getattr(tokenizer, "eos_token_ids", None):
            tokenizer.eos_token_ids = tuple(fmt.eos_token_ids(config))
    return FamilyCheckpoint(graph, weights, file_dtype, tokenizer, config, config_file, fmt, source_names)


def load_checkpoint(folder: Path, dtype: Optional[str] = None, compile: str = "program",
                    fuse: bool | str = "auto", overrides: list[str] = (), trust_plugins: bool = False,
                    memory_check: bool = True, tokenizer: Any = None) -> tuple[LanguageModel, Any]:
    """Read a family's checkpoint folder (`read_family_checkpoint`), then load its weights, checked by name,
    shape and dtype, into a Program.

    `tokenizer`: a tokenizer to use instead of the folder's (an `HFTokenizer` without eos ids gets the
    config's), or None for the folder's own (None if it has none)."""
    folder = Path(folder)
    ck = read_family_checkpoint(folder, overrides, trust_plugins, tokenizer)
    program = _checked_program(ck.graph, ck.weights, folder, dtype or ck.dtype, compile, fuse, memory_check)
    model = LanguageModel(program, ck.tokenizer)
    object.__setattr__(model, "checkpoint_source", checkpoint_source(folder, ck.config, ck.config_file, ck.fmt,
                                                                          ck.source_names))
    return model, ck.tokenizer


MAX_COMPANION_BYTES = 256 << 20  # a tokenizer file is a few MB; a bound on what is kept, not a format rule


def checkpoint_source(folder: Path, config: dict, config_file: Path, fmt: CheckpointFormat,
                      weight_names: Optional[frozenset] = None) -> Any:
    """What writing the model back in its own format needs (`mad.save(..., format="source")`): the format,
    the config as read and its file's bytes, and the tokenizer and generation files of the folder."""
    from .formats import COMPANION_FILES, CheckpointSource

    def read(file: Path) -> Optional[bytes]:
        try:
            return file.read_bytes() if file.is_file() and file.stat().st_size <= MAX_COMPANION_BYTES else None
        except OSError:
            return None

    companions = {name: data for name in COMPANION_FILES if (data := read(folder / name)) is not None}
    return CheckpointSource(format=fmt, config=config, config_name=config_file.name,
                            config_bytes=read(config_file) or b"", folder=folder, companions=companions,
                            weight_names=weight_names)


MAX_LISTED = 20  # of each kind of weight error; a config that does not describe the weights would list thousands


def check_weights(graph: Any, weights: dict, where: str, expected: Optional[dict] = None) -> None:
    """Missing, unexpected, wrong-shape and wrong-dtype weights against the graph's parameters (or
    `expected`, {name: array of the expected shape and dtype}: a quantized program's parameters), listed
    together by name (up to MAX_LISTED of each kind), before anything is loaded. A floating-point
    parameter takes any floating-point weight; any other (a packed quantized weight) its exact dtype."""
    if expected is None:
        own = {f"{n}.{k}": (tuple(int(d) for d in shape), None)
               for n in graph.blocks() for k, shape in graph.g.nodes[n]["params"].items()}
    else:
        own = {k: (tuple(a.shape), None if mx.issubdtype(a.dtype, mx.floating) else a.dtype)
               for k, a in expected.items()}
    kinds: dict[str, list[str]] = {"missing": [], "unexpected": [], "shape": [], "dtype": []}
    for k, (shape, _) in own.items():
        if k not in weights:
            kinds["missing"].append(f"{where}: missing weight '{k}' {shape}")
    for k, w in weights.items():
        if not isinstance(w, mx.array):
            kinds["dtype"].append(f"{where}: weight '{k}' is a {type(w).__name__}, not an array")
        elif k not in own:
            kinds["unexpected"].append(f"{where}: unexpected weight '{k}' {tuple(w.shape)}")
        else:
            shape, exact = own[k]
            if tuple(w.shape) != shape:
                kinds["shape"].append(f"{where}: weight '{k}' has shape {tuple(w.shape)}, the model expects {shape}")
            if exact is None and not mx.issubdtype(w.dtype, mx.floating):
                kinds["dtype"].append(f"{where}: weight '{k}' has dtype {w.dtype}, the model expects floating-point "
                                      "weights")
            elif exact is not None and w.dtype != exact:
                kinds["dtype"].append(f"{where}: weight '{k}' has dtype {w.dtype}, the quantized model expects "
                                      f"{exact}")
    diags = Diagnostics()
    for kind, messages in kinds.items():
        for m in messages[:MAX_LISTED]:
            diags.error(m)
        if len(messages) > MAX_LISTED:
            diags.error(f"{where}: ... and {len(messages) - MAX_LISTED} more {kind} weight errors "
                        f"({len(messages)} in all)")
    diags.raise_if_any()


@contextmanager
def _located(file: Path):
    """Errors a format raises without a position point at `file` (the config or the weights)."""
    try:
        yield
    except MadError as e:
        raise MadError([d if d.source else Diagnostic(d.message, Source(str(file)), d.notes)
                        for d in e.diagnostics]) from None


MAX_INDEX_BYTES = 64 << 20  # far above a large model's index: a bound on what is read, not a format rule


def _read_index(folder: Path, index: Path) -> dict[str, list[str]]:
    """The shard index: {shard file: [tensor names]}, every shard confined to the checkpoint folder."""
    where = Source(str(index))
    data = _read_json(index, index.name) if index.stat().st_size <= MAX_INDEX_BYTES else None
    if data is None:
        raise MadError(f"shard index is too large (more than {MAX_INDEX_BYTES >> 20} MiB)", where)
    if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
        raise MadError("shard index: expected a mapping with a 'weight_map' mapping of tensor name -> shard file",
                       where)
    weight_map = data["weight_map"]
    if not weight_map:
        raise MadError("shard index: 'weight_map' is empty", where)
    root = folder.resolve()
    # a Hugging Face hub cache snapshot (<repo>/snapshots/<rev>/) links its files to <repo>/blobs/
    blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
    shards: dict[str, list[str]] = {}
    diags = Diagnostics()
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            diags.error(f"shard index: entry '{key}' -> {name!r}: the shard must be a file name", where)
            continue
        try:
            target = (folder / name).resolve()
        except (OSError, RuntimeError, ValueError) as e:
            diags.error(f"shard index: entry '{key}' -> '{name}': cannot resolve the path ({e})", where)
            continue
        lexical = Path(os.path.normpath(name))
        inside = root in target.parents or (blobs is not None and (folder / name).is_symlink()
                                            and target.parent == blobs.resolve())
        if lexical.is_absolute() or lexical.parts[:1] == ("..",) or target == root or not inside:
            diags.error(f"shard index: entry '{key}' -> '{name}': the shard is outside the checkpoint folder "
                        f"{folder} (shards must be files inside it)", where)
            continue
        shards.setdefault(name, []).append(key)
    diags.raise_if_any()
    return shards


def read_safetensors(folder: Path) -> tuple[dict[str, mx.array], str]:
    """All tensors of `model.safetensors` or the shards of `model.safetensors.index.json` (lazily mapped).

    Returns (weights, dtype name of the floating weights). The index must name files inside the folder;
    a tensor in two shards, an index entry its shard lacks and a shard tensor the index does not list
    are errors.
    """
    index = folder / "model.safetensors.index.json"
    listed: Optional[dict[str, list[str]]] = None
    if index.is_file():
        listed = _read_index(folder, index)
        files = sorted(listed)
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise MadError(f"{folder}: no model.safetensors or model.safetensors.index.json", Source(str(folder)))
    weights: dict[str, mx.array] = {}
    owner: dict[str, str] = {}
    diags = Diagnostics()
    from rich.progress import Progress

    with Progress(transient=True, disable=len(files) < 2) as progress:
        task = progress.add_task("loading shards", total=len(files))
        for name in files:
            file = folder / name
            if not file.is_file():
                raise MadError(f"shard '{name}' named in the index is missing", Source(str(file)))
            try:
                tensors = mx.load(str(file), format="safetensors")
            except Exception as e:  # noqa: BLE001 - mlx raises RuntimeError/ValueError for bad files
                raise MadError(f"cannot read safetensors file (truncated or corrupt?): {e}", Source(str(file))) from None
            for key in tensors:
                if key in owner:
                    diags.error(f"tensor '{key}' is in two shards: '{owner[key]}' and '{name}'", Source(str(file)))
                owner.setdefault(key, name)
            if listed is not None:
                for key in listed[name]:
                    if key not in tensors:
                        diags.error(f"shard index: '{key}' -> '{name}', but the shard has no tensor '{key}'",
                                    Source(str(index)))
                expected = set(listed[name])
                for key in tensors:
                    if key not in expected:
                        diags.error(f"shard '{name}' holds tensor '{key}', which the index does not map to it",
                                    Source(str(index)))
            weights.update(tensors)
            progress.advance(task)
    diags.raise_if_any()
    floats = [v.dtype for v in weights.values() if mx.issubdtype(v.dtype, mx.floating)]
    dtype = {mx.bfloat16: "bfloat16", mx.float16: "float16"}.get(floats[0] if floats else mx.float32, "float32")
    return weights, dtype


# ----------------------------------------------------------------------------------------- state files
STATE_FORMAT = "mad-state"  # the safetensors metadata `format` of a state file


def is_state_file(path: str | Path) -> bool:
    """Whether `path` is a state file MAD wrote (its safetensors header says format mad-state)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 16 << 20:
                return False
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return False
    return isinstance(header, dict) and isinstance(header.get("__metadata__"), dict) and \
        header["__metadata__"].get("format") == STATE_FORMAT


def check_state_target(path: str | Path, flag: str = "state file") -> Path:
    """Before any work: a state can be written at `path` (see `report.check_output_file`), and a file
    already there is an empty file or a state file MAD wrote: nothing else of the user's is overwritten."""
    from .report import check_output_file

    path = check_output_file(path, flag)
    if path.is_file() and path.stat().st_size > 0 and not is_state_file(path):
        raise MadError(f"{flag} {path}: the file exists and is not a MAD state file; MAD replaces only its own "
                       "state files (give another name, or remove it first)")
    return path


def save_state_file(path: str | Path, state: dict, flag: str = "state file") -> None:
    """Save a state ({node: {name: array}}) as safetensors, keys `node/name`, written atomically.

    Any file name works (the data goes to a temp file ending in `.safetensors`, renamed to `path`). A
    file already at `path` is replaced only if it is a state file (or empty): see `check_state_target`.
    """
    from .report import write_atomic_file

    if not isinstance(state, dict) or not all(isinstance(v, dict) for v in state.values()) or not all(
            isinstance(a, mx.array) for v in state.values() for a in v.values()):
        raise MadError("save_state_file: a state is a dict {node: {name: MLX array}}")
    check_state_target(path, flag)
    flat = {f"{node}/{name}": arr for node, entries in state.items() for name, arr in entries.items()}
    mx.eval(flat)
    write_atomic_file(path, lambda tmp: mx.save_safetensors(tmp, flat, metadata={"format": STATE_FORMAT}),
                      suffix=".safetensors", flag=flag)


def load_state_file(path: str | Path, model: LanguageModel | Program) -> dict:
    """Read a state file and check it against the model: every key has an owner, every entry the declared
    shape (one batch size throughout) and dtype (float32), and no NaN or infinity."""
    program = model.program if isinstance(model, LanguageModel) else model
    where = Source(str(path))
    if not Path(path).is_file():
        raise MadError("cannot read state file: " + ("it is a folder" if Path(path).is_dir() else "no such file"),
                       where)
    try:
        flat = mx.load(str(path), format="safetensors")
    except Exception as e:  # noqa: BLE001
        raise MadError(f"cannot read state file (not safetensors, truncated or corrupt?): {e}", where) from None
    state: dict = {}
    diags = Diagnostics()
    for key, arr in flat.items():
        node, sep, name = key.rpartition("/")
        if not sep:
            diags.error(f"state file: key '{key}' is not 'node/name'", where)
            continue
        state.setdefault(node, {})[name] = arr
    diags.raise_if_any()
    check_state_arrays(program.graph, state, where=str(path))
    entries = [(f"{node}/{name}", arr) for node, e in state.items() for name, arr in e.items()]
    finite = [mx.isfinite(arr).all() for _, arr in entries]
    try:
        mx.eval(finite)
    except Exception as e:  # noqa: BLE001 - the data of a truncated file is read here
        raise MadError(f"cannot read state file (truncated or corrupt?): {e}", where) from None
    for (key, _), ok in zip(entries, finite):
        if not ok.item():
            diags.error(f"state file: entry '{key}' holds NaN or infinite values", where)
    diags.raise_if_any()
    return state
