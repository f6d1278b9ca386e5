"""Checkpoint formats: one module per model family, found by convention (as mlx-lm finds `models/<model_type>.py`).

A format module `mad/formats/<name>.py` defines, at module level:

    NAME: str                                   the family, as messages name it
    CONFIG_FILES: tuple[str, ...]               config files it reads, in order (optional; default config.json)
    detect(config) -> bool                      whether it reads a config that has no `model_type` of its own
    topology(config) -> (Path, [str])           the shipped topology file and the `--set` overrides for this model
    sanitize(weights, config) -> weights        checkpoint names -> node names (optional; default: unchanged)
    unsanitize(weights, config[, names]) -> weights
                                                node names -> checkpoint names and layouts, the inverse of
                                                `sanitize` (what `mad.save(model, DIR, format="source")` writes;
                                                `names`, when it takes them: the source checkpoint's tensor
                                                names, a hint where the config alone is ambiguous; optional:
                                                without a `sanitize` the names are unchanged, with one and no
                                                `unsanitize` the family cannot be written back)
    eos_token_ids(config) -> [int]              the config's eos ids, checked
    tokenizer(folder, config) -> tok or None    optional; default: the folder's tokenizer.json with those eos ids

A config whose `model_type` is X is read by `mad.formats.X` when that module exists (the name is the
convention, so adding a family adds one file here and nothing else). A config without one (NX-AI's
`config.yaml`) is offered to each module's `detect`, in name order. A family that lives outside MAD (a
plugin) passes a `CheckpointFormat` to `register_format`; it is asked after the shipped ones.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

from ..tokenizers import folder_tokenizer


def _unchanged(weights: dict, config: dict) -> dict:
    return weights


@dataclass
class CheckpointFormat:
    """How to read one family's checkpoint folders (the module-level names above, gathered)."""

    name: str
    detect: Callable[[dict], bool]
    topology: Callable[[dict], tuple[Path, list[str]]]
    eos_token_ids: Callable[[dict], list[int]] = lambda config: []
    sanitize: Callable[[dict, dict], dict] = _unchanged
    tokenizer: Optional[Callable[[Path, dict], Any]] = None
    config_files: tuple[str, ...] = ("config.json",)
    unsanitize: Optional[Callable[[dict, dict], dict]] = None

    def __post_init__(self) -> None:
        if self.unsanitize is None and self.sanitize is _unchanged:
            self.unsanitize = _unchanged  # names never changed: written back as they are
        if self.tokenizer is None:  # the shared rule: tokenizer.json with the config's eos ids
            eos = self.eos_token_ids
            self.tokenizer = lambda folder, config: folder_tokenizer(folder, eos(config))

    @classmethod
    def from_module(cls, module: ModuleType) -> "CheckpointFormat":
        return cls(name=module.NAME, detect=module.detect, topology=module.topology,
                   eos_token_ids=module.eos_token_ids, sanitize=getattr(module, "sanitize", _unchanged),
                   unsanitize=getattr(module, "unsanitize", None),
                   tokenizer=getattr(module, "tokenizer", None),
                   config_files=tuple(getattr(module, "CONFIG_FILES", ("config.json",))))


# the files of a checkpoint folder beside its config and weights that travel with it when a model is written
# back in its own format (tokenizer and generation settings), copied unchanged when the source folder has them
COMPANION_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
                   "chat_template.json")


@dataclass
class CheckpointSource:
    """Where a model loaded from a checkpoint folder came from: what writing it back in its own format needs
    (`mad.save(model, DIR, format="source")`). Set by `load_checkpoint` as `model.checkpoint_source`."""

    format: CheckpointFormat
    config: dict                  # the config as read (references unresolved: the formats resolve them)
    config_name: str              # its file name in the folder (config.json, config.yaml, ...)
    config_bytes: bytes           # the file as it was when loaded, written back unchanged
    folder: Path                  # the source folder (companion files are copied from it when saving)
    companions: dict[str, bytes] = field(default_factory=dict)  # COMPANION_FILES present at load time
    weight_names: Optional[frozenset] = None  # the tensor names of the source checkpoint (before `sanitize`)

    @property
    def is_hf(self) -> bool:
        """A Hugging Face folder (config.json with a `model_type`), which transformers reads."""
        return self.config_name == "config.json" and isinstance(self.config.get("model_type"), str)


_REGISTERED: list[CheckpointFormat] = []
_LOADED: dict[str, CheckpointFormat] = {}


def shipped_topology(file: str) -> Path:
    """A topology file shipped with MAD (`mad.topologies`), which a format names for its family."""
    from ..errors import MadError
    from ..topology import shipped_topologies

    folder = shipped_topologies()
    if folder is None or not (folder / file).is_file():
        raise MadError(f"the shipped topology {file} is not installed (no mad.topologies folder holds it)")
    return folder / file


def register_format(fmt: CheckpointFormat) -> CheckpointFormat:
    """Add a format defined outside `mad.formats` (asked by `detect` after the shipped ones)."""
    _REGISTERED.append(fmt)
    return fmt


def module_names() -> list[str]:
    """The format modules shipped in this package, in name order (helpers start with `_`)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_") and not m.ispkg)


def format_named(name: str) -> Optional[CheckpointFormat]:
    """The format of module `mad.formats.<name>`, or None when there is no such module."""
    if not isinstance(name, str) or name not in module_names():
        return None  # only the package's own modules: a config's text never picks what is imported
    if name not in _LOADED:
        _LOADED[name] = CheckpointFormat.from_module(importlib.import_module(f"{__name__}.{name}"))
    return _LOADED[name]


def all_formats() -> list[CheckpointFormat]:
    """Every format: the shipped modules (name order), then the registered ones."""
    return [format_named(n) for n in module_names()] + list(_REGISTERED)


def config_files() -> list[str]:
    """The config file names any format reads, config.json first."""
    return list(dict.fromkeys(["config.json"] + [n for f in all_formats() for n in f.config_files]))


def find_format(config: dict) -> Optional[CheckpointFormat]:
    """The format that reads `config`: the module its `model_type` names, else the first whose `detect` agrees."""
    model_type = config.get("model_type")
    if isinstance(model_type, str):
        fmt = format_named(model_type.replace("-", "_"))
        if fmt is not None:
            return fmt
    for fmt in all_formats():
        try:
            if fmt.detect(config):
                return fmt
        except Exception:  # noqa: BLE001 - a detector meeting a config of odd types: it does not read it
            continue
    return None


__all__ = ["COMPANION_FILES", "CheckpointFormat", "CheckpointSource", "all_formats", "config_files", "find_format",
           "format_named", "module_names",
           "register_format",
           "shipped_topology"]
