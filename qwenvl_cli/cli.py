"""The `qwenvl` command: options -> request -> run -> output.

torch, the model and the media code are imported inside the commands, so `--help` stays instant.
Errors become one `qwenvl: ...` line on stderr and an exit code (QWENVL_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from enum import Enum
from typing import Iterator, Optional

import typer

from qwenvl_cli import __version__
from qwenvl_cli.errors import QwenVLError

app = typer.Typer(
    name="qwenvl",
    help="Understand images with Qwen2.5-VL, locally, from the shell.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(str, Enum):
    auto = "auto"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qwenvl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Understand images with Qwen2.5-VL, locally, from the shell."""


def _ignore(_: str) -> None:
    pass


def _progress(quiet: bool, message: str):
    """A spinner on stderr while something slow happens, only when stderr is a terminal."""
    if quiet or not sys.stderr.isatty():
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
        return nullcontext()
    from rich.console import Console

    return Console(stderr=True).status(message)


@contextmanager
def _reported_errors() -> Iterator[None]:
    """Every failure becomes one stderr line and an exit code; Ctrl-C exits 130 with output intact."""
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        sys.stdout.flush()
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


@app.command(
    epilog=(
        "Examples:\n\n"
        "  qwenvl describe cat.jpg\n\n"
        "  qwenvl describe a.png b.png --together --prompt 'What changed?'\n\n"
        "  ls *.jpg | qwenvl describe - --json | jq -r .text"
    )
)
def describe(
    images: list[str] = typer.Argument(..., metavar="IMAGE", help="Image files, globs, or - to read paths (or one image) from stdin."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="What to ask (default: describe the image)."),
    system: str = typer.Option("You are a helpful assistant.", "--system", help="System prompt."),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="Checkpoint directory or hub id [env QWENVL_MODEL; default Qwen/Qwen2.5-VL-3B-Instruct]."
    ),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per answer, one per line."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="Stop after N tokens [default 512]."),
    temperature: Optional[float] = typer.Option(None, "--temperature", min=0.0, help="0 = greedy [default: the model's]."),
    top_p: Optional[float] = typer.Option(None, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=0, help="Sample among the K most likely (0 = off)."),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty", min=0.01, help="1.0 = off."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, max=2**63 - 1, help="Seed for reproducible sampling."),
    device: Device = typer.Option(Device.auto, "--device", help="Where to run."),
    dtype: DType = typer.Option(DType.auto, "--dtype", help="Weights dtype (auto: bf16 on GPU, fp32 on CPU)."),
    min_pixels: Optional[int] = typer.Option(None, "--min-pixels", min=1, help="Smallest resized image area."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", min=1, help="Largest resized image area."),
    together: bool = typer.Option(False, "--together", help="All images in one prompt, one answer."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Read the image files inside directories."),
    output_dir: Optional[str] = typer.Option(
        None, "--output-dir", "-o", help="Write one file per answer here (NAME.txt, or NAME.json with --json)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Timings and token counts on stderr."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display on stderr (errors still show)."),
) -> None:
    """Describe images, or answer --prompt about them. Text streams to stdout as it is generated."""
    with _reported_errors():
        from qwenvl_cli.engine import Engine, model_label
        from qwenvl_cli.errors import UsageError
        from qwenvl_cli.hub import model_reference
        from qwenvl_cli.inputs import expand_inputs
        from qwenvl_cli.output import FileWriter, Printer, warn
        from qwenvl_cli.tasks.describe import DescribeRequest, run_describe

        if min_pixels and max_pixels and min_pixels > max_pixels:
            raise UsageError(f"--min-pixels {min_pixels} is larger than --max-pixels {max_pixels}")
        if top_p is not None and top_p <= 0:
            raise UsageError(f"--top-p must be above 0 (got {top_p}); use --temperature 0 for greedy decoding")
        items = expand_inputs(images, sys.stdin.buffer if "-" in images else None, recursive)
        ref = model_reference(model)
        t0 = time.perf_counter()
        with _progress(quiet, f"Loading {ref}"):
            engine = Engine.load(ref, device, dtype)
        if verbose:
            warn(f"loaded {ref} on {engine.model.device} ({engine.model.dtype}) in {time.perf_counter() - t0:.1f}s")
        pre = engine.preprocessor
        lo, hi = min_pixels or pre.min_pixels, max_pixels or pre.max_pixels
        if lo > hi:
            raise UsageError(f"pixel bounds are impossible: min {lo} > max {hi} (see --min-pixels/--max-pixels)")
        if temperature and top_k is None and top_p is None:
            # The hub checkpoints default to top_k 1 / top_p 0.001, which would make any temperature greedy:
            # asking for a temperature means asking for sampling, so open the filters unless given.
            top_k, top_p = 0, 1.0
        params = engine.sampling(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
        )
        req = DescribeRequest(prompt, system, params, min_pixels, max_pixels, together)
        writer = FileWriter(Path(output_dir), json_out) if output_dir else None
        # With --output-dir, answers go to files: stdout lists the files, errors stay on stderr only.
        printer = Printer(json_out and writer is None, multi=len(items) > 1 and not together)
        on_start, on_text = (printer.start, printer.piece) if writer is None else (_ignore, _ignore)
        label = model_label(ref)
        failures = 0
        for outcome in run_describe(engine, items, req, on_start, on_text):
            if outcome.error is not None:
                failures += 1
                printer.failed(outcome.names[0], outcome.error)
                continue
            answer = outcome.answer
            record = {
                "file": list(outcome.names) if together else outcome.names[0],
                "text": answer.text,
                "prompt_tokens": answer.prompt_tokens,
                "completion_tokens": answer.completion_tokens,
                "finish_reason": answer.finish_reason,
                "model": label,
            }
            if writer is None:
                printer.done(record)
            else:
                writer.write(outcome.names[0], record)
            if verbose:
                t = answer.timings
                warn(
                    f"{', '.join(outcome.names)}: {answer.prompt_tokens} prompt tokens, prefill {t.prefill:.2f}s; "
                    f"{answer.completion_tokens} tokens, decode {t.tokens_per_second:.1f} tok/s"
                )
        if failures:
            raise typer.Exit(1)


@app.command(epilog="Example:\n\n  qwenvl models")
def models() -> None:
    """List the known Qwen2.5-VL checkpoints and which are in the local cache, with their size."""
    with _reported_errors():
        from qwenvl_cli.hub import KNOWN_MODELS, cached_models

        cached = cached_models()
        names = list(KNOWN_MODELS) + sorted(k for k in cached if k not in KNOWN_MODELS and "VL" in k)
        width = max(len(n) for n in names)
        for name in names:
            entry = cached.get(name)
            status = f"cached  {entry.size_bytes / 1e9:6.1f} GB  {entry.path}" if entry else "not downloaded"
            typer.echo(f"{name:<{width}}  {status}")


@app.command(epilog="Example:\n\n  qwenvl download Qwen/Qwen2.5-VL-7B-Instruct")
def download(
    model: str = typer.Argument(..., help="Hub id, e.g. Qwen/Qwen2.5-VL-3B-Instruct."),
) -> None:
    """Download a checkpoint into the Hugging Face cache (resumable; progress on stderr)."""
    with _reported_errors():
        from qwenvl_cli.hub import download as fetch

        typer.echo(str(fetch(model)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
