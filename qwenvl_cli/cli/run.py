"""The one run of an answering command: options -> checked request -> inputs -> model loaded once -> the
task over every still and clip -> each outcome out (stdout, --json lines, or --output-dir files).

Every command body is `run_task(SomeTask(...), common_options(...))`. torch is imported here, so the
command modules import this inside their functions and `--help` stays instant.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace

import typer

from qwenvl_cli.cli import started_up
from qwenvl_cli.cli.common import Common
from qwenvl_cli.engine import Engine, model_label
from qwenvl_cli.errors import OutputError, UsageError
from qwenvl_cli.heap import reuse_large_blocks
from qwenvl_cli.hub import model_reference
from qwenvl_cli.inputs import expand_inputs
from qwenvl_cli.output import Sink, warn
from qwenvl_cli.progress import Feedback
from qwenvl_cli.tasks import runner
from qwenvl_cli.tasks.base import Task, envelope, usage
from qwenvl_cli.tasks.sources import SourceOptions


def source_options(opts: Common, task: Task) -> SourceOptions:
    """PDF and video options as the sources take them; bad values are usage errors here, before loading."""
    from qwenvl_cli.media.pdf import DEFAULT_DPI, parse_pages

    video = None
    if task.videos:
        from qwenvl_cli.media.video import VideoOptions

        given = {
            "fps": opts.fps,
            "nframes": opts.nframes,
            "start": opts.start,
            "end": opts.end,
            "max_frames": opts.max_frames,
            "min_pixels": opts.min_pixels,
            "max_pixels": opts.max_pixels,
            "total_pixels": opts.total_pixels,
        }
        video = VideoOptions(**{k: v for k, v in given.items() if v is not None})
    return SourceOptions(
        pages=parse_pages(opts.pages) if opts.pages is not None else None,
        dpi=opts.dpi or DEFAULT_DPI,
        password=opts.password,
        video=video,
        segment=opts.segment,
        videos=task.videos,
    )


def check_sampling_options(opts: Common) -> None:
    if opts.min_pixels and opts.max_pixels and opts.min_pixels > opts.max_pixels:
        raise UsageError(f"--min-pixels {opts.min_pixels} is larger than --max-pixels {opts.max_pixels}")
    if opts.top_p is not None and opts.top_p <= 0:
        raise UsageError(f"--top-p must be above 0 (got {opts.top_p}); use --temperature 0 for greedy decoding")


def sampling(engine: Engine, opts: Common):
    top_k, top_p = opts.top_k, opts.top_p
    if opts.temperature and top_k is None and top_p is None:
        # The hub checkpoints default to top_k 1 / top_p 0.001, which would make any temperature greedy:
        # asking for a temperature means asking for sampling, so open the filters unless given.
        top_k, top_p = 0, 1.0
    return engine.sampling(
        max_new_tokens=opts.max_new_tokens,
        temperature=opts.temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=opts.repetition_penalty,
        seed=opts.seed,
    )


def load_engine(opts: Common, feedback: Feedback, log) -> tuple[Engine, str]:
    ref = model_reference(opts.model)
    heap = reuse_large_blocks()  # a setting of this process, before the first large tensor
    t0 = time.perf_counter()
    with feedback.status(f"Loading {ref}"):
        engine = Engine.load(ref, opts.device, opts.dtype, quantize=opts.quantize)
    how = engine.dtype_reason + (f"; decoder weights {opts.quantize}" if opts.quantize else "") + f"; {heap}"
    if engine.model.device.type == "cpu":
        from qwenvl_cli.model import native

        how += f"; decode on {native.status().reason}"
    log(f"loaded {ref} on {engine.model.device} ({how}) in {time.perf_counter() - t0:.1f}s")
    pre = engine.preprocessor
    lo, hi = opts.min_pixels or pre.min_pixels, opts.max_pixels or pre.max_pixels
    if lo > hi:
        raise UsageError(f"pixel bounds are impossible: min {lo} > max {hi} (see --min-pixels/--max-pixels)")
    context = engine.model.config.text.max_position_embeddings
    if lo // pre.factor**2 >= context:  # the smallest picture alone would overflow the context
        raise UsageError(
            f"--min-pixels {lo:,}: an image that small already needs {lo // pre.factor**2:,} vision tokens, "
            f"over the model's context of {context:,}"
        )
    return engine, model_label(ref)


def run_task(task: Task, opts: Common) -> None:
    """Answer every input with `task`; exit 1 at the end when any input (or part) failed."""
    started_up()
    check_sampling_options(opts)
    source_opts = source_options(opts, task)
    stdin = sys.stdin.buffer if "-" in opts.inputs and sys.stdin is not None else None  # None: closed (<&-)
    items = expand_inputs(opts.inputs, stdin, opts.recursive, task.videos)
    several_parts = source_opts.pages is not None or source_opts.segment is not None
    several_parts = several_parts and not task.joins_parts
    sink = Sink(opts.json, opts.output_dir, multi=len(items) > 1 or several_parts, streaming=task.streams,
                join_parts=task.joins_parts)

    def log(message: str) -> None:
        if opts.verbose:
            warn(message)

    feedback = Feedback.for_streams(opts.quiet)
    engine, label = load_engine(opts, feedback, log)
    task.prepare(engine, items)
    request = runner.Request(opts.system, sampling(engine, opts), opts.min_pixels, opts.max_pixels, opts.together, source_opts)
    failures = 0
    outcomes = runner.run(engine, items, task.plan, request, sink.start, sink.piece, warn, feedback)
    for outcome in outcomes:
        try:
            if outcome.error is None:
                rendered = task.render(outcome)  # may write a --draw / --sheet file
                for note in rendered.notes:
                    warn(note)
                record = {**envelope(outcome, opts.together), **rendered.fields, **usage(outcome, label)}
                sink.done(outcome, record, rendered)
        except OutputError as exc:  # a result file that cannot be written fails this input only
            outcome = replace(outcome, error=str(exc))
        if outcome.error is not None:
            failures += 1
            sink.failed(outcome, list(outcome.names) if opts.together and len(outcome.names) > 1 else outcome.names[0])
            continue
        a = outcome.answer
        log(
            f"{outcome.label}: preprocess {outcome.preprocess:.2f}s; {a.prompt_tokens} prompt tokens, prefill "
            f"{a.timings.prefill:.2f}s; {a.completion_tokens} tokens, decode {a.timings.tokens_per_second:.1f} tok/s"
            + (f" ({a.timings.decode_path})" if a.timings.decode_path else "")
        )
    if failures:
        raise typer.Exit(1)
