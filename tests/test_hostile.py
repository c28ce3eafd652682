"""Hostile inputs: each gives one line on stderr naming the file, exit 1, no traceback, no hang, bounded
memory; in a batch the good inputs still answer. Files are built here, byte by byte where needed."""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from pdf_fixtures import build_pdf, encrypted_pdf
from qwenvl_cli.cli import app

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
SHAPES = SAMPLES / "shapes.png"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png() -> bytes:
    """A valid PNG header declaring 100,000 x 100,000 pixels (30 GB decoded), with a tiny body."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 10))
            + _png_chunk(b"IEND", b""))


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def pdf_bytes(pages: int = 1) -> bytes:
    buf = io.BytesIO()
    images = [Image.new("RGB", (100, 100), "white") for _ in range(pages)]
    images[0].save(buf, format="PDF", save_all=True, append_images=images[1:])
    return buf.getvalue()


# An MP4 holding only an audio track's boxes: a container, but no video stream.
AUDIO_ONLY_MP4 = b"\x00\x00\x00\x18ftypM4A \x00\x00\x02\x00M4A isom" + b"\x00\x00\x00\x08free" * 4


# name -> (bytes to write, words the one error line must contain)
HOSTILE = {
    "empty.png": (b"", "empty"),
    "empty.pdf": (b"", "empty"),
    "truncated.jpg": (jpeg_bytes()[:300], "truncated"),
    "truncated.png": (SHAPES.read_bytes()[:200], "truncated"),
    "corrupt.png": (b"\x89PNG\r\n\x1a\n" + b"\x13" * 64, ""),
    "notes.png": (b"just some text, not an image\n", "text"),
    "huge.png": (huge_png(), "pixels"),
    "truncated.pdf": (pdf_bytes(3)[:400], ""),
    "corrupt.pdf": (b"%PDF-1.7\n" + b"\x00garbage" * 50, ""),
    "zero-pages.pdf": (build_pdf([]), "no pages"),
    "locked.pdf": (encrypted_pdf("pw"), "--password"),
    "audio-only.mp4": (AUDIO_ONLY_MP4, "video"),
}


@pytest.fixture(scope="module")
def model_dir(make_ckpt):
    return str(make_ckpt(max_pixels=64 * 28 * 28))


# Videos, made with PyAV in the fixture: name -> words the one error line must contain.
HOSTILE_VIDEOS = {
    "no-moov.mp4": "moov",  # an MP4 cut in half: its index (written last) is gone
    "zero-frames.mkv": "no frames",  # a video stream without one frame
    "garbage.mkv": "ffmpeg",  # a Matroska signature, then noise
}


def _write_hostile_videos(folder: Path) -> None:
    from video_fixtures import write_clip, zero_frame_clip

    good = write_clip(folder / "good.mp4", 20, fps=10).read_bytes()
    (folder / "good.mp4").unlink()
    (folder / "no-moov.mp4").write_bytes(good[: len(good) // 2])
    zero_frame_clip(folder / "zero-frames.mkv")
    (folder / "garbage.mkv").write_bytes(b"\x1a\x45\xdf\xa3" + bytes(range(256)) * 12)


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile")
    for name, (data, _) in HOSTILE.items():
        (folder / name).write_bytes(data)
    _write_hostile_videos(folder)
    return folder


def assert_one_line(result, name: str, words: str = "") -> None:
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    [line] = result.stderr.splitlines()
    assert line.startswith(f"qwenvl: {name}"), line
    assert words.lower() in line.lower(), line


@pytest.mark.parametrize("name", sorted(HOSTILE))
@pytest.mark.parametrize("command", ["describe", "extract"])
def test_each_hostile_file_is_one_line_and_exit_1(model_dir, hostile_dir, name, command):
    path = str(hostile_dir / name)
    r = CliRunner().invoke(app, [command, path, "--model", model_dir, "--max-new-tokens", "2"])
    assert_one_line(r, path, HOSTILE[name][1])
    assert r.stdout == ""


@pytest.mark.parametrize("name", sorted(HOSTILE_VIDEOS))
@pytest.mark.parametrize("command", ["describe", "video"])
def test_each_hostile_video_is_one_line_and_exit_1(model_dir, hostile_dir, name, command):
    path = str(hostile_dir / name)
    r = CliRunner().invoke(app, [command, path, "--model", model_dir, "--max-new-tokens", "2"])
    assert_one_line(r, path, HOSTILE_VIDEOS[name])
    assert r.stdout == ""


def test_hostile_paths(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("qwenvl_cli.inputs.PIPE_WAIT_SECONDS", 0.5)
    folder = tmp_path / "folder"
    folder.mkdir()
    not_a_dir = tmp_path / "plain.png"
    not_a_dir.write_bytes(SHAPES.read_bytes())
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # nobody writes to it: a plain open() would block forever
    cases = [
        (str(folder), "directory"),
        (str(tmp_path / "missing.png"), "not found"),
        (str(not_a_dir / "inner.png"), ""),
        (str(tmp_path / ("x" * 300 + ".png")), ""),
        (str(fifo), "nothing was written to it"),
    ]
    for path, words in cases:
        r = CliRunner().invoke(app, ["ground", path, "thing", "--model", model_dir])
        assert_one_line(r, path, words)


def test_spaces_and_non_ascii_names_work(model_dir, tmp_path):
    folder = tmp_path / "my scans"
    folder.mkdir()
    image = folder / "résumé 页 1.png"
    image.write_bytes(SHAPES.read_bytes())
    r = CliRunner().invoke(app, ["describe", str(image), "--model", model_dir, "--json", "--max-new-tokens", "1"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["file"] == str(image)


def test_animated_image_uses_the_first_frame_and_says_so(model_dir, tmp_path):
    gif = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (60, 60), c) for c in ("red", "green", "blue")]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100)
    r = CliRunner().invoke(app, ["describe", str(gif), "--model", model_dir, "--max-new-tokens", "1"])
    assert r.exit_code == 0
    [line] = r.stderr.splitlines()
    assert str(gif) in line and "3 frames" in line and "first frame" in line


@pytest.mark.parametrize(
    "breakage, words",
    [("missing shard", "shard"), ("corrupt header", "safetensors"), ("impossible config", "config")],
)
def test_broken_model_directories(make_ckpt, tmp_path, breakage, words):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(make_ckpt(shards=2), model)
    if breakage == "missing shard":
        (model / "model-00002-of-00002.safetensors").unlink()
    elif breakage == "corrupt header":
        shard = model / "model-00001-of-00002.safetensors"
        shard.write_bytes(struct.pack("<Q", 10**12) + b"{")
    else:
        config = json.loads((model / "config.json").read_text())
        config["num_attention_heads"] = 5  # 64 hidden is not divisible into 5 heads
        (model / "config.json").write_text(json.dumps(config))
    r = CliRunner().invoke(app, ["describe", str(SHAPES), "--model", str(model)])
    assert r.exit_code == 1
    [line] = r.stderr.splitlines()
    assert "Traceback" not in r.stderr and str(model) in line and words in line.lower(), line


def test_a_batch_of_every_hostile_file_in_a_real_process(model_dir, hostile_dir):
    """All of them in one run, with good files between: one error line each, the good ones answer, exit 1,
    within a timeout, and the process's peak memory stays far below what the huge PNG would need."""
    names = sorted(HOSTILE) + sorted(HOSTILE_VIDEOS)
    args = [str(SHAPES)] + [str(hostile_dir / n) for n in names] + [str(SHAPES)]
    cmd = [sys.executable, "-m", "qwenvl_cli", "describe", *args, "--model", model_dir, "--json", "--max-new-tokens", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["file"] for rec in records] == args
    assert "text" in records[0] and "text" in records[-1]
    assert all("error" in rec for rec in records[1:-1])
    assert len(r.stderr.splitlines()) == len(names)
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux
    assert peak_gib < 4, f"peak RSS {peak_gib:.1f} GiB"


def test_a_pipe_with_data_is_read(model_dir, tmp_path):
    """bash's `qwenvl describe <(curl ...)` passes a pipe: its bytes are the image."""
    import threading

    fifo = tmp_path / "incoming"
    os.mkfifo(fifo)

    def write():
        with open(fifo, "wb") as f:
            f.write(SHAPES.read_bytes())

    writer = threading.Thread(target=write)
    writer.start()
    r = CliRunner().invoke(app, ["describe", str(fifo), "--model", model_dir, "--json", "--max-new-tokens", "1"])
    writer.join(timeout=10)
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["file"] == str(fifo)
