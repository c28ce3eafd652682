"""detect_kind: image, PDF or video from the first bytes, whatever the file is called; one-line errors
naming the file for everything else."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

from pdf_fixtures import build_pdf, red_page
from qwenvl_cli.errors import InputError
from qwenvl_cli.media.detect import HEAD_BYTES, detect_kind


def _saved(fmt: str, size=(8, 6), mode="RGB", **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (200, 30, 30) if mode == "RGB" else 128).save(buf, fmt, **kwargs)
    return buf.getvalue()


def _ftyp(brand: bytes, compatible: bytes = b"isom") -> bytes:
    body = b"ftyp" + brand + b"\x00\x00\x02\x00" + compatible
    return (len(body) + 4).to_bytes(4, "big") + body + b"\x00\x00\x00\x08free"


def _ts(packet: int = 188, prefix: int = 0) -> bytes:
    one = b"\x00" * prefix + b"\x47\x40\x00\x10" + b"\xff" * (packet - prefix - 4)
    return one * 8


# -------------------------------------------------------------------------------------- images (Pillow's own)
PILLOW_IMAGES = {
    "jpeg": lambda: _saved("JPEG"),
    "png": lambda: _saved("PNG"),
    "gif": lambda: _saved("GIF"),
    "webp": lambda: _saved("WEBP"),
    "bmp": lambda: _saved("BMP"),
    "tiff": lambda: _saved("TIFF"),
    "tiff_big_endian_header": lambda: b"MM\x00*\x00\x00\x00\x08",
    "ico": lambda: _saved("ICO", size=(16, 16)),
    "ppm": lambda: _saved("PPM"),
    "pgm": lambda: _saved("PPM", mode="L"),
    "jpeg2000": lambda: _saved("JPEG2000"),
    "avif": lambda: _saved("AVIF"),
    "tga_via_pillow_fallback": lambda: _saved("TGA"),
    "pcx_via_pillow_fallback": lambda: _saved("PCX"),
    "qoi": lambda: _saved("QOI"),
}


@pytest.mark.parametrize("fmt", sorted(PILLOW_IMAGES))
def test_images_pillow_writes_are_images(fmt):
    try:
        data = PILLOW_IMAGES[fmt]()
    except (KeyError, OSError) as exc:  # an encoder this Pillow build lacks
        pytest.skip(f"Pillow cannot write {fmt}: {exc}")
    assert detect_kind(data, "x") == "image"


def test_ascii_netpbm_is_an_image_not_text():
    assert detect_kind(b"P1\n2 2\n0 1\n1 0\n", "a.pbm") == "image"
    assert detect_kind(b"P3\n1 1\n255\n255 0 0\n", "a.ppm") == "image"


def test_heif_brand_without_a_decoder_is_named():
    # ftyp heic: only an image if a Pillow plugin (e.g. pillow-heif) reads it; none is installed here.
    with pytest.raises(InputError, match=r"^photo\.heic: a HEIF/AVIF image \(brand 'heic'\) that this Pillow"):
        detect_kind(_ftyp(b"heic", b"mif1heic"), "photo.heic")


# -------------------------------------------------------------------------------------- PDF and video
def test_pdf_at_start_and_after_leading_junk():
    pdf = build_pdf([red_page()])
    assert detect_kind(pdf, "a.pdf") == "pdf"
    assert detect_kind(b"\r\n\x00junk before the header " * 10 + pdf, "b.pdf") == "pdf"
    assert detect_kind(b"\x00" * 900 + b"%PDF-1.4\n", "c.pdf") == "pdf"


def test_pdf_header_after_the_first_kilobyte_is_not_a_pdf():
    with pytest.raises(InputError, match="unrecognised file format"):
        detect_kind(b"\x00" * 1100 + b"%PDF-1.4\n", "late.pdf")


VIDEOS = {
    "mp4_isom": _ftyp(b"isom", b"isomiso2avc1mp41"),
    "mp4_mp42": _ftyp(b"mp42"),
    "mov_qt": _ftyp(b"qt  ", b"qt  "),
    "3gp": _ftyp(b"3gp5"),
    "m4v": _ftyp(b"M4V "),
    "quicktime_without_ftyp": b"\x00\x00\x00\x08wide\x00\x10\x00\x00mdat",
    "matroska_webm": b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01webm",
    "avi": b"RIFF\x24\x00\x10\x00AVI LIST",
    "mpeg_ts": _ts(),
    "m2ts": _ts(192, prefix=4),
    "mpeg_ps": b"\x00\x00\x01\xba\x44\x00\x04\x00\x04\x01",
    "mpeg_video": b"\x00\x00\x01\xb3\x14\x00\xf0\x13",
    "flv": b"FLV\x01\x05\x00\x00\x00\x09",
    "ogg_theora": b"OggS\x00\x02" + b"\x00" * 20 + b"\x01\x2a\x80theora\x03\x02",
    "wmv": b"\x30\x26\xb2\x75\x8e\x66\xcf\x11\xa6\xd9\x00\xaa\x00\x62\xce\x6c",
}


@pytest.mark.parametrize("case", sorted(VIDEOS))
def test_video_containers(case):
    assert detect_kind(VIDEOS[case], "clip") == "video"


def test_a_real_mp4_is_video(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(3):
            out.mux(stream.encode(av.VideoFrame.from_image(Image.new("RGB", (32, 32)))))
        out.mux(stream.encode())
    assert detect_kind(path, "clip.mp4") == "video"


# -------------------------------------------------------------------------------------- content, not name
def test_content_wins_over_the_extension(tmp_path):
    png_as_pdf = tmp_path / "scan.pdf"
    png_as_pdf.write_bytes(_saved("PNG"))
    pdf_as_jpg = tmp_path / "photo.jpg"
    pdf_as_jpg.write_bytes(build_pdf([red_page()]))
    assert detect_kind(png_as_pdf, "scan.pdf") == "image"
    assert detect_kind(pdf_as_jpg, "photo.jpg") == "pdf"


def test_path_with_spaces_and_non_ascii(tmp_path):
    folder = tmp_path / "mes documents – été"
    folder.mkdir()
    path = folder / "relevé de compte 日本.pdf"
    path.write_bytes(build_pdf([red_page()]))
    assert detect_kind(path, str(path)) == "pdf"


def test_reads_only_the_head(tmp_path, monkeypatch):
    path = tmp_path / "big.mkv"
    path.write_bytes(b"\x1a\x45\xdf\xa3" + b"\x00" * (HEAD_BYTES * 50))
    reads = []
    real_open = type(path).open

    def counting_open(self, *args, **kwargs):
        f = real_open(self, *args, **kwargs)
        real_read = f.read
        f.read = lambda n=-1: reads.append(n) or real_read(n)
        return f

    monkeypatch.setattr(type(path), "open", counting_open)
    assert detect_kind(path, "big.mkv") == "video"
    assert reads == [HEAD_BYTES]


# -------------------------------------------------------------------------------------- errors
ERRORS = {
    "text_named_png": (b"Dear diary,\ntoday I renamed a text file.\n", "a text file, not an image, PDF or video"),
    "utf8_text": ("Prix : 12 € — café ☕\n".encode(), "a text file"),
    "utf16_text": ("hello".encode("utf-16"), "a text file"),
    "html": (b"<!DOCTYPE html><html><body>hi</body></html>", "a text file"),
    "svg": (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "an SVG drawing"),
    "zip": (b"PK\x03\x04\x14\x00\x00\x00", "a ZIP archive"),
    "gzip": (b"\x1f\x8b\x08\x00\x00\x00", "a gzip archive"),
    "wav": (b"RIFF\x24\x00\x00\x00WAVEfmt ", "an audio file"),
    "mp3_id3": (b"ID3\x04\x00\x00\x00\x00\x00\x00", "an audio file"),
    "mp3_frame": (b"\xff\xfb\x90\x64\x00" + b"\x00" * 40, "an audio file"),
    "m4a": (_ftyp(b"M4A "), "an audio file"),
    "ogg_vorbis": (b"OggS\x00\x02" + b"\x00" * 20 + b"\x01\x1e\x01vorbis", "an Ogg audio file"),
    "binary_junk": (bytes([0x00, 0x13, 0x37, 0xBE, 0xEF, 0x01, 0x02, 0x03, 0x04]), "unrecognised file format"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_not_an_image_pdf_or_video(case, tmp_path):
    data, problem = ERRORS[case]
    path = tmp_path / "input.png"
    path.write_bytes(data)
    for source in (path, data):
        with pytest.raises(InputError) as info:
            detect_kind(source, "input.png")
        message = str(info.value)
        assert message.startswith("input.png: ") and problem in message and "\n" not in message


def test_unrecognised_names_the_first_bytes():
    with pytest.raises(InputError, match=r"^x: unrecognised file format \(starts with 00 13 37 be ef 01 02 03\)$"):
        detect_kind(bytes([0x00, 0x13, 0x37, 0xBE, 0xEF, 0x01, 0x02, 0x03, 0x04]), "x")


def test_missing_directory_empty(tmp_path):
    with pytest.raises(InputError, match=r"^nope\.pdf: file not found$"):
        detect_kind(tmp_path / "nope.pdf", "nope.pdf")
    with pytest.raises(InputError, match=r"^dir: is a directory$"):
        detect_kind(tmp_path, "dir")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(InputError, match=r"^empty\.jpg: empty file \(0 bytes\)$"):
        detect_kind(tmp_path / "empty.jpg", "empty.jpg")
    with pytest.raises(InputError, match=r"^-: empty \(0 bytes\)$"):
        detect_kind(b"", "-")


def test_unreadable_file():
    """chmod 000. Root reads files whatever their mode, so as root the check runs in a forked child that
    has dropped to the `nobody` user (the module is already imported: nothing to read from disk)."""
    import tempfile

    folder = Path(tempfile.mkdtemp())
    folder.chmod(0o755)
    path = folder / "secret.png"
    path.write_bytes(_saved("PNG"))
    path.chmod(0)

    def check() -> bool:
        try:
            detect_kind(path, "secret.png")
        except InputError as exc:
            return str(exc) == "secret.png: permission denied"
        return False

    try:
        if os.geteuid() != 0:
            assert check()
            return
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                code = 0 if check() else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        path.chmod(0o644)
        path.unlink()
        folder.rmdir()


def test_unreadable_file_as_root_via_a_refused_open(tmp_path, monkeypatch):
    # The chmod test above cannot run as root; the same message must come from a refused open().
    path = tmp_path / "secret.png"
    path.write_bytes(_saved("PNG"))

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "open", refuse)
    with pytest.raises(InputError, match=r"^secret\.png: permission denied$"):
        detect_kind(path, "secret.png")
