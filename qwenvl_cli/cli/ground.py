"""`qwenvl ground`: boxes (or points) for what the user names, in the original image's pixels."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from qwenvl_cli.cli import app
from qwenvl_cli.cli.common import Session, common_options, make_constraint_factory, reported_errors, shared_options
from qwenvl_cli.inputs import display_base, is_file


def draw_target(raw: str) -> Path:
    """Check --draw before any work: a directory (existing, or named with a trailing /: created), or a
    file whose suffix names an image format Pillow writes, in an existing directory."""
    from qwenvl_cli.draw import image_format
    from qwenvl_cli.errors import UsageError

    path = Path(raw).expanduser()
    if raw.endswith(("/", "\\")) or path.is_dir():
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--draw {raw}: cannot create the directory ({exc.strerror})") from None
        return path
    if image_format(path) is None:
        raise UsageError(f"--draw {raw}: unknown image suffix {path.suffix or '(none)'!r} (use .png, .jpg or .webp)")
    if not path.parent.is_dir():
        raise UsageError(f"--draw {raw}: no directory {path.parent}")
    return path


def draw_path(draw: Path, name: str, page: int | None, several: bool, used: set[Path]) -> Path:
    """Where --draw writes one picture's drawing. OUT.png itself for a single image; with several inputs
    `OUT-<input stem>.png`, and PDF pages add `-pN` (`OUT-p2.png`, `OUT-scan-p2.png`). A directory given
    as --draw gets `<input name>[.pN].boxes.png` inside. A path already written in this run gets -2, -3..."""
    if draw.is_dir():
        base = display_base(name)
        path = draw / (base + (f".p{page}" if page is not None else "") + ".boxes.png")
    else:
        parts = []
        if several:
            parts.append(Path(display_base(name)).stem)
        if page is not None:
            parts.append(f"p{page}")
        path = draw.with_name("-".join([draw.stem, *parts]) + draw.suffix) if parts else draw
    candidate, n = path, 1
    while candidate in used:
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    used.add(candidate)
    return candidate


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
        from qwenvl_cli.draw import draw_detections, save_image
        from qwenvl_cli.errors import UsageError
        from qwenvl_cli.output import warn
        from qwenvl_cli.tasks.ground import found_record, found_text, ground_plan

        if len(inputs) < 2:
            raise UsageError("give the image or PDF files, then what to find: qwenvl ground photo.jpg 'every red car'")
        *files, query = inputs
        if not query.strip():
            raise UsageError("the query is empty: say what to find, e.g. 'every red car'")
        if is_file(query):
            raise UsageError(f"the last argument is what to find, but {query!r} names a file: add the query after the files")
        target = draw_target(draw) if draw is not None else None
        session = Session(common_options(shared, files), streams_text=False)
        plan = ground_plan(query, points, make_constraint_factory(session.engine))
        several = len(session.items) > 1
        drawn: set[Path] = set()
        for outcome in session.run(plan):
            found = outcome.result
            record = {**session.base_record(outcome), "query": query, **found_record(found, points), **session.usage(outcome)}
            if found.truncated:
                warn(f"{outcome.label}: the answer hit --max-new-tokens; showing the complete boxes")
            if target is not None:
                visual = outcome.seen[0].visual
                path = draw_path(target, outcome.names[0], outcome.page, several, drawn)
                save_image(draw_detections(visual.image, list(found.detections)), path, outcome.label)
                record["drawing"] = str(path)
            session.emit(outcome, record, found_text(record))
        session.close()
