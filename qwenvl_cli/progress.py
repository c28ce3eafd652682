"""Feedback on stderr while work runs: a spinner for model loading, a progress bar for batches, PDF
pages and video segments. Shown only when stderr is a terminal and --quiet is off; bars also only when stdout is not that
terminal (answers printed there would tear through a live bar; they are the progress then). Everything
here is a no-op when disabled, so tasks call it unconditionally.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext
from typing import Iterator


def _quiet_hub_bars() -> None:
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()


class Feedback:
    def __init__(self, spinner: bool, bars: bool, console=None) -> None:
        self.spinner = spinner
        self.bars = bars
        self._console = console
        self._progress = None
        self._inputs = None
        self._pages = None

    @classmethod
    def for_streams(cls, quiet: bool) -> Feedback:
        """The rule above, from the real stderr and stdout."""
        on_terminal = not quiet and sys.stderr.isatty()
        if not on_terminal:
            _quiet_hub_bars()  # huggingface_hub's own bars follow the same rule
        # Answers printed to the same terminal would tear through a live bar: bars only when stdout goes
        # elsewhere (a file, a pipe); on a terminal the answers themselves show the progress.
        bars = on_terminal and not sys.stdout.isatty()
        return cls(spinner=on_terminal, bars=bars)

    @property
    def console(self):
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True)
        return self._console

    def status(self, message: str):
        """A spinner with `message` for the duration of a `with` block."""
        return self.console.status(message) if self.spinner else nullcontext()

    @contextmanager
    def batch(self, total: int) -> Iterator[Feedback]:
        """A bar over `total` inputs for the duration of the block; `input_done` advances it."""
        if not self.bars or total < 1:
            yield self
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=True) as progress:
            self._progress = progress
            self._inputs = progress.add_task("inputs", total=total) if total > 1 else None
            try:
                yield self
            finally:
                self._progress = self._inputs = self._pages = None

    def input_started(self, name: str) -> None:
        if self._progress is not None and self._inputs is not None:
            self._progress.update(self._inputs, description=_short(name))

    def input_done(self) -> None:
        if self._progress is not None and self._inputs is not None:
            self._progress.advance(self._inputs)
        self.pages_done()

    def pages_started(self, name: str, total: int, unit: str = "pages") -> None:
        """A second bar over the pages of one document (or the segments of one video)."""
        if self._progress is None:
            return
        self.pages_done()
        self._pages = self._progress.add_task(f"{_short(name)} {unit}", total=total)

    def page_done(self) -> None:
        if self._progress is not None and self._pages is not None:
            self._progress.advance(self._pages)

    def pages_done(self) -> None:
        if self._progress is not None and self._pages is not None:
            self._progress.remove_task(self._pages)
            self._pages = None


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


SILENT = Feedback(spinner=False, bars=False)
