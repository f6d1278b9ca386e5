"""Reusing prompt prefixes, the recurrent way: state snapshots keyed by token prefixes.

A recurrent model holds everything it has read in a fixed-size state, so a prompt that starts like an
earlier one continues from a snapshot of the state after the shared part instead of reading it again (a
transformer would keep its whole KV cache for that). `PromptCache` keeps snapshots in memory, least
recently used first out, bounded by bytes (the server's). A prompt cache file (`mad run --prompt-cache`)
keeps one snapshot on disk, with the prefix it read and the model that read it.

Exactness: snapshots are taken only where the prompt is split into forward calls anyway
(`mad.generate.resume_points`: whole blocks of `PREFILL_BLOCK` tokens, and the cuts the caller names,
such as the end of a chat's system part), so a prompt continued from a snapshot goes through the same
calls, of the same shapes, as one read from the start: the same numbers, bit for bit. A snapshot is
therefore keyed by its tokens and by the cuts before it (the calls that made it), and serves a prompt
with the same tokens and cuts. The whole prompt is kept too (its state and last logits), for a prompt
asked again. Which points are kept: the last one of each prompt, its cuts, and the point where a prompt
leaves a prefix seen before (where the next prompt of that family will branch off too). With a cut at
the end of a long system part, a new question after it reads only the question.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .errors import MadError, Source

DEFAULT_BYTES = 4 << 30  # the server's default bound (`--prompt-cache-bytes`): about 30 xLSTM-7B states
SEEN_PREFIXES = 1 << 16  # block prefixes remembered for finding branch points (keys only, no states)


@dataclass(eq=False)
class _Entry:
    ids: tuple[int, ...]
    cuts: tuple[int, ...]  # the cuts before the end of `ids`: how the state was read
    state: dict
    logits: Optional[mx.array]  # (1, V) after the last token: only for a whole prompt
    nbytes: int


def state_nbytes(state: dict) -> int:
    """Bytes of a state's arrays."""
    return sum(a.nbytes for entries in state.values() for a in entries.values())


