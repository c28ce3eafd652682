"""The only writer to stdout. Text answers stream as they are generated; with --json each answer (or
failed input) is one JSON object on its own line. Diagnostics go to stderr, one line each.

File names come from users and file systems: in messages and headers their control characters are
shown escaped (a newline cannot split a line, an ESC cannot reach the terminal), and bytes that are not
UTF-8 become U+FFFD, in text and JSON alike (so --json output is always valid UTF-8).
"""

from __future__ import annotations

import json
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence, TextIO

from qwenvl_cli.errors import OutputError, UsageError
from qwenvl_cli.inputs import display_base

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_C1 = re.compile(r"[\x7f-\x9f]")  # json.dumps escapes C0 itself
_SURROGATE = re.compile(r"[\ud800-\udfff]")  # os.fsdecode's escapes of bytes that are not UTF-8


def printable(text: str) -> str:
    """`text` safe for one terminal line: control characters as escapes (\\n, \\x1b), non-UTF-8 bytes as U+FFFD."""
    return _CONTROL.sub(lambda m: repr(m[0])[1:-1], _SURROGATE.sub("\ufffd", text))


def json_line(record: dict[str, Any], indent: int | None = None) -> str:
    """The record as JSON text that is valid UTF-8 and holds no raw control character."""
    text = json.dumps(record, ensure_ascii=False, indent=indent)
    return _C1.sub(lambda m: f"\\u{ord(m[0]):04x}", _SURROGATE.sub("\ufffd", text))


def free_path(path: Path, used: set[Path]) -> Path:
    """`path`, or `NAME-2.ext`, `NAME-3.ext` ... : the first that this run has not written and that does not
    exist (a file, a directory, or a symlink, even a dangling one): qwenvl never overwrites a file and never
    writes through a link."""
    candidate, n = path, 1
    while candidate in used or os.path.lexists(candidate):
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    used.add(candidate)
    return candidate


def writable_directory(path: Path, option: str) -> Path:
    """`path`, created if needed, checked writable before any work (a read-only file system included): a
    UsageError naming `option` otherwise."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{option}: cannot create the directory ({exc.strerror})") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{option}: the directory is not writable")
    return path


@contextmanager
def new_file(path: Path, what: str) -> Iterator[BinaryIO]:
    """A file created for writing that did not exist before (O_EXCL, no symlink followed). On any failure
    the partial file is removed and an OutputError names `what` and the reason: an error of that input."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as exc:
        raise OutputError(f"{what}: cannot write {path} ({exc.strerror or exc})") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
    except BaseException as exc:
        try:
            os.unlink(path)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise OutputError(f"{what}: cannot write {path} ({exc.strerror or exc})") from exc
        raise


def emit(out: TextIO, text: str) -> None:
    """Write and flush `text` on stdout; a stream that cannot take it (closed, a full disk) stops the run
    with one line (a reader that went away, BrokenPipeError, stays a quiet stop)."""
    try:
        out.write(text)
        out.flush()
    except BrokenPipeError:
        raise
    except (OSError, ValueError) as exc:
        from qwenvl_cli.errors import StdoutError

        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise StdoutError(f"standard output: cannot write the answers ({reason})") from exc


def warn(message: str, err: TextIO | None = None) -> None:
    """One diagnostic line on stderr (nowhere when stderr is closed)."""
    err = err or sys.stderr
    if err is None:
        return
    err.write(f"qwenvl: {printable(message)}\n")
    err.flush()


def error_record(name: str | list[str], message: str, part=None) -> dict[str, Any]:
    """The --json record of a failed input (or of its page or segment)."""
    return {"file": name, **(part.fields if part is not None else {}), "error": message}


