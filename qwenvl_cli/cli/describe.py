"""`qwenvl describe`: free-text answers about images and PDF pages, streamed."""

from __future__ import annotations

from typing import Optional

import typer

from qwenvl_cli.cli import app
from qwenvl_cli.cli.common import (
    DEVICE, DPI, DTYPE, JSON, MAX_NEW_TOKENS, MAX_PIXELS, MIN_PIXELS, MODEL, OUTPUT_DIR, PAGES, PASSWORD, QUIET,
    RECURSIVE, REPETITION_PENALTY, SEED, SYSTEM, TEMPERATURE, TOP_K, TOP_P, VERBOSE, Device, DType, Session,
    common_options, reported_errors,
)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  qwenvl describe cat.jpg\n\n"
        "  qwenvl describe a.png b.png --together --prompt 'What changed?'\n\n"
        "  qwenvl describe report.pdf --pages 1-2 --prompt 'Summarise this page.'\n\n"
        "  ls *.jpg | qwenvl describe - --json | jq -r .text"
    )
)
def describe(
    inputs: list[str] = typer.Argument(
        ..., metavar="IMAGE_OR_PDF...", help="Image or PDF files, globs, directories (-r), or - to read paths (or one file) from stdin."
    ),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="What to ask (default: describe the image)."),
    system: str = SYSTEM,
    model: Optional[str] = MODEL,
    json: bool = JSON,
    max_new_tokens: Optional[int] = MAX_NEW_TOKENS,
    temperature: Optional[float] = TEMPERATURE,
    top_p: Optional[float] = TOP_P,
    top_k: Optional[int] = TOP_K,
    repetition_penalty: Optional[float] = REPETITION_PENALTY,
    seed: Optional[int] = SEED,
    device: Device = DEVICE,
    dtype: DType = DTYPE,
    min_pixels: Optional[int] = MIN_PIXELS,
    max_pixels: Optional[int] = MAX_PIXELS,
    pages: Optional[str] = PAGES,
    dpi: Optional[float] = DPI,
    password: Optional[str] = PASSWORD,
    together: bool = typer.Option(False, "--together", help="All images and pages in one prompt, one answer."),
    recursive: bool = RECURSIVE,
    output_dir: Optional[str] = OUTPUT_DIR,
    verbose: bool = VERBOSE,
    quiet: bool = QUIET,
) -> None:
    """Describe images and PDF pages, or answer --prompt about them. Text streams to stdout as it is generated."""
    with reported_errors():
        from qwenvl_cli.tasks.describe import describe_plan

        session = Session(common_options(locals(), inputs), streams_text=True)
        for outcome in session.run(describe_plan(prompt)):
            record = {**session.base_record(outcome), "text": outcome.answer.text, **session.usage(outcome)}
            session.emit(outcome, record)
        session.close()
