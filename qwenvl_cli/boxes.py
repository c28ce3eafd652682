"""Boxes and points from the model's JSON, and their move from the resized image the model saw to the
original image the user gave.

The model answers in absolute pixels of the RESIZED image (`resized_size` = (w, h), multiples of 28);
`to_original` returns pixels of the ORIGINAL upright image (`original_size` = (W, H), after EXIF
orientation) as integers: x1, y1 inclusive, x2, y2 exclusive edges, so a box covers x2 - x1 columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

BOX_KEYS = ("bbox_2d", "bbox")
POINT_KEYS = ("point_2d", "point")
LABEL_KEYS = ("label", "text_content", "text", "name")


@dataclass(frozen=True)
class Detection:
    """One thing found: a box, a point, or both, with its label ("" when the model gave none)."""

    label: str
    bbox: tuple[float, float, float, float] | None = None  # x1, y1, x2, y2 in pixels of some image
    point: tuple[float, float] | None = None  # x, y in pixels of the same image

    def __post_init__(self) -> None:
        if self.bbox is not None and len(self.bbox) != 4:
            raise ValueError(f"a bbox has 4 numbers (x1, y1, x2, y2), got {len(self.bbox)}")
        if self.point is not None and len(self.point) != 2:
            raise ValueError(f"a point has 2 numbers (x, y), got {len(self.point)}")


def _is_item(value: Any) -> bool:
    return isinstance(value, dict) and any(k in value for k in BOX_KEYS + POINT_KEYS)


def _numbers(value: Any, n: int) -> tuple[float, ...] | None:
    """`value` as n finite numbers, or None (wrong length, bools, strings, NaN)."""
    if not isinstance(value, (list, tuple)) or len(value) != n:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return None
    return tuple(value)


def _first(item: dict, keys: tuple[str, ...]) -> Any:
    return next((item[k] for k in keys if item.get(k) is not None), None)


def _label(item: dict) -> str:
    for key in LABEL_KEYS:
        v = item.get(key)
        if isinstance(v, str):
            return v.strip()
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)
    return ""


def _detection(item: Any) -> Detection | None:
    if not _is_item(item):
        return None
    raw_box, raw_point = _first(item, BOX_KEYS), _first(item, POINT_KEYS)
    bbox = _numbers(raw_box, 4) if raw_box is not None else None
    point = _numbers(raw_point, 2) if raw_point is not None else None
    if (raw_box is not None and bbox is None) or (raw_point is not None and point is None):
        return None  # a box or point is there but malformed: skip the whole item
    if bbox is None and point is None:
        return None
    return Detection(label=_label(item), bbox=bbox, point=point)


def detections_from_json(value: Any) -> list[Detection]:
    """Detections from parsed model output: a list of items, a single item, or a dict wrapping a list
    (`{"objects": [...]}`: its first list value that holds an item). Items that are not dicts, or whose
    box or point has the wrong length or non-numbers, are skipped. Coordinates are left as given."""
    if _is_item(value):
        items: list = [value]
    elif isinstance(value, list):
        items = value
    elif isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        items = next((v for v in lists if any(_is_item(i) for i in v)), [])
    else:
        items = []
    return [d for d in map(_detection, items) if d is not None]


def _round(v: float) -> int:
    return math.floor(v + 0.5)  # nearest, halves up (Python's round() would go half-to-even)


def to_original(
    dets: list[Detection], resized_size: tuple[int, int], original_size: tuple[int, int]
) -> list[Detection]:
    """Detections in pixels of the resized image (w, h) -> pixels of the original image (W, H).

    x scales by W/w, y by H/h. Boxes: inverted corners swapped, clamped to [0, W] x [0, H], rounded to
    integers (halves up), dropped when nothing is left (zero width or height: entirely outside, or
    degenerate). Points: dropped when outside [0, W] x [0, H], else rounded and kept on a real pixel
    ([0, W-1] x [0, H-1]). A detection with a dropped box or point is dropped whole."""
    (w, h), (W, H) = resized_size, original_size
    if min(w, h, W, H) <= 0:
        raise ValueError(f"image sizes must be positive, got resized {w}x{h}, original {W}x{H}")
    sx, sy = W / w, H / h
    out: list[Detection] = []
    for d in dets:
        bbox = point = None
        if d.bbox is not None:
            x1, y1, x2, y2 = d.bbox
            xa, xb = sorted((x1 * sx, x2 * sx))
            ya, yb = sorted((y1 * sy, y2 * sy))
            box = (
                _round(min(max(xa, 0.0), W)),
                _round(min(max(ya, 0.0), H)),
                _round(min(max(xb, 0.0), W)),
                _round(min(max(yb, 0.0), H)),
            )
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            bbox = box
        if d.point is not None:
            px, py = d.point[0] * sx, d.point[1] * sy
            if not (0 <= px <= W and 0 <= py <= H):
                continue
            point = (min(_round(px), W - 1), min(_round(py), H - 1))
        out.append(Detection(label=d.label, bbox=bbox, point=point))
    return out


__all__ = ["Detection", "detections_from_json", "to_original"]
