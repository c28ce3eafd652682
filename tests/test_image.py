"""Image loading and preprocessing: smart_resize table, parity with transformers' PIL image processor,
EXIF orientation, mode conversion and the errors a user sees for bad files."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from qwenvl_cli.config import PreprocessorConfig
from qwenvl_cli.errors import InputError, UsageError
from qwenvl_cli.media.image import (
    load_image,
    patchify,
    preprocess_image,
    smart_resize,
    to_rgb,
)


# ---------------------------------------------------------------------------------------------- smart_resize
@pytest.mark.parametrize(
    ("hw", "kwargs", "expected"),
    [
        ((870, 1398), {}, (868, 1400)),  # round(31.07)=31, round(49.93)=50
        ((1024, 1024), {}, (1036, 1036)),  # round(36.57)=37 -> 1369 tokens
        ((70, 70), {}, (56, 56)),  # 70/28 = 2.5 rounds half to even -> 2
        ((98, 98), {}, (112, 112)),  # 3.5 -> 4
        ((20, 30), {}, (56, 84)),  # 28x28 < 3136: beta=sqrt(3136/600)=2.286, ceil(1.63)=2, ceil(2.45)=3
        ((4000, 6000), {}, (2912, 4368)),  # 4004x5992 > max: beta=1.3669, floor(104.5)=104, floor(156.8)=156
        ((300, 2400), {}, (308, 2408)),  # ratio 8: round(10.71)=11, round(85.71)=86
        ((10, 2000), {}, (28, 812)),  # ratio exactly 200 is allowed; h rounds to 0, min branch fixes it
        ((480, 640), {"min_pixels": 50_000, "max_pixels": 100_000}, (252, 364)),  # beta=1.7527: 9.78, 13.04
        ((150, 200), {"min_pixels": 200_000, "max_pixels": 1_000_000}, (392, 532)),  # beta=2.582, 14 and 19
    ],
)
def test_smart_resize_table(hw, kwargs, expected):
    assert smart_resize(*hw, **kwargs) == expected


def test_smart_resize_refuses_extreme_aspect_ratio():
    with pytest.raises(InputError, match=r"2010x10 pixels: aspect ratio 201\.0 exceeds the limit of 200"):
        smart_resize(10, 2010)


def test_vision_token_count():
    from qwenvl_cli.prompts import vision_token_count

    assert vision_token_count((1, 74, 74)) == 1369
    assert vision_token_count(torch.tensor([2, 4, 6])) == 12
    assert vision_token_count([1, 8, 8], merge_size=1) == 64


# ---------------------------------------------------------------------------------------------- parity
@pytest.fixture(scope="module")
def reference():
    mod = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

    def run(image: Image.Image, min_pixels: int, max_pixels: int):
        proc = mod.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
        out = proc(images=[image], return_tensors="np")
        return torch.from_numpy(np.asarray(out["pixel_values"])), tuple(int(v) for v in out["image_grid_thw"][0])

    return run


def _noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Smooth gradient plus noise: exercises the bicubic filter everywhere, including overshoot."""
    rng = np.random.default_rng(seed)
    channels = len(Image.new(mode, (1, 1)).getbands())
    yy, xx = np.mgrid[0:height, 0:width]
    base = (xx * 255 / max(width - 1, 1) + yy * 255 / max(height - 1, 1)) / 2
    arr = base[..., None] * 0.6 + rng.integers(0, 100, (height, width, channels))
    arr = np.clip(arr, 0, 255).astype(np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode=mode)


def _rgba_with_holes() -> Image.Image:
    img = _noise(333, 222, "RGBA", seed=3)
    a = np.asarray(img).copy()
    a[..., 3] = np.linspace(0, 255, a.shape[1]).astype(np.uint8)[None, :]  # alpha ramp 0..255
    a[:40, :40, 3] = 0  # a fully transparent corner
    return Image.fromarray(a, mode="RGBA")


def _palette_with_transparency() -> Image.Image:
    img = _noise(120, 90, seed=4).quantize(colors=16)
    img.info["transparency"] = 3
    return img


