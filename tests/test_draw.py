"""draw_detections checked by pixels; save_image round trips and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from qwenvl_cli.boxes import Detection
from qwenvl_cli.draw import PALETTE, draw_detections, label_colours, save_image
from qwenvl_cli.errors import OutputError, UsageError

WHITE = (255, 255, 255)


def white(w: int = 200, h: int = 100) -> Image.Image:
    return Image.new("RGB", (w, h), WHITE)


def test_box_edges_have_the_label_colour() -> None:
    image = white()
    out = draw_detections(image, [Detection("cat", bbox=(20, 10, 120, 60))])
    colour = label_colours(["cat"])["cat"]
    assert out.size == (200, 100) and out.mode == "RGB"
    # line width max(2, round(100/300)) = 2; the outline lies inside [20, 120) x [10, 60)
    for xy in [(20, 35), (21, 35), (119, 35), (118, 35), (70, 59), (70, 58), (119, 59)]:
        assert out.getpixel(xy) == colour, xy
    assert out.getpixel((10, 35)) == WHITE  # left of the box
    assert out.getpixel((121, 35)) == WHITE  # just right of it
    assert out.getpixel((70, 61)) == WHITE  # just below it
    assert out.getpixel((100, 45)) == WHITE  # well inside, away from the tag at the top-left
    assert out.getpixel((190, 90)) == WHITE


def test_tag_goes_inside_when_no_room_above() -> None:
    colour = label_colours(["cat"])["cat"]
    near_top = draw_detections(white(), [Detection("cat", bbox=(20, 5, 120, 60))])
    assert near_top.getpixel((22, 8)) == colour or near_top.getpixel((23, 9)) == colour  # tag inside
    room = draw_detections(white(400, 400), [Detection("cat", bbox=(20, 200, 300, 380))])
    above = [room.getpixel((x, 195)) for x in range(20, 40)]
    assert colour in above  # the tag sits on the box's top edge, above it
    assert room.getpixel((200, 300)) == WHITE


def test_point_draws_its_colour() -> None:
    out = draw_detections(white(), [Detection("eye", point=(150, 50))])
    colour = label_colours(["eye"])["eye"]
    assert out.getpixel((150, 50)) == colour
    assert out.getpixel((151, 51)) == colour
    assert out.getpixel((150, 80)) == WHITE


def test_colours_per_label() -> None:
    dets = [
        Detection("cat", bbox=(10, 30, 60, 90)),
        Detection("dog", bbox=(100, 30, 150, 90)),
        Detection("cat", bbox=(160, 30, 190, 90)),
    ]
    out = draw_detections(white(), dets)
    cat, dog, cat2 = out.getpixel((10, 80)), out.getpixel((100, 80)), out.getpixel((160, 80))
    assert cat != dog
    assert cat == cat2
    assert {cat, dog} <= set(PALETTE)


def test_colours_are_stable_and_distinct() -> None:
    labels = [f"thing {i}" for i in range(len(PALETTE))]
    first = label_colours(labels)
    assert len(set(first.values())) == len(PALETTE)  # all distinct while the palette lasts
    assert label_colours(labels) == first
    assert label_colours(["solo"]) == label_colours(["solo"])
    assert label_colours(["a", "a", "b"]).keys() == {"a", "b"}


def test_input_is_not_modified() -> None:
    image = white()
    before = image.tobytes()
    out = draw_detections(image, [Detection("cat", bbox=(20, 10, 120, 60)), Detection("p", point=(5, 5))])
    assert image.tobytes() == before
    assert out is not image


def test_any_mode_in_rgb_out() -> None:
    grey = Image.new("L", (50, 40), 255)
    out = draw_detections(grey, [Detection("", bbox=(5, 5, 30, 30))])
    assert out.mode == "RGB" and grey.mode == "L"
    assert out.getpixel((5, 20)) != WHITE


def test_line_width_scales_with_the_image() -> None:
    # 900x900: max(2, round(900/300)) = 3 pixels of outline.
    out = draw_detections(white(900, 900), [Detection("", bbox=(100, 100, 800, 800))])
    row = [out.getpixel((x, 450)) for x in range(98, 106)]
    assert row[:2] == [WHITE, WHITE] and len(set(row[2:5])) == 1 and row[2] != WHITE and row[5] == WHITE


def test_boxes_outside_do_not_crash() -> None:
    out = draw_detections(white(), [Detection("edge", bbox=(190, 90, 200, 100)), Detection("x", point=(0, 0))])
    assert out.size == (200, 100)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".JPEG", ".webp"])
def test_save_and_read_back(tmp_path: Path, suffix: str) -> None:
    out = draw_detections(white(), [Detection("cat", bbox=(20, 10, 120, 60))])
    path = tmp_path / f"boxes{suffix}"
    save_image(out, path, "photo.jpg")
    with Image.open(path) as back:
        assert back.size == (200, 100)
        assert back.format == {".png": "PNG", ".jpg": "JPEG", ".JPEG": "JPEG", ".webp": "WEBP"}[suffix]
        pixel = back.convert("RGB").getpixel((150, 80))
        if suffix == ".png":
            assert back.convert("RGB").tobytes() == out.tobytes()
        assert all(v > 240 for v in pixel)


def test_save_rgba_as_jpeg(tmp_path: Path) -> None:
    save_image(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), tmp_path / "a.jpg", "x")
    assert (tmp_path / "a.jpg").stat().st_size > 0


@pytest.mark.parametrize("name", ["boxes.xyz", "boxes"])
def test_bad_suffix(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    with pytest.raises(UsageError) as err:
        save_image(white(), path, "photo.jpg")
    message = str(err.value)
    assert str(path) in message and "\n" not in message and message.startswith("photo.jpg: ")
    assert not path.exists()


def test_unwritable_path(tmp_path: Path) -> None:
    # A drawing that cannot be written is an error of that picture (the batch goes on), not a usage error.
    path = tmp_path / "missing-dir" / "boxes.png"
    with pytest.raises(OutputError) as err:
        save_image(white(), path, "photo.jpg")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_non_latin_labels_use_a_unicode_font_when_the_system_has_one(monkeypatch):
    import qwenvl_cli.draw as draw_module

    tried = []
    real = draw_module.ImageFont.truetype

    def truetype(path, size=10, **kwargs):
        if not isinstance(path, str) or not path.startswith("/fonts/"):
            return real(path, size, **kwargs)  # Pillow's own default font goes through here too
        tried.append(path)
        if path == "/fonts/present.ttc":
            return ("font", path, size)
        raise OSError("cannot open resource")

    monkeypatch.setattr(draw_module, "UNICODE_FONTS", ("/fonts/missing.ttc", "/fonts/present.ttc", "/fonts/later.ttc"))
    monkeypatch.setattr(draw_module.ImageFont, "truetype", truetype)
    assert draw_module._font(12, ["猫 🐱"]) == ("font", "/fonts/present.ttc", 12)
    assert tried == ["/fonts/missing.ttc", "/fonts/present.ttc"]
    tried.clear()
    draw_module._font(12, ["cat"])  # Latin labels keep Pillow's own font
    assert tried == []
