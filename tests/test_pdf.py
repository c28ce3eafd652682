"""PDF pages: --pages parsing, render size and colour, pixel -> PDF point mapping (checked against where a
drawn rectangle really lands), passwords, lazy rendering, the pixel cap, errors, and preprocessing parity
of a rendered page with transformers."""

from __future__ import annotations

import gc
import json
import math
import types
import weakref

import numpy as np
import pypdfium2 as pdfium
import pytest
import torch

from pdf_fixtures import A4, RED_RECT, FixturePage, build_pdf, encrypted_pdf, rect_content, red_page
from qwenvl_cli.errors import InputError, UsageError
from qwenvl_cli.media import pdf as pdf_module
from qwenvl_cli.media.pdf import (
    DEFAULT_DPI,
    MAX_RENDER_PIXELS,
    PageGeometry,
    PageSpec,
    PdfFile,
    parse_pages,
    render_scale,
)

RED_POINTS = (RED_RECT[0], RED_RECT[1], RED_RECT[0] + RED_RECT[2], RED_RECT[1] + RED_RECT[3])  # (100, 600, 250, 680)


def _open(pages: list[FixturePage], name: str = "doc.pdf") -> PdfFile:
    return PdfFile.open(build_pdf(pages), name)


def _colour_box(image, colour: str) -> tuple[int, int, int, int]:
    """Pixel box [x1, y1, x2, y2) of the pixels that are mostly `colour` ("red" or "blue")."""
    a = np.asarray(image).astype(int)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    mask = (r > 200) & (g < 60) & (b < 60) if colour == "red" else (b > 200) & (r < 60) & (g < 60)
    ys, xs = np.nonzero(mask)
    assert xs.size, f"no {colour} pixels on the page"
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# ---------------------------------------------------------------------------------------------- --pages
@pytest.mark.parametrize(
    ("spec", "ranges", "resolved"),
    [
        ("2", ((2, 2),), [2]),
        ("1-3,7", ((1, 3), (7, 7)), [1, 2, 3, 7]),
        ("5-", ((5, None),), [5, 6, 7, 8]),
        ("-3", ((1, 3),), [1, 2, 3]),
        (" 7 , 1 - 2 ", ((7, 7), (1, 2)), [7, 1, 2]),  # order kept as given
        ("3,1-4,3", ((3, 3), (1, 4), (3, 3)), [3, 1, 2, 4]),  # duplicates dropped, first place kept
        ("8-8", ((8, 8),), [8]),
    ],
)
def test_parse_and_resolve_pages(spec, ranges, resolved):
    parsed = parse_pages(spec)
    assert parsed == PageSpec(ranges)
    assert parsed.resolve(8, "doc.pdf") == resolved


@pytest.mark.parametrize(
    ("spec", "bad"),
    [
        ("", "--pages is empty"),
        ("  ", "--pages is empty"),
        ("1,,3", "an empty item between commas"),
        ("1,", "an empty item between commas"),
        ("a", "'a' is not a page or a range"),
        ("1-b", "'1-b' is not a page or a range"),
        ("-", "'-' is not a page or a range"),
        ("1-2-3", "'1-2-3' is not a page or a range"),
        ("1.5", "'1.5' is not a page or a range"),
        ("+2", "'+2' is not a page or a range"),
        ("²", "'²' is not a page or a range"),
        ("0", "'0': pages are numbered from 1"),
        ("0-3", "'0-3': pages are numbered from 1"),
        ("5-2", "'5-2' runs backwards"),
    ],
)
def test_parse_pages_errors(spec, bad):
    with pytest.raises(UsageError) as info:
        parse_pages(spec)
    message = str(info.value)
    assert message.startswith("--pages") and bad in message and "\n" not in message
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    ("spec", "count", "message"),
    [
        ("9", 5, "doc.pdf: --pages 9 is beyond the last page (the PDF has 5 pages)"),
        ("1,6-", 5, "doc.pdf: --pages 6- is beyond the last page (the PDF has 5 pages)"),
        ("3-9", 5, "doc.pdf: --pages 3-9 goes beyond the last page (the PDF has 5 pages)"),
        ("2", 1, "doc.pdf: --pages 2 is beyond the last page (the PDF has 1 page)"),
    ],
)
def test_pages_beyond_the_document(spec, count, message):
    with pytest.raises(InputError) as info:
        parse_pages(spec).resolve(count, "doc.pdf")
    assert str(info.value) == message


# ---------------------------------------------------------------------------------------------- rendering
def test_page_count_and_numbers():
    with _open([red_page(), FixturePage(), red_page(rotate=90)]) as pdf:
        assert pdf.page_count == 3
        assert [p.number for p in pdf.pages([3, 1], dpi=36)] == [3, 1]
        with pytest.raises(InputError, match=r"^doc\.pdf: page 4 does not exist \(the PDF has 3 pages\)$"):
            pdf.render(4)


