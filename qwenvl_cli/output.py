"""The only writer to stdout. Text answers stream as they are generated; with --json each answer (or
failed input) is one JSON object on its own line. Diagnostics go to stderr, one line each.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO


def warn(message: str, err: TextIO | None = None) -> None:
    """One diagnostic line on stderr."""
    err = err or sys.stderr
    err.write(f"qwenvl: {message}\n")
    err.flush()


class Printer:
    def __init__(self, json_mode: bool, multi: bool, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.json_mode = json_mode
        self.multi = multi  # several answers: text mode separates them with a header per input
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self._answers = 0
        self._line_open = False

    def start(self, name: str) -> None:
        if self.json_mode:
            return
        if self.multi:
            self.out.write(("\n" if self._answers else "") + f"==> {name} <==\n")
            self.out.flush()

    def piece(self, text: str) -> None:
        """A streamed piece of the current answer (text mode only)."""
        if self.json_mode or not text:
            return
        self.out.write(text)
        self.out.flush()
        self._line_open = not text.endswith("\n")

    def done(self, record: dict[str, Any]) -> None:
        self._answers += 1
        if self.json_mode:
            self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
        elif self._line_open:
            self.out.write("\n")
        self._line_open = False
        self.out.flush()

    def failed(self, name: str, message: str) -> None:
        if self._line_open:  # an answer was cut off mid-line
            self.out.write("\n")
            self._line_open = False
        warn(message, self.err)
        if self.json_mode:
            self.out.write(json.dumps({"file": name, "error": message}, ensure_ascii=False) + "\n")
            self.out.flush()
