"""Positions as pure functions: the vision tower's 2D rotary tables and window layout, the decoder's
multimodal RoPE (temporal / height / width sections) and the 3D position ids of a chat sequence.

Everything here depends only on grid sizes and configs, so callers compute it once per image grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

Grid = tuple[int, int, int]  # (t, h, w) in patches, as image_grid_thw / video_grid_thw


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin # (..., hd) with its first half negated, so that rotate_half(x) * sin equals
    x.roll(hd // 2, -1) * signed_sin(sin) exactly ((-a) * b == a * (-b) in IEEE arithmetic): one roll
    instead of two slices, a negation and a cat per rotation, for the decode step."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


# ----------------------------------------------------------------------------------------------- vision


def vision_patch_positions(grids: Sequence[Grid], merge: int) -> torch.Tensor:
    """(h, w) patch coordinates in the processor's row order (2x2 merge blocks, row-major). # (N, 2)"""
    out = []
    for t, h, w in grids:
        hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hh = hh.reshape(shape).transpose(1, 2).flatten()
        ww = ww.reshape(shape).transpose(1, 2).flatten()
        out.append(torch.stack([hh, ww], dim=-1).repeat(t, 1))
    return torch.cat(out)


def vision_rotary(grids: Sequence[Grid], head_dim: int, merge: int, theta: float = 10000.0):
    """cos, sin for the vision tower: head_dim/2 rotary dims split over h and w, then doubled.

    Returns two float32 tensors # (N, head_dim), N = sum(t*h*w), rows in processor order.
    """
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))  # (head_dim/4,)
    pos = vision_patch_positions(grids, merge).float()  # (N, 2)
    freqs = (pos[..., None] * inv_freq).flatten(1)  # (N, 2 * head_dim/4): h freqs then w freqs
    emb = torch.cat([freqs, freqs], dim=-1)  # (N, head_dim)
    return emb.cos(), emb.sin()


@dataclass(frozen=True)
class Segments:
    """A partition of a token sequence into consecutive attention segments, padded for one batched call.

    gather:  (S, Lmax) long, token index per padded slot; N (one past the end) for padding.
    key_mask: (S, 1, 1, Lmax) bool, True where the slot holds a real token; None when all segments are full.
    scatter: (N,) long, the padded flat slot each token's output comes from (S*Lmax space).
    cu_seqlens: (S+1,) the boundaries, kept for the slow per-segment oracle.
    cu: (S+1,) int32, the same boundaries as a tensor, for variable-length attention (no padding).
    """

    gather: torch.Tensor
    key_mask: torch.Tensor | None
    scatter: torch.Tensor
    cu_seqlens: tuple[int, ...]
    cu: torch.Tensor

    @property
    def max_len(self) -> int:
        return self.gather.shape[1]

    def to(self, device: torch.device | str) -> Segments:
        mask = None if self.key_mask is None else self.key_mask.to(device)
        return Segments(self.gather.to(device), mask, self.scatter.to(device), self.cu_seqlens, self.cu.to(device))


def make_segments(cu_seqlens: Sequence[int]) -> Segments:
    lengths = [b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]) if b > a]
    starts = [a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]) if b > a]
    n = cu_seqlens[-1]
    lmax = max(lengths)
    slot = torch.arange(lmax)
    start_t = torch.tensor(starts)[:, None]
    len_t = torch.tensor(lengths)[:, None]
    valid = slot[None, :] < len_t  # (S, Lmax)
    gather = torch.where(valid, start_t + slot[None, :], torch.full_like(valid, n, dtype=torch.long))
    scatter = (torch.arange(len(lengths))[:, None] * lmax + slot[None, :])[valid]
    key_mask = None if all(length == lmax for length in lengths) else valid[:, None, None, :]
    bounds = (0, *torch.tensor(lengths).cumsum(0).tolist())
    return Segments(gather, key_mask, scatter, tuple(bounds), torch.tensor(bounds, dtype=torch.int32))


@dataclass(frozen=True)
class VisionLayout:
    """Everything the vision tower needs for one set of grids, computed once.

    window_index: (N/merge_unit,) merged-token order for window attention (frame by frame, windows
    row-major, tokens row-major inside a window); cos/sin are already permuted into that order.
    """

    window_index: torch.Tensor
    reverse_index: torch.Tensor
    cos: torch.Tensor  # (N, head_dim) float32, window order
    sin: torch.Tensor
    windows: Segments  # 112-px windows (empty windows dropped)
    frames: Segments  # one segment per frame, for the full-attention blocks

    def to(self, device: torch.device | str) -> VisionLayout:
        return VisionLayout(
            self.window_index.to(device),
            self.reverse_index.to(device),
            self.cos.to(device),
            self.sin.to(device),
            self.windows.to(device),
            self.frames.to(device),
        )


