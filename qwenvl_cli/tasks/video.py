"""`qwenvl video`: a description of a video (or of each --segment), temporal grounding (--find: when does
something happen) and dense captioning (--events), with times in seconds of the SOURCE file.

Prompts are the cookbooks' (see ../shared/QWEN25VL.md). The model's times count from the first frame it
saw (its MRoPE time axis starts there): the clip's first frame time is added back, and the result clamped
to the sampled range. --find decodes constrained to the sentence the model was trained to answer with,
--events to the JSON list of 'mm:ss.ff' events, so both always parse.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from qwenvl_cli.engine import Answer
from qwenvl_cli.errors import AnswerError, InputError, UsageError
from qwenvl_cli.tasks.base import Rendered, Task, json_answer
from qwenvl_cli.tasks.ground import draw_path
from qwenvl_cli.tasks.runner import Job, Outcome, Seen
from qwenvl_cli.tasks.sources import Clip

DESCRIBE_PROMPT = "Describe this video."
FIND_PROMPT = "Give the query: '{query}', when does the described content occur in the video?"
EVENTS_PROMPT = (
    "Localize a series of activity events in the video, output the start and end timestamp for each event, "
    "and describe each event with sentences. Provide the result in json format with 'mm:ss.ff' format for "
    "time depiction."
)
# "The given query happens in 64.0 - 72.0 seconds." Seconds with at most 5 digits (27 hours) and 2 decimals.
SECONDS = r"/[0-9]{1,5}(\.[0-9]{1,2})?/"
FIND_GRAMMAR = f'start: "The given query happens in " TIME " - " TIME " seconds."\nTIME: {SECONDS}\n'
_FIND_ANSWER = re.compile(r"happens in ([0-9.]+) - ([0-9.]+) seconds")
CLOCK_PATTERN = r"^[0-9]{2,3}:[0-5][0-9]\.[0-9]{2}$"  # mm:ss.ff
MAX_EVENTS = 100
DESCRIPTION_MAX_CHARS = 400
EVENT_FORMATS = ("text", "json", "srt", "vtt")


def events_schema() -> dict:
    """The dense-captioning list: start/end as 'mm:ss.ff', a bounded description, at most MAX_EVENTS."""
    clock = {"type": "string", "pattern": CLOCK_PATTERN}
    item = {
        "type": "object",
        "properties": {
            "start_time": clock,
            "end_time": clock,
            "description": {"type": "string", "maxLength": DESCRIPTION_MAX_CHARS},
        },
        "required": ["start_time", "end_time", "description"],
        "additionalProperties": False,
    }
    return {"type": "array", "items": item, "maxItems": MAX_EVENTS}


@dataclass(frozen=True)
class Event:
    start: float  # seconds of the source file
    end: float
    label: str


@dataclass(frozen=True)
class Timeline:
    """What one answer says happens when."""

    events: tuple[Event, ...]
    truncated: bool = False  # --events cut off by --max-new-tokens: the complete events are kept


def to_source_time(t: float, clip: Clip) -> float:
    """A time the model gave (seconds from the first frame it saw) -> seconds of the source, clamped to the
    range that was sampled."""
    v = clip.video
    return min(max(clip.offset + t, v.start), v.end)


def _event(a: float, b: float, label: str, clip: Clip) -> Event:
    a, b = sorted((a, b))
    return Event(round(to_source_time(a, clip), 3), round(to_source_time(b, clip), 3), label)


def read_find(answer: Answer, clip: Clip, query: str) -> Timeline:
    match = _FIND_ANSWER.search(answer.text)
    if match is None:
        if answer.finish_reason == "length":
            raise AnswerError(
                f"the answer was cut off at {answer.completion_tokens} tokens before the time range (raise --max-new-tokens)"
            )
        raise AnswerError(f"the model's answer holds no time range: {answer.text[:80]!r}")
    return Timeline((_event(float(match[1]), float(match[2]), query, clip),))


def parse_clock(text: str) -> float:
    """'mm:ss.ff' (or seconds) -> seconds; AnswerError for anything else."""
    from qwenvl_cli.media.video import parse_time

    try:
        return parse_time(str(text).strip().rstrip("s"))
    except UsageError as exc:
        raise AnswerError(f"the model gave a time that cannot be read: {text!r}") from exc


def read_events(answer: Answer, clip: Clip) -> Timeline:
    value = json_answer(answer, "event")
    items = value if isinstance(value, list) else [value]
    events = []
    for item in items:
        if not isinstance(item, dict) or not {"start_time", "end_time"} <= item.keys():
            continue  # a cut-off last item
        label = " ".join(str(item.get("description", "")).split())
        events.append(_event(parse_clock(item["start_time"]), parse_clock(item["end_time"]), label, clip))
    return Timeline(tuple(events), truncated=answer.finish_reason == "length")


def timeline_text(events: Sequence[Event]) -> str:
    """`00:01:04.000 - 00:01:12.000  label` per event."""
    from qwenvl_cli.media.video import format_time

    lines = [f"{format_time(e.start)} - {format_time(e.end)}  {e.label}" for e in events]
    return "\n".join(lines) if lines else "(no events)"


class VideoTask(Task):
    """mode "describe" (free text, streamed; `prompt` replaces the question), "find" (`query`) or "events"
    (`fmt` text/json/srt/vtt); `sheet` is the checked --sheet target."""

    videos = True

    def __init__(self, mode: str, prompt: str | None = None, query: str | None = None, fmt: str = "text",
                 sheet: Path | None = None) -> None:
        if mode not in ("describe", "find", "events"):
            raise ValueError(f"unknown video mode {mode!r}")
        if fmt not in EVENT_FORMATS:
            raise UsageError(f"--format {fmt}: choose {', '.join(EVENT_FORMATS)}")
        if fmt != "text" and mode != "events":
            raise UsageError("--format is for --events (json, srt or vtt)")
        if mode == "find" and not (query or "").strip():
            raise UsageError("--find is empty: say what to look for, e.g. --find 'the ball hits the ground'")
        self.mode, self.prompt, self.query, self.fmt, self.sheet = mode, prompt, query, fmt, sheet
        self.streams = mode == "describe"
        # Subtitles of a video's segments form one file: numbering goes on, one WEBVTT header.
        self.joins_parts = fmt in ("srt", "vtt")
        self.cues: dict[str, int] = {}  # input name -> cues written so far
        self.headed: set[str] = set()  # inputs whose WEBVTT header is out
        self.several = False
        self.drawn: set[Path] = set()

    def prepare(self, engine, items) -> None:
        super().prepare(engine, items)
        self.several = len(items) > 1

    def plan(self, seen: Sequence[Seen]) -> Job:
        [one] = seen
        clip = one.source
        if not isinstance(clip, Clip):  # an error of that input: the batch's videos still answer
            raise InputError(f"{clip.label}: an image or PDF, not a video (qwenvl describe, ground and extract read those)")
        from qwenvl_cli.constrain import JsonConstraint

        tokenizer = self.engine.tokenizer
        if self.mode == "find":
            constraint = JsonConstraint.from_lark(tokenizer, FIND_GRAMMAR)
            text = FIND_PROMPT.format(query=self.query.strip())
            if self.prompt:
                text = f"{self.prompt}\n{text}"
            return Job(text, lambda a: read_find(a, clip, self.query.strip()), constraint)
        if self.mode == "events":
            constraint = self.engine.json_constraint(events_schema(), fenced=True)
            return Job(self.prompt or EVENTS_PROMPT, lambda a: read_events(a, clip), constraint)
        return Job(self.prompt or DESCRIBE_PROMPT)

    def render(self, outcome: Outcome) -> Rendered:
        clip = outcome.seen[0].source
        notes: tuple[str, ...] = ()
        if self.mode == "describe":
            fields: dict = {"text": outcome.answer.text}
            text, suffix, events = None, None, ()
        else:
            timeline: Timeline = outcome.result
            events = timeline.events
            fields = {"query": self.query.strip()} if self.mode == "find" else {}
            fields["events"] = [{"start": e.start, "end": e.end, "label": e.label} for e in events]
            text = self._text(events, fields["events"], outcome.names[0])
            suffix = {"json": ".json", "srt": ".srt", "vtt": ".vtt"}.get(self.fmt)
            if timeline.truncated:
                notes = (f"{outcome.label}: the answer hit --max-new-tokens; showing the complete events",)
        if self.sheet is not None:
            path = self._sheet(clip, outcome, events)
            fields["sheet"] = str(path)
        return Rendered(fields, text, suffix, notes=notes)

    def _text(self, events: Sequence[Event], records: list[dict], name: str) -> str:
        """The text form of one answer's events (`records`: their JSON form) for --format."""
        from qwenvl_cli.subtitles import cue_count, to_srt, to_vtt

        if self.joins_parts:
            before = self.cues.get(name, 0)
            self.cues[name] = before + cue_count(events)
            if self.fmt == "srt":
                text = to_srt(events, first=before + 1)
                return "\n" + text if before and text else text  # a blank line between cues of two segments
            text = to_vtt(events, header=name not in self.headed)
            self.headed.add(name)
            return "\n" + text if before and text else text
        if self.fmt == "json":
            return json.dumps(records, ensure_ascii=False, indent=2)
        return timeline_text(events)

    def _sheet(self, clip: Clip, outcome: Outcome, events: Sequence[Event]) -> Path:
        from qwenvl_cli.draw import save_image
        from qwenvl_cli.sheet import contact_sheet

        times = clip.video.timestamps
        marked = [i for i, t in enumerate(times) if any(e.start <= t <= e.end for e in events)] if self.mode == "find" else []
        path = draw_path(self.sheet, outcome.names[0], outcome.part, self.several, self.drawn, kind="sheet")
        save_image(contact_sheet(clip.video.frames, times, marked), path, outcome.label)
        return path


def video_task(prompt: str | None, find: str | None, events: bool, fmt: str, sheet: str | None, *,
               start: str | None, end: str | None, segment: str | None) -> tuple[VideoTask, dict]:
    """The `video` command's options -> its task, and the times (--start, --end, --segment) in seconds."""
    from qwenvl_cli.media.video import parse_time
    from qwenvl_cli.tasks.ground import draw_target

    if find is not None and events:
        raise UsageError("--find and --events ask different questions: give one")
    mode = "find" if find is not None else "events" if events else "describe"
    def seconds(option: str, text: str | None) -> float | None:
        if text is None:
            return None
        try:
            return parse_time(text)
        except UsageError as exc:
            raise UsageError(f"{option}: {exc}") from exc

    timing = {"start": seconds("--start", start), "end": seconds("--end", end), "segment": seconds("--segment", segment)}
    target = draw_target(sheet, "--sheet") if sheet is not None else None
    return VideoTask(mode, prompt, find, fmt, target), timing
