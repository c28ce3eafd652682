"""The Qwen2.5-VL vision tower: patch embedding, RMSNorm/SwiGLU blocks with 2D rotary window attention,
and the 2x2 patch merger to the decoder width.

Fast path (`attention="batched"`): every window of a block (or every frame of a full-attention block) goes
through ONE attention call. On a GPU in bfloat16/float16 that is variable-length flash attention over the
segments as they lie (torch's varlen_attn, no padding); elsewhere one SDPA call over padded segments
(`attention="padded"` forces it), and on CPUs with the native kernels (model/native) the rotary embedding
and the gather into segments are one pass. Slow oracle: `attention="loop"` attends segment by segment, as
the reference implementation does; tests hold them equal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwenvl_cli.config import VisionConfig
from qwenvl_cli.model import native
from qwenvl_cli.model.rope import Segments, VisionLayout, rotate_half

ATTENTION = ("batched", "padded", "loop")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":  # one native pass with the same bits (tests/test_native.py)
            kernels = native.kernels()
            y = kernels.rms_norm(x, self.weight, self.eps) if kernels is not None else None
            if y is not None:
                return y
        # torch.rms_norm in float32 is h * rsqrt(mean(h^2) + eps) in one dispatch instead of five, the same
        # bits as the reference's spelled-out form (reference() below; tests/test_speed_paths.py).
        return self.weight * torch.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """transformers' Qwen2RMSNorm, op for op."""
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        # After loading, model/quant.fuse_projections may replace gate/up by one matrix (the text decoder's).
        self.gate_up: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class PatchEmbed(nn.Module):
    """Conv3d with kernel == stride == (t, p, p) on flattened patches is one matmul; keep the conv's
    weight (its checkpoint name and shape) and run it as a linear layer."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel, stride=kernel, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:  # (N, C*t*p*p) -> (N, D)
        weight = self.proj.weight
        return F.linear(patches.to(weight.dtype), weight.reshape(weight.shape[0], -1))


def apply_vision_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x # (N, H, hd); cos/sin # (N, hd) float32. Rotation in float32, as the reference does."""
    dtype = x.dtype
    x = x.float()
    out = x * cos[:, None] + rotate_half(x) * sin[:, None]
    return out.to(dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(
        self, x: torch.Tensor, segments: Segments, cos: torch.Tensor, sin: torch.Tensor, attention: str = "batched"
    ) -> torch.Tensor:  # x (N, D)
        n = x.shape[0]
        qkv = self.qkv(x)  # (N, 3 * H * hd)
        kernels = native.kernels() if x.device.type == "cpu" and attention == "batched" else None
        if kernels is not None and qkv.dtype in (torch.float32, torch.bfloat16):
            out = _segment_attention_native(kernels, qkv, segments, cos, sin, self.num_heads, self.head_dim)
            return self.proj(out.reshape(n, -1))
        q, k, v = qkv.view(n, 3, self.num_heads, self.head_dim).unbind(1)  # each (N, H, hd)
        q = apply_vision_rotary(q, cos, sin)
        k = apply_vision_rotary(k, cos, sin)
        out = None
        if attention == "loop":
            out = _segment_attention_loop(q, k, v, segments)
        elif attention == "batched" and _varlen_applies(q):
            out = _segment_attention_varlen(q, k, v, segments)
        if out is None:
            out = _segment_attention(q, k, v, segments)
        return self.proj(out.reshape(n, -1))


# Why variable-length attention stopped serving in this process ("" while it serves): the first call that
# raises (flash attention not built for this GPU, say) turns it off, and the padded call serves instead.
varlen_off = ""


def _varlen_applies(q: torch.Tensor) -> bool:
    return q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and not varlen_off


def _varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k):  # torch's, imported on first use (the tests swap it)
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k)


def _segment_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments) -> torch.Tensor | None:
    """Every segment in one variable-length flash-attention call on the rows as they lie (segments are
    consecutive rows): no gather, no padding, no mask. q, k, v # (N, H, hd) -> (N, H, hd), or None (and
    varlen_off set) where torch cannot run it here."""
    global varlen_off
    try:
        return _varlen_attn(q, k, v.contiguous(), seg.cu, seg.cu, seg.max_len, seg.max_len)
    except (RuntimeError, ImportError, NotImplementedError, TypeError) as exc:  # TypeError: an older signature
        varlen_off = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        return None


def _segment_attention_native(kernels, qkv: torch.Tensor, seg: Segments, cos: torch.Tensor, sin: torch.Tensor,
                              heads: int, head_dim: int) -> torch.Tensor:
    """_segment_attention on the native kernels: q and k rotated while gathered into the padded segments
    (one pass each instead of the eight tensor ops of apply_vision_rotary and the gather), v gathered, the
    output scattered back; the same SDPA call on the same values, so the same bits (tests/test_native.py).
    qkv # (N, 3 * H * hd) -> (N, H * hd)."""
    width = heads * head_dim
    q, k, v = (kernels.rope_gather(qkv, i * width, heads, head_dim, cos if i < 2 else None,
                                   sin if i < 2 else None, seg.gather) for i in range(3))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=seg.key_mask)  # (S, H, Lmax, hd)
    return kernels.scatter_rows(out, seg.scatter)


def _segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments) -> torch.Tensor:
    """All segments in one SDPA call: gather into (S, H, Lmax, hd) with a key-padding mask."""
    n, h, d = q.shape
    s, lmax = seg.gather.shape

    def pad(x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x, x.new_zeros(1, h, d)])  # row N is the padding row
        return x[seg.gather].permute(0, 2, 1, 3)  # (S, H, Lmax, hd)

    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=seg.key_mask)
    out = out.permute(0, 2, 1, 3).reshape(s * lmax, h, d)
    return out[seg.scatter]  # (N, H, hd)


def _segment_attention_loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments) -> torch.Tensor:
    """Slow oracle: one attention call per segment, with explicit softmax."""
    outs = []
    scale = q.shape[-1] ** -0.5
    for a, b in zip(seg.cu_seqlens[:-1], seg.cu_seqlens[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # (H, L, hd)
        w = torch.softmax((qs @ ks.transpose(1, 2)).float() * scale, dim=-1).to(vs.dtype)
        outs.append((w @ vs).transpose(0, 1))
    return torch.cat(outs)


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = VisionAttention(cfg)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=True)

    def forward(self, x, segments, cos, sin, attention="batched"):
        x = x + self.attn(self.norm1(x), segments, cos, sin, attention)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.hidden = cfg.hidden_size * cfg.merge_unit
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.hidden, self.hidden), nn.GELU(), nn.Linear(self.hidden, cfg.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N / merge_unit, out)
        return self.mlp(self.ln_q(x).view(-1, self.hidden))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def forward(self, patches: torch.Tensor, layout: VisionLayout, attention: str = "batched") -> torch.Tensor:
        """patches # (N, C*t*p*p) in processor order -> merged features # (N / merge_unit, out_hidden),
        in the processor's merged-token order (the order of the pad tokens)."""
        if attention not in ATTENTION:
            raise ValueError(f"vision attention {attention!r}: choose one of {', '.join(ATTENTION)}")
        unit = self.cfg.merge_unit
        x = self.patch_embed(patches)
        n = x.shape[0]
        x = x.view(n // unit, unit, -1)[layout.window_index].reshape(n, -1)
        full = set(self.cfg.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            segments = layout.frames if i in full else layout.windows
            x = block(x, segments, layout.cos, layout.sin, attention)
        return self.merger(x)[layout.reverse_index]
