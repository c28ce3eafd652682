"""The loop every subcommand shares: inputs -> pictures (images, PDF pages) -> one prompt each (or one for
all with --together) -> answer -> the task's parsed result. A bad input yields an error outcome and the
loop goes on; the model is loaded once by the caller.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from qwenvl_cli.engine import Answer, Engine
from qwenvl_cli.errors import InputError, PromptError, QwenVLError
from qwenvl_cli.generate import SamplingParams
from qwenvl_cli.inputs import InputItem
from qwenvl_cli.media.image import ProcessedImage, preprocess_image
from qwenvl_cli.progress import SILENT, Feedback
from qwenvl_cli.prompts import vision_token_count
from qwenvl_cli.tasks.sources import DocumentOptions, Visual, visuals


@dataclass(frozen=True)
class Seen:
    """A picture and what the model was given of it."""

    visual: Visual
    image: ProcessedImage


@dataclass(frozen=True)
class Job:
    """What a task asks about some pictures, and how it reads the answer."""

    text: str  # the user's question, after the pictures
    finish: Callable[[Answer], Any] = lambda answer: answer.text  # may raise QwenVLError
    constraint: Any = None  # a fresh JsonConstraint per answer, or None for free text


@dataclass(frozen=True)
class Request:
    system: str | None
    params: SamplingParams
    min_pixels: int | None = None
    max_pixels: int | None = None
    together: bool = False
    documents: DocumentOptions = field(default_factory=DocumentOptions)


@dataclass(frozen=True)
class Outcome:
    """One answer (a picture, a PDF page, or with --together all of them), or one failed input."""

    names: tuple[str, ...]
    page: int | None = None
    answer: Answer | None = None
    result: Any = None
    error: str | None = None
    seen: tuple[Seen, ...] = ()
    preprocess: float = 0.0  # seconds reading, rendering and preprocessing the pictures

    @property
    def label(self) -> str:
        joined = ", ".join(self.names)
        return joined if self.page is None else f"{joined} (page {self.page})"


Plan = Callable[[Sequence[Seen]], Job]


def _process(visual: Visual, engine: Engine, req: Request) -> Seen:
    try:
        image = preprocess_image(visual.image, engine.preprocessor, min_pixels=req.min_pixels, max_pixels=req.max_pixels)
    except InputError as exc:  # e.g. an extreme aspect ratio: say which file and page
        raise InputError(f"{visual.label}: {exc}") from None
    return Seen(visual, image)


def _answer(engine: Engine, seen: Sequence[Seen], plan: Plan, req: Request, on_text) -> tuple[Answer, Any]:
    job = plan(seen)
    prompt = engine.prompt([*(s.image for s in seen), job.text], req.system)
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
                pictures = visuals(item, req.documents, on_warning, feedback)
                while True:
                    start = time.perf_counter()
                    visual = next(pictures, None)
                    if visual is None:
                        break
                    outcome = Outcome((item.name,), visual.page)
                    try:
                        seen = (_process(visual, engine, req),)
                        spent = time.perf_counter() - start
                        on_start(outcome)
                        answer, result = _answer(engine, seen, plan, req, on_text)
                    except QwenVLError as exc:  # this page failed; the document's other pages still answer
                        yield Outcome((item.name,), visual.page, error=_named(str(exc), visual.label, item.name))
                        continue
                    yield Outcome((item.name,), visual.page, answer, result, seen=seen, preprocess=spent)
            except QwenVLError as exc:
                yield Outcome((item.name,), error=str(exc))
            feedback.input_done()


def _run_together(engine, items, plan, req, on_start, on_text, on_warning, feedback) -> Iterator[Outcome]:
    """Every picture of every input in one prompt. Refuses, with the numbers, once the pictures alone
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
                for visual in visuals(item, req.documents, on_warning, feedback):
                    seen.append(_process(visual, engine, req))
                    tokens += vision_token_count(seen[-1].image.grid_thw, merge)
                    if tokens >= context:
                        raise PromptError(
                            f"--together: the first {len(seen)} pictures ({visual.label} is the last) already need "
                            f"{tokens:,} vision tokens, over the model's context of {context:,}; "
                            "select fewer --pages, lower --dpi or --max-pixels, or drop --together"
                        )
            except PromptError:
                raise
            except QwenVLError as exc:
                failed = True
                yield Outcome((item.name,), error=str(exc))
            feedback.input_done()
    if failed or not seen:
        return
    names = tuple(dict.fromkeys(s.visual.name for s in seen))
    spent = time.perf_counter() - start
    try:
        on_start(Outcome(names))
        answer, result = _answer(engine, seen, plan, req, on_text)
    except QwenVLError as exc:
        yield Outcome(names, error=_named(str(exc), ", ".join(names), names[0]))
        return
    yield Outcome(names, None, answer, result, seen=tuple(seen), preprocess=spent)


def _named(message: str, label: str, name: str) -> str:
    """Every error line names its input: prefix the label unless the message already starts with it."""
    return message if message.startswith(name) else f"{label}: {message}"
