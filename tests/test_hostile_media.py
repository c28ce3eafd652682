"""Hostile media that cost more than their own answer before: a PDF page that renders without end (bounded
in time and memory by the render child, Ctrl-C still stops it), libraries talking on fd 2 or through
warnings (one qwenvl line at most), files larger than any real image or PDF, and error causes kept for
QWENVL_DEBUG=1."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin
from typer.testing import CliRunner

from pdf_fixtures import build_pdf, red_page, self_drawing_pdf, xfa_pdf
from qwenvl_cli.cli import app
from qwenvl_cli.errors import InputError
from qwenvl_cli.media import image as image_module
from qwenvl_cli.media import pdf as pdf_module
from qwenvl_cli.media import sandbox
from qwenvl_cli.media.image import load_image
from qwenvl_cli.media.pdf import PdfFile

SHAPES = Path(__file__).resolve().parents[1] / "samples" / "shapes.png"


@pytest.fixture(scope="module")
def model_dir(make_ckpt):
    return str(make_ckpt(max_pixels=64 * 28 * 28))


@pytest.fixture
def small_limits(monkeypatch):
    """2 s and 1 GiB per page: the self-drawing page reaches the deadline first (it grows ~0.2 GB/s)."""
    monkeypatch.setattr(pdf_module, "RENDER_SECONDS", 2.0)
    monkeypatch.setattr(pdf_module, "RENDER_MEMORY_BYTES", 1 << 30)


def _child_pid() -> int | None:
    proc = sandbox._shared._proc if sandbox._shared is not None else None
    return None if proc is None else proc.pid


# ---------------------------------------------------------------------------------------------- the render child
@pytest.mark.parametrize(
    "limits, words",
    [((2.0, 1 << 30), "still rendering at the deadline"), ((60.0, 256 << 20), "ran out of memory")],
    ids=["deadline", "memory"],
)
def test_a_self_drawing_page_costs_that_page_only(model_dir, tmp_path, monkeypatch, limits, words):
    seconds, memory = limits
    monkeypatch.setattr(pdf_module, "RENDER_SECONDS", seconds)
    monkeypatch.setattr(pdf_module, "RENDER_MEMORY_BYTES", memory)
    hostile = tmp_path / "self-drawing.pdf"
    hostile.write_bytes(self_drawing_pdf(good_pages=1))
    args = [str(hostile), str(SHAPES)]
    start = time.monotonic()
    r = CliRunner().invoke(app, ["describe", *args, "--model", model_dir, "--json", "--max-new-tokens", "2"])
    assert time.monotonic() - start < 40
    assert r.exit_code == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    [line] = r.stderr.splitlines()
    limit_text = f"{seconds:g} s / {'1 GiB' if memory == 1 << 30 else '256 MiB'}"
    assert line.startswith(f"qwenvl: {hostile} (page 2): could not be rendered within {limit_text}"), line
    assert words in line, line
    records = [json.loads(rec) for rec in r.stdout.splitlines()]
    assert [(rec["file"], rec.get("page")) for rec in records] == [(str(hostile), 1), (str(hostile), 2), (str(SHAPES), None)]
    assert "text" in records[0] and "error" in records[1] and "text" in records[2]


def test_pages_after_a_killed_render_still_answer(small_limits):
    with PdfFile.open(self_drawing_pdf(good_pages=1), "self.pdf") as pdf:
        first = _child_pid()
        with pytest.raises(InputError, match=r"^self\.pdf: page 2 could not be rendered within 2 s / 1 GiB"):
            pdf.render(2, 72)
        assert _child_pid() is None  # killed, not left rendering
        assert pdf.render(1, 72).image.size == (595, 842)  # a new child opens the document again
        assert _child_pid() not in (None, first)


def test_ctrl_c_during_a_render_stops_it_at_once(monkeypatch):
    """pdfium ignores SIGINT while it renders in-process; the parent, waiting on the child, does not."""
    monkeypatch.setattr(pdf_module, "RENDER_SECONDS", 120.0)
    with PdfFile.open(self_drawing_pdf(), "self.pdf") as pdf:
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            pdf.render(1, 72)
        assert time.monotonic() - start < 5
        assert _child_pid() is None


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the render child through /proc")
def test_ctrl_c_stops_the_cli_in_the_middle_of_a_render(model_dir, tmp_path):
    """The real thing: `qwenvl describe` on the self-drawing page, SIGINT once its render child runs: exit 130
    with one line, at once, and the child is gone (before, only SIGKILL stopped it)."""
    import subprocess
    import sys

    hostile = tmp_path / "self-drawing.pdf"
    hostile.write_bytes(self_drawing_pdf())
    cmd = [sys.executable, "-m", "qwenvl_cli", "describe", str(hostile), "--model", model_dir, "--max-new-tokens", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    child = None
    for _ in range(600):  # the model loads first: up to 60 s on a busy machine
        pids = children.read_text().split() if children.exists() else []
        renderers = [int(pid) for pid in pids if b"qwenvl_cli.media.sandbox" in _cmdline(pid)]
        if renderers:
            child = renderers[0]
            break
        time.sleep(0.1)
    assert child is not None, "no render child started"
    time.sleep(0.5)  # well inside pdfium's endless load
    proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    out, err = proc.communicate(timeout=20)
    assert time.monotonic() - start < 10
    assert proc.returncode == 130 and err == "qwenvl: interrupted\n" and out == "", (proc.returncode, out, err)
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_one_child_serves_every_page_and_document():
    with PdfFile.open(build_pdf([red_page(), red_page()]), "a.pdf") as a:
        a.render(1, 36)
        pid = _child_pid()
        a.render(2, 36)
    with PdfFile.open(build_pdf([red_page()]), "b.pdf") as b:
        b.render(1, 36)
    assert pid is not None and _child_pid() == pid


def test_pages_are_rendered_in_the_child_one_at_a_time(monkeypatch):
    rendered: list[float] = []
    real_render = sandbox.RemoteDocument.render

    def counting_render(self, scale, *args, **kwargs):
        rendered.append(scale)
        return real_render(self, scale, *args, **kwargs)

    monkeypatch.setattr(sandbox.RemoteDocument, "render", counting_render)
    with PdfFile.open(build_pdf([red_page() for _ in range(50)]), "doc.pdf") as pdf:
        pages = pdf.pages(list(range(1, 51)), dpi=36)
        assert rendered == []
        assert next(pages).number == 1 and len(rendered) == 1
        assert next(pages).number == 2 and len(rendered) == 2
        pages.close()


@pytest.mark.parametrize("rotate", [0, 90, 270])
def test_the_child_renders_what_pdfium_renders_here(rotate):
    """The slow oracle: the same page rendered in this process, pixel for pixel and box for box."""
    data = build_pdf([red_page(rotate=rotate, crop=(50, 500, 400, 800))])
    with PdfFile.open(data, "a.pdf", isolated=False) as here, PdfFile.open(data, "a.pdf") as there:
        a, b = here.render(1, 100), there.render(1, 100)
    assert a.geometry == b.geometry
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


# ---------------------------------------------------------------------------------------------- stray library output
def _tiff(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="TIFF", **save)
    return buf.getvalue()


def corrupt_zip_tiff() -> bytes:
    """A deflate-compressed TIFF (decoded by libtiff) whose strip is scrambled: libtiff prints
    `ZIPDecode: Decoding error at scanline 0, ...` on fd 2 and Pillow raises `decoder error -2`."""
    data = bytearray(_tiff(Image.new("RGB", (64, 64), (10, 200, 30)), compression="tiff_adobe_deflate"))
    tiff = Image.open(io.BytesIO(bytes(data)))
    offset, length = tiff.tag_v2[273][0], tiff.tag_v2[279][0]
    for i in range(offset + 2, offset + length - 4):
        data[i] ^= 0x55
    return bytes(data)


def oversized_tag_tiff() -> bytes:
    """A good TIFF whose ImageDescription claims 1,000,000 bytes: Pillow warns `Tag data larger than file`
    (a UserWarning printed with its source line) and skips the tag."""
    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[270] = "x" * 40
    data = bytearray(_tiff(Image.new("RGB", (32, 32), (10, 200, 30)), tiffinfo=info))
    (ifd,) = struct.unpack("<I", data[4:8])
    (entries,) = struct.unpack("<H", data[ifd : ifd + 2])
    for i in range(entries):
        entry = ifd + 2 + 12 * i
        if struct.unpack("<H", data[entry : entry + 2])[0] == 270:
            data[entry + 4 : entry + 8] = struct.pack("<I", 1_000_000)
    return bytes(data)


def test_libtiff_message_joins_the_error_and_nothing_reaches_fd2(capfd):
    with pytest.raises(InputError) as info:
        load_image(corrupt_zip_tiff(), name="scan.tif")
    message = str(info.value)
    assert message.startswith("scan.tif: corrupt or unreadable image (decoder error -2: ZIPDecode: "), message
    assert "\n" not in message
    assert capfd.readouterr().err == ""


def test_pillow_user_warning_becomes_one_line_naming_the_file(capfd):
    seen: list[str] = []
    with _no_warning_escapes():
        image = load_image(oversized_tag_tiff(), name="scan.tif", on_warning=seen.append)
    assert image.size == (32, 32)
    assert seen == ["scan.tif: the decoder warned: Tag data larger than file. Skipping tag 270"]
    assert capfd.readouterr().err == ""


class _no_warning_escapes:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self._seen = self._catch.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        assert self._seen == [], [str(w.message) for w in self._seen]


def test_python_stderr_still_reaches_the_terminal_during_a_capture(capfd):
    """The progress bar's thread writes through sys.stderr while an image decodes: that is not libtiff."""
    import sys

    from qwenvl_cli.media.capture import captured_output

    with captured_output() as said:
        sys.stderr.write("progress\n")
        sys.stderr.flush()
        os.write(2, b"TIFFReadDirectory: from C\n")
    assert said.summary() == "TIFFReadDirectory: from C"
    assert capfd.readouterr().err == "progress\n"


