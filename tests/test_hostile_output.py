"""Outputs under hostile conditions: no file is ever overwritten or written through a link, a failed
write costs that input only, names with control characters or non-UTF-8 bytes cannot break a line or the
JSON, and closed or full standard streams give one line, not a traceback."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qwenvl_cli.cli import app

SHAPES = Path(__file__).resolve().parents[1] / "samples" / "shapes.png"


@pytest.fixture(scope="module")
def model_dir(make_ckpt):
    return str(make_ckpt(max_pixels=64 * 28 * 28))


def run(*args: str, stdin: bytes | None = None):
    return CliRunner().invoke(app, list(args), input=stdin)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def photo(tmp_path: Path, name: str = "photo.png") -> Path:
    path = tmp_path / name
    path.write_bytes(SHAPES.read_bytes())
    return path


def test_draw_never_replaces_the_input_an_existing_file_or_a_link_target(model_dir, tmp_path):
    p = photo(tmp_path)
    before = p.read_bytes()
    r = run("ground", str(p), "a circle", "--draw", str(p), "--model", model_dir, "--json", "--max-new-tokens", "8")
    assert r.exit_code == 0, r.stderr
    assert p.read_bytes() == before
    assert json_lines(r.stdout)[0]["drawing"] == str(tmp_path / "photo-2.png")
    elsewhere = tmp_path / "elsewhere.png"
    elsewhere.write_bytes(b"precious")
    link = tmp_path / "out.png"
    link.symlink_to(elsewhere)
    r = run("ground", str(p), "a circle", "--draw", str(link), "--model", model_dir, "--json", "--max-new-tokens", "8")
    assert r.exit_code == 0, r.stderr
    assert elsewhere.read_bytes() == b"precious" and link.is_symlink()
    assert json_lines(r.stdout)[0]["drawing"] == str(tmp_path / "out-2.png")


def test_output_dir_never_overwrites_nor_escapes_through_a_link(model_dir, tmp_path):
    p = photo(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "photo.png.txt").write_text("yesterday's answer")
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours")
    (out / "photo.png-2.txt").symlink_to(outside)
    r = run("describe", str(p), "--model", model_dir, "--max-new-tokens", "3", "-o", str(out))
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == str(out / "photo.png-3.txt")
    assert (out / "photo.png.txt").read_text() == "yesterday's answer" and outside.read_text() == "not yours"


def test_a_failed_write_fails_that_input_only_and_leaves_no_file(model_dir, tmp_path, monkeypatch):
    import qwenvl_cli.output as output

    real_fdopen = os.fdopen
    out = tmp_path / "out"

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def fdopen(fd, mode="r", *a, **k):
        f = real_fdopen(fd, mode, *a, **k)
        return Full(f) if "first" in os.readlink(f"/proc/self/fd/{fd}") else f

    monkeypatch.setattr(output.os, "fdopen", fdopen)
    first, second = photo(tmp_path, "first.png"), photo(tmp_path, "second.png")
    r = run("describe", str(first), str(second), "--model", model_dir, "--max-new-tokens", "2", "-o", str(out))
    assert r.exit_code == 1
    assert sorted(p.name for p in out.iterdir()) == ["second.png.txt"]  # no 0-byte first.png.txt
    [line] = r.stderr.splitlines()
    assert line.startswith(f"qwenvl: {first}: cannot write") and "No space left" in line


def test_output_dir_with_json_keeps_the_error_records(model_dir, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    out = tmp_path / "out"
    r = run("describe", str(bad), "--model", model_dir, "--json", "-o", str(out))
    assert r.exit_code == 1
    record = json.loads((out / "bad.png.json").read_text())
    assert record["file"] == str(bad) and "error" in record


def test_names_cannot_split_lines_or_reach_the_terminal(model_dir, tmp_path):
    r = run("describe", str(tmp_path / "a\nb\x1b]0;pwned\x07.png"), "--model", model_dir, "--json")
    assert r.exit_code == 1
    [line] = r.stderr.splitlines()
    assert "\x1b" not in r.stderr and "\\n" in line and "\\x1b" in line
    [record] = json_lines(r.stdout)
    assert record["file"] == str(tmp_path / "a\nb\x1b]0;pwned\x07.png")  # JSON keeps the name, escaped


def test_non_utf8_names_keep_json_valid(model_dir, tmp_path):
    raw = os.fsencode(tmp_path) + b"/caf\xe9.png"
    with open(raw, "wb") as f:
        f.write(SHAPES.read_bytes())
    cmd = [sys.executable, "-m", "qwenvl_cli", "describe", os.fsdecode(raw), "--model", model_dir, "--json",
           "--max-new-tokens", "2"]
    r = subprocess.run(cmd, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout.decode("utf-8"))  # strict UTF-8
    assert record["file"].endswith("caf\ufffd.png")


def shell(cmd: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=timeout)


def test_closed_and_full_standard_streams(model_dir, tmp_path):
    q = f"{sys.executable} -m qwenvl_cli describe {SHAPES} --model {model_dir} --max-new-tokens 2"
    r = shell(f"{q} 2>&-")
    assert r.returncode == 0 and r.stdout.strip()
    r = shell(f"{q} > /dev/full")
    assert r.returncode == 1
    assert r.stderr.splitlines() == ["qwenvl: standard output: cannot write the answers (No space left on device)"]
    r = shell(f"{q} >&-")
    assert r.returncode == 1 and r.stderr.splitlines() == ["qwenvl: standard output is closed: there is nowhere to write the answers"]
    r = shell(f"{sys.executable} -m qwenvl_cli describe - --model {model_dir} <&-")
    assert r.returncode == 1 and r.stderr.splitlines() == ["qwenvl: -: standard input is closed"]


def test_stdin_is_read_with_a_bound(model_dir, monkeypatch):
    monkeypatch.setattr("qwenvl_cli.inputs.MAX_PIPE_BYTES", 1 << 20)
    r = run("describe", "-", "--model", model_dir, stdin=b"\0" * (3 << 20))
    assert r.exit_code == 1
    assert r.stderr.splitlines() == ["qwenvl: -: more than 1 MiB on standard input; pass the file by name"]


def test_usage_errors_found_by_the_review(model_dir):
    r = run("describe", str(SHAPES), "--pages", "", "--model", model_dir)
    assert r.exit_code == 2 and "--pages is empty" in r.stderr
    r = run("describe", str(SHAPES), "--min-pixels", "1000000000000", "--max-pixels", "1000000000000", "--model", model_dir)
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1 and "context" in r.stderr


def test_a_bad_pdf_page_fails_alone(model_dir, tmp_path, monkeypatch):
    from PIL import Image

    from qwenvl_cli.errors import InputError
    from qwenvl_cli.media.pdf import PdfFile

    pdf = tmp_path / "three.pdf"
    pages = [Image.new("RGB", (100, 100), "white")] * 3
    pages[0].save(pdf, format="PDF", save_all=True, append_images=pages[1:])
    real = PdfFile.render

    def render(self, number, dpi=200):
        if number == 2:
            raise InputError(f"{self.name}: page 2: cannot render (broken content stream)")
        return real(self, number, dpi)

    monkeypatch.setattr(PdfFile, "render", render)
    r = run("describe", str(pdf), "--model", model_dir, "--json", "--max-new-tokens", "1")
    assert r.exit_code == 1
    records = json_lines(r.stdout)
    assert [x.get("page") for x in records] == [1, 2, 3]
    assert "error" in records[1] and "text" in records[2]
    assert r.stderr.splitlines() == [f"qwenvl: {pdf} (page 2): cannot render (broken content stream)"]
