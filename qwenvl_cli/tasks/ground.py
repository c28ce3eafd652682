"""`qwenvl ground`: find things, as boxes (or points) in the ORIGINAL image's pixels.

The prompt is the cookbook's grounding prompt; decoding is constrained to the JSON list the model was
trained to write (```json fence, `{"bbox_2d": [x1, y1, x2, y2], "label": ...}` in pixels of the resized
image it saw). The boxes are then scaled to the upright original image, clamped, degenerate ones
dropped; PDF pages also get PDF points.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from qwenvl_cli.boxes import Detection, detections_from_json, to_original
from qwenvl_cli.engine import Answer
from qwenvl_cli.errors import AnswerError, UsageError
from qwenvl_cli.inputs import display_base, is_file
from qwenvl_cli.output import free_path, writable_directory
from qwenvl_cli.tasks.base import Rendered, Task, json_answer
from qwenvl_cli.tasks.runner import Job, Outcome, Seen
from qwenvl_cli.tasks.sources import Part

LABEL = {"type": "string", "maxLength": 200}


def coords_schema(n: int, size: tuple[int, int]) -> dict:
    """n integers alternating x, y, each within the resized image the model saw (width, height): the
    grammar cannot produce a coordinate off the picture."""
    width, height = size
    axes = [{"type": "integer", "minimum": 0, "maximum": width if i % 2 == 0 else height} for i in range(n)]
    return {"type": "array", "prefixItems": axes, "items": False, "minItems": n, "maxItems": n}


def ground_schema(points: bool, size: tuple[int, int]) -> dict:
    """The list of `{"bbox_2d": [x1, y1, x2, y2], "label"}` (or `point_2d`) for a picture resized to `size`."""
    key, n = ("point_2d", 2) if points else ("bbox_2d", 4)
    item = {
        "type": "object",
        "properties": {key: coords_schema(n, size), "label": LABEL},
        "required": [key, "label"],
        "additionalProperties": False,
    }
    return {"type": "array", "items": item}


def ground_prompt(query: str, points: bool) -> str:
    what = "point" if points else "bbox"
    return f"Locate {query.strip()} in the image, output the {what} coordinates in JSON format."


@dataclass(frozen=True)
class Found:
    """What was found in one picture."""

    detections: tuple[Detection, ...]  # in the original image's pixels (PDF: the rendered page's)
    image_size: tuple[int, int]  # (width, height) of that image
    truncated: bool = False  # the answer hit --max-new-tokens; the complete items are kept
    pdf_boxes: tuple[tuple[float, ...], ...] | None = None  # per detection, PDF points (PDF pages only)
    dpi: float | None = None


def read_detections(answer: Answer, seen: Seen) -> Found:
    """The model's JSON -> detections in original pixels (+ PDF points for a page)."""
    value = json_answer(answer, "box")
    image = seen.image
    found = to_original(detections_from_json(value), image.resized_size, image.original_size)
    if not found and answer.finish_reason == "length" and value in ([], {}):
        raise AnswerError(
            f"the answer was cut off at {answer.completion_tokens} tokens before any complete box "
            "(raise --max-new-tokens)"
        )
    pdf = None
    geometry = seen.source.geometry
    if geometry is not None:
        pdf = tuple(
            geometry.to_points(d.bbox) if d.bbox is not None else geometry.point_to_points(*d.point) for d in found
        )
    return Found(
        tuple(found),
        image.original_size,
        truncated=answer.finish_reason == "length",
        pdf_boxes=pdf,
        dpi=geometry.dpi if geometry is not None else None,
    )


def found_record(found: Found, points: bool) -> dict:
    """The JSON fields for one picture: objects as `{"label", "bbox_2d"}` (or `point_2d`), plus
    `bbox_pdf` / `point_pdf` in PDF points on PDF pages."""
    key = "point_2d" if points else "bbox_2d"
    objects = []
    for i, d in enumerate(found.detections):
        coords = d.point if points else d.bbox
        if coords is None:
            continue
        obj = {"label": d.label, key: [int(v) for v in coords]}
        if found.pdf_boxes is not None:
            obj["point_pdf" if points else "bbox_pdf"] = list(found.pdf_boxes[i])
        objects.append(obj)
    record = {"objects": objects, "image_size": list(found.image_size)}
    if found.dpi is not None:
        record["dpi"] = found.dpi
    return record


