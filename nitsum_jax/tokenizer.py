"""Tokenizers through the `tokenizers` library, plus the byte-level one the `tiny` model ships."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

TOKENIZER_FILE = "tokenizer.json"
BYTE_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>") + tuple(
    f"<|reserved_{i}|>" for i in range(5))


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table that byte-level BPE (GPT-2 style) uses."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_level_tokenizer() -> Tokenizer:
    """Token id == byte value for 0..255, then the specials (264 ids in all): any text round-trips."""
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(BYTE_SPECIALS))
    return tok


class TextTokenizer:
    """Text <-> token ids, with the model's BOS/EOS conventions."""

    def __init__(self, tokenizer: Tokenizer, bos_token_id: int | None, eos_token_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)

    @classmethod
    def from_dir(cls, directory: Path, bos_token_id: int | None, eos_token_ids: Sequence[int]) -> "TextTokenizer":
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        return cls(Tokenizer.from_file(str(path)), bos_token_id, eos_token_ids)

    @classmethod
    def byte_level(cls) -> "TextTokenizer":
        return cls(byte_level_tokenizer(), bos_token_id=256, eos_token_ids=(257,))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def stream(self) -> "TextDecoder":
        """An incremental decoder for one growing token list (O(1) work per token)."""
        return TextDecoder(self)

    def save(self, directory: Path) -> None:
        self.tokenizer.save(str(Path(directory) / TOKENIZER_FILE))


class TextDecoder:
    """The text of a growing token list, one token at a time, through `tokenizers`' DecodeStream
    (which holds back an unfinished UTF-8 character). Decoding the whole list again for every new
    token costs O(length) per token; at batch 32 that was the largest host cost of a decode step.
    Pieces are joined only when `text` is read; `tail` looks at the end without joining."""

    def __init__(self, tokenizer: TextTokenizer):
        self._tokenizer = tokenizer.tokenizer
        self._stream = decoders.DecodeStream(skip_special_tokens=True)
        self._parts: list[str] = []
        # `text` may be read (and the pieces joined) from another thread than the one adding
        # tokens, e.g. a request's `seq.text` while the engine streams it.
        self._lock = threading.Lock()

    def add(self, token: int) -> str:
        """Feed one token; returns the text it completed ("" while a character is unfinished)."""
        piece = self._stream.step(self._tokenizer, int(token)) or ""
        if piece:
            with self._lock:
                self._parts.append(piece)
        return piece

    @property
    def text(self) -> str:
        with self._lock:
            if len(self._parts) > 1:
                self._parts[:] = ["".join(self._parts)]
            return self._parts[0] if self._parts else ""

    def tail(self, n: int) -> str:
        """The last `n` characters (fewer if the text is shorter)."""
        out, size = [], 0
        with self._lock:
            for part in reversed(self._parts):
                out.append(part)
                size += len(part)
                if size >= n:
                    break
        return "".join(reversed(out))[-n:] if n > 0 else ""
