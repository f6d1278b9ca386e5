"""Training data for `mad train`: a corpus tokenised once into a memory-mapped token file, and its batches.

`--data` is a text file, a folder of text files (every non-hidden file below it, by sorted path; `.jsonl`
files among them are read as JSONL), or a JSONL file whose lines are objects with a `text` string. Text
must be UTF-8. Documents are tokenised with the model's tokenizer (bytes by default), in pieces of about
1 MiB cut at line ends, and appended to `tokens.bin` (uint16 ids, or uint32 for vocabularies above 65,536):
the corpus is never held in memory. `tokens.json` records what was read (paths, sizes, modification
times, the tokenizer), so that a later run with the same data reuses the file.

The last 5% of the tokens (at least one sequence, when the corpus has room for two) are held out for
evaluation. Training reads the rest as non-overlapping windows of `seq + 1` tokens, in an order shuffled
per epoch from the seed: batch `k` is a function of (seed, k) alone, so a resumed run reads what the
uninterrupted run would have read.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from .errors import MadError, Source

HELD_OUT = 0.05
PIECE_BYTES = 1 << 20
TOKENS_FILE = "tokens.bin"
META_FILE = "tokens.json"
CACHE_VERSION = 1


# ----------------------------------------------------------------------------------------- sources
def data_files(path: Path) -> list[Path]:
    """The files `--data` names, in reading order; a MadError for a missing path or an empty folder."""
    path = Path(path)
    if not path.exists():
        raise MadError(f"--data {path}: no such file or folder")
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise MadError(f"--data {path}: not a file or folder")
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise MadError(f"--data {path}: the folder holds no files (hidden files are skipped)")
    return files


def _decode_error(file: Path, offset: int, byte: int) -> MadError:
    return MadError(f"not UTF-8 text (byte {byte:#04x} at offset {offset}); MAD trains on UTF-8 text: convert the "
                    "file (e.g. iconv -t UTF-8)", Source(str(file)))


def _text_pieces(file: Path) -> Iterator[str]:
    """A text file as pieces of about PIECE_BYTES, each ending at a line end (or the file's end), decoded
    strictly as UTF-8 (a byte-order mark at the start is dropped)."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    carry = ""
    with open(file, "rb") as f:
        first = True
        while True:
            chunk = f.read(PIECE_BYTES)
            if first and chunk.startswith(codecs.BOM_UTF8):
                chunk, offset = chunk[3:], 3
            first = False
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                pending = len(getattr(decoder, "buffer", b"") or b"")
                raise _decode_error(file, offset - pending + e.start, e.object[e.start]) from None
            offset += len(chunk)
            text = carry + text
            if not chunk:
                if text:
                    yield text
                return
            cut = text.rfind("\n") + 1
            if cut == 0 and len(text) < 4 * PIECE_BYTES:
                carry = text
                continue
            cut = cut or len(text)
            yield text[:cut]
            carry = text[cut:]


def _jsonl_texts(file: Path) -> Iterator[str]:
    """The `text` of each line of a JSONL file (blank lines skipped); a MadError at file:line otherwise."""
    with open(file, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise MadError(f"line {n} is not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})",
                               Source(str(file), n, e.start + 1)) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise MadError(f"line {n} is not JSON: {e}", Source(str(file), n, 1)) from None
            if not isinstance(record, dict) or "text" not in record:
                raise MadError(f"line {n} has no \"text\" field (each line must be an object with a \"text\" string)",
                               Source(str(file), n, 1))
            if not isinstance(record["text"], str):
                raise MadError(f"line {n}: \"text\" must be a string, got {type(record['text']).__name__}",
                               Source(str(file), n, 1))
            yield record["text"]


def _is_jsonl(file: Path) -> bool:
    return file.suffix.lower() in (".jsonl", ".ndjson")


# ----------------------------------------------------------------------------------------- tokenising
def tokenizer_id(tokenizer: Any) -> str:
    """What identifies a tokenizer for the cache: 'bytes', or the sha256 of its tokenizer.json."""
    if getattr(tokenizer, "is_bytes", False):
        return "bytes"
    inner = getattr(tokenizer, "tok", None)
    if inner is not None and hasattr(inner, "to_str"):
        return "sha256:" + hashlib.sha256(inner.to_str().encode()).hexdigest()
    return f"object:{type(tokenizer).__module__}.{type(tokenizer).__qualname__}"


def corpus_key(files: list[Path], tokenizer: Any, vocab_size: int) -> dict:
    entries = []
    for f in files:
        st = f.stat()
        entries.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return {"version": CACHE_VERSION, "files": entries, "tokenizer": tokenizer_id(tokenizer), "vocab_size": vocab_size}


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _encode(tokenizer: Any, text: str) -> np.ndarray:
    if getattr(tokenizer, "is_bytes", False):
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def tokenise(files: list[Path], tokenizer: Any, vocab_size: int, folder: Path) -> dict:
    """Write `folder/tokens.bin` (every file's tokens, one after another) and `folder/tokens.json`; returns
    the metadata. Documents are separated by the tokenizer's first eos id, when it has one."""
    dtype = token_dtype(vocab_size)
    eos = list(getattr(tokenizer, "eos_token_ids", ()) or ())
    sep = np.asarray(eos[:1], dtype=dtype)
    count = 0
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / TOKENS_FILE, "wb") as out:
        for file in files:
            pieces = _jsonl_texts(file) if _is_jsonl(file) else _text_pieces(file)
            for n, text in enumerate(pieces):
                ids = _encode(tokenizer, text)
                if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                    bad = int(ids.max() if ids.max() >= vocab_size else ids.min())
                    raise MadError(f"the tokenizer gives id {bad}, outside the model's vocabulary (0..{vocab_size - 1})",
                                   Source(str(file)))
                ids.astype(dtype).tofile(out)
                count += int(ids.size)
                if _is_jsonl(file) and sep.size:
                    sep.tofile(out)
                    count += 1
            if not _is_jsonl(file) and sep.size:
                sep.tofile(out)
                count += 1
    meta = {"key": corpus_key(files, tokenizer, vocab_size), "tokens": count, "dtype": dtype.name}
    (folder / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def cached_meta(folder: Path, key: dict) -> Optional[dict]:
    """The metadata of a token file in `folder` made from the same data and tokenizer, else None."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
        size = (folder / TOKENS_FILE).stat().st_size
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("key") != key:
        return None
    try:
        if size != int(meta["tokens"]) * np.dtype(meta["dtype"]).itemsize:
            return None
    except (KeyError, TypeError, ValueError):
        return None
    return meta


# ----------------------------------------------------------------------------------------- batches
@dataclass
class Corpus:
    """A tokenised corpus (memory-mapped), split into training and held-out tokens, read in windows of
    `seq + 1` tokens."""

    folder: Path
    tokens: np.ndarray  # memmap of all tokens
    n_train: int
    seq: int
    seed: int

    @property
    def train(self) -> np.ndarray:
        return self.tokens[:self.n_train]

    @property
    def held(self) -> np.ndarray:
        return self.tokens[self.n_train:]

    @property
    def windows(self) -> int:
        """Training windows per epoch: non-overlapping runs of seq inputs, each with its next-token targets."""
        return (self.n_train - 1) // self.seq

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.windows)

    def position(self, step: int, batch: int) -> dict:
        """Where batch `step` starts: epoch and window index within it (for training/state.json)."""
        start = step * batch
        return {"epoch": start // self.windows, "index": start % self.windows, "windows": self.windows,
                "tokens_read": start * self.seq}

    def batch(self, step: int, batch: int) -> np.ndarray:
        """The (batch, seq + 1) int32 windows of training step `step` (0-based)."""
        w = self.windows
        start = step * batch
        rows = []
        epoch, order = None, None
        for g in range(start, start + batch):
            e, i = divmod(g, w)
            if e != epoch:
                epoch, order = e, self._order(e)
            o = int(order[i]) * self.seq
            rows.append(self.train[o:o + self.seq + 1])
        return np.stack(rows).astype(np.int32)

    def eval_batches(self, batch: int, max_windows: int) -> list[np.ndarray]:
        """The held-out windows (at most `max_windows`, in order) as batches of up to `batch` rows."""
        held = self.held
        n = min((len(held) - 1) // self.seq if len(held) > 1 else 0, max_windows)
        return list(iter_windows(held, self.seq, batch, n))


def iter_windows(tokens: np.ndarray, seq: int, batch: int, count: int) -> Iterator[np.ndarray]:
    """The first `count` windows `tokens[k * seq : k * seq + seq + 1]` (k = 0, 1, ...: each window's last
    token is the next one's first) as int32 batches of up to `batch` rows, each read from `tokens` (a
    memmap) only when it is needed."""
    for first in range(0, count, batch):
        rows = min(batch, count - first)
        span = tokens[first * seq:(first + rows) * seq + 1]
        yield np.lib.stride_tricks.sliding_window_view(span, seq + 1)[::seq].astype(np.int32)


def open_corpus(folder: Path, meta: dict, seq: int, seed: int, where: str) -> Corpus:
    """Memory-map `folder/tokens.bin` and split it: the last 5% held out (at least seq + 1 tokens when the
    corpus has room for a training and a held-out sequence; none otherwise). A corpus shorter than one
    training sequence is a MadError."""
    total = int(meta["tokens"])
    if total == 0:
        raise MadError(f"--data {where}: the corpus is empty (no tokens)")
    if total < seq + 1:
        raise MadError(f"--data {where}: the corpus has {total:,} tokens, shorter than one training sequence "
                       f"(--seq {seq} needs {seq + 1} tokens: {seq} inputs and their next-token targets); give "
                       "more text or a smaller --seq")
    tokens = np.memmap(folder / TOKENS_FILE, dtype=np.dtype(meta["dtype"]), mode="r", shape=(total,))
    held = max(int(total * HELD_OUT), seq + 1)
    if total - held < seq + 1:
        held = 0  # room for training only: no held-out part
    return Corpus(folder, tokens, total - held, seq, seed)


__all__ = ["Corpus", "cached_meta", "corpus_key", "data_files", "open_corpus", "tokenise", "token_dtype"]
