"""Timed events as subtitle files a video player opens: SubRip (.srt) and WebVTT (.vtt). Times are
seconds of the source file; each event is one cue."""

from __future__ import annotations

import math
from typing import Iterable, Protocol


class Timed(Protocol):
    start: float
    end: float
    label: str


def _clock(seconds: float, separator: str) -> str:
    """hh:mm:ss<sep>mmm, milliseconds rounded."""
    ms = max(0, int(round(seconds * 1000)))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{separator}{ms:03d}"


def _text(label: str) -> str:
    # A blank line ends a cue in both formats, and "-->" would read as a timing line in WebVTT.
    lines = [line.strip() for line in label.replace("-->", "->").splitlines() if line.strip()]
    return "\n".join(lines) or "(no description)"


def _end(event: Timed) -> float:
    """A cue must last: an instant event (start == end) is shown for one second."""
    return event.end if event.end > event.start else event.start + 1.0


def _cues(events: Iterable[Timed]) -> list[Timed]:
    return [e for e in events if math.isfinite(e.start) and math.isfinite(e.end)]


def to_srt(events: Iterable[Timed], first: int = 1) -> str:
    """SubRip cues numbered from `first` (a later segment of the same file continues the numbering)."""
    cues = [
        f"{i}\n{_clock(e.start, ',')} --> {_clock(_end(e), ',')}\n{_text(e.label)}\n"
        for i, e in enumerate(_cues(events), first)
    ]
    return "\n".join(cues)


def to_vtt(events: Iterable[Timed], header: bool = True) -> str:
    """WebVTT cues, after the `WEBVTT` header unless they continue an earlier segment's."""
    cues = [f"{_clock(e.start, '.')} --> {_clock(_end(e), '.')}\n{_text(e.label)}\n" for e in _cues(events)]
    return ("WEBVTT\n\n" if header else "") + "\n".join(cues)


def cue_count(events: Iterable[Timed]) -> int:
    return len(_cues(events))
