"""What every answering subcommand shares: its options, the error rule, and a Session that expands the
inputs, loads the model once, and writes each outcome (stdout, --json lines, or --output-dir files).

torch and the model code are imported inside functions, so `--help` stays instant.
"""

from __future__ import annotations

import inspect
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
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
DTYPE = typer.Option(DType.auto, "--dtype", help="Weights dtype (auto: bf16 on GPU, fp16 where the GPU lacks bf16, fp32 on CPU).")
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
        _flush_quietly()
        from qwenvl_cli.output import warn

        warn("interrupted")
        raise typer.Exit(130) from None
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(141) from None
    except Exception as exc:  # noqa: BLE001
        from qwenvl_cli.output import warn

        if os.environ.get("QWENVL_DEBUG") == "1":
            raise
        code = exc.exit_code if isinstance(exc, QwenVLError) else 1
        warn(str(exc) if isinstance(exc, QwenVLError) else f"internal error: {type(exc).__name__}: {exc}")
        raise typer.Exit(code) from None


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


class Session:
    """One run of a subcommand: inputs expanded, model loaded, outputs routed."""

    def __init__(self, opts: Common, *, streams_text: bool) -> None:
        from qwenvl_cli.engine import Engine, model_label
        from qwenvl_cli.errors import UsageError
        from qwenvl_cli.hub import model_reference
        from qwenvl_cli.inputs import expand_inputs
        from qwenvl_cli.media.pdf import DEFAULT_DPI, parse_pages
        from qwenvl_cli.output import FileWriter, Printer
        from qwenvl_cli.progress import Feedback
        from qwenvl_cli.tasks.sources import DocumentOptions

        self.opts = opts
        if opts.min_pixels and opts.max_pixels and opts.min_pixels > opts.max_pixels:
            raise UsageError(f"--min-pixels {opts.min_pixels} is larger than --max-pixels {opts.max_pixels}")
        if opts.top_p is not None and opts.top_p <= 0:
            raise UsageError(f"--top-p must be above 0 (got {opts.top_p}); use --temperature 0 for greedy decoding")
        documents = DocumentOptions(
            pages=parse_pages(opts.pages) if opts.pages else None,
            dpi=opts.dpi or DEFAULT_DPI,
            password=opts.password,
        )
        self.writer = FileWriter(Path(opts.output_dir), opts.json) if opts.output_dir else None
        self.items = expand_inputs(opts.inputs, sys.stdin.buffer if "-" in opts.inputs else None, opts.recursive)
        # With --output-dir, answers go to files: stdout lists the files, errors stay on stderr only.
        self.printer = Printer(opts.json and self.writer is None, multi=len(self.items) > 1 or documents.pages is not None)
        self.streaming = streams_text and not opts.json and self.writer is None
        self.feedback = Feedback.for_streams(opts.quiet)
        ref = model_reference(opts.model)
        t0 = time.perf_counter()
        with self.feedback.status(f"Loading {ref}"):
            self.engine = Engine.load(ref, opts.device, opts.dtype)
        self.log(f"loaded {ref} on {self.engine.model.device} ({self.engine.model.dtype}) in {time.perf_counter() - t0:.1f}s")
        self.label = model_label(ref)
        pre = self.engine.preprocessor
        lo, hi = opts.min_pixels or pre.min_pixels, opts.max_pixels or pre.max_pixels
        if lo > hi:
            raise UsageError(f"pixel bounds are impossible: min {lo} > max {hi} (see --min-pixels/--max-pixels)")
        self.documents = documents
        self.failures = 0

    def log(self, message: str) -> None:
        if self.opts.verbose:
            from qwenvl_cli.output import warn

            warn(message)

    def request(self):
        from qwenvl_cli.tasks.runner import Request

        o = self.opts
        top_k, top_p = o.top_k, o.top_p
        if o.temperature and top_k is None and top_p is None:
            # The hub checkpoints default to top_k 1 / top_p 0.001, which would make any temperature greedy:
            # asking for a temperature means asking for sampling, so open the filters unless given.
            top_k, top_p = 0, 1.0
        params = self.engine.sampling(
            max_new_tokens=o.max_new_tokens,
            temperature=o.temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=o.repetition_penalty,
            seed=o.seed,
        )
        return Request(o.system, params, o.min_pixels, o.max_pixels, o.together, self.documents)

    def run(self, plan) -> Iterator[Any]:
        """Outcomes of `plan` over the inputs; failed ones are reported here and not yielded."""
        from qwenvl_cli.output import warn
        from qwenvl_cli.tasks.runner import run

        def on_start(outcome) -> None:
            self.printer.start(outcome.label, header=outcome.page is not None)

        on_text = self.printer.piece
        if not self.streaming:
            on_text = _ignore
            if self.writer is not None:
                on_start = _ignore
        outcomes = run(self.engine, self.items, plan, self.request(), on_start, on_text, warn, self.feedback)
        for outcome in outcomes:
            if outcome.error is not None:
                self.failures += 1
                name = list(outcome.names) if self.opts.together and len(outcome.names) > 1 else outcome.names[0]
                self.printer.failed(name, outcome.error, outcome.page)
                continue
            yield outcome
            self._verbose(outcome)

    def base_record(self, outcome) -> dict[str, Any]:
        """`file` (a list with --together) and `page` for a PDF page; with --together, `pages` lists the
        PDF pages that were in the prompt."""
        record: dict[str, Any] = {"file": list(outcome.names) if self.opts.together else outcome.names[0]}
        if outcome.page is not None:
            record["page"] = outcome.page
        if self.opts.together:
            pages = [{"file": s.visual.name, "page": s.visual.page} for s in outcome.seen if s.visual.page is not None]
            if pages:
                record["pages"] = pages
        return record

    def usage(self, outcome) -> dict[str, Any]:
        a = outcome.answer
        return {
            "prompt_tokens": a.prompt_tokens,
            "completion_tokens": a.completion_tokens,
            "finish_reason": a.finish_reason,
            "model": self.label,
        }

    def emit(self, outcome, record: dict[str, Any], text: str | None = None, suffix: str | None = None) -> None:
        """One answer out: a JSON line, text (streamed already when `text` is None), or a file."""
        if self.writer is None:
            self.printer.done(record, text)
        else:
            self.writer.write(outcome.names[0], record, outcome.page, text, suffix)

    def _verbose(self, outcome) -> None:
        a = outcome.answer
        t = a.timings
        self.log(
            f"{outcome.label}: preprocess {outcome.preprocess:.2f}s; {a.prompt_tokens} prompt tokens, prefill "
            f"{t.prefill:.2f}s; {a.completion_tokens} tokens, decode {t.tokens_per_second:.1f} tok/s"
        )

    def close(self) -> None:
        """Exit 1 when any input failed (the others have answered)."""
        if self.failures:
            raise typer.Exit(1)


def _ignore(_: str) -> None:
    pass


def make_constraint_factory(engine):
    """schema -> a constraint for one answer, in the ```json fenced form the model was trained to write."""

    def make(schema: dict):
        return engine.json_constraint(schema, fenced=True)

    return make


def common_options(values: dict[str, Any], inputs: list[str]) -> Common:
    """A Common from a command's shared options (and --together where it has one); enums become values."""
    from dataclasses import fields

    given = {}
    for f in fields(Common):
        if f.name in values and f.name != "inputs":
            v = values[f.name]
            given[f.name] = v.value if isinstance(v, Enum) else v
    return Common(inputs=inputs, **given)
