"""Constrained decoding: which token ids may come next so that the answer is JSON valid against a schema,
bare or in a ```json fence (or matches a Lark grammar, `from_lark`), ended by <|im_end|>. Grammar engine: llguidance (chosen by measurement,
see benchmarks/bench_constrain.py), driven by the checkpoint's tokenizer.json; transformers is never needed.

A random or confused model can still write a string until max_new_tokens runs out: the answer then ends
with finish_reason "length" and holds a JSON prefix, which the task layer has to treat as truncated, unless
the schema is first passed through `bound_schema`, which gives every value a finite length.
"""

from __future__ import annotations

import copy
import json
import re
import weakref
from typing import Sequence

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
            raise ModelError(f"{tokenizer.path}: cannot read the tokenizer for constrained output ({reason})") from exc
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

    def __init__(
        self, ll_tokenizer, grammar: str, eos_id: int, schema: dict, fenced: bool, prefix: Sequence[int] = ()
    ) -> None:
        self._ll_tokenizer = ll_tokenizer
        self._grammar = grammar
        self._matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
        ll_vocab = ll_tokenizer.vocab_size
        self._bits = np.zeros((ll_vocab + 31) // 32, dtype=np.int32)  # llguidance's bitmask, bit i = id i
        self._refuse_if_stuck(prefix)
        self._ll_vocab = ll_vocab  # ids the grammar knows (the tokenizer's), a prefix of the model's vocab
        self.eos_id = eos_id
        self.schema = schema
        self.fenced = fenced
        self._host: torch.Tensor | None = None  # (V,) bool, pinned when the logits live on a GPU
        self._device_mask: torch.Tensor | None = None  # (V,) bool on the logits' device, None on CPU
        self._mask_device: torch.device | None = None

    @classmethod
    def from_schema(cls, tokenizer: Tokenizer, schema: dict, *, fenced: bool = False) -> JsonConstraint:
        """Compile `schema`; a schema using a feature llguidance cannot enforce is a UsageError here, before
        anything is generated."""
        if not isinstance(schema, dict):
            raise UsageError(f"JSON schema: expected an object, got {type(schema).__name__}")
        check_depth(schema, COMPILE_MAX_DEPTH)  # before deepcopy and llguidance recurse into it
        schema = copy.deepcopy(schema)
        schema.pop("x-guidance", None)  # our whitespace bounds, not the caller's
        ll_tok = _ll_tokenizer(tokenizer)
        try:
            grammar = _grammar(schema, fenced)
        except ValueError as exc:
            raise UsageError(f"JSON schema: {_schema_reason(str(exc))}") from exc
        prefix = tokenizer.encode(FENCE_OPEN) if fenced else ()  # the JSON starts after the fence
        return cls(ll_tok, grammar, tokenizer.im_end_id, schema, fenced, prefix)

    def _refuse_if_stuck(self, prefix: Sequence[int]) -> None:
        """UsageError for a grammar that compiles but allows no token where the JSON starts (after `prefix`
        ids): a $ref that only refers to itself. The matcher says so only when asked for a mask, so ask
        once here, before anything is generated."""
        matcher = self._matcher
        if not matcher.is_error():
            for token in prefix:
                matcher.consume_token(token)
            if not matcher.is_error():
                matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if matcher.is_error():
            raise UsageError(f"JSON schema not supported for constrained output: {_schema_reason(matcher.get_error())}")
        matcher.reset()

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
    """llguidance's compile error as one line of at most 200 characters: without the grammar source it quotes
    after the reason (lines `N | ...`), and without the parser state it dumps when no token can start."""
    if "recursion limit exceeded" in error:
        return f"nested too deeply (at most {SCHEMA_MAX_DEPTH} levels)"
    if "<state>" in error:  # e.g. "NoExtensionBias\n<state>...": not even a first token is possible
        return "no JSON value can satisfy it (e.g. a $ref that only refers to itself)"
    text = " ".join(error.split())
    text = re.split(r" \d+ \| ", text, maxsplit=1)[0]
    reason = text.split("failed to compile JSON schema: ", 1)[-1].strip() or text
    return _one_line(reason)


# ------------------------------------------------------------------------------------ bounded schemas

# A schema value without bounds is a lexeme a looping model can extend forever (digits, string characters,
# array items, object keys), so that the answer never closes and ends "length" at --max-new-tokens.
# `bound_schema` gives each such value a finite, generous bound; a bound the schema already has is kept.
NUMBER_LIMIT = 10**15  # |x| <= 1e15: 15 integer digits (16 for 1e15 itself); float64 is exact up to 9e15
NUMBER_DECIMALS = 10  # multipleOf 1e-10; llguidance refuses 1e-11 and finer ("too many digits" in the float)
NUMBER_MAX_CHARS = 1 + 16 + 1 + NUMBER_DECIMALS  # "-1000000000000000.0000000000": 28; no exponent form
# A string token holds at least one character, so a string at this bound is at most the default answer budget
# (--max-new-tokens 512) in tokens; a user who wants longer values says so with their own maxLength.
STRING_MAX_CHARS = 512
ARRAY_MAX_ITEMS = 256  # rows of a long invoice table, with room to spare
OPEN_KEY_MAX_CHARS = 64  # key names of an object the schema leaves open (no "properties")
OPEN_MAX_PROPERTIES = 64
ANY_DEPTH = 3  # a value the schema leaves open (`{}`, `true`, no "items") nests at most 3 arrays/objects deep
SCHEMA_MAX_DEPTH = 100  # JSON levels of a schema file
COMPILE_MAX_DEPTH = 120  # what is compiled, bounds included; llguidance's JSON parser (serde) stops at 128

_TYPES = ("null", "boolean", "number", "string", "array", "object")
_COMBINATORS = ("$ref", "anyOf", "oneOf", "allOf", "not", "enum", "const", "if")
_SUBSCHEMA = ("additionalItems", "contains")  # one schema each
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")  # name -> schema


def check_depth(value, limit: int = SCHEMA_MAX_DEPTH) -> None:
    """UsageError when objects and arrays nest deeper than `limit` (checked without recursion, so that no
    RecursionError can come from a hostile file)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    raise UsageError(f"JSON schema: nested too deeply (more than {limit} levels)")
                stack.append((child, depth + 1))


def bound_schema(schema: dict, max_chars: int = STRING_MAX_CHARS, max_items: int = ARRAY_MAX_ITEMS) -> dict:
    """`schema` (not modified) with every open-ended value bounded, so that every answer it allows is finite:

    - number: minimum -1e15 / maximum 1e15 where missing, and multipleOf 1e-10 (at most 10 decimals, no
      exponent): at most NUMBER_MAX_CHARS (28) characters. llguidance has no digit-count option, and a
      range alone still lets the fraction run on; integer: the range only.
    - string: maxLength `max_chars` (pattern and format strings too).
    - array: maxItems `max_items` (at least minItems); missing items: a bounded open value.
    - object with "properties": additionalProperties false unless given (the listed fields are the answer);
      without them: keys of at most 64 characters, at most 64 of them, values bounded open values.
    - `{}` / `true` / a schema without type keywords: a bounded open value, nesting at most ANY_DEPTH deep.
    Left as written: enum/const, anything under "not", and the length of keys an explicit additionalProperties
    or patternProperties allows (llguidance has no propertyNames); recursive $refs can still nest without end.
    """
    check_depth(schema)
    return _bound(schema, max_chars, max_items)


def _bound(node, max_chars: int, max_items: int):
    if node is True:
        return _open_value(ANY_DEPTH, max_chars, max_items)
    if not isinstance(node, dict):
        return node  # false, or a malformed value for llguidance to name
    out = dict(node)
    for key in _SUBSCHEMA:
        if key in out:
            out[key] = _bound(out[key], max_chars, max_items)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_bound(s, max_chars, max_items) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _bound(s, max_chars, max_items) for name, s in out[key].items()}
    items = out.get("items")
    if isinstance(items, list):  # draft-4 tuple form
        out["items"] = [_bound(s, max_chars, max_items) for s in items]
    elif items is not None:
        out["items"] = _bound(items, max_chars, max_items)
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _bound(out["additionalProperties"], max_chars, max_items)

    types = out.get("type")
    if types is None:
        if any(k in out for k in _COMBINATORS):
            return out  # the branches (or the $ref's target, bounded where it is defined) carry the bounds
        types = _TYPES  # no type keyword: every type is allowed, each bounded below
    types = {types} if isinstance(types, str) else set(types) if isinstance(types, (list, tuple)) else set()
    if types & {"number", "integer"}:
        _bound_number(out, "number" in types)
    if "string" in types:
        out.setdefault("maxLength", max(max_chars, _int(out.get("minLength"))))
    if "array" in types:
        out.setdefault("maxItems", max(max_items, _int(out.get("minItems"))))
        if "items" not in out or out["items"] is True:
            out["items"] = _open_value(ANY_DEPTH - 1, max_chars, max_items)
    if "object" in types:
        _bound_object(out, max_chars, max_items)
    return out


def _int(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _number(value) -> float | int | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _bound_number(out: dict, fractions: bool) -> None:
    low = _number(out.get("minimum"))
    low = low if low is not None else _number(out.get("exclusiveMinimum"))
    high = _number(out.get("maximum"))
    high = high if high is not None else _number(out.get("exclusiveMaximum"))
    if low is None:  # below the schema's own maximum where that is under -1e15, so that the range is not empty
        out["minimum"] = -NUMBER_LIMIT if high is None or high > -NUMBER_LIMIT else high - NUMBER_LIMIT
    if high is None:
        out["maximum"] = NUMBER_LIMIT if low is None or low < NUMBER_LIMIT else low + NUMBER_LIMIT
    if fractions and "multipleOf" not in out:
        out["multipleOf"] = float(f"1e-{NUMBER_DECIMALS}")


def _bound_object(out: dict, max_chars: int, max_items: int) -> None:
    extra = out.get("additionalProperties", True)
    listed = isinstance(out.get("properties"), dict) and bool(out["properties"])
    if listed or "patternProperties" in out:
        if "additionalProperties" not in out:
            out["additionalProperties"] = False
        elif extra is True:
            out["additionalProperties"] = _open_value(ANY_DEPTH - 1, max_chars, max_items)
        props = set(out.get("properties", {}))
        if out["additionalProperties"] is not False and props <= set(out.get("required", ())):
            # llguidance takes maxProperties only when every listed property is required
            out.setdefault("maxProperties", len(props) + OPEN_MAX_PROPERTIES)
        return
    if extra is False:
        return
    value = _open_value(ANY_DEPTH - 1, max_chars, max_items) if extra is True else extra
    out.pop("additionalProperties", None)
    out.pop("properties", None)
    out["patternProperties"] = {f"^.{{0,{OPEN_KEY_MAX_CHARS}}}$": value}
    out["additionalProperties"] = False
    out.setdefault("maxProperties", OPEN_MAX_PROPERTIES)


def _open_value(depth: int, max_chars: int, max_items: int) -> dict:
    """Any JSON value, bounded: scalars as above, arrays and objects only `depth` more levels deep."""
    node: dict = {"type": list(_TYPES) if depth > 0 else ["null", "boolean", "number", "string"]}
    node["maxLength"] = max_chars
    _bound_number(node, True)
    if depth > 0:
        inner = _open_value(depth - 1, max_chars, max_items)
        node["maxItems"] = max_items
        node["items"] = inner
        node["patternProperties"] = {f"^.{{0,{OPEN_KEY_MAX_CHARS}}}$": inner}
        node["additionalProperties"] = False
        node["maxProperties"] = OPEN_MAX_PROPERTIES
    return node
