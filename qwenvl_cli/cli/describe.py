"""`qwenvl describe`: free-text answers about images and PDF pages, streamed."""

from __future__ import annotations

from typing import Optional

import typer

from qwenvl_cli.cli import app
from qwenvl_cli.cli.common import Session, common_options, reported_errors, shared_options


@app.command(
    epilog=(
        "Examples:\n\n"
        "  qwenvl describe cat.jpg\n\n"
        "  qwenvl describe a.png b.png --together --prompt 'What changed?'\n\n"
        "  qwenvl describe report.pdf --pages 1-2 --prompt 'Summarise this page.'\n\n"
        "  ls *.jpg | qwenvl describe - --json | jq -r .text"
    )
)
@shared_options()
def describe(
    inputs: list[str] = typer.Argument(
        ..., metavar="IMAGE_OR_PDF...", help="Image or PDF files, globs, directories (-r), or - to read paths (or one file) from stdin."
    ),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="What to ask (default: describe the image)."),
    together: bool = typer.Option(False, "--together", help="All images and pages in one prompt, one answer."),
    **shared,
) -> None:
    """Describe images and PDF pages, or answer --prompt about them. Text streams to stdout as it is generated."""
    with reported_errors():
        from qwenvl_cli.tasks.describe import describe_plan

        session = Session(common_options({**shared, "together": together}, inputs), streams_text=True)
        for outcome in session.run(describe_plan(prompt)):
            record = {**session.base_record(outcome), "text": outcome.answer.text, **session.usage(outcome)}
            session.emit(outcome, record)
        session.close()
