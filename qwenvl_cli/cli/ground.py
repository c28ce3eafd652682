"""`qwenvl ground`: boxes (or points) for what the user names, in the original image's pixels."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from qwenvl_cli.cli import app
from qwenvl_cli.cli.common import (
    DEVICE, DPI, DTYPE, JSON, MAX_NEW_TOKENS, MAX_PIXELS, MIN_PIXELS, MODEL, OUTPUT_DIR, PAGES, PASSWORD, QUIET,
    RECURSIVE, REPETITION_PENALTY, SEED, SYSTEM, TEMPERATURE, TOP_K, TOP_P, VERBOSE, Device, DType, Session,
    common_options, make_constraint_factory, reported_errors,
)


def draw_path(draw: Path, name: str, page: int | None, several: bool) -> Path:
    """Where --draw writes one picture's drawing. OUT.png itself for a single image; with several inputs
    `OUT-<input stem>.png`, and PDF pages add `-pN` (`OUT-p2.png`, `OUT-scan-p2.png`). A directory given
    as --draw gets `<input name>[.pN].boxes.png` inside."""
    if draw.is_dir():
        base = "stdin" if name == "-" else Path(name).name
        return draw / (base + (f".p{page}" if page is not None else "") + ".boxes.png")
    parts = []
    if several:
        parts.append("stdin" if name == "-" else Path(name).stem)
    if page is not None:
        parts.append(f"p{page}")
    return draw.with_name("-".join([draw.stem, *parts]) + draw.suffix) if parts else draw


@app.command(
    epilog=(
        "Examples:\n\n"
        "  qwenvl ground street.jpg 'every red car'\n\n"
        "  qwenvl ground street.jpg 'the traffic lights' --json --draw boxes.png\n\n"
        "  qwenvl ground plan.pdf 'the signature' --pages 3 --json | jq '.objects[].bbox_pdf'"
    )
)
def ground(
    inputs: list[str] = typer.Argument(
        ..., metavar="IMAGE_OR_PDF... QUERY", help="Image or PDF files (globs, directories with -r, - for stdin), then what to find."
    ),
    points: bool = typer.Option(False, "--points", help="Points (point_2d) instead of boxes."),
    draw: Optional[Path] = typer.Option(None, "--draw", help="Write a copy of the image with the labelled boxes (PNG, JPEG, WebP)."),
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
    recursive: bool = RECURSIVE,
    output_dir: Optional[str] = OUTPUT_DIR,
    verbose: bool = VERBOSE,
    quiet: bool = QUIET,
) -> None:
    """Find things in images and PDF pages: boxes in the original image's pixels (PDF pages: also PDF points).

    The output always parses: decoding is constrained to the JSON the model was trained to write."""
    with reported_errors():
        from qwenvl_cli.draw import draw_detections, save_image
        from qwenvl_cli.errors import UsageError
        from qwenvl_cli.output import warn
        from qwenvl_cli.tasks.ground import found_record, found_text, ground_plan

        if len(inputs) < 2:
            raise UsageError("give the image or PDF files, then what to find: qwenvl ground photo.jpg 'every red car'")
        *files, query = inputs
        if not query.strip():
            raise UsageError("the query is empty: say what to find, e.g. 'every red car'")
        session = Session(common_options(locals(), files), streams_text=False)
        plan = ground_plan(query, points, make_constraint_factory(session.engine))
        several = len(session.items) > 1
        for outcome in session.run(plan):
            found = outcome.result
            record = {**session.base_record(outcome), "query": query, **found_record(found, points), **session.usage(outcome)}
            if found.truncated:
                warn(f"{outcome.label}: the answer hit --max-new-tokens; showing the complete boxes")
            if draw is not None:
                visual = outcome.seen[0].visual
                target = draw_path(draw, outcome.names[0], outcome.page, several)
                save_image(draw_detections(visual.image, list(found.detections)), target, outcome.label)
                record["drawing"] = str(target)
            session.emit(outcome, record, found_text(record))
        session.close()
