"""Positions: 3D MRoPE ids (hand-computed and against transformers), window layout, rotary tables."""

import math

import pytest
import torch

from qwenvl_cli.model.rope import (
    VisionSpan,
    make_segments,
    mrope_cos_sin,
    rope_index,
    text_cos_sin,
    text_inv_freq,
    vision_layout,
    window_order,
)


def reference_rope_index():
    """transformers' Qwen2_5_VLModel and a stand-in `self` for calling its get_rope_index unbound (it only
    reads the config), with the checkpoints' tokens_per_second 2 (the class default, 4, is not theirs)."""
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=151936,
                         rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e6}),
        vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=16, out_hidden_size=16,
                           tokens_per_second=2),
    )
    stub = type("Stub", (), {"config": cfg, "get_vision_position_ids": Qwen2_5_VLModel.get_vision_position_ids})()
    return Qwen2_5_VLModel, stub


def test_text_only_positions_are_arange():
    pos, delta = rope_index([0] * 5, [], merge=2, tokens_per_second=2)
    assert pos.tolist() == [list(range(5))] * 3
    assert delta == 0


def test_image_block_positions_hand_computed():
    # 2 text, one image of 4x6 patches (2x3 merged), 2 text.
    types = [0, 0] + [1] * 6 + [0, 0]
    pos, delta = rope_index(types, [VisionSpan((1, 4, 6))], merge=2, tokens_per_second=2)
    assert pos[0].tolist() == [0, 1, 2, 2, 2, 2, 2, 2, 5, 6]
    assert pos[1].tolist() == [0, 1, 2, 2, 2, 3, 3, 3, 5, 6]
    assert pos[2].tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 5, 6]
    assert delta == 7 - 10


def test_long_video_text_resumes_after_the_largest_temporal_position():
    # 10 temporal groups of 2x2 merged tokens, 1 s per group, 2 positions per second: t = 3 + 2k.
    types = [0, 0, 0] + [2] * 40 + [0]
    pos, delta = rope_index(types, [VisionSpan((10, 4, 4), 1.0)], merge=2, tokens_per_second=2)
    t = pos[0, 3:43].view(10, 4)
    assert t[:, 0].tolist() == [3 + 2 * k for k in range(10)]
    assert pos[1, 3:43].max() == 4 and pos[2, 3:43].max() == 4
    # The original definition: text after the video starts at max(all positions) + 1 = 3 + 18 + 1.
    assert pos[:, 43].tolist() == [22, 22, 22]
    assert delta == 23 - 44


def test_fractional_seconds_per_grid_are_floored_after_multiplying():
    # 3 fps sampling: 2/3 s per temporal patch, 2 tokens/s -> floor(k * 4/3), not k * int(2/3 * 2).
    types = [2] * 6
    pos, _ = rope_index(types, [VisionSpan((6, 2, 2), 2 / 3)], merge=2, tokens_per_second=2)
    assert pos[0].tolist() == [math.floor(k * 4 / 3) for k in range(6)] == [0, 1, 2, 4, 5, 6]


def test_rope_index_matches_transformers_for_images_and_short_video():
    Qwen2_5_VLModel, stub = reference_rope_index()
    grids_img = [(1, 6, 8), (1, 4, 4)]
    grid_vid = (2, 4, 6)  # short: temporal positions stay below the spatial extent
    types = [0] * 4 + [1] * 12 + [0] * 3 + [2] * 12 + [0] * 2 + [1] * 4 + [0] * 5
    ids = torch.tensor([[151655 if t == 1 else 151656 if t == 2 else 100 for t in types]])
    ref_pos, ref_delta = Qwen2_5_VLModel.get_rope_index(
        stub, ids, torch.tensor([types]), image_grid_thw=torch.tensor(grids_img),
        video_grid_thw=torch.tensor([grid_vid]), second_per_grid_ts=torch.tensor([1.0]),
    )
    spans = [VisionSpan(grids_img[0]), VisionSpan(grid_vid, 1.0), VisionSpan(grids_img[1])]
    pos, delta = rope_index(types, spans, merge=2, tokens_per_second=2)
    assert torch.equal(pos, ref_pos[:, 0])
    assert delta == ref_delta.item()


