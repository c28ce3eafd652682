"""Constrained decoding: which token ids may come next so that the answer is JSON valid against a schema,
bare or in a ```json fence (or matches a Lark grammar, `from_lark`), ended by <|im_end|>. Grammar engine: llguidance (chosen by measurement,
see benchmarks/bench_constrain.py), driven by the checkpoint's tokenizer.json; transformers is never needed.

A random or confused model can still write a string until max_new_tokens runs out: the answer then ends
with finish_reason "length" and holds a JSON prefix, which the task layer has to treat as truncated.
"""

from __future__ import annotations

import copy
import json
import re
import weakref

import llguidance
import numpy as np
import torch

from qwenvl_cli.errors import ModelError, UsageError
from qwenvl_cli.tokenizer import Tokenizer

# Whitespace between JSON tokens: nothing, one space, or a newline and an indent of up to 3 tabs or 12 spaces
# (the styles the models write: `[\n\t{"bbox_2d": [..], ...}\n]`, json.dumps(indent=4)), so that whitespace
# runs are bounded and a model cannot loop in them.
WHITESPACE = r"(\x20|\n(\t{1,3}|\x20{1,12})?)?"
JSON_OPTIONS = {"whitespace_flexible": False, "whitespace_pattern": WHITESPACE, "lenient": False}
FENCE_OPEN = "```json\n"
FENCE_CLOSE = "\n```"

# Building an LLTokenizer from tokenizer.json takes ~0.7 s (it walks the whole vocabulary): once per Tokenizer.
_LL_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ConstraintViolation(RuntimeError):
    """A token the constraint did not allow was fed to it: a bug in the caller's masking, not a user error."""


def _ll_tokenizer(tokenizer: Tokenizer):
    cached = _LL_TOKENIZERS.get(tokenizer)
    if cached is None:
        try:
            text = tokenizer.path.read_text(encoding="utf-8")
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ModelError(f"{tokenizer.path}: cannot read the tokenizer for constrained output ({reason})") from None
        # n_vocab: the tokenizer's own ids only (151665); the embedding's padding rows never get a bit.
        cached = llguidance.LLTokenizer(text, n_vocab=tokenizer.vocab_size, eos_token=tokenizer.im_end_id)
        _LL_TOKENIZERS[tokenizer] = cached
    return cached


def _grammar(schema: dict, fenced: bool) -> str:
    if not fenced:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    # Lark with the schema embedded; the JSON options travel in the schema's own "x-guidance" key.
    embedded = {**schema, "x-guidance": JSON_OPTIONS}
    lark = f"start: {json.dumps(FENCE_OPEN)} answer {json.dumps(FENCE_CLOSE)}\nanswer: %json {json.dumps(embedded)}\n"
    return llguidance.LLMatcher.grammar_from_lark(lark)


