"""`qwenvl describe`: a free-text answer per still or clip, or one for all with --together."""

from __future__ import annotations

from typing import Sequence

from qwenvl_cli.tasks.base import Rendered, Task
from qwenvl_cli.tasks.runner import Job, Outcome, Seen
from qwenvl_cli.tasks.sources import Clip

DEFAULT_PROMPT = "Describe this image."
DEFAULT_PROMPT_MANY = "Describe these images."
DEFAULT_PROMPT_VIDEO = "Describe this video."


def default_prompt(seen: Sequence[Seen]) -> str:
    """The question when the user asks none: for one image, several, or a video among them."""
    if any(isinstance(s.source, Clip) for s in seen):
        return DEFAULT_PROMPT_VIDEO if len(seen) == 1 else "Describe these images and videos."
    return DEFAULT_PROMPT if len(seen) == 1 else DEFAULT_PROMPT_MANY


class DescribeTask(Task):
    streams = True
    videos = True

    def __init__(self, prompt: str | None) -> None:
        self.prompt = prompt

    def plan(self, seen: Sequence[Seen]) -> Job:
        return Job(self.prompt or default_prompt(seen))

    def render(self, outcome: Outcome) -> Rendered:
        return Rendered({"text": outcome.answer.text})
