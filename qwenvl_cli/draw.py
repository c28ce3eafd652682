"""`--draw OUT.png`: a copy of the picture with the detections drawn on it, and saving it.

Boxes are outlines with a filled label tag above them (inside the box when it would fall off the top);
points are filled dots with the tag beside them. Each label gets its own colour, the same one in every
drawing that holds the same set of labels. Coordinates are the image's own pixels (x2, y2 exclusive).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from qwenvl_cli.boxes import Detection
from qwenvl_cli.errors import UsageError

# Saturated colours, distinct from each other and from white and black backgrounds.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 200, 200), (240, 50, 230), (160, 190, 0), (250, 90, 150), (0, 128, 128),
    (170, 110, 40), (128, 0, 0), (40, 170, 130), (128, 128, 0), (0, 0, 128),
    (255, 200, 0), (90, 90, 255), (200, 60, 0), (0, 160, 60), (110, 70, 160),
)


def label_colours(labels: list[str]) -> dict[str, tuple[int, int, int]]:
    """A colour per distinct label. Each label starts at a palette slot picked by a hash of its text
    (stable across runs, unlike hash()); a slot already taken by an earlier label moves it to the next
    free one, so up to len(PALETTE) labels are all distinct."""
    colours: dict[str, tuple[int, int, int]] = {}
    taken: set[int] = set()
    for label in dict.fromkeys(labels):
        slot = int.from_bytes(hashlib.md5(label.encode()).digest()[:4], "big") % len(PALETTE)
        for step in range(len(PALETTE)):
            if (slot + step) % len(PALETTE) not in taken:
                slot = (slot + step) % len(PALETTE)
                break
        taken.add(slot)
        if len(taken) == len(PALETTE):
            taken.clear()  # more labels than colours: start sharing
        colours[label] = PALETTE[slot]
    return colours


# Fonts with CJK glyphs (Qwen often labels in Chinese), tried in order where the system has them; Pillow's
# built-in font draws Latin only (CJK labels would come out as empty boxes).
UNICODE_FONTS = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/System/Library/Fonts/PingFang.ttc",
    "/Library/Fonts/Arial Unicode.ttf",
    "C:/Windows/Fonts/msyh.ttc",
)


def _needs_unicode_font(labels: list[str]) -> bool:
    return any(ord(ch) > 0x2FF for label in labels for ch in label)


def _font(size: int, labels: list[str] = ()) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    if _needs_unicode_font(list(labels)):
        for path in UNICODE_FONTS:
            try:
                return ImageFont.truetype(path, size)
            except (OSError, ImportError):
                continue
    try:
        return ImageFont.load_default(size=size)  # scalable where Pillow has FreeType (>= 10.1)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _text_on(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    luma = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    return (0, 0, 0) if luma > 150 else (255, 255, 255)


def _tag(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, colour, font, pad: int, size) -> None:
    """A filled tag holding `text`, its top-left at `xy`, moved left/up to stay inside the image."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left + 2 * pad, bottom - top + 2 * pad
    x = max(0, min(xy[0], size[0] - tw))
    y = max(0, min(xy[1], size[1] - th))
    draw.rectangle([x, y, x + tw - 1, y + th - 1], fill=colour)
    draw.text((x + pad - left, y + pad - top), text, fill=_text_on(colour), font=font)


def draw_detections(image: Image.Image, dets: list[Detection]) -> Image.Image:
    """A new RGB image: `image` with `dets` (in its pixels) drawn on it; `image` itself is not changed."""
    out = image.convert("RGB")  # always a copy
    W, H = out.size
    line = max(2, round(min(W, H) / 300))
    font = _font(max(10, round(min(W, H) / 40)), [d.label for d in dets])
    pad = max(1, line // 2)
    colours = label_colours([d.label for d in dets])
    draw = ImageDraw.Draw(out)
    tags: list[tuple[tuple[int, int], str, tuple[int, int, int], bool]] = []
    for d in dets:
        colour = colours[d.label]
        if d.bbox is not None:
            x1, y1, x2, y2 = (round(v) for v in d.bbox)
            # PIL's rectangle includes its far corner and grows inward with width: the outline stays
            # inside the box's pixels [x1, x2) x [y1, y2).
            draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=colour, width=line)
            if d.label:
                tags.append(((x1, y1), d.label, colour, True))
        if d.point is not None:
            x, y = (round(v) for v in d.point)
            r = max(3, 2 * line)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline=(255, 255, 255))
            if d.label and d.bbox is None:
                tags.append(((x + r + 2, y - r), d.label, colour, False))
    for (x, y), text, colour, above in tags:  # after every shape, so no outline covers a tag
        if above:
            _, top, _, bottom = draw.textbbox((0, 0), text, font=font)
            th = bottom - top + 2 * pad
            y = y - th if y - th >= 0 else y  # no room above: inside the box, at its top
        _tag(draw, (x, y), text, colour, font, pad, (W, H))
    return out


def image_format(path: Path) -> str | None:
    """The Pillow format a path's suffix names, if Pillow can write it (".png" -> "PNG"), else None."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    return fmt if fmt in Image.SAVE else None


def save_image(image: Image.Image, path: Path, name: str) -> None:
    """Write `image` to `path` (a new file: never over an existing one, never through a link) in the format
    its suffix names (.png, .jpg, .webp, ...). `name` is the picture it was drawn from, for the message.
    An unknown suffix is a UsageError; a failed write an OutputError (that input's error), no file left."""
    from qwenvl_cli.output import new_file

    path = Path(path)
    fmt = image_format(path)
    if fmt is None:
        raise UsageError(
            f"{name}: cannot write the drawing to {path}: unknown image suffix {path.suffix or '(none)'!r} "
            "(use .png, .jpg or .webp)"
        )
    if fmt in ("JPEG", "BMP", "PPM") and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    with new_file(path, name) as f:
        image.save(f, format=fmt)


__all__ = ["PALETTE", "draw_detections", "label_colours", "save_image"]