def test_window_order_hand_computed():
    # 12x20 patches -> 6x10 merged -> windows of 4x4 merged: rows [4, 2] x cols [4, 4, 2].
    index, cu = window_order([(1, 12, 20)], merge=2, window_merged=4)
    sizes = [b - a for a, b in zip(cu[:-1], cu[1:])]
    assert sizes == [4 * s for s in (16, 16, 8, 8, 8, 4)]
    assert index[:4].tolist() == [0, 1, 2, 3]  # first row of the first window
    assert index[4:8].tolist() == [10, 11, 12, 13]  # its second row
    assert sorted(index.tolist()) == list(range(60))


@pytest.mark.parametrize("grids", [[(1, 12, 20)], [(1, 16, 16)], [(1, 8, 40), (1, 4, 4)], [(3, 10, 6)]])
def test_window_layout_matches_transformers(grids):
    from transformers.vision_utils import get_vision_window_index

    ref_index, ref_cu = get_vision_window_index(torch.tensor(grids), 2, 112, 14)
    index, cu = window_order(grids, merge=2, window_merged=4)
    assert torch.equal(index, ref_index)
    assert cu == ref_cu.tolist()


def test_segments_pad_and_scatter_back():
    seg = make_segments([0, 3, 3, 8, 10])  # an empty segment is dropped
    assert seg.gather.tolist() == [[0, 1, 2, 10, 10], [3, 4, 5, 6, 7], [8, 9, 10, 10, 10]]
    assert seg.cu_seqlens == (0, 3, 8, 10)
    flat = seg.gather.flatten()
    assert flat[seg.scatter].tolist() == list(range(10))
    assert make_segments([0, 4, 8]).key_mask is None  # equal lengths need no mask


def test_vision_layout_permutes_rotary_with_the_windows():
    layout = vision_layout([(1, 12, 20)], head_dim=16, merge=2, window_merged=4)
    assert torch.equal(layout.window_index[layout.reverse_index], torch.arange(60))
    from qwenvl_cli.model.rope import vision_rotary

    cos, _ = vision_rotary([(1, 12, 20)], 16, 2)
    first_window_second_row = cos.view(60, 4, 16)[10]
    assert torch.equal(layout.cos.view(60, 4, 16)[4], first_window_second_row)


def test_mrope_sections_take_t_h_w_axes():
    inv = text_inv_freq(16, 1e6)  # 8 frequencies, sections [2, 3, 3]
    positions = torch.stack([torch.full((1, 1), 5), torch.full((1, 1), 7), torch.full((1, 1), 11)])
    cos, _ = mrope_cos_sin(positions, inv, [2, 3, 3], torch.float32)
    expected = torch.cat([5 * inv[:2], 7 * inv[2:5], 11 * inv[5:]]).cos()
    assert torch.allclose(cos[0, 0, :8], expected) and torch.allclose(cos[0, 0, 8:], expected)
    # With all three axes equal, MRoPE is plain RoPE.
    same = torch.full((3, 1, 4), 9)
    assert torch.allclose(mrope_cos_sin(same, inv, [2, 3, 3], torch.float32)[0], text_cos_sin(torch.full((4,), 9), inv, torch.float32)[0])


def test_video_time_positions_round_like_transformers_float32():
    Qwen2_5_VLModel, stub = reference_rope_index()
    spg = 2 / 1.3  # --fps 1.3: a 60 s clip at 30 fps samples 78 frames, sample_fps exactly 1.3
    grid = (60, 2, 2)
    types = [0] * 3 + [2] * 60
    ids = torch.tensor([[151656 if t == 2 else 100 for t in types]])
    ref_pos, _ = Qwen2_5_VLModel.get_rope_index(
        stub, ids, torch.tensor([types]), video_grid_thw=torch.tensor([grid]), second_per_grid_ts=torch.tensor([spg]))
    pos, _ = rope_index(types, [VisionSpan(grid, spg)], merge=2, tokens_per_second=2)
    # Compare the video block only: after it, transformers 5.x resumes text differently (see QWEN25VL.md).
    assert pos[0, 3:].tolist() == ref_pos[0, 0, 3:].tolist()