def found_text(record: dict) -> str:
    """Human-readable lines: `label  [x1, y1, x2, y2]` (and the PDF points)."""
    lines = []
    for obj in record["objects"]:
        coords = obj.get("bbox_2d") or obj.get("point_2d")
        line = f"{obj['label'] or '(no label)'}  {coords}"
        pdf = obj.get("bbox_pdf") or obj.get("point_pdf")
        if pdf is not None:
            line += f"  pdf points {pdf}"
        lines.append(line)
    return "\n".join(lines) if lines else "(nothing found)"


def split_query(inputs: Sequence[str]) -> tuple[list[str], str]:
    """`FILE... QUERY` -> (files, query); the last argument is always the query."""
    if len(inputs) < 2:
        raise UsageError("give the image or PDF files, then what to find: qwenvl ground photo.jpg 'every red car'")
    *files, query = inputs
    if not query.strip():
        raise UsageError("the query is empty: say what to find, e.g. 'every red car'")
    if is_file(query):
        raise UsageError(f"the last argument is what to find, but {query!r} names a file: add the query after the files")
    return files, query


def draw_target(raw: str, option: str = "--draw") -> Path:
    """Check --draw (or video's --sheet) before any work: a directory (existing, or named with a trailing
    /: created), or a file whose suffix names an image format Pillow writes, in an existing directory."""
    from qwenvl_cli.draw import image_format

    path = Path(raw).expanduser()
    if raw.endswith(("/", "\\")) or path.is_dir():
        return writable_directory(path, f"{option} {raw}")
    if image_format(path) is None:
        raise UsageError(f"{option} {raw}: unknown image suffix {path.suffix or '(none)'!r} (use .png, .jpg or .webp)")
    if not path.parent.is_dir():
        raise UsageError(f"{option} {raw}: no directory {path.parent}")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {raw}: the directory {path.parent} is not writable")
    return path


def draw_path(draw: Path, name: str, part: Part | None, several: bool, used: set[Path], kind: str = "boxes") -> Path:
    """Where --draw (or video's --sheet) writes one picture. OUT.png itself for a single input; with
    several inputs `OUT-<input stem>.png`, and a part adds its tag (`OUT-p2.png`, `OUT-scan-p2.png`). A
    directory gets `<input name>[.pN].<kind>.png` inside. A path already written in this run, or that
    exists (the input itself, an earlier file, a symlink), gets -2, -3...: nothing is overwritten."""
    if draw.is_dir():
        base = display_base(name)
        path = draw / (base + (f".{part.tag}" if part is not None else "") + f".{kind}.png")
    else:
        parts = []
        if several:
            parts.append(Path(display_base(name)).stem)
        if part is not None:
            parts.append(part.tag)
        path = draw.with_name("-".join([draw.stem, *parts]) + draw.suffix) if parts else draw
    return free_path(path, used)


class GroundTask(Task):
    """Boxes (or points) for `query` in each still, decoding constrained to the list the model writes;
    `draw` is the checked --draw target."""

    def __init__(self, query: str, points: bool, draw: Path | None = None) -> None:
        self.query = query
        self.points = points
        self.draw = draw
        self.drawn: set[Path] = set()
        self.several = False

    def prepare(self, engine, items) -> None:
        super().prepare(engine, items)
        self.several = len(items) > 1

    def plan(self, seen: Sequence[Seen]) -> Job:
        [one] = seen  # grounding answers about one picture at a time
        schema = ground_schema(self.points, one.image.resized_size)
        constraint = self.engine.json_constraint(schema, fenced=True)
        return Job(ground_prompt(self.query, self.points), lambda answer: read_detections(answer, one), constraint)

    def render(self, outcome: Outcome) -> Rendered:
        from qwenvl_cli.draw import draw_detections, save_image

        found = outcome.result
        fields = {"query": self.query, **found_record(found, self.points)}
        notes = ()
        if found.truncated:
            notes = (f"{outcome.label}: the answer hit --max-new-tokens; showing the complete boxes",)
        if self.draw is not None:
            path = draw_path(self.draw, outcome.names[0], outcome.part, self.several, self.drawn)
            save_image(draw_detections(outcome.seen[0].source.image, list(found.detections)), path, outcome.label)
            fields["drawing"] = str(path)
        return Rendered(fields, found_text(fields), notes=notes)
