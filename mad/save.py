"""MAD checkpoint folders: what `mad.save(model, DIR)` and `mad train -o DIR` write, and `mad.load(DIR)` reads.

A MAD checkpoint folder holds

    .mad-build              the marker of folders MAD wrote (the rule of `mad build -o`: MAD replaces only those)
    resolved.yaml           the resolved topology (sizes, overrides and templates applied)
    model.safetensors       the weights, named by node (the checkpoint names: `Program.parameters()`)
    mad.json                {"format": "mad-checkpoint", "tokenizer": "bytes" | "tokenizer.json" | null, ...,
                             "quantization": {...} for a quantized model (mlx-lm's config entry, see mad.quantize)}
    tokenizer.json          when the model had one
    source/                 when the model came from a family's checkpoint folder (HF, NX-AI): that folder's
                            config, tokenizer and generation files, and weight_names.json; mad.json's "source"
                            names the format, so that the model can be saved back in it
    training/               `mad train` only: optimizer.safetensors and state.json (step, data position, seed)
    metrics.jsonl, loss.svg `mad train` only
    data/                   `mad train` only: the tokenised corpus (a memory-mapped token file), a cache

`mad.save(model, DIR, format="source")` writes a model loaded from an HF or NX-AI checkpoint folder (or
from a MAD checkpoint with a source/) in that folder's own format instead (`write_source_checkpoint`): its config, model.safetensors under its names,
its tokenizer files (and the marker, so that MAD may replace it).

The folder is written whole into a temp folder beside it, then swapped in (one atomic exchange where the
system has one), so a crash or a full disk leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import mlx.core as mx

from .errors import MadError
from .report import _is_build_dir, write_mad_folder

CHECKPOINT_FORMAT = "mad-checkpoint"
CHECKPOINT_VERSION = 1
MAD_JSON = "mad.json"
SOURCE_DIR = "source"  # a checkpoint folder's config and companion files, when the model came from one
SOURCE_NAMES = "weight_names.json"


def is_mad_checkpoint(path: str | Path) -> bool:
    """A folder MAD wrote that holds weights: marker, resolved.yaml and model.safetensors."""
    path = Path(path)
    return path.is_dir() and (path / "resolved.yaml").is_file() and (path / "model.safetensors").is_file() \
        and _is_build_dir(path, follow_links=True)  # read, never replaced: a linked marker (the Hub's cache) counts


def named_weights(model: Any) -> dict[str, mx.array]:
    """{checkpoint name: array} of a LanguageModel or Program (node names; fused weights under their own names)."""
    program = getattr(model, "program", model)
    if not hasattr(program, "parameters") or not hasattr(program, "graph"):
        raise MadError(f"save: expected a model from mad.load or a mad.Program, got {type(model).__name__}")
    return program.parameters()


def tokenizer_entry(tokenizer: Any) -> tuple[Optional[str], Optional[str], list[int]]:
    """(mad.json's `tokenizer` value, tokenizer.json text or None, eos ids) for a tokenizer."""
    eos = [int(t) for t in getattr(tokenizer, "eos_token_ids", ()) or ()]
    if tokenizer is None:
        return None, None, []
    if getattr(tokenizer, "is_bytes", False):
        return "bytes", None, eos
    inner = getattr(tokenizer, "tok", None)
    if inner is not None and hasattr(inner, "to_str"):
        return "tokenizer.json", inner.to_str(), eos
    return None, None, eos  # a tokenizer MAD cannot write: the folder records none


def _link_or_copy(src: Path, dst: Path) -> None:
    """`dst` as a hard link of `src` (no copy: a corpus cache may be large), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_folder(out: str | Path, write: Callable[[Path], None], flag: str = "-o") -> Path:
    """Write a MAD checkpoint folder: `write(tmp)` fills it (see `report.write_mad_folder`)."""
    return write_mad_folder(out, write, flag, checkpoint=True)


def write_checkpoint(out: str | Path, model: Any, tokenizer: Any = None, *, extra: Optional[Mapping[str, Any]] = None,
                     links: Optional[Mapping[str, Path]] = None, info: Optional[dict] = None,
                     flag: str = "-o") -> Path:
    """Write the checkpoint folder of `model` (see the module docstring), atomically.

    `extra`: {relative path: str | bytes | callable(path)} more files (training state, metrics);
    `links`: {relative path: existing file} hard-linked (else copied) in (the corpus cache);
    `info`: more entries for mad.json.
    """
    program = getattr(model, "program", model)
    weights = named_weights(model)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None and getattr(model, "vocab_size", 1 << 30) <= 256:
        from .tokenizers import ByteTokenizer

        tokenizer = ByteTokenizer()  # what mad.load and mad run use for such a model
    kind, tok_json, eos = tokenizer_entry(tokenizer)
    meta = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "name": program.graph.name,
            "dtype": str(program.dtype).rsplit(".", 1)[-1], "tokenizer": kind, "eos_token_ids": eos,
            **(info or {})}
    if getattr(program, "quantization", None) is not None:
        meta["quantization"] = program.quantization  # what `mad.load` quantizes the modules by before loading
    source = getattr(model, "checkpoint_source", None)
    source_files: dict[str, bytes] = {}
    if source is not None and source.config_bytes:  # kept, so that a fine-tuned model can be saved back in it
        meta["source"] = {"format": source.format.name, "config": source.config_name}
        source_files = {f"{SOURCE_DIR}/{name}": data for name, data in source.companions.items()}
        source_files[f"{SOURCE_DIR}/{source.config_name}"] = source.config_bytes
        if source.weight_names is not None:
            source_files[f"{SOURCE_DIR}/{SOURCE_NAMES}"] = json.dumps(sorted(source.weight_names)).encode()
    resolved = program.graph.resolved.to_yaml()
    mx.eval(weights)

    def write(tmp: Path) -> None:
        (tmp / "resolved.yaml").write_text(resolved)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        if tok_json is not None:
            (tmp / "tokenizer.json").write_text(tok_json, encoding="utf-8")
        (tmp / MAD_JSON).write_text(json.dumps(meta, indent=1) + "\n")
        for name, data in source_files.items():
            (tmp / name).parent.mkdir(exist_ok=True)
            (tmp / name).write_bytes(data)
        for name, content in (extra or {}).items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if callable(content):
                content(target)
            elif isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content, encoding="utf-8")
        for name, src in (links or {}).items():
            _link_or_copy(Path(src), tmp / name)

    return write_folder(out, write, flag)


SAVE_FORMATS = ("mad", "source", "hf")


def source_of(model: Any, format: str = "source") -> Any:
    """The `CheckpointSource` of a model loaded from a checkpoint folder (see `mad.formats`); a MadError
    saying why when it has none, or when `format` is "hf" and the source is not a Hugging Face folder."""
    source = getattr(model, "checkpoint_source", None)
    if getattr(getattr(model, "program", model), "quantization", None) is not None:
        raise MadError(f"save: format={format!r}: the model is quantized, and its source format has no quantized "
                       "layout; save it with format='mad' (a MAD checkpoint records the quantization)")
    if source is None:
        raise MadError(f"save: format={format!r} writes a model in the format of the checkpoint it was loaded from, "
                       "but this model was not loaded from a checkpoint folder (a topology, a build or a MAD "
                       "checkpoint); save it with format='mad'")
    if format == "hf" and not source.is_hf:
        raise MadError(f"save: format='hf': the model was loaded from a {source.format.name} checkpoint "
                       f"({source.config_name}), not a Hugging Face folder; format='source' writes it in that "
                       "format")
    if source.format.unsanitize is None:
        raise MadError(f"save: the checkpoint format {source.format.name} cannot be written back (its format module "
                       "has a `sanitize` and no `unsanitize`)")
    if not source.config_bytes:
        raise MadError(f"save: the config file {source.config_name} of {source.folder} could not be read when the "
                       "model was loaded")
    return source


def source_weights(model: Any, source: Any) -> dict[str, mx.array]:
    """The model's weights under the source checkpoint's names and layouts (the format's `unsanitize`), in the
    model's dtype, checked to be arrays with unique names."""
    from .loading import _located

    weights = named_weights(model)
    unsanitize = source.format.unsanitize
    try:
        takes_names = "names" in inspect.signature(unsanitize).parameters
    except (TypeError, ValueError):
        takes_names = False
    with _located(source.folder / source.config_name):
        out = unsanitize(dict(weights), source.config, names=source.weight_names) if takes_names \
            else unsanitize(dict(weights), source.config)
    if not isinstance(out, dict) or not all(isinstance(k, str) and isinstance(v, mx.array) for k, v in out.items()):
        raise MadError(f"save: the {source.format.name} format's unsanitize did not return {{name: array}}")
    return out


def write_source_checkpoint(out: str | Path, model: Any, format: str = "source", flag: str = "save:") -> Path:
    """Write `model` in the format of the checkpoint folder it was loaded from: the config file as loaded
    (unchanged: a model's weights keep their shapes), model.safetensors under the checkpoint's names and
    layouts (the format's `unsanitize`) in the model's dtype, and the folder's tokenizer and generation files
    (`mad.formats.COMPANION_FILES`) as they were. Atomic, with the target rules of `save`; the folder gets
    MAD's marker, so that MAD may replace it later."""
    source = source_of(model, format)
    weights = source_weights(model, source)
    mx.eval(weights)
    metadata = {"format": "pt"} if source.is_hf else {}  # transformers reads only "pt"-tagged (or untagged) files

    def write(tmp: Path) -> None:
        (tmp / source.config_name).write_bytes(source.config_bytes)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata=metadata)
        for name, data in source.companions.items():
            if name != source.config_name:
                (tmp / name).write_bytes(data)

    return write_folder(out, write, flag)


def save(model: Any, path: str | Path, tokenizer: Any = None, *, format: str = "mad") -> Path:
    """Write `model` (from `mad.load`, or a `Program`) as a checkpoint folder that `mad.load(path)` reads.

    `format="mad"` (default): a MAD checkpoint folder: resolved.yaml, model.safetensors (node names),
    mad.json and the tokenizer (`tokenizer`, else the model's; a vocabulary of up to 256 ids without one
    records bytes).
    `format="source"`: for a model loaded from a checkpoint folder (HF `model_type: xlstm`, NX-AI, ...), that
    folder's format: its config file unchanged, model.safetensors under its names and layouts (fused
    projections re-fused, ...) in the model's dtype, its tokenizer and generation files; a fine-tuned
    xLSTM-7B written so still loads in transformers. `format="hf"`: the same, for a model from a Hugging
    Face folder only (an error for another source). `tokenizer` is not used by these (the source's files are).

    `path` must be absent, empty or a folder MAD wrote; the folder is written to a temp folder and swapped
    in (never half-written)."""
    if not isinstance(path, (str, os.PathLike)):
        raise MadError(f"save: path must be a folder name, got {type(path).__name__}")
    if not isinstance(format, str) or format not in SAVE_FORMATS:
        raise MadError(f"save: format must be one of {', '.join(map(repr, SAVE_FORMATS))}, got {format!r}")
    from .shard import sharding_of

    if sharding_of(model) is not None:
        raise MadError("save: this model is one member's part of a tensor-parallel model (mad.load(..., group=)); "
                       "save the model loaded in one process")
    if format == "mad":
        return write_checkpoint(path, model, tokenizer, flag="save:")
    return write_source_checkpoint(path, model, format, flag="save:")


__all__ = ["CHECKPOINT_FORMAT", "MAD_JSON", "SAVE_FORMATS", "is_mad_checkpoint", "named_weights", "save",
           "source_of", "source_weights", "write_checkpoint", "write_folder", "write_source_checkpoint"]
