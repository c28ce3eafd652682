"""The only writer to stdout. Text answers stream as they are generated; with --json each answer (or
failed input) is one JSON object on its own line. Diagnostics go to stderr, one line each.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence, TextIO

from qwenvl_cli.errors import UsageError
from qwenvl_cli.inputs import display_base


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

    def start(self, name: str, header: bool = False) -> None:
        """An answer begins: a `==> name <==` header in text mode for batches (or when `header`)."""
        if self.json_mode:
            return
        if self.multi or header:
            self.out.write(("\n" if self._answers else "") + f"==> {name} <==\n")
            self.out.flush()

    def piece(self, text: str) -> None:
        """A streamed piece of the current answer (text mode only)."""
        if self.json_mode or not text:
            return
        self.out.write(text)
        self.out.flush()
        self._line_open = not text.endswith("\n")

    def done(self, record: dict[str, Any], rendered: str | None = None) -> None:
        """The end of an answer: its JSON line, or in text mode `rendered` (for answers that are not
        streamed) or the newline that closes the streamed text."""
        self._answers += 1
        if self.json_mode:
            self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
        elif rendered is not None:
            self.out.write(rendered if rendered.endswith("\n") or not rendered else rendered + "\n")
        elif self._line_open:
            self.out.write("\n")
        self._line_open = False
        self.out.flush()

    def failed(self, name: str | list[str], message: str, part=None) -> None:
        """A failed input (or page, or segment: `part`): its line on stderr, and with --json its record."""
        if self._line_open:  # an answer was cut off mid-line
            self.out.write("\n")
            self._line_open = False
        warn(message, self.err)
        if self.json_mode:
            record: dict[str, Any] = {"file": name}
            if part is not None:
                record.update(part.fields)
            record["error"] = message
            self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.out.flush()


class FileWriter:
    """--output-dir: one result file per answer, named after the input's file name, then `.pN` for a PDF
    page (`.sN` for a video segment), then the suffix (`cat.jpg` -> `cat.jpg.txt`, `doc.pdf` page 3 -> `doc.pdf.p3.json`); CSV tables
    one file each (`doc.pdf.p3.table2.csv`). A name repeated in one run gets -2, -3 ... before the
    suffix. The path of each file written is printed on stdout."""

    def __init__(self, directory: Path, json_mode: bool, out: TextIO | None = None) -> None:
        self.directory = directory
        self.json_mode = json_mode
        self.out = out or sys.stdout
        self.used: set[str] = set()
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--output-dir {directory}: cannot create the directory ({exc.strerror})") from None

    def path_for(self, name: str, part=None, suffix: str | None = None) -> Path:
        base = display_base(name)
        if part is not None:
            base += f".{part.tag}"
        suffix = suffix or (".json" if self.json_mode else ".txt")
        candidate, n = base + suffix, 1
        while candidate in self.used:
            n += 1
            candidate = f"{base}-{n}{suffix}"
        self.used.add(candidate)
        return self.directory / candidate

    def write(
        self, name: str, record: dict[str, Any], part=None, text: str | None = None, suffix: str | None = None
    ) -> Path:
        """The record as JSON with --json, else `text` (default: the record's "text")."""
        if self.json_mode:
            body = json.dumps(record, ensure_ascii=False, indent=2)
        else:
            body = record["text"] if text is None else text
        return self._write(self.path_for(name, part, None if self.json_mode else suffix), body)

    def write_each(self, name: str, part, bodies: Sequence[str], stem: str, suffix: str) -> list[Path]:
        """Several files for one answer (`stem` numbered from 1), e.g. one CSV per table."""
        base = name if part is None else f"{name}.{part.tag}"
        return [self._write(self.path_for(f"{base}.{stem}{i}", None, suffix), b) for i, b in enumerate(bodies, 1)]

    def _write(self, path: Path, body: str) -> Path:
        try:
            path.write_text(body if body.endswith("\n") else body + "\n", encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"{path}: cannot write ({exc.strerror})") from None
        self.out.write(f"{path}\n")
        self.out.flush()
        return path


class Sink:
    """Where a run's outcomes go: stdout (streamed text with `==>` headers, or --json lines), or with
    --output-dir one file per answer (stdout then lists the files; errors stay on stderr)."""

    def __init__(self, json_mode: bool, output_dir: str | None, multi: bool, streaming: bool) -> None:
        self.writer = FileWriter(Path(output_dir), json_mode) if output_dir else None
        self.printer = Printer(json_mode and self.writer is None, multi=multi)
        self.streaming = streaming and not json_mode and self.writer is None

    def start(self, outcome) -> None:
        """An answer begins: its header, unless the answer goes to a file."""
        if self.streaming or self.writer is None:
            self.printer.start(outcome.label, header=outcome.part is not None)

    def piece(self, text: str) -> None:
        if self.streaming:
            self.printer.piece(text)

    def failed(self, outcome, name) -> None:
        self.printer.failed(name, outcome.error, outcome.part)

    def done(self, outcome, record: dict[str, Any], rendered) -> None:
        """One answer out: its JSON line, its text (streamed already when `rendered.text` is None and
        the task streams), or its file(s)."""
        text = None if self.streaming else rendered.text
        if self.writer is None:
            self.printer.done(record, text)
        elif rendered.files is not None:
            stem, suffix, bodies = rendered.files
            self.writer.write_each(outcome.names[0], outcome.part, bodies, stem, suffix)
        else:
            self.writer.write(outcome.names[0], record, outcome.part, text, rendered.suffix)
