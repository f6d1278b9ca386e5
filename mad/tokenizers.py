"""Tokenizers: bytes, a `tokenizer.json`, streaming detokenization, and a checkpoint folder's tokenizer.

Every checkpoint format reads its tokenizer the same way (`folder_tokenizer`): the folder's
`tokenizer.json` with the eos ids its config names (`eos_token_ids`), so that the rule is written once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import MadError, Source


class ByteTokenizer:
    """The default tokenizer: UTF-8 bytes, ids 0..255, no special tokens."""

    eos_token_ids: tuple[int, ...] = ()
    is_bytes = True

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizer.json` read with the `tokenizers` library; eos ids from the model config."""

    def __init__(self, path: str | Path, eos_token_ids: Sequence[int] = ()):
        from tokenizers import Tokenizer

        if not Path(path).is_file():
            raise MadError(f"no such tokenizer file: {path}", Source(str(path)))
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the library raises plain Exceptions
            raise MadError(f"cannot read tokenizer: {e}", Source(str(path))) from None
        bad = [t for t in eos_token_ids if not isinstance(t, int) or isinstance(t, bool) or t < 0]
        if bad:
            raise MadError(f"eos token ids must be integers >= 0, got {bad[0]!r}", Source(str(path)))
        self.eos_token_ids = tuple(eos_token_ids)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


class StreamingDetokenizer:
    """Emits text only once it is complete (no half UTF-8 characters), re-decoding a short window."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.offset = 0  # tokens before this are printed
        self.printed = ""  # text of tokens[offset:] already emitted

    def add(self, token: int) -> None:
        self.tokens.append(token)

    def pop(self) -> str:
        text = self.tokenizer.decode(self.tokens[self.offset:])
        if text.endswith("\ufffd"):
            return ""
        new = text[len(self.printed):]
        self.printed = text
        if len(self.tokens) - self.offset > 16 and text.endswith((" ", "\n")):
            self.offset, self.printed = len(self.tokens), ""
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.tokens[self.offset:])
        new = text[len(self.printed):]
        self.offset, self.printed = len(self.tokens), ""
        return new


# ----------------------------------------------------------------------------------------- checkpoint folders
def eos_token_ids(value: Any, key: str = "eos_token_id") -> list[int]:
    """A config's eos entry (one id, a list of ids, or None) as a list; anything else is a MadError naming `key`,
    so that a mistyped config fails at load rather than generating past its end."""
    ids = value if isinstance(value, list) else ([value] if value is not None else [])
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise MadError(f"'{key}' must be a token id or a list of them, got {value!r}")
    return ids


def folder_tokenizer(folder: Path, eos_ids: Sequence[int]) -> Optional[HFTokenizer]:
    """The folder's `tokenizer.json` with these eos ids, or None when the folder has none."""
    file = Path(folder) / "tokenizer.json"
    return HFTokenizer(file, eos_ids) if file.is_file() else None


def tokenizer_of(tokenizer: Any) -> Any:
    """What `mad.load(..., tokenizer=...)` accepts, as a tokenizer: None stays None (the checkpoint's own),
    "bytes" is `ByteTokenizer`, a path is a `tokenizer.json`, an object with `encode` is used as it is."""
    import os

    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    if str(tokenizer) == "bytes":
        return ByteTokenizer()
    return HFTokenizer(tokenizer)


__all__ = ["ByteTokenizer", "HFTokenizer", "StreamingDetokenizer", "eos_token_ids", "folder_tokenizer",
           "tokenizer_of"]
