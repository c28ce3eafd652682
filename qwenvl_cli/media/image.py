"""Images for the vision tower: load (EXIF orientation applied, any mode to RGB), smart_resize, and
patchify into the flat `(grid_t·grid_h·grid_w, C·t·p·p)` rows the patch embedding consumes.

Matches transformers' PIL backend (`Qwen2VLImageProcessorPil`) bit for bit: bicubic resize of the
uint8 RGB image by PIL, ×1/255 in float64 cast to float32, CLIP normalisation in float32.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from qwenvl_cli.config import PreprocessorConfig
from qwenvl_cli.errors import InputError, UsageError
from qwenvl_cli.media.capture import Said, captured_output

MAX_ASPECT_RATIO = 200
# The largest image file read. Pillow refuses more than 2 x MAX_IMAGE_PIXELS (179 MP) as a decompression
# bomb; stored uncompressed at 16 bits per channel with alpha, that is 1.43 GB: no real image needs more
# (beyond it, Pillow would still walk a whole GIF to count its frames).
MAX_IMAGE_BYTES = 2 << 30


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 3136, max_pixels: int = 12845056
) -> tuple[int, int]:
    """(height, width) in pixels, both multiples of `factor`, area within [min_pixels, max_pixels] where
    possible, aspect ratio kept as closely as possible. Same arithmetic as Qwen's reference (round() is
    Python's half-to-even there too)."""
    if height < 1 or width < 1:
        raise InputError(f"image is {width}x{height} pixels: nothing to look at")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise InputError(
            f"image is {width}x{height} pixels: aspect ratio {ratio:.1f} exceeds the limit of {MAX_ASPECT_RATIO}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _bomb_message(label: str, exc: BaseException) -> str:
    numbers = [int(n) for n in re.findall(r"(\d+) pixels", str(exc))]
    if len(numbers) >= 2:
        return (
            f"{label}: image has {numbers[0]:,} pixels, over the limit of {numbers[1]:,} "
            "(possible decompression bomb)"
        )
    return f"{label}: possible decompression bomb ({_one_line(exc)})"


def load_image(
    path: str | Path | bytes, name: str | None = None, on_warning: Callable[[str], None] | None = None
) -> Image.Image:
    """Decode an image file (or its bytes) to RGB with EXIF orientation applied; animated images and
    multi-page TIFFs give their first frame, and say so through `on_warning` (one line naming the file).
    Every failure is an InputError naming the file (or `name`, e.g. "-" for stdin)."""
    if isinstance(path, bytes):
        label, source = name or "<image bytes>", io.BytesIO(path)
        if not path:
            raise InputError(f"{label}: empty (0 bytes)")
        size = len(path)
    else:
        label, source = name or str(path), Path(path)
        if not source.exists():
            raise InputError(f"{label}: file not found")
        if source.is_dir():
            raise InputError(f"{label}: is a directory, not an image")
        try:
            size = source.stat().st_size
        except OSError as exc:
            raise InputError(f"{label}: cannot read ({_one_line(exc)})") from exc
        if size == 0:
            raise InputError(f"{label}: empty file (0 bytes)")
    if size > MAX_IMAGE_BYTES:
        raise InputError(
            f"{label}: {size / 2**30:.3g} GiB, over the limit of {MAX_IMAGE_BYTES / 2**30:g} GiB for an image file"
        )
    said = Said()
    try:
        # What libtiff prints on fd 2 and Pillow's UserWarnings are caught: one line below, at most.
        with captured_output() as said:
            # Treat PIL's warning band (over MAX_IMAGE_PIXELS, under twice that) as a refusal as well.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as opened:
                opened.load()  # Image.open is lazy: truncation only shows when decoding
                note = _frames_note(opened, label)
                rgb = to_rgb(ImageOps.exif_transpose(opened))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(_bomb_message(label, exc)) from exc
    except Image.UnidentifiedImageError as exc:
        raise InputError(f"{label}: not an image Pillow can read (unknown or unsupported format)") from exc
    except PermissionError as exc:
        raise InputError(f"{label}: permission denied") from exc
    except OSError as exc:
        if "truncated" in str(exc):
            raise InputError(f"{label}: truncated image ({_with_said(exc, said)})") from exc
        raise InputError(f"{label}: corrupt or unreadable image ({_with_said(exc, said)})") from exc
    except Exception as exc:  # Pillow's plugins raise assorted errors on malformed files
        raise InputError(f"{label}: corrupt image ({type(exc).__name__}: {_with_said(exc, said)})") from exc
    if on_warning is not None:
        if note is not None:
            on_warning(note)
        summary = said.summary()
        if summary is not None:
            on_warning(f"{label}: the decoder warned: {summary}")
    return rgb


def _with_said(exc: BaseException, said: Said) -> str:
    """Pillow's error, with the reason the C library printed (libtiff: `decoder error -2` says nothing; its
    `ZIPDecode: Decoding error at scanline 0, ...` does)."""
    lines = [line for line in said.output.splitlines() if line.strip()]
    return _one_line(exc) if not lines else f"{_one_line(exc)}: {' '.join(lines[0].split())}"


def _frames_note(image: Image.Image, label: str) -> str | None:
    """The warning for an image of several frames, of which only the first is used."""
    n = getattr(image, "n_frames", 1)
    # MPO is a camera JPEG carrying extra pictures (depth map, stereo pair): its first frame is the photo.
    if n <= 1 or image.format == "MPO":
        return None
    if image.format == "TIFF":
        return f"{label}: multi-page image ({n} pages): using the first page"
    return f"{label}: animated image ({n} frames): using the first frame"


def _to_8bit(image: Image.Image) -> Image.Image:
    """Greyscale of more than 8 bits (I;16*, I, F) to 'L'. PIL's own convert clips at 255, which turns
    16-bit scans white; scale the full range instead (16-bit -> /257, float in [0, 1] -> ×255). Mode 'I'
    holds 16-bit PNGs in older Pillows: values above 255 there are read as 16-bit."""
    a = np.asarray(image)
    if image.mode.startswith("I;16") or (image.mode == "I" and a.max(initial=0) > 255):
        a = a.astype(np.float64) / 257.0
    elif image.mode == "F" and a.size and 0.0 <= a.min() and a.max() <= 1.0:
        a = a.astype(np.float64) * 255.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 'RGB'. Transparency (an alpha band, premultiplied or not, or a palette/colour-key
    `transparency`) is composited onto white, as transformers' convert_to_rgb does."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _to_8bit(image)
    if image.mode == "La":  # premultiplied; PIL converts it only to LA
        image = image.convert("LA")
    has_alpha = image.mode in ("RGBA", "RGBa", "LA", "PA") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # a copy even when already RGB


@dataclass(frozen=True)
class ProcessedImage:
    pixel_values: torch.Tensor  # (t·gh·gw, C·tp·p·p) float32, rows in 2x2 merge-block order
    grid_thw: tuple[int, int, int]  # (1, gh, gw) in patches of the resized image
    resized_size: tuple[int, int]  # (width, height) in pixels, the image the model saw
    original_size: tuple[int, int]  # (width, height) in pixels, after EXIF orientation


def preprocess_image(
    image: Image.Image,
    cfg: PreprocessorConfig,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> ProcessedImage:
    """RGB -> smart_resize (bicubic) -> ×1/255 -> (x - mean) / std -> two identical temporal frames ->
    patches. min_pixels/max_pixels override the config's."""
    lo = cfg.min_pixels if min_pixels is None else min_pixels
    hi = cfg.max_pixels if max_pixels is None else max_pixels
    if lo < 1 or hi < 1 or lo > hi:
        raise UsageError(f"need 0 < min_pixels <= max_pixels, got min_pixels {lo}, max_pixels {hi}")

    rgb = to_rgb(image)
    width, height = rgb.size
    new_h, new_w = smart_resize(height, width, factor=cfg.factor, min_pixels=lo, max_pixels=hi)
    # Resize the uint8 image in PIL, as the reference does (not a float resize: that differs by ~1e-2).
    resized = rgb.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    x = np.asarray(resized)  # (H, W, C) uint8
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)  # the reference rescales in float64
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    x = (x - mean) / std  # float32 throughout, like the reference
    pixels = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)  # (C, H, W)
    return ProcessedImage(
        pixel_values=patchify(pixels, cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size),
        grid_thw=(1, new_h // cfg.patch_size, new_w // cfg.patch_size),
        resized_size=(new_w, new_h),
        original_size=(width, height),
    )


def patchify(pixels: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int) -> torch.Tensor:
    """(C, H, W) one still image -> (gh·gw, C·tp·p·p): the image repeated to `temporal_patch_size` frames,
    rows ordered by 2x2 merge block (block row, block col, then row/col inside the block), features in
    (C, t, py, px) order. H and W must be multiples of patch_size·merge_size."""
    c, h, w = pixels.shape
    p, m, tp = patch_size, merge_size, temporal_patch_size
    gh, gw = h // p, w // p
    if gh * p != h or gw * p != w or gh % m or gw % m:
        raise ValueError(f"image {w}x{h} is not a multiple of patch_size*merge_size = {p * m}")
    x = pixels.reshape(c, gh // m, m, p, gw // m, m, p)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
    x = x.unsqueeze(5).expand(*x.shape[:5], tp, p, p)  # (gh/m, gw/m, m, m, C, tp, p, p)
    return x.reshape(gh * gw, c * tp * p * p).contiguous()


__all__ = [
    "ProcessedImage",
    "load_image",
    "patchify",
    "preprocess_image",
    "smart_resize",
    "to_rgb",
]