def test_xfa_form_is_one_warning(capfd):
    seen: list[str] = []
    with PdfFile.open(xfa_pdf(), "form.pdf", on_warning=seen.append) as pdf:
        pdf.render(1, 36)
    assert seen == ["form.pdf: the PDF is an XFA form, which this pdfium cannot run: only its plain PDF content is read"]
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_a_batch_with_a_corrupt_tiff_says_one_line(model_dir, tmp_path, capfd):
    scan = tmp_path / "scan.tif"
    scan.write_bytes(corrupt_zip_tiff())
    tagged = tmp_path / "tagged.tif"
    tagged.write_bytes(oversized_tag_tiff())
    r = CliRunner().invoke(app, ["describe", str(scan), str(tagged), "--model", model_dir, "--json", "--max-new-tokens", "1"])
    assert r.exit_code == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"qwenvl: {scan}: corrupt or unreadable image (decoder error -2: ZIPDecode:"), lines
    assert lines[1] == f"qwenvl: {tagged}: the decoder warned: Tag data larger than file. Skipping tag 270"
    assert [json.loads(rec)["file"] for rec in r.stdout.splitlines()] == [str(scan), str(tagged)]
    assert capfd.readouterr().err == ""  # nothing went around sys.stderr, straight to fd 2


# ---------------------------------------------------------------------------------------------- sizes, causes
def test_files_larger_than_any_real_image_or_pdf_are_refused_with_the_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(image_module, "MAX_IMAGE_BYTES", 1000)
    monkeypatch.setattr(pdf_module, "MAX_PDF_BYTES", 1000)
    big = tmp_path / "big.png"
    Image.effect_noise((64, 64), 50).save(big)
    size = big.stat().st_size
    with pytest.raises(InputError, match=rf"^big\.png: {size / 2**30:.3g} GiB, over the limit of .* for an image file$"):
        load_image(big, name="big.png")
    data = build_pdf([red_page() for _ in range(3)])
    with pytest.raises(InputError, match=r"^big\.pdf: .* MiB, over the limit of .* MiB for a PDF$"):
        PdfFile.open(data, "big.pdf")


@pytest.mark.parametrize(
    "call",
    [
        lambda: load_image(b"\x89PNG\r\n\x1a\n" + b"\x13" * 64, name="x.png"),
        lambda: load_image(corrupt_zip_tiff(), name="x.tif"),
        lambda: PdfFile.open(b"%PDF-1.7\n" + b"\x00garbage" * 50, "x.pdf"),
    ],
    ids=["png", "tiff", "pdf"],
)
def test_errors_keep_their_cause_for_qwenvl_debug(call):
    with pytest.raises(InputError) as info:
        call()
    assert info.value.__cause__ is not None
