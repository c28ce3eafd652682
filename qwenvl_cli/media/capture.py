"""What decoding libraries say on their own, caught around one library call so that the one-line rule holds:
C libraries that write straight to fd 2 (libtiff's `ZIPDecode: Decoding error at scanline 0, ...`, pdfium)
and Python warnings from Pillow's plugins (`Tag data larger than file`). The caller turns what was said into
at most one warning naming the file, or drops it (or folds it into the error) when the call failed anyway.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

# libtiff prints one line per bad scanline: a 100,000-row TIFF says megabytes. Keep the first 64 KiB.
MAX_CAPTURED_BYTES = 64 << 10

_lock = threading.RLock()  # fd 2 is one per process: one capture at a time (nesting stacks)
_terminal: io.TextIOWrapper | None = None  # sys.stderr's stand-in while fd 2 is captured; never closed


@dataclass
class Said:
    """What a library call wrote to fd 2 (its first MAX_CAPTURED_BYTES, decoded) and the warnings it raised."""

    output: str = ""
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """What was said, one item per distinct line, in order (Pillow parses a TIFF's tags up to three times
        per load, warning each time)."""
        said = [" ".join(line.split()) for line in [*self.output.splitlines(), *self.warnings]]
        return list(dict.fromkeys(line for line in said if line))

    def summary(self) -> str | None:
        """One line: the first thing said, and how many more; None when nothing was said."""
        lines = self.lines()
        if not lines:
            return None
        more = len(lines) - 1
        return lines[0] if not more else f"{lines[0]} (and {more} more message{'s' if more > 1 else ''})"


def _writes_to_fd2(stream) -> bool:
    try:
        return stream is not None and stream.fileno() == 2
    except (AttributeError, OSError, ValueError):  # io.StringIO, CliRunner's capture, a closed stream
        return False


def _python_stderr() -> io.TextIOWrapper:
    """A text stream on a copy of the real fd 2, made once: Python code that writes to sys.stderr while fd 2
    is captured (the progress bar's refresh thread, warn()) still reaches the terminal, and a thread that
    still holds it after the capture ends writes to the same place, never to a closed or reused fd."""
    global _terminal
    if _terminal is None:
        encoding = getattr(sys.__stderr__, "encoding", None) or "utf-8"
        raw = io.FileIO(os.dup(2), "w", closefd=False)  # the copy lives as long as the process
        _terminal = io.TextIOWrapper(raw, encoding=encoding, errors="backslashreplace", write_through=True)
    return _terminal


@contextmanager
def captured_output() -> Iterator[Said]:
    """Inside: whatever is written to fd 2 goes to a temporary file; Python's sys.stderr keeps its place.
    Warnings raised inside are recorded instead of printed (DecompressionBombWarning and the like still
    follow the filters the caller sets inside). Read the result after the block."""
    said = Said()
    with _lock, tempfile.TemporaryFile() as sink:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()  # what Python buffered before belongs on the real stderr
            except (AttributeError, OSError, ValueError):
                pass
        saved = os.dup(2)
        swapped = sys.stderr if _writes_to_fd2(sys.stderr) else None
        seen: list[warnings.WarningMessage] = []
        try:
            if swapped is not None:
                sys.stderr = _python_stderr()
            os.dup2(sink.fileno(), 2)
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                yield said
        finally:  # also when the call failed: the caller may fold what was said into its error
            os.dup2(saved, 2)
            os.close(saved)
            if swapped is not None:
                sys.stderr = swapped
            said.warnings = [str(w.message) for w in seen]
            sink.seek(0)
            said.output = sink.read(MAX_CAPTURED_BYTES).decode("utf-8", "replace")


__all__ = ["MAX_CAPTURED_BYTES", "Said", "captured_output"]
