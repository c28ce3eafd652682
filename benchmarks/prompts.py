"""The test prompt the benchmarks share: a random image of a given size, preprocessed, and the chat ids
of one user turn holding it ("Describe this image."), pads expanded to its vision tokens."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from qwenvl_cli.config import PreprocessorConfig
from qwenvl_cli.media.image import ProcessedImage, preprocess_image
from qwenvl_cli.model.qwen2_5_vl import VisionInput


def image_prompt(width: int, height: int) -> tuple[ProcessedImage, VisionInput, list[int]]:
    """(processed image, its VisionInput, input ids) for a width x height random picture."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))
    processed = preprocess_image(image, PreprocessorConfig())
    vis = VisionInput(processed.pixel_values, (processed.grid_thw,))
    n_vis = processed.pixel_values.shape[0] // 4
    ids = [151644, 8948, 198, 151652] + [151655] * n_vis + [151653, 74785, 419, 2168, 13, 151645, 198, 151644, 77091, 198]
    return processed, vis, ids


def grid_tensor(processed: ProcessedImage, device="cpu") -> torch.Tensor:
    return torch.tensor([processed.grid_thw], device=device)
