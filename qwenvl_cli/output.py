"""The only writer to stdout. Text answers stream as they are generated; with --json each answer (or
failed input) is one JSON object on its own line. Diagnostics go to stderr, one line each.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

from qwenvl_cli.errors import UsageError


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


class FileWriter:
    """--output-dir: one result file per input, named after the input's file name plus .txt or .json
    (`cat.jpg` -> `cat.jpg.txt`); a repeated name in one run gets -2, -3 ... before the suffix. The path of
    each file written is printed on stdout."""

    def __init__(self, directory: Path, json_mode: bool, out: TextIO | None = None) -> None:
        self.directory = directory
        self.json_mode = json_mode
        self.out = out or sys.stdout
        self.used: set[str] = set()
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--output-dir {directory}: cannot create the directory ({exc.strerror})") from None

    def path_for(self, name: str) -> Path:
        base = "stdin" if name == "-" else Path(name).name
        suffix = ".json" if self.json_mode else ".txt"
        candidate, n = base + suffix, 1
        while candidate in self.used:
            n += 1
            candidate = f"{base}-{n}{suffix}"
        self.used.add(candidate)
        return self.directory / candidate

    def write(self, name: str, record: dict[str, Any]) -> Path:
        path = self.path_for(name)
        body = json.dumps(record, ensure_ascii=False, indent=2) if self.json_mode else record["text"]
        try:
            path.write_text(body + "\n", encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"{path}: cannot write ({exc.strerror})") from None
        self.out.write(f"{path}\n")
        self.out.flush()
        return path
