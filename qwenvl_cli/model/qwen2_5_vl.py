"""Qwen2.5-VL: token embeddings with vision features scattered at the pad tokens, the MRoPE decoder, and
the LM head. Module names follow the hub checkpoint (`visual.*`, `model.*`, `lm_head`).

The model holds weights only: the rope tables of a prompt, its cache and its position offset are the
caller's (see generate.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch
from torch import nn

from qwenvl_cli.config import ModelConfig
from qwenvl_cli.errors import PromptError
from qwenvl_cli.model.rope import (
    Grid,
    VisionLayout,
    VisionSpan,
    mrope_cos_sin,
    rope_index,
    text_cos_sin,
    text_inv_freq,
    vision_layout,
)
from qwenvl_cli.model.text import KVCache, TextModel
from qwenvl_cli.model.vision import VisionTransformer
from qwenvl_cli.prompts import token_types, vision_token_count


@dataclass(frozen=True)
class VisionInput:
    """Preprocessed pixels of the images, or of the videos, of one prompt, in the order their pads appear.

    Videos carry one seconds-per-temporal-patch value per grid (their MRoPE time step); images carry None.
    """

    pixel_values: torch.Tensor  # (sum t*h*w, C*t*p*p) float32
    grids: tuple[Grid, ...]
    second_per_grid_ts: tuple[float, ...] | None = None  # videos only: seconds per temporal patch, per grid

    def __post_init__(self) -> None:
        rows = sum(t * h * w for t, h, w in self.grids)
        if self.pixel_values.shape[0] != rows:
            raise ValueError(
                f"vision input: {self.pixel_values.shape[0]} pixel rows for grids {list(self.grids)} "
                f"({rows} patches)"
            )
        spg = self.second_per_grid_ts
        if spg is None:
            return
        if len(spg) != len(self.grids):
            raise PromptError(f"video input: {len(spg)} second_per_grid_ts for {len(self.grids)} video grids")
        bad = [s for s in spg if not (math.isfinite(s) and s > 0)]
        if bad:
            raise PromptError(f"video input: seconds per temporal patch must be finite and positive, got {bad}")

    @property
    def is_video(self) -> bool:
        return self.second_per_grid_ts is not None


@dataclass(frozen=True)
class Prompt:
    """A tokenised prompt with its vision inputs and its 3D positions."""

    input_ids: torch.Tensor  # (1, L) long
    positions: torch.Tensor  # (3, 1, L) long
    rope_delta: int  # decode position = index in the sequence + rope_delta
    images: VisionInput | None = None
    videos: VisionInput | None = None

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]


# Patches per vision-tower call for videos: 4096 tokens, 5 temporal patches (10 frames) at the per-frame
# maximum of 768 tokens. Bounds the tower's activations whatever the clip's length.
VIDEO_CHUNK_PATCHES = 16384


def chunk_grids(grids: Sequence[Grid], max_patches: int) -> list[tuple[Grid, ...]]:
    """Split video grids into consecutive chunks of whole temporal patches, at most `max_patches` patches a
    chunk where one temporal patch fits (else that patch alone). A chunk may hold pieces of several videos;
    concatenated in order, the chunks give back every temporal patch of `grids` once."""
    if max_patches < 1:
        raise ValueError(f"max_patches must be positive, got {max_patches}")
    chunks: list[tuple[Grid, ...]] = []
    current: list[Grid] = []
    used = 0
    for t, h, w in grids:
        per = h * w
        left = t
        while left:
            take = min(left, max(max_patches - used, 0) // per)
            if take == 0:
                if current:
                    chunks.append(tuple(current))
                    current, used = [], 0
                    continue
                take = 1  # one temporal patch larger than the budget: it goes alone
            current.append((take, h, w))
            used += take * per
            left -= take
    if current:
        chunks.append(tuple(current))
    return chunks


@lru_cache(maxsize=64)
def _cached_layout(grids: tuple[Grid, ...], head_dim: int, merge: int, window_merged: int) -> VisionLayout:
    return vision_layout(grids, head_dim, merge, window_merged)


class Qwen2_5_VL(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config.vision)
        self.model = TextModel(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the final norm's: embeddings may be an int8 table under --quantize)."""
        return self.model.norm.weight.dtype

    # ------------------------------------------------------------------ prompt preparation (host side)

    def make_prompt(
        self, input_ids: Sequence[int], images: VisionInput | None = None, videos: VisionInput | None = None
    ) -> Prompt:
        """Positions for `input_ids` (pads already expanded), checking pad counts against the grids."""
        cfg = self.config
        merge = cfg.vision.spatial_merge_size
        types = token_types(input_ids)  # the config's pad ids are Qwen2.5-VL's (checked in ModelConfig)
        if images is not None and images.is_video:
            raise ValueError("make_prompt: images= got a video input (it carries second_per_grid_ts)")
        if videos is not None and not videos.is_video:
            raise ValueError("make_prompt: videos= got an image input (no second_per_grid_ts)")
        spans: list[VisionSpan] = []
        for kind, vis, name in ((1, images, "image"), (2, videos, "video")):
            grids = vis.grids if vis is not None else ()
            expected = sum(vision_token_count(g, merge) for g in grids)
            found = types.count(kind)
            if found != expected:
                raise PromptError(
                    f"the prompt has {found} {name} pad tokens but the {len(grids)} {name}(s) give {expected} "
                    f"vision tokens"
                )
        # Spans in sequence order: images and videos interleave as their pads appear.
        image_iter = iter(images.grids if images else ())
        video_iter = iter(zip(videos.grids, videos.second_per_grid_ts) if videos else ())
        i = 0
        while i < len(types):
            if types[i] == 0:
                i += 1
                continue
            if types[i] == 1:
                grid = next(image_iter)
                spans.append(VisionSpan(grid))
            else:
                grid, spg = next(video_iter)
                spans.append(VisionSpan(grid, spg))
            i += vision_token_count(grid, merge)
        positions, delta = rope_index(types, spans, merge, cfg.vision.tokens_per_second)
        return Prompt(
            input_ids=torch.tensor([list(input_ids)], dtype=torch.long),
            positions=positions[:, None, :],
            rope_delta=delta,
            images=images,
            videos=videos,
        )

    # ------------------------------------------------------------------ forward pieces (device side)

    def vision_features(
        self, vis: VisionInput, attention: str = "batched", max_patches: int = VIDEO_CHUNK_PATCHES
    ) -> torch.Tensor:
        """# (sum t*h*w / merge_unit, text hidden), in pad-token order.

        Videos go through the tower in chunks of whole temporal patches, at most `max_patches` patches per
        call (one temporal patch alone if it is larger): attention never crosses a temporal patch, so the
        features equal one call's while activation memory stays bounded. Images take one call.
        """
        if not vis.is_video:
            return self._encode(vis.pixel_values, tuple(vis.grids), attention)
        feats, row = [], 0
        for grids in chunk_grids(vis.grids, max_patches):
            rows = sum(t * h * w for t, h, w in grids)
            feats.append(self._encode(vis.pixel_values[row:row + rows], grids, attention))
            row += rows
        return torch.cat(feats)

    def _encode(self, pixel_values: torch.Tensor, grids: tuple[Grid, ...], attention: str) -> torch.Tensor:
        v = self.config.vision
        layout = _cached_layout(grids, v.head_dim, v.spatial_merge_size, v.window_merged).to(self.device)
        return self.visual(pixel_values.to(self.device), layout, attention)

    def embed(self, prompt: Prompt, attention: str = "batched") -> torch.Tensor:
        """Token embeddings with vision features written at the pad positions. # (1, L, D)"""
        ids = prompt.input_ids.to(self.device)
        embeds = self.model.embed_tokens(ids)
        for vis, token in ((prompt.images, self.config.image_token_id), (prompt.videos, self.config.video_token_id)):
            if vis is None:
                continue
            feats = self.vision_features(vis, attention).to(embeds.dtype)
            mask = ids == token
            embeds = embeds.masked_scatter(mask[..., None], feats)
        return embeds

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions # (3, B, L) -> cos, sin # (B, L, head_dim)."""
        t = self.config.text
        inv = text_inv_freq(t.head_dim, t.rope_theta)
        return mrope_cos_sin(positions.to(self.device), inv, t.mrope_section, self.dtype)

    def decode_tables(self, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position # (L,) on device, identical on all three axes (text after the prompt)."""
        t = self.config.text
        return text_cos_sin(position, text_inv_freq(t.head_dim, t.rope_theta), self.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def forward(self, prompt: Prompt, cache: KVCache | None = None, attention: str = "batched") -> torch.Tensor:
        """Full-sequence logits of a prompt # (1, L, vocab) float32 (the prefill oracle and parity target)."""
        embeds = self.embed(prompt, attention)
        cos, sin = self.rope_tables(prompt.positions)
        return self.logits(self.model(embeds, cos, sin, cache, 0))
