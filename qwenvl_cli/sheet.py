"""Contact sheets: sampled video frames as one grid image of thumbnails, each labelled with its time,
so a user can see what the model saw (and which frames an answer pointed at, outlined in red)."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PAD = 6  # px around each thumbnail; the red outline of a marked frame lives in it
OUTLINE = 3  # px
LABEL_SIZE = 14  # px, Pillow's default font
BACKGROUND = (24, 24, 24)
TEXT = (235, 235, 235)
MARK = (255, 0, 0)


def time_label(seconds: float) -> str:
    """'mm:ss.ff' as the model's dense captions write times; 'h:mm:ss.ff' past an hour."""
    cs = round(seconds * 100)
    minutes, rest = divmod(cs, 6000)
    text = f"{minutes % 60:02d}:{rest // 100:02d}.{rest % 100:02d}"
    return f"{minutes // 60}:{text}" if minutes >= 60 else text


def contact_sheet(
    frames: np.ndarray,
    timestamps: Sequence[float],
    marked: Collection[int] = (),
    columns: int | None = None,
    thumb_width: int = 240,
) -> Image.Image:
    """(n, H, W, 3) uint8 frames -> one RGB image: a grid of `columns` thumbnails (default about
    square), `thumb_width` px wide, each with its time under it; frames whose index is in `marked` are
    outlined in red."""
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (n, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    n, h, w, _ = frames.shape
    if n == 0 or len(timestamps) != n:
        raise ValueError(f"{n} frames and {len(timestamps)} timestamps")
    if thumb_width < 8:
        raise ValueError(f"thumb_width must be at least 8 px, got {thumb_width}")
    columns = max(1, min(n, columns or math.ceil(math.sqrt(n))))
    rows = math.ceil(n / columns)
    thumb_h = max(1, round(thumb_width * h / w))
    font = ImageFont.load_default(LABEL_SIZE)
    label_h = LABEL_SIZE + 6
    cell_w, cell_h = thumb_width + 2 * PAD, thumb_h + 2 * PAD + label_h
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for k in range(n):
        x, y = (k % columns) * cell_w + PAD, (k // columns) * cell_h + PAD
        thumb = Image.fromarray(frames[k]).resize((thumb_width, thumb_h), Image.Resampling.BICUBIC)
        sheet.paste(thumb, (x, y))
        if k in marked:
            box = (x - OUTLINE, y - OUTLINE, x + thumb_width + OUTLINE - 1, y + thumb_h + OUTLINE - 1)
            draw.rectangle(box, outline=MARK, width=OUTLINE)
        label = f"#{k}  {time_label(timestamps[k])}"
        draw.text((x, y + thumb_h + PAD // 2 + 2), label, fill=TEXT, font=font)
    return sheet


__all__ = ["contact_sheet", "time_label"]