def window_order(grids: Sequence[Grid], merge: int, window_merged: int) -> tuple[torch.Tensor, list[int]]:
    """Merged-token permutation into windows and the window boundaries in patch units."""
    index, cu = [], [0]
    offset = 0
    unit = merge * merge
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        ids = torch.arange(t * gh * gw).reshape(t, gh, gw)
        nh, nw = math.ceil(gh / window_merged), math.ceil(gw / window_merged)
        padded = torch.full((t, nh * window_merged, nw * window_merged), -1, dtype=torch.long)
        padded[:, :gh, :gw] = ids
        padded = padded.reshape(t, nh, window_merged, nw, window_merged).permute(0, 1, 3, 2, 4)
        padded = padded.reshape(t * nh * nw, window_merged * window_merged)
        counts = (padded >= 0).sum(-1)
        index.append(padded[padded >= 0] + offset)
        for c in counts.tolist():
            if c:
                cu.append(cu[-1] + c * unit)
        offset += t * gh * gw
    return torch.cat(index), cu


def vision_layout(grids: Sequence[Grid], head_dim: int, merge: int, window_merged: int) -> VisionLayout:
    grids = [tuple(int(v) for v in g) for g in grids]
    unit = merge * merge
    window_index, cu_windows = window_order(grids, merge, window_merged)
    cos, sin = vision_rotary(grids, head_dim, merge)
    n = cos.shape[0]

    def permute(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(n // unit, unit, -1)[window_index].reshape(n, -1)

    frames = [0]
    for t, h, w in grids:
        frames += [frames[-1] + h * w * (i + 1) for i in range(t)]
    return VisionLayout(
        window_index=window_index,
        reverse_index=torch.argsort(window_index),
        cos=permute(cos),
        sin=permute(sin),
        windows=make_segments(cu_windows),
        frames=make_segments(frames),
    )


# ----------------------------------------------------------------------------------------------- text


def text_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))  # (head_dim/2,)


def mrope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, section: Sequence[int], dtype: torch.dtype):
    """Multimodal RoPE tables. positions # (3, B, L) -> cos, sin # (B, L, head_dim) in `dtype`.

    Frequency band i takes its angle from axis i % 3 (t, h, w) of the position, band widths `section`.
    """
    freqs = positions[..., None].float() * inv_freq.to(positions.device)  # (3, B, L, head_dim/2)
    chunks = freqs.split(list(section), dim=-1)
    freqs = torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)  # (B, L, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def text_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """Plain 1D RoPE tables for text-only steps (all three MRoPE axes equal). positions # (L,)."""
    freqs = positions[:, None].float() * inv_freq.to(positions.device)  # (L, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)[None]  # (1, L, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@dataclass(frozen=True)
class VisionSpan:
    """One image or video block inside the token sequence, in the order the pads appear."""

    grid: Grid
    second_per_grid_t: float = 0.0  # seconds covered by one temporal patch (0 for images)


def rope_index(
    token_types: Sequence[int], spans: Sequence[VisionSpan], merge: int, tokens_per_second: float
) -> tuple[torch.Tensor, int]:
    """3D position ids of one sequence and the rope delta for decoding.

    token_types: 0 text, 1 image pad, 2 video pad, one per input id. A vision block starting after
    `s` positions gets t = s + floor(frame_group * second_per_grid_t * tokens_per_second),
    h = s + row, w = s + column (merged grid); the next text resumes at max(all positions) + 1.
    Returns positions # (3, L) long, and delta = max position + 1 - L.
    """
    out: list[torch.Tensor] = []
    pos = 0  # next free position
    spans_iter = iter(spans)
    i, n = 0, len(token_types)
    while i < n:
        kind = token_types[i]
        j = i
        while j < n and token_types[j] == kind:
            j += 1
        if kind == 0:
            out.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos += j - i
            i = j
            continue
        # A run of pads may hold several consecutive vision blocks; take them span by span.
        while i < j:
            span = next(spans_iter)
            t, h, w = span.grid
            gh, gw = h // merge, w // merge
            count = t * gh * gw
            if count > j - i:
                raise ValueError(f"vision block of {count} tokens but only {j - i} pads in the sequence")
            # As the reference computes it: int index x seconds-per-grid x tokens/s in float32 (torch's default
            # for int * float), truncated once. Flooring in float64 instead can land one below where the exact
            # product is an integer (fps 1.3: temporal patch 39 is exactly 120, float64 gives 119.99...).
            spg = span.second_per_grid_t if kind == 2 else 0.0
            tt = (torch.arange(t) * spg * tokens_per_second).long()
            block = torch.stack(
                torch.meshgrid(tt, torch.arange(gh), torch.arange(gw), indexing="ij")
            ).reshape(3, -1)
            out.append(block + pos)
            pos = int(block.max()) + pos + 1
            i += count
    positions = torch.cat(out, dim=1) if out else torch.zeros(3, 0, dtype=torch.long)
    return positions, pos - n
