"""The loop every subcommand shares: inputs -> stills and clips (images, PDF pages, videos or their
segments) -> one prompt each (or one for all with --together) -> answer -> the task's parsed result. A bad
input, page or segment yields an error outcome and the loop goes on; the model is loaded once by the caller.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from qwenvl_cli.engine import Answer, Engine
from qwenvl_cli.errors import InputError, PromptError, QwenVLError, StdoutError
from qwenvl_cli.generate import SamplingParams
from qwenvl_cli.inputs import InputItem
from qwenvl_cli.media.image import ProcessedImage, preprocess_image
from qwenvl_cli.progress import SILENT, Feedback
from qwenvl_cli.prompts import vision_token_count
from qwenvl_cli.tasks.sources import Broken, Clip, Part, Source, SourceOptions, Still, labelled, sources


@dataclass(frozen=True)
class Seen:
    """A still or clip and what the model was given of it (a ProcessedImage or a ProcessedVideo)."""

    source: Source
    media: Any

    @property
    def image(self) -> ProcessedImage:
        """The processed picture of a still (tasks that read pixels back: ground, extract --json)."""
        if not isinstance(self.source, Still):
            raise InputError(f"{self.source.label}: a video; this command reads images and PDF pages")
        return self.media


@dataclass(frozen=True)
class Job:
    """What a task asks about some stills or clips, and how it reads the answer."""

    text: str  # the user's question, after the pictures
    finish: Callable[[Answer], Any] = lambda answer: answer.text  # may raise QwenVLError
    constraint: Any = None  # a fresh constraint per answer, or None for free text


@dataclass(frozen=True)
class Request:
    system: str | None
    params: SamplingParams
    min_pixels: int | None = None  # images (videos carry their own bounds in sources.video)
    max_pixels: int | None = None
    together: bool = False
    sources: SourceOptions = field(default_factory=SourceOptions)


@dataclass(frozen=True)
class Outcome:
    """One answer (a still, a clip, or with --together all of them), or one failed input or part."""

    names: tuple[str, ...]
    part: Part | None = None
    answer: Answer | None = None
    result: Any = None
    error: str | None = None
    seen: tuple[Seen, ...] = ()
    preprocess: float = 0.0  # seconds reading, rendering, decoding and preprocessing

    @property
    def label(self) -> str:
        return labelled(", ".join(self.names), self.part)


Plan = Callable[[Sequence[Seen]], Job]


def _process(source: Source, engine: Engine, req: Request) -> Seen:
    try:
        if isinstance(source, Clip):
            from qwenvl_cli.media.frames import preprocess_frames

            video = source.video
            return Seen(source, preprocess_frames(video.frames, engine.preprocessor, video.second_per_grid_t))
        image = preprocess_image(source.image, engine.preprocessor, min_pixels=req.min_pixels, max_pixels=req.max_pixels)
    except InputError as exc:  # e.g. an extreme aspect ratio: say which file and part
        raise InputError(_named(str(exc), source.label, source.name)) from exc
    return Seen(source, image)


def _answer(engine: Engine, seen: Sequence[Seen], plan: Plan, req: Request, on_text) -> tuple[Answer, Any]:
    job = plan(seen)
    prompt = engine.prompt([*(s.media for s in seen), job.text], req.system)
    answer = engine.answer(prompt, req.params, on_text, constraint=job.constraint)
    return answer, job.finish(answer)


def run(
    engine: Engine,
    items: list[InputItem],
    plan: Plan,
    req: Request,
    on_start: Callable[[Outcome], None],  # an answer begins (for headers)
    on_text: Callable[[str], None],
    on_warning: Callable[[str], None],
    feedback: Feedback = SILENT,
) -> Iterator[Outcome]:
    if req.together:
        yield from _run_together(engine, items, plan, req, on_start, on_text, on_warning, feedback)
        return
    with feedback.batch(len(items)):
        for item in items:
            feedback.input_started(item.name)
            try:
                parts = sources(item, req.sources, on_warning, feedback)
                while True:
                    start = time.perf_counter()
                    source = next(parts, None)
                    if source is None:
                        break
                    if isinstance(source, Broken):
                        yield Outcome((item.name,), source.part, error=source.error)
                        continue
                    try:
                        seen = (_process(source, engine, req),)
                        spent = time.perf_counter() - start
                        on_start(Outcome((item.name,), source.part))
                        answer, result = _answer(engine, seen, plan, req, on_text)
                    except StdoutError:
                        raise  # the answers have nowhere to go: stop the run
                    except QwenVLError as exc:  # this part failed; the input's other parts still answer
                        yield Outcome((item.name,), source.part, error=_named(str(exc), source.label, item.name))
                        continue
                    yield Outcome((item.name,), source.part, answer, result, seen=seen, preprocess=spent)
            except StdoutError:
                raise
            except QwenVLError as exc:
                yield Outcome((item.name,), error=str(exc))
            feedback.input_done()


def _run_together(engine, items, plan, req, on_start, on_text, on_warning, feedback) -> Iterator[Outcome]:
    """Every still and clip of every input in one prompt. Refuses, with the numbers, once they alone
    would not fit the context."""
    context = engine.model.config.text.max_position_embeddings
    merge = engine.model.config.vision.spatial_merge_size
    seen: list[Seen] = []
    tokens = 0
    start = time.perf_counter()
    failed = False
    with feedback.batch(len(items)):
        for item in items:
            feedback.input_started(item.name)
            try:
                for source in sources(item, req.sources, on_warning, feedback):
                    if isinstance(source, Broken):
                        raise InputError(source.error)
                    seen.append(_process(source, engine, req))
                    tokens += vision_token_count(seen[-1].media.grid_thw, merge)
                    if tokens >= context:
                        raise PromptError(
                            f"--together: the first {len(seen)} pictures and clips ({source.label} is the last) "
                            f"already need {tokens:,} vision tokens, over the model's context of {context:,}; "
                            "select fewer --pages, lower --dpi, --max-pixels or --total-pixels, or drop --together"
                        )
            except PromptError:
                raise
            except QwenVLError as exc:
                failed = True
                yield Outcome((item.name,), error=str(exc))
            feedback.input_done()
    if failed or not seen:
        if failed and seen:
            on_warning("--together: no combined answer, since an input above could not be read")
        return
    names = tuple(dict.fromkeys(s.source.name for s in seen))
    spent = time.perf_counter() - start
    try:
        on_start(Outcome(names))
        answer, result = _answer(engine, seen, plan, req, on_text)
    except StdoutError:
        raise
    except QwenVLError as exc:
        yield Outcome(names, error=_named(str(exc), ", ".join(names), names[0]))
        return
    yield Outcome(names, None, answer, result, seen=tuple(seen), preprocess=spent)


def _named(message: str, label: str, name: str) -> str:
    """Every error line names its input: prefix the label unless the message already starts with it."""
    return message if message.startswith(name) else f"{label}: {message}"
