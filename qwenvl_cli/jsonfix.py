"""Lenient reading of the JSON in a model's free-form answer: ```json fences with prose around them,
trailing commas, Python literals and quotes, comments, unquoted keys, and answers cut off at the token
limit. Strict `json.loads` is tried first; the repairing parser below only runs when it fails. Nothing
is ever evaluated.

Rules:
- Where to look: the whole answer (strictly), then each ``` fence in order (an unclosed last fence runs
  to the end), then the whole answer from each `[` or `{` in order, skipping those inside a failed
  attempt. The first candidate that gives a value wins; text after that value is ignored.
- Cut off: strings, numbers, words and objects that the end of the text cuts are dropped; a cut list is
  closed and kept with its complete elements; the outermost value is closed and kept with its complete
  members. So `[{"a":1},{"a` -> `[{"a": 1}]` and `{"a": 1, "b": "x` -> `{"a": 1}`.
- Several objects in a row (JSON-lines style, whitespace or commas between) become a list of them.
"""

from __future__ import annotations

import json
import re
from typing import Any


class LenientJSONError(ValueError):
    """No JSON value could be read from the text, even with repairs."""


_FENCE = re.compile(r"```[\w+.-]*[^\S\n]*\n?(.*?)(?:```|\Z)", re.S)
_START = re.compile(r"[\[{]")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_WORD = re.compile(r"[^\W\d]\w*")
_KEY = re.compile(r"[\w$][\w$.\-]*")  # unquoted keys: identifiers, also `a-b`, `a.b`, `2nd`
_STRING_RUN = {'"': re.compile(r'[^"\\]+'), "'": re.compile(r"[^'\\]+")}
_WORDS = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "/": "/", "\\": "\\", '"': '"', "'": "'"}
_MAX_DEPTH = 200


class _Fail(Exception):
    """Not JSON from this start position."""


class _Cut(Exception):
    """The text ended inside a value. `partial` is what a list or the outermost value keeps."""

    def __init__(self, partial: Any, keep: bool) -> None:
        super().__init__()
        self.partial = partial
        self.keep = keep  # whether the parent keeps `partial` (cut lists: yes; the rest: no)


