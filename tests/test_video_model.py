"""Video input on the model side: frames -> patches (media/frames.py), prompts mixing images and videos,
MRoPE time positions, and chunked vision encoding, against transformers' Qwen2_5_VLForConditionalGeneration
on the same tiny random checkpoint.

transformers' video processor needs torchvision (not installable here), so its model gets our
`pixel_values_videos`, `video_grid_thw` and `second_per_grid_ts` directly; the patch layout is checked
against the processor's own `patchify` source. float32 logits within 1e-4, 32 greedy tokens identical.
"""

from __future__ import annotations

import ast
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoints import assert_same_as_reference, reference_model, reference_processor
from qwenvl_cli.engine import Engine
from qwenvl_cli.errors import PromptError
from qwenvl_cli.media.frames import ProcessedVideo, preprocess_frames
from qwenvl_cli.media.image import preprocess_image
from qwenvl_cli.model.loader import load_model, open_checkpoint
from qwenvl_cli.model.qwen2_5_vl import Qwen2_5_VL, VisionInput, chunk_grids
from qwenvl_cli.prompts import token_types
from qwenvl_cli.tokenizer import Tokenizer

IMAGE_ID, VIDEO_ID = 151655, 151656
NEW_TOKENS = 32


def noise_frames(n: int, height: int, width: int, seed: int) -> np.ndarray:
    """(n, H, W, 3) uint8: a gradient that drifts from frame to frame, plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    frames = []
    for k in range(n):
        base = np.stack([(x + 9 * k) * 255 / width, (y + 5 * k) * 255 / height, (x + y + 13 * k) % 256], -1)
        frames.append(np.clip(base * 0.6 + rng.integers(0, 100, (height, width, 3)), 0, 255))
    return np.stack(frames).astype(np.uint8)


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(noise_frames(1, height, width, seed + 100)[0])


@pytest.fixture(scope="module")
def setup(make_ckpt):
    path = make_ckpt(max_pixels=64 * 28 * 28)  # the checkpoint test_parity uses
    ckpt = open_checkpoint(path)
    engine = Engine("tiny", ckpt, load_model(ckpt), Tokenizer.from_dir(path))
    return engine, reference_model(path), reference_processor(path)


def video(engine: Engine, n: int, height: int, width: int, fps: float, seed: int = 0) -> ProcessedVideo:
    return preprocess_frames(noise_frames(n, height, width, seed), engine.preprocessor, 2 / fps)


def reference_inputs(prompt, images: list[Image.Image], processor) -> dict:
    """What transformers' model takes for `prompt`: our ids (checked separately), images through its PIL
    processor, videos as our patches with their timing."""
    ids = prompt.input_ids
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "mm_token_type_ids": torch.tensor([token_types(ids[0].tolist())])}
    if images:
        pix = processor.image_processor(images=images, return_tensors="pt")
        inputs.update(pixel_values=pix["pixel_values"], image_grid_thw=pix["image_grid_thw"])
        assert torch.equal(pix["pixel_values"], prompt.images.pixel_values)
    if prompt.videos is not None:
        inputs.update(pixel_values_videos=prompt.videos.pixel_values,
                      video_grid_thw=torch.tensor(prompt.videos.grids),
                      second_per_grid_ts=torch.tensor(prompt.videos.second_per_grid_ts))
    return inputs


def reference_ids(processor, parts, grids) -> list[int]:
    """The processor's chat template and tokenizer, each pad expanded to t*h*w/4 by hand (its video
    processor, which would do the expansion, is unavailable)."""
    content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": kind} for p, kind in parts]
    chat = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    out, grid_iter = [], iter(grids)
    for token in processor.tokenizer(chat)["input_ids"]:
        if token in (IMAGE_ID, VIDEO_ID):
            t, h, w = next(grid_iter)
            out.extend([token] * (t * h * w // 4))
        else:
            out.append(token)
    return out


# Frames of 56x140 px: grid (t, 4, 10), merged 2x5 (two windows a frame, one partly empty). Every case keeps
# the temporal positions below the spatial extent (5), where transformers 5.24's MRoPE agrees with the
# original definition.
CASES = {
    "short video": [("video", 4, 2.0), "What happens?"],
    "odd frame count": [("video", 5, 2.0), "What happens?"],
    "image and video": [("video", 4, 2.0), "Compare the clip with the picture.", ("image", 90, 60)],
    "image before two videos": [("image", 60, 90), ("video", 4, 2.0), ("video", 2, 1.0), "Which clip?"],
    "fps 1": [("video", 4, 1.0), "When?"],
    "fps 4": [("video", 6, 4.0), "When?"],
}


def build(engine, spec):
    """Parts for Engine.prompt from a CASES entry, and the PIL images among them."""
    parts, images, kinds = [], [], []
    for i, item in enumerate(spec):
        if isinstance(item, str):
            parts.append(item)
            kinds.append((item, None))
        elif item[0] == "image":
            im = noise_image(item[1], item[2], seed=i)
            images.append(im)
            parts.append(preprocess_image(im, engine.preprocessor))
            kinds.append((None, "image"))
        else:
            parts.append(video(engine, item[1], 56, 140, item[2], seed=i))
            kinds.append((None, "video"))
    return parts, images, kinds


@pytest.mark.parametrize("case", list(CASES))
def test_video_prompt_logits_positions_and_greedy_tokens_match_transformers(setup, case):
    engine, ref, processor = setup
    parts, images, kinds = build(engine, CASES[case])
    prompt = engine.prompt(parts)
    assert prompt.input_ids[0].tolist() == reference_ids(processor, kinds, [p.grid_thw for p in parts
                                                                            if not isinstance(p, str)])
    inputs = reference_inputs(prompt, images, processor)

    positions, delta = ref.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"), second_per_grid_ts=inputs.get("second_per_grid_ts"))
    assert torch.equal(prompt.positions, positions)
    assert prompt.rope_delta == delta.item()

    assert_same_as_reference(engine, ref, prompt, inputs, NEW_TOKENS)


def test_long_video_text_resumes_after_the_last_temporal_position_unlike_transformers(setup):
    # 20 frames at 2 fps on 56x84 px: grid (10, 4, 6), merged 2x3; t = 2k reaches 18, far past the side 3.
    engine, ref, _ = setup
    prompt = engine.prompt([video(engine, 20, 56, 84, 2.0), "What happens?"])
    ids = prompt.input_ids[0]
    pads = (ids == VIDEO_ID).nonzero().flatten()
    start, end = pads[0].item(), pads[-1].item() + 1
    assert end - start == 10 * 2 * 3
    pos = prompt.positions[:, 0]
    block = pos[:, start:end].view(3, 10, 2, 3)
    assert block[0, :, 0, 0].tolist() == [start + 2 * k for k in range(10)]
    assert (block[0] == block[0, :, :1, :1]).all()  # one time per temporal patch
    assert block[1, 3, :, 0].tolist() == [start, start + 1]
    assert block[2, 3, 0].tolist() == [start, start + 1, start + 2]
    # The original definition (Qwen's, transformers 4.x, vLLM): the next text starts at max + 1.
    after = start + 18 + 1
    assert pos[:, end].tolist() == [after] * 3
    assert pos[:, end:].tolist() == [list(range(after, after + len(ids) - end))] * 3
    assert prompt.rope_delta == after + len(ids) - end - len(ids)

    # transformers 5.24 resumes at start + max(h, w) / merge = start + 3, reusing temporal positions.
    ref_pos, ref_delta = ref.model.get_rope_index(
        prompt.input_ids, torch.tensor([token_types(ids.tolist())]), video_grid_thw=torch.tensor([(10, 4, 6)]),
        second_per_grid_ts=torch.tensor([1.0]))
    assert torch.equal(ref_pos[:, 0, :end], pos[:, :end])
    n_after = len(ids) - end
    assert ref_pos[:, 0, end:].tolist() == [list(range(start + 3, start + 3 + n_after))] * 3
    # Its rope delta still comes from the largest position, here the video's last t: decoding jumps past it.
    assert start + 3 + n_after - 1 < start + 18
    assert ref_delta.item() == start + 18 + 1 - len(ids) == prompt.rope_delta - n_after


@pytest.mark.parametrize("fps, expected", [(2, [0, 2, 4]), (1, [0, 4, 8]), (4, [0, 1, 2]), (0.5, [0, 8, 16])])
def test_temporal_positions_follow_seconds_per_grid(setup, fps, expected):
    engine, _, _ = setup
    clip = video(engine, 6, 56, 84, fps)
    assert clip.grid_thw == (3, 4, 6) and clip.second_per_grid_t == 2 / fps
    prompt = engine.prompt(["Watch:", clip, "When?"])
    ids = prompt.input_ids[0]
    mask = ids == VIDEO_ID
    start = mask.nonzero()[0].item()
    t, h, w = (prompt.positions[i, 0, mask].view(3, 2, 3) - start for i in range(3))
    assert t[:, 0, 0].tolist() == expected
    assert (t == t[:, :1, :1]).all()  # one time per temporal patch
    assert h[0, :, 0].tolist() == [0, 1] and w[0, 0].tolist() == [0, 1, 2]
    after = start + max(expected[-1], 2) + 1
    assert prompt.positions[0, 0, mask.nonzero()[-1].item() + 1].item() == after


def test_video_features_match_transformers_the_loop_oracle_and_chunking(setup):
    engine, ref, _ = setup
    clips = [video(engine, 6, 56, 140, 2.0, seed=1), video(engine, 3, 84, 56, 1.0, seed=2)]
    vis = VisionInput(torch.cat([c.pixel_values for c in clips]), tuple(c.grid_thw for c in clips),
                      tuple(c.second_per_grid_t for c in clips))
    assert vis.grids == ((3, 4, 10), (2, 6, 4))
    with torch.inference_mode():
        expected = torch.cat(ref.model.get_video_features(vis.pixel_values, torch.tensor(vis.grids)).pooler_output)
        fast = engine.model.vision_features(vis)
        slow = engine.model.vision_features(vis, attention="loop")
        # 40 patches: one temporal patch a chunk; 100: pieces of both videos share a chunk; 1: below one patch.
        chunked = {n: engine.model.vision_features(vis, max_patches=n) for n in (40, 100, 1)}
        slow_chunked = engine.model.vision_features(vis, attention="loop", max_patches=64)
    assert fast.shape == (3 * 10 + 2 * 6, engine.model.config.text.hidden_size)
    torch.testing.assert_close(fast, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    # float32 matmuls of other row counts round differently (seen: 1.1e-6 on features of magnitude 2.7, on
    # Zen 4 and on Xeon cores alike, where MKL picks other kernels) ...
    for n, feats in chunked.items():
        torch.testing.assert_close(feats, fast, atol=4e-6, rtol=1e-6)
    torch.testing.assert_close(slow_chunked, slow, atol=4e-6, rtol=1e-6)
    # ... but the arithmetic is the same: in float64 chunks and one call agree to rounding (seen: 2e-15).
    wide = Qwen2_5_VL(engine.model.config)  # the same vision tower in float64 (the decoder is not used)
    wide.visual.load_state_dict(engine.model.visual.state_dict())
    wide.double()
    with torch.inference_mode():
        one = wide.vision_features(vis)
        for n in (40, 100):
            torch.testing.assert_close(wide.vision_features(vis, max_patches=n), one, atol=1e-12, rtol=0)


def test_chunk_grids_hand_computed():
    grids = [(3, 4, 10), (2, 6, 4)]  # 40 and 24 patches a temporal patch
    assert chunk_grids(grids, 10_000) == [((3, 4, 10), (2, 6, 4))]
    assert chunk_grids(grids, 40) == [((1, 4, 10),)] * 3 + [((1, 6, 4),)] * 2
    assert chunk_grids(grids, 100) == [((2, 4, 10),), ((1, 4, 10), (2, 6, 4))]
    assert chunk_grids(grids, 1) == [((1, 4, 10),)] * 3 + [((1, 6, 4),)] * 2
    with pytest.raises(ValueError, match="max_patches"):
        chunk_grids(grids, 0)


# ----------------------------------------------------------------------------------------------- frames


def _reference_patchify():
    """transformers' Qwen2VLVideoProcessor.patchify, compiled from its source: the module imports
    torchvision at the top, but this method is plain torch."""
    spec = importlib.util.find_spec("transformers")
    source = Path(spec.submodule_search_locations[0], "models/qwen2_vl/video_processing_qwen2_vl.py").read_text()
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "patchify")
    namespace = {"torch": torch}
    exec(compile(ast.Module([fn], type_ignores=[]), "patchify", "exec"), namespace)
    return namespace["patchify"]


@pytest.mark.parametrize("n", [4, 5])
def test_patch_layout_matches_the_video_processor(setup, n):
    engine, _, _ = setup
    cfg = engine.preprocessor
    frames = noise_frames(n, 56, 140, seed=n)
    ours = preprocess_frames(frames, cfg, 1.0)
    x = (frames.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(cfg.image_mean, dtype=np.float32)) / np.asarray(cfg.image_std, dtype=np.float32)
    videos = torch.from_numpy(x).permute(0, 3, 1, 2)[None]  # (1, n, C, H, W)
    patches, gt, gh, gw = _reference_patchify()(None, videos, cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size)
    assert ours.grid_thw == (gt, gh, gw) == (math.ceil(n / 2), 4, 10)
    assert torch.equal(ours.pixel_values, patches[0])
    assert ours.resized_size == (140, 56) and ours.pixel_values.dtype == torch.float32


def test_odd_frame_count_repeats_the_last_frame(setup):
    engine, _, _ = setup
    frames = noise_frames(3, 56, 84, seed=3)
    odd = preprocess_frames(frames, engine.preprocessor, 1.0)
    even = preprocess_frames(np.concatenate([frames, frames[-1:]]), engine.preprocessor, 1.0)
    assert odd.grid_thw == even.grid_thw == (2, 4, 6)
    assert torch.equal(odd.pixel_values, even.pixel_values)


def test_two_frames_of_a_still_equal_the_image_path(setup):
    engine, _, _ = setup
    still = noise_frames(1, 56, 84, seed=4)[0]  # multiples of 28 within the pixel budget: no resize
    image = preprocess_image(Image.fromarray(still), engine.preprocessor)
    clip = preprocess_frames(np.stack([still, still]), engine.preprocessor, 1.0)
    assert image.grid_thw == clip.grid_thw == (1, 4, 6) and image.resized_size == clip.resized_size
    assert torch.equal(clip.pixel_values, image.pixel_values)


@pytest.mark.parametrize("frames, spg, error, match", [
    (np.zeros((2, 56, 84, 3), np.float32), 1.0, ValueError, "uint8"),
    (np.zeros((56, 84, 3), np.uint8), 1.0, ValueError, r"\(56, 84, 3\)"),
    (np.zeros((2, 56, 84, 4), np.uint8), 1.0, ValueError, r"\(2, 56, 84, 4\)"),
    (np.zeros((0, 56, 84, 3), np.uint8), 1.0, ValueError, "n >= 1"),
    (np.zeros((2, 50, 84, 3), np.uint8), 1.0, ValueError, "84x50 pixels.*multiples of 28"),
    (np.zeros((2, 56, 84, 3), np.uint8), 0.0, PromptError, "got 0.0"),
    (np.zeros((2, 56, 84, 3), np.uint8), -1.0, PromptError, "got -1.0"),
    (np.zeros((2, 56, 84, 3), np.uint8), float("nan"), PromptError, "got nan"),
    (np.zeros((2, 56, 84, 3), np.uint8), float("inf"), PromptError, "got inf"),
])
def test_preprocess_frames_refuses_bad_input(setup, frames, spg, error, match):
    engine, _, _ = setup
    with pytest.raises(error, match=match):
        preprocess_frames(frames, engine.preprocessor, spg)


def test_vision_input_checks_timing_and_rows():
    pix = torch.zeros(2 * 4 * 6, 1176)
    VisionInput(pix, ((2, 4, 6),), (1.0,))
    with pytest.raises(PromptError, match="2 second_per_grid_ts for 1 video grids"):
        VisionInput(pix, ((2, 4, 6),), (1.0, 1.0))
    with pytest.raises(PromptError, match=r"got \[nan\]"):
        VisionInput(pix, ((2, 4, 6),), (float("nan"),))
    with pytest.raises(PromptError, match=r"got \[0.0\]"):
        VisionInput(pix, ((2, 4, 6),), (0.0,))
    with pytest.raises(ValueError, match="48 pixel rows for grids \\[\\(1, 4, 6\\)\\] \\(24 patches\\)"):
        VisionInput(pix, ((1, 4, 6),))


def test_make_prompt_refuses_swapped_kinds(setup):
    engine, _, _ = setup
    clip = video(engine, 2, 56, 56, 2.0)
    as_image = VisionInput(clip.pixel_values, (clip.grid_thw,))
    as_video = VisionInput(clip.pixel_values, (clip.grid_thw,), (1.0,))
    with pytest.raises(ValueError, match="videos= got an image input"):
        engine.model.make_prompt([VIDEO_ID] * 4, videos=as_image)
    with pytest.raises(ValueError, match="images= got a video input"):
        engine.model.make_prompt([IMAGE_ID] * 4, images=as_video)
    with pytest.raises(TypeError, match="not a prompt part: int"):
        engine.prompt(["hi", 3])
