"""Models on the Hugging Face Hub: `mad run org/name`, `--model org/name`, `mad.load("org/name")`.

A model reference that names an existing file or folder stays a path. Otherwise a repository id
(`org/name`) is fetched with `huggingface_hub.snapshot_download` into the Hugging Face cache, as mlx-lm
does: only the files MAD reads (`HUB_FILES`), at a pinned `revision` (branch, tag or commit sha; default
main), with huggingface_hub's progress bars; files already in the cache are not fetched again. The result
is the cache's snapshot folder (`<cache>/models--org--name/snapshots/<sha>/`), which `mad.load` reads as
any checkpoint folder.

The environment is read at each call, as the user set it last (huggingface_hub reads it once, at
import): the cache is `HF_HUB_CACHE`, else `HF_HOME/hub`, else huggingface_hub's default
(~/.cache/huggingface/hub); `HF_HUB_OFFLINE=1` uses the cache only, with no network access.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath
from typing import Any, Optional

from .errors import Diagnostic, MadError

# what MAD reads from a repository: configs and the tokenizer (*.json), the weights and their shard index
# (model*.safetensors, model.safetensors.index.json), NX-AI's config.yaml and a MAD checkpoint's
# resolved.yaml, and the tokenizer files a checkpoint carries along when it is saved in its own format
HUB_FILES = ("*.json", "model*.safetensors", "*.yaml", "*.yml", "*.txt", "*.model", "*.jinja")

# a missing topology file is a typo, not a repository: `mad run topologies/tny.yaml` never goes online
_FILE_SUFFIXES = (".yaml", ".yml")


def _is_true(value: Optional[str]) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def offline() -> bool:
    """Whether offline mode is on: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as the environment says now,
    else as huggingface_hub read it at import."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if value is not None:
        return _is_true(value)
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> str:
    """The Hugging Face cache folder as the environment names it now: HF_HUB_CACHE, else HF_HOME/hub, else
    the one huggingface_hub chose at import."""
    for name, sub in (("HF_HUB_CACHE", ""), ("HUGGINGFACE_HUB_CACHE", ""), ("HF_HOME", "hub")):
        value = os.environ.get(name)
        if value:
            folder = os.path.expandvars(os.path.expanduser(value))
            return os.path.join(folder, sub) if sub else folder
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def is_repo_id(ref: Any) -> bool:
    """Whether `ref` is read as a Hugging Face repository id: not an existing path, of the form `org/name`
    (huggingface_hub's own validator), and not a topology file name."""
    if not isinstance(ref, (str, os.PathLike)):
        return False
    text = PurePath(ref).as_posix() if isinstance(ref, PurePath) else os.fspath(ref)
    if not isinstance(text, str) or text.count("/") != 1 or text.lower().endswith(_FILE_SUFFIXES):
        return False
    if os.path.lexists(text):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def check_revision(revision: Any, flag: str = "revision") -> None:
    """A revision is None or a non-empty string (a branch, a tag or a commit sha)."""
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise MadError(f"{flag} must be a branch, a tag or a commit sha of a Hugging Face repository, got "
                       f"{revision!r}")


def resolve(ref: str | os.PathLike, revision: Optional[str] = None) -> Path:
    """The local path of a model reference: an existing file or folder as it is; a repository id
    (`org/name`) fetched into the Hugging Face cache (see `fetch`); anything else a MadError."""
    if not isinstance(ref, (str, os.PathLike)):
        raise MadError(f"a model is a file or folder name or a Hugging Face repository id, got {type(ref).__name__}")
    check_revision(revision)
    if is_repo_id(ref):
        text = PurePath(ref).as_posix() if isinstance(ref, PurePath) else os.fspath(ref)
        return fetch(text, revision)
    path = Path(ref)
    if not path.exists():
        raise MadError(f"no such file or folder: {path}")
    if revision is not None:
        raise MadError(f"a revision ({revision!r}) applies to Hugging Face repositories; {path} is a local "
                       f"{'folder' if path.is_dir() else 'file'}")
    return path


