"""What a task is to the command that runs it: the question it asks about some stills or clips (a Job), and
how one answer becomes its output (`Rendered`: the task's JSON fields and text form). The record envelope
every answer shares (file, page or segment, the clip's timing, token usage) is built here, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from qwenvl_cli.errors import AnswerError
from qwenvl_cli.jsonfix import LenientJSONError, parse_lenient
from qwenvl_cli.tasks.runner import Job, Outcome, Seen
from qwenvl_cli.tasks.sources import Clip


@dataclass(frozen=True)
class Rendered:
    """One answer's output. `text` is the text form when it is not the streamed answer itself (None: it
    was streamed); `suffix` names its --output-dir file type (.txt by default); `files`, when set, are
    written as one --output-dir file each instead (`NAME.table1.csv` ...): (stem, suffix, bodies);
    `notes` are warnings for stderr (each names the input)."""

    fields: dict[str, Any]
    text: str | None = None
    suffix: str | None = None
    files: tuple[str, str, tuple[str, ...]] | None = None
    notes: tuple[str, ...] = ()


class Task:
    """Base for describe / ground / extract / video. Subclasses set `streams` and implement `plan` and
    `render`; `prepare` runs once after the model has loaded, before any input is read."""

    streams = False  # text answers stream to stdout as they are generated
    videos = False  # reads video files (the others are refused before any decoding)
    joins_parts = False  # the text answers of one input's parts form one document (subtitles of segments):
    # no `==>` header between them, and with --output-dir one file per input

    def prepare(self, engine, items: Sequence) -> None:
        self.engine = engine

    def plan(self, seen: Sequence[Seen]) -> Job:
        raise NotImplementedError

    def render(self, outcome: Outcome) -> Rendered:
        raise NotImplementedError


def clip_fields(clip: Clip, grid: Sequence[int]) -> dict[str, Any]:
    """The timing of what the model saw of a video: every frame's presentation time (seconds of the
    source), the sampling rate, the file's duration, the sampled range, the grid and seconds per grid."""
    v = clip.video
    return {
        "frames": [round(t, 3) for t in v.timestamps],
        "fps": round(v.sample_fps, 4),
        "duration": round(v.info.duration, 3),
        "start": round(v.start, 3),
        "end": round(v.end, 3),
        "video_grid_thw": [int(g) for g in grid],
        "second_per_grid_t": round(v.second_per_grid_t, 6),
    }


def envelope(outcome: Outcome, together: bool) -> dict[str, Any]:
    """`file` (a list with --together), `page` or `segment`, and for a clip its timing fields; with
    --together, `pages` and `videos` list what was in the prompt."""
    record: dict[str, Any] = {"file": list(outcome.names) if together else outcome.names[0]}
    if outcome.part is not None:
        record.update(outcome.part.fields)
    if together:
        pages = [{"file": s.source.name, **s.source.part.fields} for s in outcome.seen
                 if s.source.part is not None and not isinstance(s.source, Clip)]
        videos = [{"file": s.source.name, **clip_fields(s.source, s.media.grid_thw)} for s in outcome.seen
                  if isinstance(s.source, Clip)]
        if pages:
            record["pages"] = pages
        if videos:
            record["videos"] = videos
    elif outcome.seen and isinstance(outcome.seen[0].source, Clip):
        record.update(clip_fields(outcome.seen[0].source, outcome.seen[0].media.grid_thw))
    return record


def usage(outcome: Outcome, model: str) -> dict[str, Any]:
    a = outcome.answer
    return {
        "prompt_tokens": a.prompt_tokens,
        "completion_tokens": a.completion_tokens,
        "finish_reason": a.finish_reason,
        "model": model,
    }


def json_answer(answer, what: str) -> Any:
    """The JSON in the model's answer, read leniently (fences, trailing commas, a list cut off mid-item).
    None there: an AnswerError saying the answer was cut off before any complete `what` (a box, an event),
    or that it holds no JSON list of them."""
    try:
        return parse_lenient(answer.text)
    except LenientJSONError as exc:
        if answer.finish_reason == "length":
            raise AnswerError(
                f"the answer was cut off at {answer.completion_tokens} tokens before any complete {what} "
                "(raise --max-new-tokens)"
            ) from exc
        raise AnswerError(f"the model's answer holds no JSON list of {what}s: {answer.text[:80]!r}") from exc