PARITY_CASES = {
    "odd_451x300": (lambda: _noise(451, 300), 3136, 12845056),
    "tiny_below_min": (lambda: _noise(30, 20, seed=1), 3136, 12845056),
    "wide_8_to_1": (lambda: _noise(800, 100, seed=2), 3136, 12845056),
    "rgba_alpha": (_rgba_with_holes, 3136, 12845056),
    "grayscale_L": (lambda: _noise(200, 150, "L", seed=5), 3136, 12845056),
    "la_alpha": (lambda: _noise(90, 60, "LA", seed=6), 3136, 12845056),
    "palette_transparency": (_palette_with_transparency, 3136, 12845056),
    "cmyk": (lambda: _noise(100, 70, "CMYK", seed=7), 3136, 12845056),
    "custom_max_downscale": (lambda: _noise(640, 480, seed=8), 50_000, 100_000),
    "custom_min_upscale": (lambda: _noise(200, 150, seed=9), 200_000, 1_000_000),
}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_parity_with_transformers_pil_processor(reference, case):
    make, lo, hi = PARITY_CASES[case]
    image = make()
    ref_pixels, ref_grid = reference(image, lo, hi)
    ours = preprocess_image(image, PreprocessorConfig(min_pixels=lo, max_pixels=hi))
    assert ours.grid_thw == ref_grid
    assert ours.pixel_values.dtype == torch.float32
    assert ours.pixel_values.shape == ref_pixels.shape == (ref_grid[1] * ref_grid[2], 1176)
    assert (ours.pixel_values - ref_pixels).abs().max().item() <= 1e-6
    assert ours.resized_size == (ref_grid[2] * 14, ref_grid[1] * 14)
    assert ours.original_size == image.size


def test_overrides_equal_a_config_with_those_limits():
    image = _noise(640, 480, seed=8)
    via_kwargs = preprocess_image(image, PreprocessorConfig(), min_pixels=50_000, max_pixels=100_000)
    via_cfg = preprocess_image(image, PreprocessorConfig(min_pixels=50_000, max_pixels=100_000))
    assert via_kwargs.grid_thw == via_cfg.grid_thw == (1, 18, 26)
    assert torch.equal(via_kwargs.pixel_values, via_cfg.pixel_values)
    with pytest.raises(UsageError, match="got min_pixels 200, max_pixels 100"):
        preprocess_image(image, PreprocessorConfig(), min_pixels=200, max_pixels=100)


def test_patchify_matches_the_documented_flattening():
    # QWEN25VL.md: reshape(gt, 2, C, gh/2, 2, 14, gw/2, 2, 14).permute(0,3,6,4,7,2,1,5,8)
    c, gh, gw = 3, 4, 6
    pixels = torch.randn(c, gh * 14, gw * 14)
    frames = pixels[None].expand(2, c, gh * 14, gw * 14)
    expected = (
        frames.reshape(1, 2, c, gh // 2, 2, 14, gw // 2, 2, 14)
        .permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        .reshape(gh * gw, c * 2 * 14 * 14)
    )
    assert torch.equal(patchify(pixels, 14, 2, 2), expected)


# ---------------------------------------------------------------------------------------------- to_rgb
def test_to_rgb_composites_transparency_on_white():
    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 255))
    rgba.putpixel((1, 0), (10, 20, 30, 0))
    assert np.asarray(to_rgb(rgba)).tolist() == [[[10, 20, 30], [255, 255, 255]]]
    la = Image.new("LA", (1, 1), (0, 128))
    assert to_rgb(la).getpixel((0, 0)) == (127, 127, 127)  # half black over white
    pal = Image.new("P", (1, 1), 0)
    pal.info["transparency"] = 0
    assert to_rgb(pal).getpixel((0, 0)) == (255, 255, 255)


def test_to_rgb_other_modes():
    assert to_rgb(Image.new("CMYK", (1, 1), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb(Image.new("1", (1, 1), 1)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (1, 1), 77)).getpixel((0, 0)) == (77, 77, 77)
    # 16-bit greyscale keeps its full range (PIL's own convert clips everything above 255 to white).
    deep = Image.fromarray(np.array([[0, 257 * 128, 65535]], dtype=np.uint16))
    assert deep.mode.startswith("I;16")
    assert np.asarray(to_rgb(deep))[0, :, 0].tolist() == [0, 128, 255]
    flt = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(to_rgb(flt))[0, :, 0].tolist() == [0, 128, 255]
    assert to_rgb(Image.new("RGB", (3, 2))).mode == "RGB"


# ---------------------------------------------------------------------------------------------- load_image
def _upright() -> np.ndarray:
    """48x32 (WxH) image of six 16x16 coloured blocks: any flip or rotation changes it."""
    colours = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(255, 255, 0), (0, 255, 255), (255, 0, 255)]]
    return np.kron(np.array(colours, dtype=np.uint8), np.ones((16, 16, 1), dtype=np.uint8))


