"""The Qwen tokenizer from tokenizer.json (the `tokenizers` library) and an incremental detokeniser that
never splits a multi-byte character while streaming."""

from __future__ import annotations

from pathlib import Path

from qwenvl_cli import config as ids
from qwenvl_cli.errors import ModelError

SPECIAL = {
    "<|endoftext|>": ids.ENDOFTEXT_ID,
    "<|im_start|>": ids.IM_START_ID,
    "<|im_end|>": ids.IM_END_ID,
    "<|vision_start|>": ids.VISION_START_ID,
    "<|vision_end|>": ids.VISION_END_ID,
    "<|image_pad|>": ids.IMAGE_PAD_ID,
    "<|video_pad|>": ids.VIDEO_PAD_ID,
}


class Tokenizer:
    def __init__(self, backend, path: Path) -> None:
        self._tok = backend
        self.path = path
        for text, expected in SPECIAL.items():
            found = backend.token_to_id(text)
            if found != expected:
                raise ModelError(f"{path}: special token {text} has id {found}, Qwen2.5-VL needs {expected}")
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        from tokenizers import Tokenizer as Backend

        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise ModelError(f"{file}: tokenizer file not found")
        try:
            backend = Backend.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise ModelError(f"{file}: cannot load tokenizer ({str(exc).splitlines()[0] if str(exc) else exc})") from None
        return cls(backend, file)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in it (`<|im_start|>`) map to their ids; no BOS."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        # Ids past the tokenizer's vocabulary (the embedding matrix is padded) decode to nothing.
        valid = [t for t in token_ids if 0 <= t < self.vocab_size]
        return self._tok.decode(valid, skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Feed token ids one at a time; get back text as soon as it is complete. Holds back while the decoded
    tail ends in U+FFFD (a character whose bytes span tokens still to come)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters of decode(ids) already returned

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        return self._take(text)

    def flush(self) -> str:
        return self._take(self.tokenizer.decode(self.ids))

    def _take(self, text: str) -> str:
        piece = text[self.emitted :]
        self.emitted = len(text)
        # Restart the window at a clean boundary so decoding stays O(tokens since last emit).
        self.ids, self.emitted = [], 0
        return piece