def fetch(repo_id: str, revision: Optional[str] = None) -> Path:
    """The snapshot folder of `repo_id` at `revision` in the Hugging Face cache, fetched (the files MAD
    reads, `HUB_FILES`) unless offline mode is on. Every failure is one MadError saying what to do."""
    from huggingface_hub import snapshot_download
    from huggingface_hub import utils as hf

    cache = cache_dir()
    is_offline = offline()
    at = f" (revision {revision})" if revision else ""
    get = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    private = "if it is private or gated, log in first (`hf auth login`, or set HF_TOKEN)"
    incomplete = getattr(hf, "IncompleteSnapshotError", ())  # huggingface_hub >= 1.x names this case
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=list(HUB_FILES),
                                   local_files_only=is_offline)
    except hf.RevisionNotFoundError:
        raise _error(f"{repo_id}: the Hugging Face repository has no revision {revision!r}",
                     "a revision is a branch, a tag or a commit sha of the repository") from None
    except hf.GatedRepoError:
        raise _error(f"{repo_id} is a gated Hugging Face repository: accept its conditions on "
                     f"https://huggingface.co/{repo_id}, then log in (`hf auth login`, or set HF_TOKEN)") from None
    except hf.RepositoryNotFoundError:
        raise _error(f"no such file or folder: {repo_id}, and no Hugging Face repository {repo_id}", private) from None
    except incomplete:
        raise _error(f"{repo_id}{at}: the copy in the Hugging Face cache ({cache}) is incomplete and the Hub cannot "
                     "be reached" + (" (offline mode is on: HF_HUB_OFFLINE=1)" if is_offline else ""),
                     f"fetch it again with network access: `{get}`") from None
    except hf.LocalEntryNotFoundError as e:
        if is_offline or isinstance(e.__cause__, hf.OfflineModeIsEnabled):
            raise _error(f"{repo_id}{at} is not in the Hugging Face cache ({cache}), and offline mode is on "
                         "(HF_HUB_OFFLINE=1)", f"fetch it once with network access: `{get}`, or run again without "
                         "HF_HUB_OFFLINE") from None
        raise _error(f"cannot fetch {repo_id}{at} from the Hugging Face Hub ({_cause(e.__cause__ or e)}), and it is "
                     f"not in the cache ({cache})", "check the network (or HF_ENDPOINT); offline mode "
                     "(HF_HUB_OFFLINE=1) loads models already in the cache") from None
    except hf.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise _error(f"{repo_id}: the Hugging Face Hub refused access ({status})", private) from None
        raise _error(f"{repo_id}{at}: the Hugging Face Hub answered with an error: {_cause(e)}",
                     "try again later; offline mode (HF_HUB_OFFLINE=1) loads models already in the cache") from None
    except OSError as e:
        raise _error(f"cannot fetch {repo_id}{at} into the Hugging Face cache ({cache}): {e.strerror or e}",
                     "HF_HUB_CACHE (or HF_HOME) chooses another cache folder") from None
    except Exception as e:  # noqa: BLE001 - network libraries raise their own kinds (proxies, TLS, ...)
        raise _error(f"cannot fetch {repo_id}{at} from the Hugging Face Hub: {_cause(e)}",
                     "check the network (or HF_ENDPOINT); offline mode (HF_HUB_OFFLINE=1) loads models already in "
                     "the cache") from None
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise _error(f"{repo_id}{at}: the repository holds none of the files MAD reads ({', '.join(HUB_FILES)})")
    return folder


def _error(message: str, *notes: str) -> MadError:
    return MadError([Diagnostic(message, None, [n for n in notes if n])])


def _cause(e: BaseException) -> str:
    """The first line of an exception's message (huggingface_hub's are paragraphs), with its kind."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


__all__ = ["HUB_FILES", "cache_dir", "check_revision", "fetch", "is_repo_id", "offline", "resolve"]
