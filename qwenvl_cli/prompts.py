"""One user turn -> input ids in the Qwen2.5-VL chat format, the same ids transformers' processor gives:
the chat template rendered with one pad token per image or video, tokenised, then each pad expanded on
the ids to the number of vision tokens its grid gives (t*h*w / merge_size**2)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from qwenvl_cli.config import IMAGE_PAD_ID, VIDEO_PAD_ID
from qwenvl_cli.errors import PromptError

DEFAULT_SYSTEM = "You are a helpful assistant."  # what the template inserts when there is no system message


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    grid_thw: tuple[int, int, int]  # patch grid (t, h, w), as image_grid_thw


@dataclass(frozen=True)
class VideoPart:
    grid_thw: tuple[int, int, int]  # patch grid (t, h, w), as video_grid_thw; t counts frame pairs


Part = TextPart | ImagePart | VideoPart


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


def chat_text(parts: Sequence[Part], system: str | None = DEFAULT_SYSTEM) -> str:
    """The chat rendered with a single pad per image/video, as the Qwen2.5-VL template renders it."""
    out = [] if system is None else [f"<|im_start|>system\n{system}<|im_end|>\n"]
    out.append("<|im_start|>user\n")
    for part in parts:
        if isinstance(part, TextPart):
            out.append(part.text)
        elif isinstance(part, ImagePart):
            out.append("<|vision_start|><|image_pad|><|vision_end|>")
        elif isinstance(part, VideoPart):
            out.append("<|vision_start|><|video_pad|><|vision_end|>")
        else:
            raise TypeError(f"not a prompt part: {part!r}")
    out.append("<|im_end|>\n<|im_start|>assistant\n")
    return "".join(out)


def vision_token_count(grid_thw: Sequence[int], merge_size: int = 2) -> int:
    """Tokens the merger yields for one image/video: one per merge_size x merge_size block of patches."""
    t, h, w = (int(v) for v in grid_thw)
    if min(t, h, w) < 1 or h % merge_size or w % merge_size:
        raise PromptError(f"vision grid {tuple(grid_thw)}: need t, h, w >= 1 with h and w multiples of {merge_size}")
    return t * h * w // merge_size**2


def build_chat_ids(
    tokenizer: Encoder, parts: Sequence[Part], *, system: str | None = DEFAULT_SYSTEM, merge_size: int = 2
) -> list[int]:
    """Input ids for a system turn (none if `system` is None), one user turn made of `parts` in order, and
    the assistant header. Special tokens are atomic in the tokenizer, so expanding each pad on the ids
    equals tokenising the string with every pad repeated (what the processor does)."""
    text = chat_text(parts, system)
    vision = [p for p in parts if not isinstance(p, TextPart)]
    counts = [vision_token_count(p.grid_thw, merge_size) for p in vision]
    ids = tokenizer.encode(text)
    pads = [i for i, t in enumerate(ids) if t in (IMAGE_PAD_ID, VIDEO_PAD_ID)]
    expected = [IMAGE_PAD_ID if isinstance(p, ImagePart) else VIDEO_PAD_ID for p in vision]
    if [ids[i] for i in pads] != expected:
        raise PromptError(
            f"the prompt text contains <|image_pad|> or <|video_pad|>: {len(pads)} vision pads for "
            f"{len(vision)} images/videos"
        )
    out: list[int] = []
    start = 0
    for i, n in zip(pads, counts):
        out.extend(ids[start:i])
        out.extend([ids[i]] * n)
        start = i + 1
    out.extend(ids[start:])
    return out


def token_types(input_ids: Sequence[int]) -> list[int]:
    """Per id: 0 text, 1 image pad, 2 video pad (transformers' mm_token_type_ids)."""
    return [1 if t == IMAGE_PAD_ID else 2 if t == VIDEO_PAD_ID else 0 for t in input_ids]