def _one_line(message: str, limit: int = 200) -> str:
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class JsonConstraint:
    """Allowed next tokens for output that must be JSON valid against `schema`, then <|im_end|>.

    One matcher, reused: the generator calls `reset()` before each answer. Per step: `allowed()` for the mask,
    then `advance(token_id)` with the chosen id. Build with `JsonConstraint.from_schema`.
    """

    def __init__(self, ll_tokenizer, grammar: str, eos_id: int, schema: dict, fenced: bool) -> None:
        self._ll_tokenizer = ll_tokenizer
        self._grammar = grammar
        self._matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise UsageError(f"JSON schema not supported for constrained output: {_schema_reason(self._matcher.get_error())}")
        ll_vocab = ll_tokenizer.vocab_size
        self._ll_vocab = ll_vocab  # ids the grammar knows (the tokenizer's), a prefix of the model's vocab
        self.eos_id = eos_id
        self.schema = schema
        self.fenced = fenced
        self._bits = np.zeros((ll_vocab + 31) // 32, dtype=np.int32)  # llguidance's bitmask, bit i = id i
        self._host: torch.Tensor | None = None  # (V,) bool, pinned when the logits live on a GPU
        self._device_mask: torch.Tensor | None = None  # (V,) bool on the logits' device, None on CPU
        self._mask_device: torch.device | None = None

    @classmethod
    def from_schema(cls, tokenizer: Tokenizer, schema: dict, *, fenced: bool = False) -> JsonConstraint:
        """Compile `schema`; a schema using a feature llguidance cannot enforce is a UsageError here, before
        anything is generated."""
        if not isinstance(schema, dict):
            raise UsageError(f"JSON schema: expected an object, got {type(schema).__name__}")
        schema = copy.deepcopy(schema)
        schema.pop("x-guidance", None)  # our whitespace bounds, not the caller's
        ll_tok = _ll_tokenizer(tokenizer)
        try:
            grammar = _grammar(schema, fenced)
        except ValueError as exc:
            raise UsageError(f"JSON schema: {_one_line(str(exc))}") from None
        return cls(ll_tok, grammar, tokenizer.im_end_id, schema, fenced)

    @classmethod
    def from_lark(cls, tokenizer: Tokenizer, lark: str) -> JsonConstraint:
        """Output that must match a Lark grammar (llguidance's dialect: quoted strings, /regex/ lexemes,
        %json), then <|im_end|>: e.g. the sentence video grounding answers in. A grammar that does not
        compile is a UsageError."""
        ll_tok = _ll_tokenizer(tokenizer)
        try:
            grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        except ValueError as exc:
            raise UsageError(f"grammar: {_one_line(str(exc))}") from exc
        return cls(ll_tok, grammar, tokenizer.im_end_id, schema={}, fenced=False)

    def reset(self) -> None:
        """Back to the start of the grammar, for the next answer."""
        if self._matcher.is_error():  # a matcher never leaves its error state: build a fresh one
            self._matcher = llguidance.LLMatcher(self._ll_tokenizer, self._grammar, log_level=0)
        else:
            self._matcher.reset()

    @property
    def finished(self) -> bool:
        """The JSON (and fence) is complete: only the EOS id may follow (or it has been consumed)."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    def _check(self) -> None:
        if self._matcher.is_error():
            raise ConstraintViolation(f"JSON constraint in error state: {_one_line(self._matcher.get_error())}")

    def allowed(self, vocab_size: int, device: torch.device | str) -> torch.Tensor:
        """(vocab_size,) bool on `device`: True where the id may come next. Ids past the tokenizer's (the
        embedding's padding rows) are never allowed. The tensor is reused: valid until the next call."""
        self._check()
        device = torch.device(device)
        if self._host is None or self._host.shape[0] != vocab_size or self._mask_device != device:
            self._host = torch.zeros(vocab_size, dtype=torch.bool, pin_memory=device.type == "cuda")
            on_cpu = device.type == "cpu"
            self._device_mask = None if on_cpu else torch.empty(vocab_size, dtype=torch.bool, device=device)
            self._mask_device = device
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        self._check()
        n = min(self._ll_vocab, vocab_size)
        # bit i of the little-endian int32 words = byte i // 8, bit i % 8 (little) on every platform torch runs on
        unpacked = np.unpackbits(self._bits.view(np.uint8), count=n, bitorder="little")  # (n,) uint8 0/1
        self._host.numpy().view(np.uint8)[:n] = unpacked
        if self._device_mask is None:
            return self._host
        # Pinned source, so the copy is asynchronous; the caller's token .item() syncs before the next write.
        self._device_mask.copy_(self._host, non_blocking=True)
        return self._device_mask

    def advance(self, token_id: int) -> None:
        """Consume the chosen id; raises ConstraintViolation if it was not allowed."""
        if not 0 <= token_id < self._ll_vocab:
            raise ConstraintViolation(f"token {token_id} is outside the tokenizer's {self._ll_vocab} ids")
        if not self._matcher.consume_token(token_id):
            raise ConstraintViolation(
                f"token {token_id} is not allowed here by the JSON constraint: {_one_line(self._matcher.get_error())}"
            )


def _schema_reason(error: str) -> str:
    """llguidance's compile error without the grammar source it quotes after the reason (lines `N | ...`)."""
    text = _one_line(error)
    text = re.split(r" \d+ \| ", text, maxsplit=1)[0]
    reason = text.split("failed to compile JSON schema: ", 1)[-1]
    return reason.strip() or text
