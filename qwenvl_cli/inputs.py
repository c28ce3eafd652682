"""Command-line inputs -> a list of items to answer, in order.

An argument is a path, a glob the shell did not expand (sorted matches), a directory (its image files,
recursively and sorted, with --recursive: images and PDFs by extension), or `-`: standard input.
Stdin that is UTF-8 text in which some line names an existing file or directory is a list of paths, one
per line (as from `ls` or `find`; directories in it are skipped, missing paths fail one by one); anything
else is the bytes of one file.
"""

from __future__ import annotations

import glob
import os
import select
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from qwenvl_cli.errors import InputError

_GLOB_CHARS = set("*?[")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
SUFFIXES = IMAGE_SUFFIXES | {".pdf"}  # what --recursive picks up in a directory
VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".wmv", ".flv", ".3gp"}


@dataclass(frozen=True)
class InputItem:
    name: str  # how the input is named in messages and JSON
    path: Path | None = None
    data: bytes | None = None  # the file's bytes, for stdin
    error: str | None = None  # known to be unusable before reading it

    def source(self) -> Path | bytes:
        """The path of a regular file, or the bytes (stdin, or a pipe such as bash's `<(...)`)."""
        if self.error is not None:
            raise InputError(self.error)
        if self.data is not None:
            return self.data
        if self.path is None:
            raise InputError(f"{self.name}: no such file")
        try:
            mode = self.path.stat().st_mode
        except OSError:
            return self.path  # reading it says what is wrong
        if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode):
            return _read_pipe(self.path, self.name)
        return self.path


PIPE_WAIT_SECONDS = 10.0  # a named pipe nobody writes to must not hang the batch
MAX_PIPE_BYTES = 1 << 30


def _read_pipe(path: Path, name: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise InputError(f"{name}: cannot read ({exc.strerror})") from exc
    try:
        ready, _, _ = select.select([fd], [], [], PIPE_WAIT_SECONDS)
        if not ready:
            raise InputError(f"{name}: not a regular file, and nothing was written to it in {PIPE_WAIT_SECONDS:g} s")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as stream:
            data = read_bounded(stream)
        if data is None:
            raise InputError(f"{name}: more than {MAX_PIPE_BYTES >> 20} MiB from a pipe")
        return data
    except OSError as exc:
        raise InputError(f"{name}: cannot read ({exc.strerror})") from exc
    finally:
        os.close(fd)


def read_bounded(stream: BinaryIO, limit: int | None = None) -> bytes | None:
    """All of `stream`, or None as soon as it holds more than `limit` bytes (default MAX_PIPE_BYTES):
    `qwenvl describe - < /dev/zero` is refused after reading the limit, not after filling memory."""
    limit = MAX_PIPE_BYTES if limit is None else limit
    chunks, total = [], 0
    while chunk := stream.read(min(1 << 20, limit + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            return None
    return b"".join(chunks)


def expand_inputs(
    args: list[str], stdin: BinaryIO | None, recursive: bool = False, videos: bool = False
) -> list[InputItem]:
    """`videos`: directories read with --recursive also give their video files."""
    items: list[InputItem] = []
    for arg in args:
        if is_dir(arg):
            items.extend(_from_directory(arg, recursive, SUFFIXES | VIDEO_SUFFIXES if videos else SUFFIXES))
        elif arg == "-":
            items.extend(_from_stdin(stdin))
        elif _GLOB_CHARS & set(arg) and not exists(arg):
            matches = sorted(glob.glob(arg))
            items.extend(InputItem(m, Path(m)) for m in matches)
            if not matches:
                items.append(InputItem(arg))  # reported as "no such file" when answered
        else:
            items.append(InputItem(arg, Path(arg)))
    return items


def _probe(test, arg: str) -> bool:
    """`test(Path(arg))` (is_dir, is_file, exists), False where the name itself is unusable (too long,
    a NUL byte): reading it later gives the message."""
    try:
        return test(Path(arg))
    except (OSError, ValueError):
        return False


def is_dir(arg: str) -> bool:
    return _probe(Path.is_dir, arg)


def is_file(arg: str) -> bool:
    return _probe(Path.is_file, arg)


def exists(arg: str) -> bool:
    return _probe(Path.exists, arg)


def display_base(name: str) -> str:
    """An input's file name for naming outputs after it (`-`, stdin, is "stdin")."""
    return "stdin" if name == "-" else Path(name).name


def _from_directory(arg: str, recursive: bool, suffixes: set[str]) -> list[InputItem]:
    what = "images, PDFs and videos" if suffixes & VIDEO_SUFFIXES else "images and PDFs"
    if not recursive:
        return [InputItem(arg, error=f"{arg}: is a directory (add --recursive to read the {what} in it)")]
    files = sorted(p for p in Path(arg).rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        return [InputItem(arg, error=f"{arg}: no {what} in this directory")]
    return [InputItem(str(p), p) for p in files]


def _from_stdin(stdin: BinaryIO | None) -> list[InputItem]:
    if stdin is None:
        return [InputItem("-", error="-: standard input is closed")]
    data = read_bounded(stdin)
    if data is None:
        return [InputItem("-", error=f"-: more than {MAX_PIPE_BYTES >> 20} MiB on standard input; pass the file by name")]
    if not data:
        return [InputItem("-", data=b"")]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return [InputItem("-", data=data)]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or len(data) >= 1_000_000 or "\0" in text:
        return [InputItem("-", data=data)]
    if not any(is_file(line) or is_dir(line) for line in lines):
        return [InputItem("-", data=data)]  # text, but not a list of paths: read as a file (and refused)
    # A list of paths: directories are skipped (`find` prints them too); a missing path fails on its own.
    files = [InputItem(line, Path(line)) for line in lines if not is_dir(line)]
    return files or [InputItem("-", error="-: the list of paths on stdin names only directories")]