class PromptCache:
    """State snapshots keyed by token prefixes; least recently used out first, at most `max_bytes`.

    `lookup(ids, cuts)` gives the longest usable prefix: the whole prompt (state and last logits), else
    the longest prefix ending at a resume point with at least one token left to read. `plan(ids, start,
    cuts)` names the points to keep while a prompt is read; `add(ids, state, logits, cuts)` keeps one.
    Keys are (length, hash, cuts before the end) and every hit compares the token ids, so a hash
    collision can only cost a miss.
    """

    def __init__(self, max_bytes: int = DEFAULT_BYTES, block: Optional[int] = None):
        from .generate import PREFILL_BLOCK

        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise MadError(f"the prompt cache size must be a number of bytes >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.block = PREFILL_BLOCK if block is None else block
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.nbytes = 0
        self._seen: OrderedDict[tuple[int, int], None] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.entries)

    def _hashes(self, ids: Sequence[int]) -> list[int]:
        """h[k]: the key hash of ids[:k * block], chained block by block (linear in the prompt's length)."""
        b, h = self.block, [0]
        for k in range(len(ids) // b):
            h.append(hash((h[-1], tuple(ids[k * b:(k + 1) * b]))))
        return h

    def _key(self, ids: Sequence[int], hashes: list[int], cuts: Sequence[int] = ()) -> tuple:
        """(length, hash of the ids, the cuts before the end): `hashes` are those of a prompt `ids` begins."""
        n, k = len(ids), len(ids) // self.block
        digest = hashes[k] if n % self.block == 0 else hash((hashes[k], tuple(ids[k * self.block:n])))
        return (n, digest, tuple(c for c in cuts if c < n))

    def _get(self, key: tuple, ids: Sequence[int]) -> Optional[_Entry]:
        entry = self.entries.get(key)
        if entry is None or entry.ids != tuple(ids):
            return None
        self.entries.move_to_end(key)
        return entry

    def lookup(self, ids: Sequence[int], cuts: Sequence[int] = ()) -> tuple[int, Optional[dict], Optional[mx.array]]:
        """(tokens covered, state, logits or None): the longest cached prefix of `ids`, read with `cuts`
        (`mad.generate.next_prompt_end`); (0, None, None) when there is none."""
        from .generate import resume_points

        hashes = self._hashes(ids)
        whole = self._get(self._key(ids, hashes, cuts), ids)
        if whole is not None and whole.logits is not None:
            self.hits += 1
            return len(ids), whole.state, whole.logits
        for p in reversed(resume_points(len(ids), cuts, self.block)):
            entry = self._get(self._key(ids[:p], hashes, cuts), ids[:p])
            if entry is not None:
                self.hits += 1
                return p, entry.state, None
        self.misses += 1
        return 0, None, None

    def plan(self, ids: Sequence[int], start: int = 0, cuts: Sequence[int] = ()) -> set[int]:
        """Resume points after `start` and before the end of `ids` worth a snapshot while reading it: the
        last one, the cuts, and the last one before `ids` leaves the longest prefix seen before. (The state
        after the whole prompt is kept by the reader anyway: `add` with its logits.)"""
        from .generate import resume_points

        b, n = self.block, len(ids)
        hashes = self._hashes(ids)
        resumable = resume_points(n, cuts, b)
        points = set(resumable[-1:]) | {c for c in cuts if 0 < c < n}
        for k in range(len(hashes) - 1, 0, -1):
            if (k, hashes[k]) in self._seen:
                points |= {max((p for p in resumable if p <= k * b), default=0)}
                break
        for k in range(1, len(hashes)):
            self._seen[(k, hashes[k])] = None
            self._seen.move_to_end((k, hashes[k]))
        while len(self._seen) > SEEN_PREFIXES:
            self._seen.popitem(last=False)
        return {p for p in points if start < p < n}

    def add(self, ids: Sequence[int], state: dict, logits: Optional[mx.array] = None, cuts: Sequence[int] = ()) -> None:
        """Keep `state` (batch 1), which has read `ids` from the start with `cuts`; `logits` after the last
        of them for a whole prompt. Older entries leave until the bytes fit; one larger than the bound is
        not kept."""
        key = self._key(ids, self._hashes(ids), cuts)
        old = self.entries.get(key)
        if old is not None and old.ids == tuple(ids) and (old.logits is not None or logits is None):
            self.entries.move_to_end(key)
            return
        nbytes = state_nbytes(state) + (logits.nbytes if logits is not None else 0) + 8 * len(ids)
        if nbytes > self.max_bytes:
            return
        if old is not None:
            self.nbytes -= self.entries.pop(key).nbytes
        self.entries[key] = _Entry(tuple(ids), key[2], state, logits, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            self.nbytes -= self.entries.popitem(last=False)[1].nbytes


# ------------------------------------------------------------------------------------------ cache files
CACHE_KIND = "prompt-cache"  # the `kind` in a prompt cache file's metadata (a MAD state file besides)
MAX_HEADER_BYTES = 64 << 20  # a header holding 4M token ids; a bound on what is read, not a format rule


def model_fingerprint(model: Any) -> str:
    """A short hash naming a model's weights: names, shapes, dtypes and a few values of every tensor (a few
    milliseconds even for 7B weights; a fine-tune or another dtype changes it)."""
    digest = hashlib.sha256()
    samples = []
    for name, a in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        digest.update(f"{name}:{tuple(a.shape)}:{a.dtype};".encode())
        flat = a.reshape(-1)
        samples.append(mx.concatenate([flat[:4], flat[flat.size // 2:flat.size // 2 + 4], flat[-4:]]).astype(mx.float32))
    if samples:
        digest.update(np.array(mx.concatenate(samples)).tobytes())
    return digest.hexdigest()[:16]


def _read_header(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= MAX_HEADER_BYTES:
                raise ValueError("bad header size")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as e:
        raise MadError(f"cannot read the prompt cache file (not a MAD state file?): {e}", Source(str(path))) from None
    return header.get("__metadata__") or {} if isinstance(header, dict) else {}


def read_cache_file(path: str | Path, model: Any, flag: str = "--prompt-cache") -> Optional[tuple[list[int], dict]]:
    """(prefix ids, state) from a prompt cache file written for this model; None when there is no file.

    A file that is not a MAD state file, a state file without a recorded prompt (`--save-state`), one
    written by another model or with another prompt block is a MadError naming it (nothing is replaced).
    """
    from .generate import PREFILL_BLOCK
    from .loading import STATE_FORMAT, load_state_file

    path = Path(path)
    if not path.exists():
        return None
    if path.is_dir():
        raise MadError(f"{flag} {path}: is a folder; give a file name")
    if path.stat().st_size == 0:
        return None  # an empty file: nothing cached yet (the target is checked before it is written)
    meta = _read_header(path)
    if meta.get("format") != STATE_FORMAT:
        raise MadError(f"{flag} {path}: the file exists and is not a MAD state file; MAD replaces only its own "
                       "files (give another name, or remove it first)")
    if meta.get("kind") != CACHE_KIND:
        raise MadError(f"{flag} {path}: a MAD state file without a recorded prompt (written by --save-state?), "
                       "not a prompt cache; give another name")
    if meta.get("model") != model_fingerprint(model):
        raise MadError(f"{flag} {path}: made by another model ({meta.get('model_name', '?')}, weights "
                       f"{meta.get('model', '?')}; this one: {model_fingerprint(model)}); give another file "
                       "name or remove it")
    if meta.get("block") != str(PREFILL_BLOCK):
        raise MadError(f"{flag} {path}: written with prompt blocks of {meta.get('block')} tokens, this MAD reads "
                       f"prompts in blocks of {PREFILL_BLOCK}; remove it to cache anew")
    try:
        ids = json.loads(meta.get("prompt_ids", ""))
        assert isinstance(ids, list) and ids and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
    except (ValueError, AssertionError):
        raise MadError(f"{flag} {path}: the recorded prompt is not a list of token ids", Source(str(path))) from None
    return ids, load_state_file(path, model)


def write_cache_file(path: str | Path, ids: Sequence[int], state: dict, model: Any, model_name: str = "",
                     flag: str = "--prompt-cache") -> None:
    """Write a prompt cache file: a MAD state file (`--load-state` reads it too) whose metadata records the
    prefix it read, the model's fingerprint and the prompt block; atomically, never over a user's file."""
    from .generate import PREFILL_BLOCK
    from .loading import STATE_FORMAT, check_state_target
    from .report import write_atomic_file

    check_state_target(path, flag)
    flat = {f"{node}/{name}": a for node, entries in state.items() for name, a in entries.items()}
    mx.eval(flat)
    meta = {"format": STATE_FORMAT, "kind": CACHE_KIND, "model": model_fingerprint(model), "model_name": model_name,
            "block": str(PREFILL_BLOCK), "prompt_ids": json.dumps([int(t) for t in ids])}
    write_atomic_file(path, lambda tmp: mx.save_safetensors(tmp, flat, metadata=meta), suffix=".safetensors",
                      flag=flag)


__all__ = ["DEFAULT_BYTES", "PromptCache", "model_fingerprint", "read_cache_file", "state_nbytes",
           "write_cache_file"]
