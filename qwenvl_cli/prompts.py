"""Chat messages -> input ids in the Qwen2.5-VL chat format, each vision pad expanded to the exact number
of vision tokens its grid gives (t*h*w / merge²)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from qwenvl_cli.config import IMAGE_PAD_ID, VIDEO_PAD_ID

DEFAULT_SYSTEM = "You are a helpful assistant."


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    grid_thw: tuple[int, int, int]  # patch grid, as image_grid_thw


@dataclass(frozen=True)
class VideoPart:
    grid_thw: tuple[int, int, int]


Part = TextPart | ImagePart | VideoPart


def chat_text(parts: Sequence[Part], system: str | None = DEFAULT_SYSTEM) -> str:
    """The chat template rendered with one pad per image/video (as transformers' template does)."""
    out = [] if system is None else [f"<|im_start|>system\n{system}<|im_end|>\n"]
    out.append("<|im_start|>user\n")
    for part in parts:
        if isinstance(part, TextPart):
            out.append(part.text)
        elif isinstance(part, ImagePart):
            out.append("<|vision_start|><|image_pad|><|vision_end|>")
        else:
            out.append("<|vision_start|><|video_pad|><|vision_end|>")
    out.append("<|im_end|>\n<|im_start|>assistant\n")
    return "".join(out)


def build_chat_ids(tokenizer, parts: Sequence[Part], *, system: str | None = DEFAULT_SYSTEM, merge_size: int = 2) -> list[int]:
    """Tokenise the chat and expand pads on ids: special tokens are atomic, so this equals tokenising
    the string with every pad repeated."""
    counts = iter(
        p.grid_thw[0] * p.grid_thw[1] * p.grid_thw[2] // merge_size**2 for p in parts if not isinstance(p, TextPart)
    )
    ids: list[int] = []
    for token in tokenizer.encode(chat_text(parts, system)):
        ids.extend([token] * next(counts) if token in (IMAGE_PAD_ID, VIDEO_PAD_ID) else [token])
    return ids


def token_types(input_ids: Sequence[int]) -> list[int]:
    """0 text, 1 image pad, 2 video pad (transformers' mm_token_type_ids)."""
    return [1 if t == IMAGE_PAD_ID else 2 if t == VIDEO_PAD_ID else 0 for t in input_ids]
