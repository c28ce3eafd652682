"""Sampled video frames for the vision tower: normalise and patchify (RGB uint8 frames, already resized
to multiples of 28 by media/video_decode.py) into the flat `(t·gh·gw, C·tp·p·p)` rows of `pixel_values_videos`.

Same arithmetic as the image path (×1/255 in float64 cast to float32, CLIP normalisation in float32) and
transformers' video layout: frames (2k, 2k+1) form temporal patch k; an odd count repeats the last frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from qwenvl_cli.config import PreprocessorConfig
from qwenvl_cli.errors import PromptError


@dataclass(frozen=True)
class ProcessedVideo:
    pixel_values: torch.Tensor  # (t·gh·gw, C·tp·p·p) float32, rows by temporal patch, then 2x2 merge block
    grid_thw: tuple[int, int, int]  # (t, gh, gw); t = temporal patches = ceil(n_frames / tp)
    second_per_grid_t: float  # seconds of video per temporal patch (tp / sample_fps)
    resized_size: tuple[int, int]  # (width, height) in pixels of each frame, as the model saw it


def preprocess_frames(frames: np.ndarray, cfg: PreprocessorConfig, second_per_grid_t: float) -> ProcessedVideo:
    """(n, H, W, 3) uint8 RGB frames, H and W multiples of cfg.factor -> patches, one temporal patch of
    `cfg.temporal_patch_size` consecutive frames at a time (bounded float64 scratch for long clips)."""
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        shape = getattr(frames, "shape", None)
        raise ValueError(f"video frames: expected an (n, H, W, 3) array with n >= 1, got shape {shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"video frames: expected uint8 RGB, got {frames.dtype}")
    n, height, width, _ = frames.shape
    if height % cfg.factor or width % cfg.factor or not height or not width:
        raise ValueError(f"video frames are {width}x{height} pixels: both sides must be multiples of {cfg.factor}")
    if not (math.isfinite(second_per_grid_t) and second_per_grid_t > 0):
        raise PromptError(f"video: seconds per temporal patch must be finite and positive, got {second_per_grid_t}")

    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gt, gh, gw = math.ceil(n / tp), height // p, width // p
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    rows = gh * gw
    out = torch.empty(gt * rows, 3 * tp * p * p, dtype=torch.float32)
    for k in range(gt):
        index = [min(k * tp + i, n - 1) for i in range(tp)]  # past the end: repeat the last frame
        x = (frames[index].astype(np.float64) * (1 / 255)).astype(np.float32)  # (tp, H, W, C)
        x = (x - mean) / std  # float32, as preprocess_image
        x = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)  # (tp, C, H, W)
        x = x.reshape(tp, 3, gh // m, m, p, gw // m, m, p)
        x = x.permute(2, 5, 3, 6, 1, 0, 4, 7)  # (gh/m, gw/m, m, m, C, tp, p, p)
        out[k * rows:(k + 1) * rows] = x.reshape(rows, -1)
    return ProcessedVideo(
        pixel_values=out,
        grid_thw=(gt, gh, gw),
        second_per_grid_t=float(second_per_grid_t),
        resized_size=(width, height),
    )


__all__ = ["ProcessedVideo", "preprocess_frames"]
