"""`qwenvl ground`: boxes (or points) for what the user names, in the original image's pixels."""

from __future__ import annotations

from typing import Optional

import typer

from qwenvl_cli.cli import app
from qwenvl_cli.cli.common import common_options, reported_errors, shared_options


@app.command(
    epilog=(
        "Examples:\n\n"
        "  qwenvl ground street.jpg 'every red car'\n\n"
        "  qwenvl ground street.jpg 'the traffic lights' --json --draw boxes.png\n\n"
        "  qwenvl ground plan.pdf 'the signature' --pages 3 --json | jq '.objects[].bbox_pdf'"
    )
)
@shared_options()
def ground(
    inputs: list[str] = typer.Argument(
        ..., metavar="IMAGE_OR_PDF... QUERY", help="Image or PDF files (globs, directories with -r, - for stdin), then what to find."
    ),
    points: bool = typer.Option(False, "--points", help="Points (point_2d) instead of boxes."),
    draw: Optional[str] = typer.Option(
        None, "--draw", help="Write a copy of each picture with the labelled boxes: OUT.png (.jpg, .webp) or a DIR/."
    ),
    **shared,
) -> None:
    """Find things in images and PDF pages: boxes in the original image's pixels (PDF pages: also PDF points).

    The output always parses: decoding is constrained to the JSON the model was trained to write."""
    with reported_errors():
        from qwenvl_cli.cli.run import run_task
        from qwenvl_cli.tasks.ground import GroundTask, draw_target, split_query

        files, query = split_query(inputs)
        run_task(GroundTask(query, points, draw_target(draw) if draw is not None else None), common_options(shared, files))
