"""`qwenvl describe`: a free-text answer per picture (image or PDF page), or one for all with --together."""

from __future__ import annotations

from typing import Sequence

from qwenvl_cli.tasks.runner import Job, Seen

DEFAULT_PROMPT = "Describe this image."
DEFAULT_PROMPT_MANY = "Describe these images."


def describe_plan(prompt: str | None):
    """The question for some pictures: the user's, or the default for one or several."""

    def plan(seen: Sequence[Seen]) -> Job:
        return Job(prompt or (DEFAULT_PROMPT if len(seen) == 1 else DEFAULT_PROMPT_MANY))

    return plan