class Printer:
    def __init__(self, json_mode: bool, multi: bool, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.json_mode = json_mode
        self.multi = multi  # several answers: text mode separates them with a header per input
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self._answers = 0
        self._line_open = False

    def start(self, name: str, header: bool = False) -> None:
        """An answer begins: a `==> name <==` header in text mode for batches (or when `header`)."""
        if self.json_mode:
            return
        if self.multi or header:
            emit(self.out, ("\n" if self._answers else "") + f"==> {printable(name)} <==\n")

    def piece(self, text: str) -> None:
        """A streamed piece of the current answer (text mode only)."""
        if self.json_mode or not text:
            return
        emit(self.out, text)
        self._line_open = not text.endswith("\n")

    def done(self, record: dict[str, Any], rendered: str | None = None) -> None:
        """The end of an answer: its JSON line, or in text mode `rendered` (for answers that are not
        streamed) or the newline that closes the streamed text."""
        self._answers += 1
        if self.json_mode:
            text = json_line(record) + "\n"
        elif rendered is not None:
            text = rendered if rendered.endswith("\n") or not rendered else rendered + "\n"
        else:
            text = "\n" if self._line_open else ""
        self._line_open = False
        emit(self.out, text)

    def failed(self, name: str | list[str], message: str, part=None) -> None:
        """A failed input (or page, or segment: `part`): its line on stderr, and with --json its record."""
        if self._line_open:  # an answer was cut off mid-line
            emit(self.out, "\n")
            self._line_open = False
        warn(message, self.err)
        if self.json_mode:
            record = error_record(name, message, part)
            emit(self.out, json_line(record) + "\n")


class FileWriter:
    """--output-dir: one result file per answer, named after the input's file name, then `.pN` for a PDF
    page (`.sN` for a video segment), then the suffix (`cat.jpg` -> `cat.jpg.txt`, `doc.pdf` page 3 ->
    `doc.pdf.p3.json`); CSV tables one file each (`doc.pdf.p3.table2.csv`). A name already written in this
    run, or already in the directory, gets -2, -3 ... before the suffix: nothing is overwritten, no link
    followed. The path of each file written is printed on stdout."""

    def __init__(self, directory: Path, json_mode: bool, out: TextIO | None = None) -> None:
        self.directory = directory
        self.json_mode = json_mode
        self.out = out or sys.stdout
        self.used: set[Path] = set()
        self.joined: dict[str, Path] = {}  # input name -> its one file (write_joined)
        writable_directory(directory, f"--output-dir {directory}")

    def path_for(self, name: str, part=None, suffix: str | None = None) -> Path:
        base = display_base(name)
        if part is not None:
            base += f".{part.tag}"
        suffix = suffix or (".json" if self.json_mode else ".txt")
        return free_path(self.directory / (base + suffix), self.used)

    def write(
        self, name: str, record: dict[str, Any], part=None, text: str | None = None, suffix: str | None = None
    ) -> Path:
        """The record as JSON with --json, else `text` (default: the record's "text")."""
        if self.json_mode:
            body = json_line(record, indent=2)
        else:
            body = record["text"] if text is None else text
        return self._write(self.path_for(name, part, None if self.json_mode else suffix), body, name)

    def write_each(self, name: str, part, bodies: Sequence[str], stem: str, suffix: str) -> list[Path]:
        """Several files for one answer (`stem` numbered from 1), e.g. one CSV per table."""
        base = name if part is None else f"{name}.{part.tag}"
        return [self._write(self.path_for(f"{base}.{stem}{i}", None, suffix), b, name) for i, b in enumerate(bodies, 1)]

    def write_joined(self, name: str, text: str, suffix: str | None) -> Path:
        """One file per input, `NAME.suffix`: the first part creates it, later parts append to it."""
        path = self.joined.get(name)
        if path is None:
            path = self.joined[name] = self._write(self.path_for(name, None, suffix), text, name)
        elif text:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0))
                with os.fdopen(fd, "ab") as f:
                    f.write((text if text.endswith("\n") else text + "\n").encode("utf-8", "replace"))
            except OSError as exc:
                raise OutputError(f"{name}: cannot write {path} ({exc.strerror or exc})") from exc
        return path

    def _write(self, path: Path, body: str, name: str) -> Path:
        with new_file(path, name) as f:
            f.write((body if body.endswith("\n") else body + "\n").encode("utf-8", "replace"))
        emit(self.out, f"{printable(str(path))}\n")
        return path


class Sink:
    """Where a run's outcomes go: stdout (streamed text with `==>` headers, or --json lines), or with
    --output-dir one file per answer (stdout then lists the files; errors stay on stderr)."""

    def __init__(self, json_mode: bool, output_dir: str | None, multi: bool, streaming: bool, join_parts: bool = False) -> None:
        self.writer = FileWriter(Path(output_dir), json_mode) if output_dir else None
        self.printer = Printer(json_mode and self.writer is None, multi=multi)
        self.streaming = streaming and not json_mode and self.writer is None
        self.join_parts = join_parts and not json_mode  # one file per input for the parts' texts

    def start(self, outcome) -> None:
        """An answer begins: its header, unless the answer goes to a file."""
        if self.streaming or self.writer is None:
            self.printer.start(outcome.label, header=outcome.part is not None and not self.join_parts)

    def piece(self, text: str) -> None:
        if self.streaming:
            self.printer.piece(text)

    def failed(self, outcome, name) -> None:
        """The error line; with --json its record too (with --output-dir, in the input's own file)."""
        self.printer.failed(name, outcome.error, outcome.part)
        if self.writer is not None and self.writer.json_mode:
            record = error_record(name, outcome.error, outcome.part)
            self.writer.write(outcome.names[0], record, outcome.part)

    def done(self, outcome, record: dict[str, Any], rendered) -> None:
        """One answer out: its JSON line, its text (streamed already when `rendered.text` is None and
        the task streams), or its file(s)."""
        text = None if self.streaming else rendered.text
        if self.writer is None:
            self.printer.done(record, text)
        elif self.join_parts:
            self.writer.write_joined(outcome.names[0], text, rendered.suffix)
        elif rendered.files is not None:
            stem, suffix, bodies = rendered.files
            self.writer.write_each(outcome.names[0], outcome.part, bodies, stem, suffix)
        else:
            self.writer.write(outcome.names[0], record, outcome.part, text, rendered.suffix)
