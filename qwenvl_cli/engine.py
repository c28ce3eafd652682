"""A loaded model ready to answer: checkpoint + weights + tokenizer + preprocessing constants.

Turns chat parts (text, preprocessed images and videos) into a Prompt and streams an Answer. Tasks build on
this; nothing here prints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch

from qwenvl_cli.errors import UsageError
from qwenvl_cli.generate import Generator, SamplingParams, Step
from qwenvl_cli.hub import resolve_model
from qwenvl_cli.media.frames import ProcessedVideo
from qwenvl_cli.media.image import ProcessedImage
from qwenvl_cli.model.loader import (Checkpoint, explain_dtype, explain_vision_dtype, load_model, narrow_weights,
                                     open_checkpoint)
from qwenvl_cli.model.qwen2_5_vl import Prompt, Qwen2_5_VL, VisionInput
from qwenvl_cli.prompts import DEFAULT_SYSTEM, ImagePart, TextPart, VideoPart, build_chat_ids
from qwenvl_cli.tokenizer import StreamDecoder, Tokenizer

if TYPE_CHECKING:
    from qwenvl_cli.constrain import JsonConstraint

Part = str | ProcessedImage | ProcessedVideo


@dataclass
class Timings:
    """Seconds spent per phase of one answer (for --verbose)."""

    prefill: float = 0.0
    decode: float = 0.0
    decode_tokens: int = 0
    decode_path: str = ""  # what ran the decode steps (Generator.decode_path), e.g. "one CUDA graph"

    @property
    def tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode if self.decode > 0 else 0.0


@dataclass(frozen=True)
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"
    model: str
    timings: Timings = field(default_factory=Timings, compare=False)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"--device {device}: choose auto, cpu or cuda")
    return torch.device(device)


class Engine:
    def __init__(
        self, name: str, ckpt: Checkpoint, model: Qwen2_5_VL, tokenizer: Tokenizer, dtype_reason: str = ""
    ) -> None:
        self.name = name
        self.ckpt = ckpt
        self.model = model
        self.tokenizer = tokenizer
        self.dtype_reason = dtype_reason  # why this dtype (for --verbose), e.g. "auto: bfloat16, the CPU has ..."
        self.generator = Generator(model)

    @classmethod
    def load(cls, model_ref: str, device: str = "auto", dtype: str = "auto", quantize: str | None = None) -> Engine:
        """`quantize`: None, "int8" or "int4" (weight-only, decoder linears and an untied LM head; see load_model)."""
        dev = pick_device(device)
        torch_dtype, reason = explain_dtype(dtype, dev)
        path = resolve_model(model_ref)
        ckpt = open_checkpoint(path)
        # Serial on purpose: tokenizers' from_file (0.3-0.45 s) holds the GIL, so a thread beside the weights
        # gained nothing (measured 0.67-0.77 s threaded vs 0.73-0.79 s serial, benchmarks/RESULTS.md), and
        # one started before `import torch` made the import longer by the whole parse (tokenizers 0.23).
        tokenizer = Tokenizer.from_dir(path)
        vision_dtype, vision_reason = explain_vision_dtype(dtype, dev, torch_dtype)
        model = load_model(ckpt, dev, torch_dtype, quantize=quantize, vision_dtype=vision_dtype)
        if vision_reason:
            reason += f"; {vision_reason}"
        narrow = narrow_weights(model)
        if narrow is not None:
            kept = str(narrow).removeprefix("torch.")
            reason += f"; decoder weights kept in the checkpoint's {kept}, float32 arithmetic"
        return cls(model_ref, ckpt, model, tokenizer, reason)

    @property
    def preprocessor(self):
        return self.ckpt.preprocessor

    def sampling(self, **overrides) -> SamplingParams:
        return SamplingParams.from_config(self.ckpt.generation, **overrides)

    def prompt(self, parts: Sequence[Part], system: str | None = DEFAULT_SYSTEM) -> Prompt:
        """One user turn of text, images and videos in any order -> a Prompt with its 3D positions."""
        chat = []
        images: list[ProcessedImage] = []
        videos: list[ProcessedVideo] = []
        for part in parts:
            if isinstance(part, str):
                chat.append(TextPart(part))
            elif isinstance(part, ProcessedImage):
                chat.append(ImagePart(part.grid_thw))
                images.append(part)
            elif isinstance(part, ProcessedVideo):
                chat.append(VideoPart(part.grid_thw))
                videos.append(part)
            else:
                raise TypeError(f"not a prompt part: {type(part).__name__}")
        merge = self.ckpt.config.vision.spatial_merge_size
        ids = build_chat_ids(self.tokenizer, chat, system=system, merge_size=merge)
        image_input = video_input = None
        if images:
            image_input = VisionInput(
                pixel_values=torch.cat([im.pixel_values for im in images]),
                grids=tuple(tuple(im.grid_thw) for im in images),
            )
        if videos:
            video_input = VisionInput(
                pixel_values=torch.cat([v.pixel_values for v in videos]),
                grids=tuple(tuple(v.grid_thw) for v in videos),
                second_per_grid_ts=tuple(v.second_per_grid_t for v in videos),
            )
        return self.model.make_prompt(ids, images=image_input, videos=video_input)

    def json_constraint(self, schema: dict, fenced: bool = False) -> JsonConstraint:
        """A constraint for `answer`: JSON valid against `schema` (in a ```json fence when `fenced`)."""
        from qwenvl_cli.constrain import JsonConstraint

        return JsonConstraint.from_schema(self.tokenizer, schema, fenced=fenced)

    def answer(
        self,
        prompt: Prompt,
        params: SamplingParams,
        on_text: Callable[[str], None] | None = None,
        *,
        constraint: JsonConstraint | None = None,
    ) -> Answer:
        """Generate to the end, calling `on_text` with each complete piece of text as it appears. Under a
        `constraint` the text is JSON valid against its schema unless finish_reason is "length"."""
        decoder = StreamDecoder(self.tokenizer)
        pieces: list[str] = []
        timings = Timings()
        start = time.perf_counter()
        steps: Iterator[Step] = self.generator.stream(prompt, params, constraint)
        count = 0
        reason = "length"
        for step in steps:
            if count == 0:
                timings.prefill = time.perf_counter() - start
                start = time.perf_counter()
            count += 1
            piece = decoder.push(step.token_id)
            if piece:
                pieces.append(piece)
                if on_text:
                    on_text(piece)
            if step.finish_reason:
                reason = step.finish_reason
        tail = decoder.flush()
        if tail:
            pieces.append(tail)
            if on_text:
                on_text(tail)
        timings.decode = time.perf_counter() - start
        timings.decode_tokens = max(count - 1, 0)
        timings.decode_path = self.generator.decode_path
        return Answer(
            text="".join(pieces),
            prompt_tokens=prompt.length,
            completion_tokens=count,
            finish_reason=reason,
            model=self.name,
            timings=timings,
        )


def model_label(ref: str) -> str:
    """How a model is named in JSON output: the hub id, or the directory's name."""
    path = Path(ref)
    return path.name if path.is_dir() else ref
