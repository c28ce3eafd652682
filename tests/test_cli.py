"""`qwenvl describe` as a user runs it: stdout carries only answers, stderr one line per problem,
exit codes 0 / 1 / 2, JSON lines that parse, batches that survive a bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qwenvl_cli.cli import app

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
SHAPES = str(SAMPLES / "shapes.png")
RECEIPT = str(SAMPLES / "receipt.png")


@pytest.fixture(scope="module")
def model_dir(make_ckpt):
    return str(make_ckpt(max_pixels=64 * 28 * 28))


def run(*args: str, stdin: bytes | None = None, env: dict | None = None):
    return CliRunner().invoke(app, list(args), input=stdin, env=env)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_describe_json_fields(model_dir):
    r = run("describe", SHAPES, "--model", model_dir, "--json", "--max-new-tokens", "6")
    assert r.exit_code == 0, r.stderr
    [record] = json_lines(r.stdout)
    assert record["file"] == SHAPES
    assert record["finish_reason"] in ("stop", "length")
    assert 1 <= record["completion_tokens"] <= 6
    assert record["prompt_tokens"] > 64  # the image's vision tokens are in the prompt
    assert record["model"] == Path(model_dir).name
    assert isinstance(record["text"], str)
    assert r.stderr == ""


def test_text_mode_streams_the_same_answer_as_json(model_dir):
    common = ("describe", SHAPES, "--model", model_dir, "--max-new-tokens", "12", "--temperature", "0")
    text = run(*common)
    record = json_lines(run(*common, "--json").stdout)[0]
    assert text.exit_code == 0
    assert text.stdout == record["text"] + ("\n" if record["text"] and not record["text"].endswith("\n") else "")


def test_batch_continues_after_a_bad_input(model_dir, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    r = run("describe", SHAPES, str(bad), RECEIPT, "--model", model_dir, "--json", "--max-new-tokens", "3")
    assert r.exit_code == 1
    records = json_lines(r.stdout)
    assert [rec["file"] for rec in records] == [SHAPES, str(bad), RECEIPT]
    assert "error" in records[1] and "text" in records[0] and "text" in records[2]
    [line] = r.stderr.splitlines()
    assert str(bad) in line and "not an image" in line
    assert "Traceback" not in r.stderr


def test_text_batch_has_headers(model_dir):
    r = run("describe", SHAPES, RECEIPT, "--model", model_dir, "--max-new-tokens", "3")
    assert r.exit_code == 0
    assert r.stdout.startswith(f"==> {SHAPES} <==\n")
    assert f"\n==> {RECEIPT} <==\n" in r.stdout


def test_together_gives_one_answer_for_all_images(model_dir):
    r = run("describe", SHAPES, RECEIPT, "--together", "--model", model_dir, "--json", "--max-new-tokens", "3")
    assert r.exit_code == 0, r.stderr
    [record] = json_lines(r.stdout)
    assert record["file"] == [SHAPES, RECEIPT]
    alone = json_lines(run("describe", SHAPES, "--model", model_dir, "--json", "--max-new-tokens", "1").stdout)[0]
    assert record["prompt_tokens"] > alone["prompt_tokens"] + 40  # the second image's vision tokens


def test_stdin_list_of_paths_and_stdin_bytes(model_dir):
    r = run("describe", "-", "--model", model_dir, "--json", "--max-new-tokens", "2",
            stdin=f"{SHAPES}\n{RECEIPT}\n".encode())
    assert [rec["file"] for rec in json_lines(r.stdout)] == [SHAPES, RECEIPT]
    r = run("describe", "-", "--model", model_dir, "--json", "--max-new-tokens", "2",
            stdin=Path(SHAPES).read_bytes())
    assert r.exit_code == 0, r.stderr
    assert json_lines(r.stdout)[0]["file"] == "-"


def test_missing_file_is_one_line_exit_1(model_dir):
    r = run("describe", "nope.jpg", "--model", model_dir)
    assert r.exit_code == 1
    assert r.stdout == ""
    assert r.stderr.strip().splitlines() == ["qwenvl: nope.jpg: file not found"]


def test_bad_model_dir(tmp_path):
    r = run("describe", SHAPES, "--model", str(tmp_path))
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines() == [f"qwenvl: {tmp_path}: no config.json (not a Qwen2.5-VL checkpoint directory)"]


def test_offline_hub_id_says_what_to_do(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "QWENVL_MODEL": ""}
    r = run("describe", SHAPES, "--model", "Qwen/Qwen2.5-VL-3B-Instruct", env=env)
    assert r.exit_code == 1
    [line] = r.stderr.strip().splitlines()
    assert "Qwen/Qwen2.5-VL-3B-Instruct" in line and "--model DIR" in line


@pytest.mark.parametrize(
    "args",
    [("--device", "tpu"), ("--dtype", "float8"), ("--temperature", "-1"), ("--max-new-tokens", "0")],
)
def test_bad_option_values_are_usage_errors(args):
    r = run("describe", SHAPES, *args)
    assert r.exit_code == 2
    assert "Traceback" not in r.stderr


def test_min_pixels_above_max_pixels_is_a_usage_error(model_dir):
    r = run("describe", SHAPES, "--model", model_dir, "--min-pixels", "5000", "--max-pixels", "4000")
    assert r.exit_code == 2
    assert "5000" in r.stderr and "4000" in r.stderr


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from qwenvl_cli.cli import run_cli\n"
        "sys.argv = ['qwenvl', 'describe', '--help']\n"
        "try:\n    run_cli()\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'transformers' not in sys.modules\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--together" in r.stdout and "Examples" in r.stdout


def _describe_then_check(model_dir, checks: str) -> subprocess.CompletedProcess:
    """`qwenvl describe SHAPES` run in a fresh interpreter through run_cli (main() would leave the process
    before anything after it runs), then the Python statements `checks` in the same process."""
    code = (
        "import gc, sys\n"
        "from qwenvl_cli.cli import run_cli\n"
        f"sys.argv = ['qwenvl', 'describe', {SHAPES!r}, '--model', {model_dir!r}, '--max-new-tokens', '2']\n"
        "try:\n    run_cli()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
    ) + checks
    env = {**os.environ, "QWENVL_DEBUG": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


def test_product_never_imports_transformers(model_dir):
    r = _describe_then_check(model_dir, "assert 'transformers' not in sys.modules\n"
                                        "assert 'torchvision' not in sys.modules\n")
    assert r.returncode == 0, r.stderr


def test_describing_an_image_loads_no_pdf_or_video_library_and_collects_garbage(model_dir):
    """pypdfium2 and PyAV are imported where a PDF or a video is opened, not on every run (20-30 ms); the
    cyclic collector, off while the imports run, is back on (with what they made frozen) for the answers."""
    r = _describe_then_check(model_dir, (
        "assert 'pypdfium2' not in sys.modules and 'av' not in sys.modules, 'a PDF or video library imported'\n"
        "assert gc.isenabled() and gc.get_freeze_count() > 100_000, (gc.isenabled(), gc.get_freeze_count())\n"
    ))
    assert r.returncode == 0, r.stderr


def test_the_console_script_exits_with_the_runs_status_after_atexit_handlers_and_threads(model_dir):
    """main() leaves without the interpreter's teardown, but only after what that teardown would have
    waited for: atexit handlers (the PDF renderer's child), other threads, the streams flushed."""
    thread = (  # a thread with work left when the main thread is done (is_alive turns False at the shutdown)
        "def last():\n    while threading.main_thread().is_alive():\n        time.sleep(0.01)\n"
        "    print('thread done', flush=True)\n"
        "threading.Thread(target=last).start()\n"
    )
    for with_thread in (False, True):
        program = (
            "import atexit, sys, threading, time\n"
            "from qwenvl_cli.cli import main\n"
            "atexit.register(lambda: print('atexit ran', flush=True))\n"
            + (thread if with_thread else "")
            + f"sys.argv = ['qwenvl', 'describe', 'nope.jpg', {SHAPES!r}, '--model', {model_dir!r}, "
            "'--max-new-tokens', '2']\n"
            "main()\n"
        )
        r = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
        assert r.returncode == 1, r.stderr  # the run's status: one input failed
        assert r.stderr.strip().splitlines() == ["qwenvl: nope.jpg: file not found"]
        lines = r.stdout.splitlines()
        assert f"==> {SHAPES} <==" in lines and "atexit ran" in lines, lines
        assert ("thread done" in lines) == with_thread, lines


def test_debug_env_shows_traceback():
    r = subprocess.run(
        [sys.executable, "-m", "qwenvl_cli", "describe", SHAPES, "--model", "/nonexistent/dir"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "QWENVL_DEBUG": "1"},
    )
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_directories_need_recursive_and_then_give_sorted_images(model_dir, tmp_path):
    folder = tmp_path / "pics"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.png", "sub/a.png"):
        (folder / name).write_bytes(Path(SHAPES).read_bytes())
    (folder / "notes.txt").write_text("not an image, skipped by suffix")
    r = run("describe", str(folder), "--model", model_dir, "--json", "--max-new-tokens", "1")
    assert r.exit_code == 1
    assert "is a directory (add --recursive" in r.stderr
    r = run("describe", str(folder), "-r", "--model", model_dir, "--json", "--max-new-tokens", "1")
    assert r.exit_code == 0, r.stderr
    assert [rec["file"] for rec in json_lines(r.stdout)] == [str(folder / "b.png"), str(folder / "sub" / "a.png")]


def test_output_dir_writes_one_predictably_named_file_per_input(model_dir, tmp_path):
    out = tmp_path / "out"
    other = tmp_path / "other"
    other.mkdir()
    same_name = other / "shapes.png"
    same_name.write_bytes(Path(SHAPES).read_bytes())
    r = run("describe", SHAPES, str(same_name), RECEIPT, "--model", model_dir, "--max-new-tokens", "4",
            "--output-dir", str(out))
    assert r.exit_code == 0, r.stderr
    names = ["shapes.png.txt", "shapes.png-2.txt", "receipt.png.txt"]
    assert r.stdout.splitlines() == [str(out / n) for n in names]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    r = run("describe", RECEIPT, "--model", model_dir, "--max-new-tokens", "4", "--json", "--output-dir", str(out))
    record = json.loads((out / "receipt.png.json").read_text())
    assert record["file"] == RECEIPT and record["completion_tokens"] >= 1


def test_no_progress_or_logs_on_stderr_when_not_a_terminal(model_dir):
    r = run("describe", SHAPES, "--model", model_dir, "--max-new-tokens", "2")
    assert r.exit_code == 0 and r.stderr == ""
    r = run("describe", SHAPES, "--model", model_dir, "--max-new-tokens", "2", "--verbose")
    lines = r.stderr.splitlines()
    assert lines[0].startswith("qwenvl: loaded ") and "tok/s" in lines[1]
    assert lines[1].endswith((" tok/s (native kernels)", " tok/s (modules (the native kernels do not take this model))"))
    assert "tok/s" not in r.stdout


def test_review_regressions(model_dir, tmp_path):
    # An extreme aspect ratio names the file.
    from PIL import Image

    wide = tmp_path / "wide.png"
    Image.new("RGB", (3000, 10)).save(wide)
    r = run("describe", str(wide), "--model", model_dir)
    assert r.exit_code == 1 and r.stderr.startswith(f"qwenvl: {wide}: ") and "aspect ratio" in r.stderr
    # Impossible pixel bounds against the checkpoint's defaults: one usage error, not one per file.
    r = run("describe", SHAPES, RECEIPT, "--model", model_dir, "--max-pixels", "100")
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1
    # --top-p 0 and an out-of-range seed are usage errors.
    assert run("describe", SHAPES, "--top-p", "0").exit_code == 2
    assert run("describe", SHAPES, "--seed", str(2**70)).exit_code == 2
    # --output-dir that is a file: one line, exit 2.
    r = run("describe", SHAPES, "--model", model_dir, "-o", SHAPES)
    assert r.exit_code == 2 and "cannot create" in r.stderr


def test_temperature_alone_samples_despite_hub_top_k_1(model_dir):
    outs = {
        json_lines(run("describe", SHAPES, "--model", model_dir, "--json", "--max-new-tokens", "8",
                       "--temperature", "1.5", "--seed", str(seed)).stdout)[0]["text"]
        for seed in (1, 2, 3)
    }
    assert len(outs) > 1


def test_broken_pipe_is_quiet(model_dir):
    cmd = f"{sys.executable} -m qwenvl_cli describe {SHAPES} {SHAPES} {SHAPES} --model {model_dir} --max-new-tokens 40 | head -c 1"
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantize_and_verbose_says_the_dtype_and_why(model_dir, quantize):
    r = run("describe", SHAPES, "--model", model_dir, "--json", "--max-new-tokens", "3", "--quantize", quantize, "-v")
    assert r.exit_code == 0, r.stderr
    assert json_lines(r.stdout)[0]["completion_tokens"] >= 1
    first = r.stderr.splitlines()[0]
    assert first.startswith("qwenvl: loaded ") and "auto: " in first and f"decoder weights {quantize}" in first
    assert "large tensors from a reused heap (mmap off)" in first or "malloc as configured" in first


def test_unknown_quantization_is_a_usage_error(model_dir):
    r = run("describe", SHAPES, "--model", model_dir, "--quantize", "int2")
    assert r.exit_code == 2
