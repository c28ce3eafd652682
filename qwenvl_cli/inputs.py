"""Command-line inputs -> a list of items to answer, in order.

An argument is a path, or a glob the shell did not expand (sorted matches), or `-`: standard input.
Stdin that is UTF-8 text whose every non-blank line names an existing file is a list of paths (as from
`ls` or `find`); anything else is the bytes of one file.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from qwenvl_cli.errors import InputError

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class InputItem:
    name: str  # how the input is named in messages and JSON
    path: Path | None = None
    data: bytes | None = None  # the file's bytes, for stdin

    def source(self) -> Path | bytes:
        if self.data is not None:
            return self.data
        if self.path is None:
            raise InputError(f"{self.name}: no such file")
        return self.path


def expand_inputs(args: list[str], stdin: BinaryIO | None) -> list[InputItem]:
    items: list[InputItem] = []
    for arg in args:
        if arg == "-":
            items.extend(_from_stdin(stdin))
        elif _GLOB_CHARS & set(arg) and not Path(arg).exists():
            matches = sorted(glob.glob(arg))
            items.extend(InputItem(m, Path(m)) for m in matches)
            if not matches:
                items.append(InputItem(arg))  # reported as "no such file" when answered
        else:
            items.append(InputItem(arg, Path(arg)))
    return items


def _from_stdin(stdin: BinaryIO | None) -> list[InputItem]:
    data = stdin.read() if stdin is not None else b""
    if not data:
        return [InputItem("-", data=b"")]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return [InputItem("-", data=data)]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and len(data) < 1_000_000 and all(Path(line).is_file() for line in lines):
        return [InputItem(line, Path(line)) for line in lines]
    return [InputItem("-", data=data)]
