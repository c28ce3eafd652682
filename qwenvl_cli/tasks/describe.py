"""`qwenvl describe`: one answer per image (the model loaded once), or all images in one prompt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from qwenvl_cli.engine import Answer, Engine
from qwenvl_cli.errors import InputError, QwenVLError
from qwenvl_cli.generate import SamplingParams
from qwenvl_cli.inputs import InputItem
from qwenvl_cli.media.image import ProcessedImage, load_image, preprocess_image

DEFAULT_PROMPT = "Describe this image."
DEFAULT_PROMPT_MANY = "Describe these images."


@dataclass(frozen=True)
class DescribeRequest:
    prompt: str | None  # None: the default prompt for one or several images
    system: str | None
    params: SamplingParams
    min_pixels: int | None = None
    max_pixels: int | None = None
    together: bool = False


@dataclass(frozen=True)
class Outcome:
    """The result for one input (or, with --together, for all of them)."""

    names: tuple[str, ...]
    answer: Answer | None = None
    error: str | None = None


def _image(engine: Engine, item: InputItem, req: DescribeRequest) -> ProcessedImage:
    image = load_image(item.source(), name=item.name)
    try:
        return preprocess_image(image, engine.preprocessor, min_pixels=req.min_pixels, max_pixels=req.max_pixels)
    except InputError as exc:  # e.g. an extreme aspect ratio: say which file
        raise InputError(f"{item.name}: {exc}") from None


def run_describe(
    engine: Engine,
    items: list[InputItem],
    req: DescribeRequest,
    on_start: Callable[[str], None],
    on_text: Callable[[str], None],
) -> Iterator[Outcome]:
    if req.together:
        images, failed = [], False
        for item in items:
            try:
                images.append(_image(engine, item, req))
            except QwenVLError as exc:
                failed = True
                yield Outcome((item.name,), error=str(exc))
        if failed or not images:
            return
        names = tuple(item.name for item in items)
        text = req.prompt or (DEFAULT_PROMPT if len(images) == 1 else DEFAULT_PROMPT_MANY)
        try:
            prompt = engine.prompt([*images, text], req.system)
        except QwenVLError as exc:
            yield Outcome(names, error=str(exc))
            return
        on_start(", ".join(names))
        yield Outcome(names, engine.answer(prompt, req.params, on_text))
        return
    for item in items:
        try:
            image = _image(engine, item, req)
            prompt = engine.prompt([image, req.prompt or DEFAULT_PROMPT], req.system)
        except QwenVLError as exc:
            yield Outcome((item.name,), error=str(exc))
            continue
        on_start(item.name)
        yield Outcome((item.name,), engine.answer(prompt, req.params, on_text))
