"""Unix-tool behaviour shared by every subcommand: Ctrl-C, progress only on a terminal, help with examples."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qwenvl_cli.cli import app
from qwenvl_cli.progress import Feedback

SHAPES = str(Path(__file__).resolve().parents[1] / "samples" / "shapes.png")


@pytest.fixture(scope="module")
def model_dir(make_ckpt):
    return str(make_ckpt(max_pixels=64 * 28 * 28))


def test_ctrl_c_stops_cleanly_with_the_printed_answers_intact(model_dir):
    cmd = [sys.executable, "-m", "qwenvl_cli", "describe", *[SHAPES] * 200, "--model", model_dir, "--json",
           "--max-new-tokens", "40"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()  # the first answer is out: the batch is under way
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    lines = [first] + rest.splitlines()
    records = [json.loads(line) for line in lines]  # every line printed is a whole JSON object
    assert 1 <= len(records) < 200
    assert err.splitlines() == ["qwenvl: interrupted"]


def test_progress_rule(monkeypatch):
    def streams(stdout_tty: bool, stderr_tty: bool):
        monkeypatch.setattr(sys.stdout, "isatty", lambda: stdout_tty, raising=False)
        monkeypatch.setattr(sys.stderr, "isatty", lambda: stderr_tty, raising=False)

    streams(stdout_tty=False, stderr_tty=True)  # `qwenvl ... > out.jsonl` in a terminal
    f = Feedback.for_streams(quiet=False)
    assert f.spinner and f.bars
    streams(stdout_tty=True, stderr_tty=True)  # answers on the same terminal: they are the progress
    f = Feedback.for_streams(quiet=False)
    assert f.spinner and not f.bars
    assert not Feedback.for_streams(quiet=True).spinner
    streams(stdout_tty=False, stderr_tty=False)  # cron, CI, pipes
    f = Feedback.for_streams(quiet=False)
    assert not f.spinner and not f.bars


def test_progress_bar_draws_inputs_and_pages_on_a_terminal():
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=100)
    feedback = Feedback(spinner=True, bars=True, console=console)
    with feedback.batch(3):
        feedback.input_started("a.pdf")
        feedback.pages_started("a.pdf", 4)
        for _ in range(4):
            feedback.page_done()
        feedback.input_done()
        console.file.flush()
        time.sleep(0.2)
    drawn = buffer.getvalue()
    assert "a.pdf" in drawn and "/3" in drawn


def test_progress_absent_off_a_terminal(model_dir, tmp_path):
    from PIL import Image

    pdf = tmp_path / "two.pdf"
    pages = [Image.new("RGB", (100, 100), "white")] * 2
    pages[0].save(pdf, format="PDF", save_all=True, append_images=pages[1:])
    r = CliRunner().invoke(app, ["describe", SHAPES, str(pdf), "--model", model_dir, "--json", "--max-new-tokens", "1"])
    assert r.exit_code == 0 and r.stderr == ""


@pytest.mark.parametrize("command", ["describe", "ground", "extract", "video", "models", "download"])
def test_every_subcommand_has_help_with_examples(command):
    r = CliRunner().invoke(app, [command, "--help"])
    assert r.exit_code == 0
    assert "Example" in r.stdout and f"qwenvl {command}" in r.stdout
