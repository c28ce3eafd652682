"""What every answering subcommand shares: its options (declared once, added to each command by
`shared_options`), the options as given (`Common`), and the error rule. The run itself is cli/run.py.

Nothing here imports torch, so `--help` stays instant.
"""

from __future__ import annotations

import inspect
import os
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterator, Optional

import typer

from qwenvl_cli.errors import QwenVLError


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(str, Enum):
    auto = "auto"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class Quantize(str, Enum):
    int8 = "int8"
    int4 = "int4"


# Options shared by the answering subcommands (Typer accepts one Option object in several commands).
SYSTEM = typer.Option("You are a helpful assistant.", "--system", help="System prompt.")
MODEL = typer.Option(
    None, "--model", "-m", help="Checkpoint directory or hub id [env QWENVL_MODEL; default Qwen/Qwen2.5-VL-3B-Instruct]."
)
JSON = typer.Option(False, "--json", help="One JSON object per answer, one per line.")
MAX_NEW_TOKENS = typer.Option(None, "--max-new-tokens", min=1, help="Stop after N tokens [default 512].")
TEMPERATURE = typer.Option(None, "--temperature", min=0.0, help="0 = greedy [default: the model's].")
TOP_P = typer.Option(None, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")
TOP_K = typer.Option(None, "--top-k", min=0, help="Sample among the K most likely (0 = off).")
REPETITION_PENALTY = typer.Option(None, "--repetition-penalty", min=0.01, help="1.0 = off.")
SEED = typer.Option(None, "--seed", min=0, max=2**63 - 1, help="Seed for reproducible sampling.")
DEVICE = typer.Option(Device.auto, "--device", help="Where to run.")
DTYPE = typer.Option(
    DType.auto, "--dtype",
    help="Weights dtype (auto: bf16 on GPUs and on CPUs with AVX512-BF16/AMX; fp16 on GPUs without bf16; else fp32).",
)
QUANTIZE = typer.Option(
    None, "--quantize",
    help="Weight-only int8 or int4 for the text decoder: 1/2 or about 1/4 of bf16's bytes to read per token.",
)
MIN_PIXELS = typer.Option(None, "--min-pixels", min=1, help="Smallest resized image area.")
MAX_PIXELS = typer.Option(None, "--max-pixels", min=1, help="Largest resized image area.")
RECURSIVE = typer.Option(False, "--recursive", "-r", help="Read the image and PDF files inside directories.")
OUTPUT_DIR = typer.Option(
    None, "--output-dir", "-o", help="Write one file per answer here (NAME.txt, NAME.pN.txt for PDF pages, .json with --json)."
)
PAGES = typer.Option(None, "--pages", help="PDF pages to read, 1-based: '1-3,7', '5-' [default: all].")
DPI = typer.Option(None, "--dpi", min=18.0, max=1200.0, help="PDF rendering resolution [default 200: A4 = 1654x2339 px].")
PASSWORD = typer.Option(None, "--password", help="Password of encrypted PDFs.")
VERBOSE = typer.Option(False, "--verbose", "-v", help="Timings and token counts on stderr.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress display on stderr (errors still show).")


# name -> (type, Option): what every answering command takes; `shared_options` adds them to a command.
SHARED = {
    "system": (str, SYSTEM),
    "model": (Optional[str], MODEL),
    "json": (bool, JSON),
    "max_new_tokens": (Optional[int], MAX_NEW_TOKENS),
    "temperature": (Optional[float], TEMPERATURE),
    "top_p": (Optional[float], TOP_P),
    "top_k": (Optional[int], TOP_K),
    "repetition_penalty": (Optional[float], REPETITION_PENALTY),
    "seed": (Optional[int], SEED),
    "device": (Device, DEVICE),
    "dtype": (DType, DTYPE),
    "quantize": (Optional[Quantize], QUANTIZE),
    "min_pixels": (Optional[int], MIN_PIXELS),
    "max_pixels": (Optional[int], MAX_PIXELS),
    "pages": (Optional[str], PAGES),
    "dpi": (Optional[float], DPI),
    "password": (Optional[str], PASSWORD),
    "recursive": (bool, RECURSIVE),
    "output_dir": (Optional[str], OUTPUT_DIR),
    "verbose": (bool, VERBOSE),
    "quiet": (bool, QUIET),
}


def shared_options(*, exclude: tuple[str, ...] = ()):
    """Give a command `def cmd(own options..., **shared)` the SHARED options (minus `exclude`): Typer reads
    the combined signature and passes them in `shared`."""

    def wrap(fn):
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        extra = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
            for name, (kind, option) in SHARED.items()
            if name not in exclude
        ]
        fn.__signature__ = sig.replace(parameters=own + extra)
        return fn

    return wrap


@contextmanager
def reported_errors() -> Iterator[None]:
    """Every failure becomes one stderr line and an exit code; Ctrl-C exits 130 with output intact."""
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        # A second Ctrl-C while shutting down must not print a traceback from some finaliser.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _flush_quietly()
        from qwenvl_cli.output import warn

        warn("interrupted")
        raise typer.Exit(130) from None
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as Unix tools do.
        _discard_stdout()
        raise typer.Exit(141) from None
    except Exception as exc:  # noqa: BLE001
        from qwenvl_cli.errors import StdoutError
        from qwenvl_cli.output import warn

        if isinstance(exc, StdoutError):
            _discard_stdout()  # what is still buffered must not fail again at exit
        if os.environ.get("QWENVL_DEBUG") == "1":
            raise
        code = exc.exit_code if isinstance(exc, QwenVLError) else 1
        warn(str(exc) if isinstance(exc, QwenVLError) else f"internal error: {type(exc).__name__}: {exc}")
        raise typer.Exit(code) from None


def _discard_stdout() -> None:
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _flush_quietly() -> None:
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        pass


@dataclass(frozen=True)
class Common:
    """The shared options as given (None = the model's default)."""

    inputs: list[str]
    model: str | None = None
    system: str | None = None
    json: bool = False
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    quantize: str | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    recursive: bool = False
    output_dir: str | None = None
    pages: str | None = None
    dpi: float | None = None
    password: str | None = None
    together: bool = False
    verbose: bool = False
    quiet: bool = False
    # video sampling (the `video` command's own options; other commands sample videos with the defaults)
    fps: float | None = None
    nframes: int | None = None
    start: float | None = None  # seconds
    end: float | None = None
    max_frames: int | None = None
    total_pixels: int | None = None
    segment: float | None = None  # seconds per answer


def common_options(values: dict[str, Any], inputs: list[str]) -> Common:
    """A Common from a command's shared options (and --together where it has one); enums become values."""
    from dataclasses import fields

    given = {}
    for f in fields(Common):
        if f.name in values and f.name != "inputs":
            v = values[f.name]
            given[f.name] = v.value if isinstance(v, Enum) else v
    return Common(inputs=inputs, **given)
