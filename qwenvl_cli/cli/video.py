"""`qwenvl video`: describe a video, find when something happens in it, or list its events, with times in
seconds of the source file."""

from __future__ import annotations

from enum import Enum
from typing import Optional

import typer

from qwenvl_cli.cli import app
from qwenvl_cli.cli.common import common_options, reported_errors, shared_options


class EventFormat(str, Enum):
    text = "text"
    json = "json"
    srt = "srt"
    vtt = "vtt"


@app.command(
    epilog=(
        "Examples:\n\n"
        "  qwenvl video clip.mp4\n\n"
        "  qwenvl video match.mp4 --find 'the ball hits the ground'      # 00:01:04.000 - 00:01:12.000  ...\n\n"
        "  qwenvl video talk.mp4 --events --format srt -o subs/\n\n"
        "  qwenvl video lecture.mp4 --segment 60 --json | jq -r '\"\\(.start)s: \\(.text)\"'\n\n"
        "  qwenvl video clip.mp4 --start 1:30 --end 2:00 --fps 4 --sheet frames.png\n\n"
        "Times: seconds (90, 12.5) or [hh:]mm:ss(.fff) (1:30, 01:02:03.250)."
    )
)
@shared_options(exclude=("pages", "dpi", "password"))
def video(
    inputs: list[str] = typer.Argument(
        ..., metavar="VIDEO...", help="Video files, globs, directories (-r), or - to read paths (or one file) from stdin."
    ),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="What to ask (default: describe the video)."),
    find: Optional[str] = typer.Option(None, "--find", help="When does this happen? Prints the time range in seconds of the file."),
    events: bool = typer.Option(False, "--events", help="List the events with their start and end times (dense captions)."),
    fmt: EventFormat = typer.Option(EventFormat.text, "--format", "-f", help="--events as text lines, JSON, SRT or WebVTT subtitles."),
    fps: Optional[float] = typer.Option(None, "--fps", help="Frames per second to sample [default 2]."),
    nframes: Optional[int] = typer.Option(None, "--nframes", help="Sample exactly this many frames (rounded to even) instead of --fps."),
    start: Optional[str] = typer.Option(None, "--start", help="Start here (seconds or [hh:]mm:ss.fff)."),
    end: Optional[str] = typer.Option(None, "--end", help="Stop here (seconds or [hh:]mm:ss.fff)."),
    max_frames: Optional[int] = typer.Option(None, "--max-frames", help="At most this many frames [default 768]."),
    total_pixels: Optional[int] = typer.Option(
        None, "--total-pixels", help="Pixel budget over all frames [default 24576*28*28 = 24,576 video tokens]."
    ),
    segment: Optional[str] = typer.Option(None, "--segment", help="Answer each SECONDS-long segment on its own (one answer per segment)."),
    sheet: Optional[str] = typer.Option(None, "--sheet", help="Write a contact sheet of the frames the model saw: OUT.png or a DIR/."),
    **shared,
) -> None:
    """Understand videos: a description (streamed), --find 'an event' (when it happens), or --events (what
    happens when). Frames are sampled by their timestamps; the model sees their absolute times."""
    with reported_errors():
        from qwenvl_cli.cli.run import run_task
        from qwenvl_cli.tasks.video import video_task

        task, timing = video_task(prompt, find, events, fmt.value, sheet, start=start, end=end, segment=segment)
        given = {"fps": fps, "nframes": nframes, "max_frames": max_frames, "total_pixels": total_pixels, **timing}
        run_task(task, common_options({**shared, **given}, inputs))