class _Parser:
    def __init__(self, text: str, pos: int) -> None:
        self.text = text
        self.pos = pos

    def skip(self) -> None:
        """Whitespace and comments (`// ...`, `/* ... */`, `# ...`)."""
        text, n = self.text, len(self.text)
        while self.pos < n:
            c = text[self.pos]
            if c.isspace():
                self.pos += 1
            elif text.startswith("//", self.pos) or c == "#":
                end = text.find("\n", self.pos)
                self.pos = n if end < 0 else end + 1
            elif text.startswith("/*", self.pos):
                end = text.find("*/", self.pos + 2)
                self.pos = n if end < 0 else end + 2
            else:
                return

    def at_end(self) -> bool:
        self.skip()
        return self.pos >= len(self.text)

    def value(self, depth: int) -> Any:
        if self.at_end():
            raise _Cut(None, keep=False)
        if depth > _MAX_DEPTH:
            raise _Fail(f"nested deeper than {_MAX_DEPTH}")
        c = self.text[self.pos]
        if c == "[":
            return self.array(depth + 1)
        if c == "{":
            return self.object(depth + 1)
        if c in "\"'":
            return self.string()
        if m := _NUMBER.match(self.text, self.pos):
            return self.number(m)
        if m := _WORD.match(self.text, self.pos):
            if m.end() == len(self.text):
                raise _Cut(None, keep=False)  # `tru` or `true`: cannot tell
            if m.group() not in _WORDS:
                raise _Fail(f"unexpected word {m.group()!r}")
            self.pos = m.end()
            return _WORDS[m.group()]
        raise _Fail(f"unexpected {c!r}")

    def number(self, m: re.Match) -> int | float:
        if m.end() == len(self.text):
            raise _Cut(None, keep=False)  # `12` may have been `125`
        self.pos = m.end()
        s = m.group().lstrip("+")
        if re.fullmatch(r"-?\d+", s):
            return int(s)
        return float(s)

    def string(self) -> str:
        text, quote = self.text, self.text[self.pos]
        run = _STRING_RUN[quote]
        self.pos += 1
        parts: list[str] = []
        while True:
            if m := run.match(text, self.pos):
                parts.append(m.group())  # raw newlines and tabs are kept: models write them
                self.pos = m.end()
            if self.pos >= len(text):
                raise _Cut(None, keep=False)
            c = text[self.pos]
            if c == quote:
                self.pos += 1
                return "".join(parts)
            # a backslash
            if self.pos + 1 >= len(text):
                raise _Cut(None, keep=False)
            e = text[self.pos + 1]
            if e == "u":
                parts.append(self.unicode_escape())
            else:
                parts.append(_ESCAPES.get(e, "\\" + e))  # unknown escapes stay as written
                self.pos += 2

    def unicode_escape(self) -> str:
        hex4 = self.text[self.pos + 2 : self.pos + 6]
        if len(hex4) < 4 and self.pos + 2 + len(hex4) == len(self.text):
            raise _Cut(None, keep=False)
        if not re.fullmatch(r"[0-9a-fA-F]{4}", hex4):
            self.pos += 2
            return "\\u"
        self.pos += 6
        code = int(hex4, 16)
        if 0xD800 <= code < 0xDC00 and re.match(r"\\u[dD][c-fC-F][0-9a-fA-F]{2}", self.text[self.pos :]):
            low = int(self.text[self.pos + 2 : self.pos + 6], 16)
            self.pos += 6
            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
        return chr(code)

    def array(self, depth: int) -> list:
        self.pos += 1
        items: list = []
        while True:
            if self.at_end():
                raise _Cut(items, keep=True)
            c = self.text[self.pos]
            if c == "]":
                self.pos += 1
                return items
            if c == ",":  # separators, trailing and doubled commas alike
                self.pos += 1
                continue
            if c == "}":
                raise _Fail("'}' closes a list")
            try:
                items.append(self.value(depth))
            except _Cut as cut:
                if cut.keep:
                    items.append(cut.partial)
                raise _Cut(items, keep=True) from None

    def object(self, depth: int) -> dict:
        self.pos += 1
        members: dict = {}
        while True:
            if self.at_end():
                raise _Cut(members, keep=False)
            c = self.text[self.pos]
            if c == "}":
                self.pos += 1
                return members
            if c == ",":
                self.pos += 1
                continue
            key = self.key(members)
            if self.at_end():
                raise _Cut(members, keep=False)
            if self.text[self.pos] != ":":
                raise _Fail(f"expected ':' after key {key!r}")
            self.pos += 1
            try:
                members[key] = self.value(depth)
            except _Cut as cut:
                if cut.keep:
                    members[key] = cut.partial
                raise _Cut(members, keep=False) from None

    def key(self, members: dict) -> str:
        c = self.text[self.pos]
        if c in "\"'":
            try:
                return self.string()
            except _Cut:
                raise _Cut(members, keep=False) from None
        m = _KEY.match(self.text, self.pos)
        if not m:
            raise _Fail(f"unexpected {c!r} where a key should be")
        if m.end() == len(self.text):
            raise _Cut(members, keep=False)
        self.pos = m.end()
        return m.group()


def _parse_at(text: str, start: int) -> Any:
    """The value starting at text[start] ('[' or '{'), then any further objects that follow it."""
    parser = _Parser(text, start)
    try:
        first = parser.value(0)
    except _Cut as cut:
        return cut.partial
    except _Fail as exc:
        exc.pos = parser.pos
        raise
    if not isinstance(first, dict):
        return first
    values = [first]
    while True:
        while not parser.at_end() and parser.text[parser.pos] == ",":
            parser.pos += 1
        if parser.at_end() or parser.text[parser.pos] != "{":
            break
        try:
            values.append(parser.value(0))
        except _Cut as cut:
            if cut.partial:  # a cut-off object among several: keep its complete members
                values.append(cut.partial)
            break
        except _Fail:
            break
    return values[0] if len(values) == 1 else values


_NOTHING = object()


def _scan(text: str) -> Any:
    """The first value that parses, trying each `[` and `{` in order; _NOTHING if none does. A start
    inside a failed attempt (before the place it failed) is not tried again: that keeps the scan linear
    on degenerate answers such as thousands of `[`."""
    resume = 0
    for m in _START.finditer(text):
        if m.start() < resume:
            continue
        try:
            return _parse_at(text, m.start())
        except _Fail as exc:
            resume = exc.pos
    return _NOTHING


def parse_lenient(text: str) -> Any:
    """The JSON value in a model's answer, repaired where needed (see the module's rules). Raises
    LenientJSONError when the text holds none."""
    stripped = text.strip()
    if not stripped:
        raise LenientJSONError("the answer is empty: no JSON in it")
    try:
        return json.loads(stripped)
    except ValueError:
        pass
    for block in _FENCE.findall(stripped):
        try:
            return json.loads(block)
        except ValueError:
            pass
        if (value := _scan(block)) is not _NOTHING:
            return value
    if (value := _scan(stripped)) is not _NOTHING:
        return value
    snippet = " ".join(stripped.split())[:60]
    raise LenientJSONError(f"no JSON list or object in the answer: {snippet!r}")


__all__ = ["LenientJSONError", "parse_lenient"]