@pytest.mark.parametrize(
    ("media", "dpi", "size"),
    [
        (A4, 72, (595, 842)),
        # pdfium's bitmap is ceil(points * dpi / 72): 826.39 -> 827, 1169.44 -> 1170 (not rounded).
        (A4, 100, (827, 1170)),
        (A4, DEFAULT_DPI, (1653, 2339)),  # 1652.78, 2338.89
        ((0, 0, 595.28, 841.89), DEFAULT_DPI, (1654, 2339)),  # exact A4 (210 x 297 mm): 1653.56, 2338.58
        ((0, 0, 612, 792), 150, (1275, 1650)),  # US Letter: 792 * 150/72 is 1650.0000000000002 in floats
    ],
)
def test_render_size(media, dpi, size):
    with _open([FixturePage(media=media)]) as pdf:
        page = pdf.render(1, dpi)
    assert page.image.size == size == (page.geometry.width_px, page.geometry.height_px)
    assert page.image.mode == "RGB"
    assert page.geometry.dpi == pytest.approx(dpi)
    assert size == tuple(math.ceil(round(v * dpi / 72, 6)) for v in media[2:])


def test_default_dpi_gives_the_documented_token_count():
    from qwenvl_cli.media.image import smart_resize
    from qwenvl_cli.prompts import vision_token_count

    h, w = smart_resize(2339, 1654)  # exact A4 at DEFAULT_DPI, under the default max_pixels: not downscaled
    assert 1654 * 2339 < 12_845_056 and (h, w) == (2352, 1652)
    assert vision_token_count((1, h // 14, w // 14)) == 4956


def test_rgb_channel_order_on_white():
    content = (rect_content(0, 0, 20, 20, (1, 0, 0)) + rect_content(20, 0, 20, 20, (0, 1, 0))
               + rect_content(40, 0, 20, 20, (0, 0, 1)))
    with _open([FixturePage(media=(0, 0, 80, 20), content=content)]) as pdf:
        image = pdf.render(1, dpi=72).image
    assert image.mode == "RGB"
    assert [image.getpixel((x, 10)) for x in (10, 30, 50, 70)] == [
        (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]


def test_annotations_are_drawn():
    # A Square annotation without an appearance stream: pdfium draws it from /C and /IC.
    annot = "<< /Type /Annot /Subtype /Square /Rect [300 300 400 350] /C [0 0 1] /IC [0 0 1] /F 4 >>"
    with _open([FixturePage(annots=annot)]) as pdf:
        page = pdf.render(1, dpi=72)
    box = page.geometry.to_points(_colour_box(page.image, "blue"))
    assert box == pytest.approx((300, 300, 400, 350), abs=1.5)


# ---------------------------------------------------------------------------------------------- geometry
def test_to_points_by_hand():
    # A4 at 144 dpi (2 px per point), no rotation: x = px / 2, y = 842 - py / 2.
    g = PageGeometry(dpi=144, width_px=1190, height_px=1684, rotation=0, crop_box=(0, 0, 595, 842))
    assert g.to_points((200, 324, 500, 484)) == (100.0, 600.0, 250.0, 680.0)
    assert g.point_to_points(0, 0) == (0, 842)
    # A crop box offset from the origin: (50, 500)-(400, 800) shown at 1 px per point.
    g = PageGeometry(dpi=72, width_px=350, height_px=300, rotation=0, crop_box=(50, 500, 400, 800))
    assert g.to_points((50, 120, 200, 200)) == (100.0, 600.0, 250.0, 680.0)
    # /Rotate 90: the image is 842 wide; its x runs up the page (y = px), its y runs right (x = py).
    g = PageGeometry(dpi=72, width_px=842, height_px=595, rotation=90, crop_box=(0, 0, 595, 842))
    assert g.to_points((600, 100, 680, 250)) == (100.0, 600.0, 250.0, 680.0)
    assert g.to_points((680, 250, 600, 100)) == (100.0, 600.0, 250.0, 680.0)  # corners in any order
    # Rounded to 2 decimals: 1/3 px at 72 dpi.
    g = PageGeometry(dpi=72, width_px=595, height_px=842, rotation=0, crop_box=(0, 0, 595, 842))
    assert g.to_points((1 / 3, 0, 2 / 3, 1)) == (0.33, 841.0, 0.67, 842.0)


def test_geometry_rejects_bad_values():
    with pytest.raises(ValueError, match="rotation 45"):
        PageGeometry(dpi=72, width_px=1, height_px=1, rotation=45, crop_box=(0, 0, 1, 1))
    with pytest.raises(ValueError, match="empty page"):
        PageGeometry(dpi=72, width_px=1, height_px=1, rotation=0, crop_box=(0, 0, 0, 1))


PLACEMENTS = {
    "plain": dict(),
    "crop_box_offset": dict(crop=(50, 500, 400, 800)),
    "rotate_90": dict(rotate=90),
    "rotate_180": dict(rotate=180),
    "rotate_270": dict(rotate=270),
    "rotate_90_with_crop": dict(rotate=90, crop=(60, 550, 300, 700)),
    "media_box_not_at_origin": dict(media=(-100, -50, 595, 842), rotate=270),
    "crop_box_beyond_media_box": dict(media=(0, 0, 400, 700), crop=(-100, -100, 500, 900)),
}


@pytest.mark.parametrize("dpi", [72, 150])
@pytest.mark.parametrize("case", sorted(PLACEMENTS))
def test_rectangle_found_in_pixels_maps_back_to_where_it_was_drawn(case, dpi):
    with _open([red_page(**PLACEMENTS[case])]) as pdf:
        page = pdf.render(1, dpi)
    box = page.geometry.to_points(_colour_box(page.image, "red"))
    assert box == pytest.approx(RED_POINTS, abs=1.0)
    assert page.geometry.rotation == PLACEMENTS[case].get("rotate", 0)


def test_geometry_reports_the_visible_box():
    with _open([red_page(media=(0, 0, 400, 700), crop=(-100, -100, 500, 900), rotate=90)]) as pdf:
        g = pdf.render(1, 72).geometry
    assert g.crop_box == (0, 0, 400, 700)  # the crop box clipped to the media box, as pdfium shows it
    assert (g.width_px, g.height_px) == (700, 400)


# ---------------------------------------------------------------------------------------------- laziness, size cap
def test_pages_are_rendered_one_at_a_time(monkeypatch):
    rendered: list[int] = []
    real_render = pdfium.PdfPage.render

    def counting_render(self, *args, **kwargs):
        rendered.append(1)
        return real_render(self, *args, **kwargs)

    monkeypatch.setattr(pdfium.PdfPage, "render", counting_render)
    # In-process rendering, where the patch can count (test_hostile_media counts the sandboxed child's).
    with PdfFile.open(build_pdf([red_page() for _ in range(300)]), "doc.pdf", isolated=False) as pdf:
        assert pdf.page_count == 300
        pages = pdf.pages(list(range(1, 301)), dpi=36)
        assert isinstance(pages, types.GeneratorType)
        assert rendered == []
        first = next(pages)
        assert first.number == 1 and len(rendered) == 1
        image = weakref.ref(first.image)
        del first
        second = next(pages)
        gc.collect()
        assert second.number == 2 and len(rendered) == 2
        assert image() is None  # nothing keeps the pages already handed out
        pages.close()


def test_render_scale_keeps_the_bitmap_under_the_cap():
    assert render_scale(595, 842, 200) == pytest.approx(200 / 72, rel=1e-8)
    side = 14_400  # 200 inches, the largest page the PDF spec allows
    scale = render_scale(side, side, 200)
    assert math.ceil(side * scale) ** 2 <= MAX_RENDER_PIXELS
    assert math.ceil(side * scale) ** 2 > MAX_RENDER_PIXELS * 0.99  # as large as fits
    assert 35 < scale * 72 < 35.4  # 72 * sqrt(5e7) / 14400 = 35.36 dpi


def test_huge_page_is_rendered_at_a_lower_dpi(monkeypatch):
    monkeypatch.setattr(pdf_module, "MAX_RENDER_PIXELS", 1_000_000)  # keeps the test fast
    with _open([red_page(media=(0, 0, 14_400, 7_200))]) as pdf:
        page = pdf.render(1, DEFAULT_DPI)
    g = page.geometry
    assert g.width_px * g.height_px <= 1_000_000
    assert g.dpi == pytest.approx(72 * math.sqrt(1_000_000 / (14_400 * 7_200)), rel=1e-2)  # ~7.07 dpi, not 200
    assert (g.width_px, g.height_px) == (math.ceil(14_400 * g.dpi / 72), math.ceil(7_200 * g.dpi / 72))
    assert page.image.size == (g.width_px, g.height_px)


# ---------------------------------------------------------------------------------------------- passwords, errors
def test_passwords():
    data = encrypted_pdf("s3cret")
    with pytest.raises(InputError, match=r"^locked\.pdf: the PDF is encrypted; give --password$"):
        PdfFile.open(data, "locked.pdf")
    with pytest.raises(InputError, match=r"^locked\.pdf: the PDF is encrypted; give --password$"):
        PdfFile.open(data, "locked.pdf", password="")
    with pytest.raises(InputError, match=r"^locked\.pdf: wrong password for the encrypted PDF$"):
        PdfFile.open(data, "locked.pdf", password="guess")
    with PdfFile.open(data, "locked.pdf", password="s3cret") as pdf:
        page = pdf.render(1, 72)
    assert page.geometry.to_points(_colour_box(page.image, "red")) == pytest.approx(RED_POINTS, abs=1.0)


def test_password_is_ignored_for_an_unencrypted_pdf():
    with PdfFile.open(build_pdf([red_page()]), "a.pdf", password="whatever") as pdf:
        assert pdf.page_count == 1


def test_open_by_path_with_spaces_and_non_ascii(tmp_path):
    path = tmp_path / "relevé de compte – 日本.pdf"
    path.write_bytes(build_pdf([red_page(), red_page()]))
    with PdfFile.open(path, str(path)) as pdf:
        assert pdf.page_count == 2
        assert pdf.render(2, 72).image.size == (595, 842)


def _truncated() -> bytes:
    data = build_pdf([red_page(), red_page()])
    return data[: len(data) // 2]


NOT_A_PDF = "not a PDF, or a corrupt or truncated one (pdfium: data format error)"
BROKEN = {
    "text_named_pdf": (lambda: b"just some notes\n", NOT_A_PDF),
    "png_named_pdf": (lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, NOT_A_PDF),
    "truncated": (_truncated, NOT_A_PDF),
    "zero_pages": (lambda: build_pdf([]), "the PDF has no pages"),
    "zero_pages_pdfium_written": (lambda: _pdfium_empty(), "the PDF has no pages"),
}


def _pdfium_empty() -> bytes:
    import io

    buf = io.BytesIO()
    pdfium.PdfDocument.new().save(buf)
    return buf.getvalue()


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_pdfs(case, tmp_path):
    make, problem = BROKEN[case]
    path = tmp_path / "broken.pdf"
    path.write_bytes(make())
    for source in (path, path.read_bytes()):
        with pytest.raises(InputError) as info:
            PdfFile.open(source, "broken.pdf")
        assert str(info.value) == f"broken.pdf: {problem}"


def test_zero_pages_after_a_failed_open():
    # pdfium keeps its last error across a successful load: a corrupt file first must not change the message.
    with pytest.raises(InputError, match="data format error"):
        PdfFile.open(b"garbage", "a.pdf")
    with pytest.raises(InputError, match=r"^b\.pdf: the PDF has no pages$"):
        PdfFile.open(build_pdf([]), "b.pdf")


def test_file_errors(tmp_path):
    with pytest.raises(InputError, match=r"^gone\.pdf: file not found$"):
        PdfFile.open(tmp_path / "gone.pdf", "gone.pdf")
    with pytest.raises(InputError, match=r"^dir: is a directory$"):
        PdfFile.open(tmp_path, "dir")
    (tmp_path / "empty.pdf").write_bytes(b"")
    with pytest.raises(InputError, match=r"^empty\.pdf: empty file \(0 bytes\)$"):
        PdfFile.open(tmp_path / "empty.pdf", "empty.pdf")
    with pytest.raises(InputError, match=r"^-: empty \(0 bytes\)$"):
        PdfFile.open(b"", "-")


def test_closing_releases_the_document():
    pdf = _open([red_page()])
    with pdf:
        pdf.render(1, 36)
    pdf.close()  # twice is fine
    with pytest.raises(ValueError, match="the PDF is closed"):
        pdf.render(1, 36)


# ---------------------------------------------------------------------------------------------- parity
def test_rendered_page_preprocesses_like_transformers(make_ckpt):
    from checkpoints import reference_processor
    from qwenvl_cli.config import IMAGE_PAD_ID, PreprocessorConfig
    from qwenvl_cli.media.image import preprocess_image
    from qwenvl_cli.prompts import vision_token_count

    ckpt = make_ckpt()
    processor = reference_processor(ckpt)
    cfg = PreprocessorConfig.from_dict(json.loads((ckpt / "preprocessor_config.json").read_text()))
    with _open([red_page(rotate=90)]) as pdf:
        image = pdf.render(1, dpi=100).image  # 1170 x 827: resized to 1176 x 840 by smart_resize

    ours = preprocess_image(image, cfg)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read the page."}]}]
    chat = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = processor(text=[chat], images=[image], return_tensors="pt")

    assert ours.grid_thw == tuple(expected["image_grid_thw"][0].tolist()) == (1, 60, 84)
    assert torch.equal(ours.pixel_values, expected["pixel_values"])
    pads = int((expected["input_ids"][0] == IMAGE_PAD_ID).sum())
    assert vision_token_count(ours.grid_thw) == pads == 60 * 84 // 4


def test_unreadable_file(tmp_path, monkeypatch):
    # chmod 000 does not stop root: refuse the open() itself.
    path = tmp_path / "secret.pdf"
    path.write_bytes(build_pdf([red_page()]))

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "open", refuse)
    with pytest.raises(InputError, match=r"^secret\.pdf: permission denied$"):
        PdfFile.open(path, "secret.pdf")
