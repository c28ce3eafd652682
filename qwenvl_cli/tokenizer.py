"""The Qwen tokenizer read from a checkpoint's tokenizer.json (the `tokenizers` library), with its special
ids checked against the ids Qwen2.5-VL uses, and an incremental detokeniser for streaming that never emits
half a character."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from qwenvl_cli import config as ids
from qwenvl_cli.errors import ModelError

# tokenizer.json is read whole into memory (Qwen2.5-VL's is 7 MB); a larger file is not a tokenizer.
MAX_TOKENIZER_BYTES = 64 << 20

# The added tokens every Qwen2.5-VL tokenizer must carry, at these ids.
SPECIAL_TOKENS = {
    "<|endoftext|>": ids.ENDOFTEXT_ID,
    "<|im_start|>": ids.IM_START_ID,
    "<|im_end|>": ids.IM_END_ID,
    "<|vision_start|>": ids.VISION_START_ID,
    "<|vision_end|>": ids.VISION_END_ID,
    "<|image_pad|>": ids.IMAGE_PAD_ID,
    "<|video_pad|>": ids.VIDEO_PAD_ID,
}


class Tokenizer:
    """Text <-> ids. Build it with `Tokenizer.from_dir(checkpoint_dir)`."""

    def __init__(self, backend, path: Path) -> None:
        self._tok = backend
        self.path = Path(path)
        added = {token.content: token_id for token_id, token in backend.get_added_tokens_decoder().items()}
        for text, expected in SPECIAL_TOKENS.items():
            found = added.get(text)
            if found != expected:
                where = "is not an added token" if found is None else f"has id {found}"
                raise ModelError(f"{self.path}: special token {text} {where}; Qwen2.5-VL needs id {expected}")
        # Ids the tokenizer can decode; the embedding matrix is larger (151936 or 152064 rows of padding).
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        from tokenizers import Tokenizer as Backend

        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise ModelError(f"{file}: tokenizer file not found")
        try:
            size = file.stat().st_size
        except OSError as exc:
            raise ModelError(f"{file}: cannot read ({exc.strerror or exc})") from exc
        if size > MAX_TOKENIZER_BYTES:
            raise ModelError(
                f"{file}: {size:,} bytes, larger than a tokenizer ({MAX_TOKENIZER_BYTES >> 20} MiB at most)"
            )
        try:
            backend = Backend.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelError(f"{file}: cannot load tokenizer ({reason})") from exc
        return cls(backend, file)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included (151665 for Qwen2.5-VL)."""
        return self._vocab_size

    @property
    def endoftext_id(self) -> int:
        return ids.ENDOFTEXT_ID  # also the pad token

    @property
    def im_start_id(self) -> int:
        return ids.IM_START_ID

    @property
    def im_end_id(self) -> int:
        return ids.IM_END_ID  # the end of a chat turn: the instruct models' EOS

    @property
    def vision_start_id(self) -> int:
        return ids.VISION_START_ID

    @property
    def vision_end_id(self) -> int:
        return ids.VISION_END_ID

    @property
    def image_pad_id(self) -> int:
        return ids.IMAGE_PAD_ID

    @property
    def video_pad_id(self) -> int:
        return ids.VIDEO_PAD_ID

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no BOS; special tokens written in it (`<|im_start|>`) map to their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        # Ids outside the tokenizer (a random or padded embedding row can be sampled) decode to nothing.
        valid = [t for t in token_ids if 0 <= t < self._vocab_size]
        return self._tok.decode(valid, skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Feed generated ids one at a time; get back the text each completes, special tokens skipped.

    Each step decodes a short window, the last emitted piece's ids plus the pending ones, and returns what
    the pending ids add, so a decoder that treats a sequence's first token specially still joins pieces
    right. Holds text back while it ends in U+FFFD: a character whose bytes span tokens still to come.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._ids: list[int] = []  # the last emitted piece's ids, then the pending ids
        self._read = 0  # how many of _ids are already emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._pending_text()
        if not text or text.endswith("\ufffd"):
            return ""
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        return text

    def flush(self) -> str:
        """Whatever is held back (an incomplete character comes out as U+FFFD); call once at the end."""
        text = self._pending_text()
        self._ids, self._read = [], 0
        return text

    def _pending_text(self) -> str:
        decode = self.tokenizer.decode
        return decode(self._ids)[len(decode(self._ids[: self._read])) :]
