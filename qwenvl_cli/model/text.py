"""The Qwen2 decoder (GQA attention with q/k/v biases, RMSNorm, SwiGLU) over a preallocated KV cache.

`forward` is pure apart from writing the caller's cache at the positions it is given: prefill writes
[0, L), a decode step writes one slot. Without a cache it is the plain full-sequence model (the oracle).
`decode` is the one-token step with fewer, larger ops; `forward` with a cache is its oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwenvl_cli.config import TextConfig
from qwenvl_cli.model import native
from qwenvl_cli.model.rope import rotate_half
from qwenvl_cli.model.vision import RMSNorm, SwiGLU


@dataclass
class KVCache:
    """Preallocated keys and values for every layer. # (layers, B, kv_heads, max_len, head_dim)"""

    k: torch.Tensor
    v: torch.Tensor

    def __post_init__(self) -> None:
        # Per-layer views # (B, kv_heads, max_len, head_dim), made once: the decode step indexes them 4 times a
        # layer, and each index op on the 5-D tensors costs 2-4 dispatches.
        self.k_layers, self.v_layers = self.k.unbind(0), self.v.unbind(0)

    @classmethod
    def allocate(cls, cfg: TextConfig, batch: int, max_len: int, device, dtype) -> KVCache:
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        return cls(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x # (B, H, L, hd); cos/sin # (B, L, hd)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query token over every cached key, grouped-query: q # (B, H, 1, hd), k/v # (B, kv, L, hd) ->
    (B, H, 1, hd), all in float32 (bfloat16 caches are widened). Two small matmuls per kv head group: on
    CPU torch's SDPA takes 137 us at 300 keys in bfloat16 and 2.3 ms at 5,000 (the matmuls: 38 us and
    242 us; in float32 28/31 us and 367/193 us), and a decode step calls it once per layer; the native
    kernel (model/native) does the same sums in one call. The oracles are SDPA and the torch form
    (tests/test_speed_paths.py, tests/test_native.py)."""
    kernels = native.kernels()
    fast = kernels.decode_attention(q, k, v) if kernels is not None else None
    return fast if fast is not None else decode_attention_torch(q, k, v)


def decode_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """decode_attention in torch ops (where the native kernels are missing, and their oracle)."""
    b, h, _, hd = q.shape
    kv = k.shape[1]
    qg = q.view(b, kv, h // kv, hd).float()  # the query heads that share each kv head
    scores = torch.matmul(qg, k.float().transpose(-1, -2)) * hd**-0.5  # (B, kv, H/kv, L) float32
    out = torch.matmul(torch.softmax(scores, dim=-1), v.float())  # (B, kv, H/kv, hd)
    return out.to(q.dtype).view(b, h, 1, hd)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        # After loading, model/quant.fuse_projections may replace q/k/v by one matrix (one call per step).
        self.qkv: nn.Module | None = None

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v # (B, L, heads * hd) each, from the three checkpoint matrices or their fused copy."""
        if self.qkv is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        kv = self.num_kv * self.head_dim
        return self.qkv(x).split([self.num_heads * self.head_dim, kv, kv], dim=-1)

    def forward(
        self,
        x: torch.Tensor,  # (B, L, D)
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        layer: int,
        start: int,
    ) -> torch.Tensor:
        b, length, _ = x.shape
        q, k, v = self.project(x)
        q = q.reshape(b, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(b, length, self.num_kv, self.head_dim).transpose(1, 2)
        v = v.reshape(b, length, self.num_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            end = start + length
            cache.k[layer, :, :, start:end] = k
            cache.v[layer, :, :, start:end] = v
            k, v = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]
        elif start:
            raise ValueError("a forward without cache must start at position 0")
        # Queries are the last `length` positions of the keys: causal with that offset. A prefill from 0
        # is plain causal; a single decode token sees everything.
        if length == 1 and x.device.type == "cpu":
            out = decode_attention(q, k, v)  # CPU SDPA is slow for one query (see decode_attention)
        else:
            if length == 1:
                mask, causal = None, False
            elif k.shape[2] == length:
                mask, causal = None, True
            else:
                q_pos = torch.arange(k.shape[2] - length, k.shape[2], device=x.device)
                mask, causal = q_pos[:, None] >= torch.arange(k.shape[2], device=x.device)[None], False
            gqa = self.num_kv != self.num_heads
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, -1))

    def decode(
        self,
        x: torch.Tensor,  # (B, 1, D)
        cos: torch.Tensor,  # (B, 1, hd)
        sin_signed: torch.Tensor,  # (B, 1, hd): rope.signed_sin of the step's sin
        cache: KVCache,
        layer: int,
        index: int,
    ) -> torch.Tensor:  # (B, 1, D)
        """`forward` for one token at sequence `index`, with the same arithmetic in fewer ops: a decode
        step is bound by per-op overhead on small models (~5 us an op, ~60 ops a layer before)."""
        b = x.shape[0]
        h, kv, hd = self.num_heads, self.num_kv, self.head_dim
        qk, v = self._rotated(x, cos, sin_signed)
        k_all, v_all = cache.k_layers[layer], cache.v_layers[layer]  # (B, kv, max_len, hd)
        k_all.select(2, index).copy_(qk[:, h:])
        v_all.select(2, index).copy_(v)
        k, v = k_all.narrow(2, 0, index + 1), v_all.narrow(2, 0, index + 1)
        q = qk[:, :h, None]  # (B, H, 1, hd)
        if x.device.type == "cpu":
            out = decode_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=kv != h)
        return self.o_proj(out.reshape(b, 1, h * hd))

    def decode_static(
        self,
        x: torch.Tensor,  # (B, 1, D)
        cos: torch.Tensor,  # (B, 1, hd)
        sin_signed: torch.Tensor,  # (B, 1, hd)
        cache: KVCache,
        layer: int,
        slot: torch.Tensor,  # (1,) long on the device: the cache slot of this token
        visible: torch.Tensor,  # (1, 1, 1, max_len) bool: the slots <= slot
    ) -> torch.Tensor:  # (B, 1, D)
        """`decode` with every shape fixed and the slot a device tensor, so that a CUDA graph can replay it
        at any position: the keys and values go in by index_copy_, and the query attends over the whole
        cache under `visible` (the unwritten slots must hold finite values, e.g. zeros: a masked weight is
        0, and 0 * NaN would still poison the sum). The query heads sharing a kv head are that head's
        queries (B, kv, H/kv, hd), so SDPA needs neither GQA support nor a repeated cache."""
        b = x.shape[0]
        h, kv, hd = self.num_heads, self.num_kv, self.head_dim
        qk, v = self._rotated(x, cos, sin_signed)
        k_all, v_all = cache.k_layers[layer], cache.v_layers[layer]  # (B, kv, max_len, hd)
        k_all.index_copy_(2, slot, qk[:, h:, None])
        v_all.index_copy_(2, slot, v[:, :, None])
        q = qk[:, :h].reshape(b, kv, h // kv, hd)
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=visible)  # (B, kv, H/kv, hd)
        return self.o_proj(out.reshape(b, 1, h * hd))

    def _rotated(
        self, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token's rotated query and key heads # (B, H + kv, hd) and its values # (B, kv, hd). With fused
        q/k/v the query and key heads rotate in one go, as one slab."""
        b = x.shape[0]
        h, kv, hd = self.num_heads, self.num_kv, self.head_dim
        if self.qkv is not None:
            qkv = self.qkv(x)  # (B, 1, (H + 2 kv) hd)
            qk = qkv[..., : (h + kv) * hd].reshape(b, h + kv, hd)
            v = qkv[..., (h + kv) * hd :].reshape(b, kv, hd)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            qk = torch.cat((q, k), dim=-1).reshape(b, h + kv, hd)
            v = v.reshape(b, kv, hd)
        return qk * cos + qk.roll(hd // 2, -1) * sin_signed, v  # == apply_rotary, bit for bit


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache, layer, start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, start)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode(self, x, cos, sin_signed, cache, layer, index):
        x = x + self.self_attn.decode(self.input_layernorm(x), cos, sin_signed, cache, layer, index)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode_static(self, x, cos, sin_signed, cache, layer, slot, visible):
        x = x + self.self_attn.decode_static(self.input_layernorm(x), cos, sin_signed, cache, layer, slot, visible)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    """Named like the checkpoint's `model.*` (embed_tokens, layers.N, norm)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        embeds: torch.Tensor,  # (B, L, D)
        cos: torch.Tensor,  # (B, L, hd)
        sin: torch.Tensor,
        cache: KVCache | None = None,
        start: int = 0,
    ) -> torch.Tensor:  # (B, L, D) final-normed hidden states
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, start)
        return self.norm(x)

    def decode(
        self,
        embeds: torch.Tensor,  # (B, 1, D)
        cos: torch.Tensor,  # (B, 1, hd)
        sin_signed: torch.Tensor,  # (B, 1, hd): rope.signed_sin(sin)
        cache: KVCache,
        index: int,
    ) -> torch.Tensor:  # (B, 1, D) final-normed
        """One token at sequence `index` (its keys and values go to cache slot `index`): equal to
        forward(embeds, cos, sin, cache, index) (tests/test_speed_paths.py)."""
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer.decode(x, cos, sin_signed, cache, i, index)
        return self.norm(x)

    def decode_static(
        self,
        embeds: torch.Tensor,  # (B, 1, D)
        cos: torch.Tensor,  # (B, 1, hd)
        sin_signed: torch.Tensor,  # (B, 1, hd)
        cache: KVCache,
        slot: torch.Tensor,  # (1,) long on the device
    ) -> torch.Tensor:  # (B, 1, D) final-normed
        """`decode` at the cache slot held in `slot`, with the same shapes at every slot (Attention.decode_static):
        what a CUDA graph captures once and replays (model/graph_step.py). Equal to decode within float
        rounding (another attention kernel), tests/test_graph_step.py."""
        slots = torch.arange(cache.max_len, device=slot.device)
        visible = (slots <= slot).view(1, 1, 1, -1)  # (1, 1, 1, max_len)
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer.decode_static(x, cos, sin_signed, cache, i, slot, visible)
        return self.norm(x)
