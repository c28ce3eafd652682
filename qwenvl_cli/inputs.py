"""Command-line inputs -> a list of items to answer, in order.

An argument is a path, a glob the shell did not expand (sorted matches), a directory (its image files,
recursively and sorted, with --recursive), or `-`: standard input.
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
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class InputItem:
    name: str  # how the input is named in messages and JSON
    path: Path | None = None
    data: bytes | None = None  # the file's bytes, for stdin
    error: str | None = None  # known to be unusable before reading it

    def source(self) -> Path | bytes:
        if self.error is not None:
            raise InputError(self.error)
        if self.data is not None:
            return self.data
        if self.path is None:
            raise InputError(f"{self.name}: no such file")
        return self.path


def expand_inputs(args: list[str], stdin: BinaryIO | None, recursive: bool = False) -> list[InputItem]:
    items: list[InputItem] = []
    for arg in args:
        if Path(arg).is_dir():
            items.extend(_from_directory(arg, recursive))
        elif arg == "-":
            items.extend(_from_stdin(stdin))
        elif _GLOB_CHARS & set(arg) and not Path(arg).exists():
            matches = sorted(glob.glob(arg))
            items.extend(InputItem(m, Path(m)) for m in matches)
            if not matches:
                items.append(InputItem(arg))  # reported as "no such file" when answered
        else:
            items.append(InputItem(arg, Path(arg)))
    return items


def _from_directory(arg: str, recursive: bool) -> list[InputItem]:
    if not recursive:
        return [InputItem(arg, error=f"{arg}: is a directory (add --recursive to read the images in it)")]
    files = sorted(p for p in Path(arg).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        return [InputItem(arg, error=f"{arg}: no image files in this directory")]
    return [InputItem(str(p), p) for p in files]


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
