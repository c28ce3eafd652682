"""`qwenvl describe`: free-text answers about images, PDF pages and videos, streamed."""

from __future__ import annotations

from typing import Optional

import typer

from qwenvl_cli.cli import app
from qwenvl_cli.cli.common import common_options, reported_errors, shared_options


@app.command(
    epilog=(
        "Examples:\n\n"
        "  qwenvl describe cat.jpg\n\n"
        "  qwenvl describe a.png b.png --together --prompt 'What changed?'\n\n"
        "  qwenvl describe report.pdf --pages 1-2 --prompt 'Summarise this page.'\n\n"
        "  qwenvl describe clip.mp4 --prompt 'What happens after the door opens?'\n\n"
        "  ls *.jpg | qwenvl describe - --json | jq -r .text"
    )
)
@shared_options()
def describe(
    inputs: list[str] = typer.Argument(
        ..., metavar="FILE...", help="Image, PDF or video files, globs, directories (-r), or - to read paths (or one file) from stdin."
    ),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="What to ask (default: describe the image or video)."),
    together: bool = typer.Option(False, "--together", help="All images, pages and videos in one prompt, one answer."),
    **shared,
) -> None:
    """Describe images, PDF pages and videos, or answer --prompt about them. Text streams to stdout as it is
    generated. Videos are sampled at 2 fps (see `qwenvl video` for the sampling options)."""
    with reported_errors():
        from qwenvl_cli.cli.run import run_task
        from qwenvl_cli.tasks.describe import DescribeTask

        run_task(DescribeTask(prompt), common_options({**shared, "together": together}, inputs))
