"""The vision tower's GPU attention path (variable-length flash attention over the segments as they lie,
model/vision.py) run on the CPU with a stand-in for torch's CUDA-only varlen_attn that attends segment by
segment: what the path hands the kernel (rows, boundaries, lengths) and what it does with the answer are
checked against the slow oracle; a kernel that raises turns the path off and the padded call serves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from qwenvl_cli.engine import Engine
from qwenvl_cli.media.image import preprocess_image
from qwenvl_cli.model import native, vision
from qwenvl_cli.model.qwen2_5_vl import VisionInput


def _segment_by_segment(q, k, v, cu_q, cu_k, max_q, max_k):
    """varlen_attn's contract, spelled out: (T, H, D) rows, int32 boundaries, the longest segment."""
    assert q.shape == k.shape == v.shape and q.dim() == 3 and v.is_contiguous()
    assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and int(cu_q[-1]) == q.shape[0]
    lengths = cu_q.diff()
    assert max_q == max_k == int(lengths.max()) and bool((lengths > 0).all())
    outs = []
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # (H, L, D)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1))
    return torch.cat(outs)


@pytest.fixture
def engine(make_ckpt, monkeypatch):
    """A CPU model whose vision attention reaches the torch forms (on a GPU the native kernels never serve)."""
    engine = Engine.load(str(make_ckpt()), "cpu", "float32")
    monkeypatch.setattr(native, "kernels", lambda: None)
    return engine


def _vision_input(engine, sizes):
    images = [preprocess_image(Image.fromarray(np.random.default_rng(w).integers(0, 255, (h, w, 3), dtype=np.uint8)),
                               engine.preprocessor) for w, h in sizes]
    return VisionInput(torch.cat([im.pixel_values for im in images]), tuple(tuple(im.grid_thw) for im in images))


def test_varlen_path_answers_what_the_oracle_does(engine, monkeypatch):
    """Two images whose windows are partly cut at the edges (segments of unequal length), through the
    varlen path with the stand-in kernel: the per-segment oracle's features, and every block's window
    and full-attention call went through it."""
    calls = []

    def kernel(*args):
        calls.append(args[5])
        return _segment_by_segment(*args)

    monkeypatch.setattr(vision, "_varlen_applies", lambda q: True)
    monkeypatch.setattr(vision, "_varlen_attn", kernel)
    vis = _vision_input(engine, [(252, 168), (60, 200)])
    with torch.inference_mode():
        got = engine.model.vision_features(vis)
        want = engine.model.vision_features(vis, attention="loop")
    assert len(calls) == engine.model.config.vision.depth  # the oracle's blocks made no call
    assert len(set(calls)) == 2  # the windows' longest segment and the frames'
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_varlen_kernel_that_fails_turns_the_path_off(engine, monkeypatch):
    def broken(*args):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.\nmore")

    monkeypatch.setattr(vision, "_varlen_applies", lambda q: not vision.varlen_off)
    monkeypatch.setattr(vision, "_varlen_attn", broken)
    monkeypatch.setattr(vision, "varlen_off", "")
    vis = _vision_input(engine, [(252, 168)])
    with torch.inference_mode():
        got = engine.model.vision_features(vis)
        want = engine.model.vision_features(vis, attention="padded")
    assert vision.varlen_off == "FlashAttention only supports Ampere GPUs or newer."
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_varlen_applies_only_to_half_precision_on_cuda():
    assert not vision._varlen_applies(torch.zeros(2, 2, 8, dtype=torch.bfloat16))  # a CPU tensor
    with pytest.raises(ValueError, match="vision attention 'flash': choose one of batched, padded, loop"):
        vision.VisionTransformer.forward(None, torch.zeros(1), None, "flash")