# How each EXIF orientation stores an upright image (the camera's sensor layout), per the EXIF spec.
STORED = {
    1: lambda u: u,
    2: lambda u: u[:, ::-1],  # mirrored horizontally
    3: lambda u: u[::-1, ::-1],  # rotated 180
    4: lambda u: u[::-1, :],  # mirrored vertically
    5: lambda u: u.transpose(1, 0, 2),  # transposed
    6: lambda u: np.rot90(u, 1),  # stored 90 CCW: shown after a 90 CW turn
    7: lambda u: u[::-1, ::-1].transpose(1, 0, 2),  # transverse
    8: lambda u: np.rot90(u, -1),  # stored 90 CW: shown after a 90 CCW turn
}


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_load_image_applies_exif_orientation(tmp_path, orientation):
    upright = _upright()
    stored = np.ascontiguousarray(STORED[orientation](upright))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    Image.fromarray(stored).save(path, "JPEG", quality=95, subsampling=0, exif=exif.tobytes())
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.size == (48, 32)
    diff = np.abs(np.asarray(image).astype(int) - upright.astype(int))
    assert diff.max() <= 24 and diff.mean() < 3  # JPEG noise only; a wrong turn moves whole blocks


def test_load_image_path_and_bytes(tmp_path):
    path = tmp_path / "a.png"
    _rgba_with_holes().save(path)
    from_path = load_image(str(path))
    from_bytes = load_image(path.read_bytes())
    assert from_path.mode == from_bytes.mode == "RGB"
    assert np.array_equal(np.asarray(from_path), np.asarray(from_bytes))
    assert from_path.getpixel((0, 0)) == (255, 255, 255)  # transparent corner on white


def test_load_image_animated_gives_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    assert load_image(path).getpixel((4, 4)) == (255, 0, 0)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    _noise(64, 64).save(buf, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda d: d / "missing.png", "file not found"),
        (lambda d: d, "is a directory"),
        (lambda d: _write(d / "empty.png", b""), "empty file"),
        (lambda d: _write(d / "notes.png", b"hello\n"), "not an image"),
        (_truncated_jpeg, "truncated"),
    ],
    ids=["missing", "directory", "empty", "text_as_png", "truncated_jpeg"],
)
def test_load_image_errors_name_the_file(tmp_path, make, problem):
    path = make(tmp_path)
    with pytest.raises(InputError) as info:
        load_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and problem in message
    assert "\n" not in message


def test_load_image_empty_bytes():
    with pytest.raises(InputError, match="<image bytes>: empty"):
        load_image(b"")


def test_load_image_decompression_bomb(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    warn, error = tmp_path / "warn.png", tmp_path / "error.png"
    Image.new("RGB", (40, 40)).save(warn)  # 1600 px: PIL warns (over the limit, under twice it)
    Image.new("RGB", (50, 50)).save(error)  # 2500 px: PIL refuses (over twice the limit)
    with pytest.raises(InputError, match=r"warn\.png: image has 1,600 pixels, over the limit of 1,000"):
        load_image(warn)
    with pytest.raises(InputError, match=r"error\.png: image has 2,500 pixels, over the limit of 2,000"):
        load_image(error)


# ---------------------------------------------------------------------------------------------- several frames
def _frames(*colours) -> list[Image.Image]:
    return [Image.new("RGB", (8, 8), c) for c in colours]


@pytest.mark.parametrize(
    ("fmt", "suffix", "kwargs"),
    [("GIF", "gif", {"duration": 100}), ("PNG", "png", {"duration": 100}), ("WEBP", "webp", {"lossless": True})],
    ids=["gif", "apng", "webp"],
)
def test_load_image_animated_warns_and_gives_first_frame(tmp_path, fmt, suffix, kwargs):
    path = tmp_path / f"anim.{suffix}"
    first, *rest = _frames((255, 0, 0), (0, 0, 255), (0, 255, 0))
    first.save(path, fmt, save_all=True, append_images=rest, **kwargs)
    warnings_seen: list[str] = []
    image = load_image(path, on_warning=warnings_seen.append)
    assert image.getpixel((4, 4)) == (255, 0, 0)
    assert warnings_seen == [f"{path}: animated image (3 frames): using the first frame"]


def test_load_image_multipage_tiff_warns(tmp_path):
    path = tmp_path / "scan.tiff"
    first, *rest = _frames((0, 255, 0), (0, 0, 255))
    first.save(path, save_all=True, append_images=rest)
    warnings_seen: list[str] = []
    image = load_image(path.read_bytes(), name="-", on_warning=warnings_seen.append)
    assert image.getpixel((4, 4)) == (0, 255, 0)
    assert warnings_seen == ["-: multi-page image (2 pages): using the first page"]


def test_load_image_single_frame_does_not_warn(tmp_path):
    path = tmp_path / "still.gif"
    _frames((255, 0, 0))[0].save(path)
    warnings_seen: list[str] = []
    load_image(path, on_warning=warnings_seen.append)
    load_image(_upright_jpeg_bytes(), on_warning=warnings_seen.append)
    assert warnings_seen == []


def _upright_jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_upright()).save(buf, "JPEG")
    return buf.getvalue()
