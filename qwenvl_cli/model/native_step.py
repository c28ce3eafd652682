"""The CPU decode step as one list of bound native calls (batch 1): `TextModel.decode` without its ~25
torch ops and module calls a layer.

A decode step on a small model is bound by per-op overhead as much as by its weight bytes: on 2 Zen 3
cores the issue preset's step spent 2.3-2.5 ms outside its products (8 layers of ~25 dispatches at 10-20 us
on this slow core) against 5.5 ms in its int8 products; bound, the whole int8 step takes 5.7 ms (8.9
before), bfloat16 9.6 (14.9), int4 3.5 (5.9). Here every op of a layer is a call into the native
library whose tensors (weights, the KV cache of one run, preallocated activations) were checked and bound
once (`native.Kernels.bind_*`, the linears' `decode_call`): per layer a norm, the q/k/v product, rope and
the cache write, the attention, o_proj, residual + norm, gate/up, silu * up, down_proj. What changes from
step to step (the cache slot, the rope tables) is read from one `native.StepState`.

The arithmetic is that of `TextModel.decode` (the oracle), rounding where its ops round (step.c):
float32 and bfloat16 activations give the same bits but for silu's exp (tests/test_native.py). A linear
without a bound call (a kind or dtype the kernels do not take, e.g. an int8 matrix in a bfloat16 model)
runs as its module, on views of the same buffers.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from qwenvl_cli.model import native
from qwenvl_cli.model.text import KVCache


class NativeStep:
    """One model's decoder bound to one KV cache. `step(token, index, cos, sin_signed)` -> (1, V) float32
    logits, as Generator.decode_step answers; `build` answers None where the model or cache is not one it
    binds (then the module path serves)."""

    def __init__(self, model, cache: KVCache, kernels: native.Kernels) -> None:
        text, cfg = model.model, model.config.text
        dtype = model.dtype
        h, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, inter, max_len = cfg.hidden_size, cfg.intermediate_size, cache.max_len
        self.model, self.cache, self.max_len, self.head_dim = model, cache, max_len, hd
        self.state = native.StepState()

        def buffer(n: int, kind: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(n, dtype=kind)

        # Activations # (n,), one set for every layer (each layer's ops run in order).
        self.x, self.h = buffer(d), buffer(d)  # the residual stream, and its norm
        self.qkv, self.q = buffer((h + 2 * kv) * hd), buffer(h * hd, torch.float32).view(h, hd)
        self.attn32 = buffer(h * hd, torch.float32).view(h, hd)
        widen = dtype != torch.float32  # the attention answers float32: o_proj takes it in the dtype
        self.attn = buffer(h * hd) if widen else self.attn32.view(-1)
        self.o, self.gate_up, self.act, self.down = buffer(d), buffer(2 * inter), buffer(inter), buffer(d)
        self.scratch = buffer(h * max_len, torch.float32).view(h, max_len)

        calls = []
        for i, layer in enumerate(text.layers):
            attn, mlp = layer.self_attn, layer.mlp
            norm = layer.input_layernorm
            residual = None if i == 0 else self.down  # the previous layer's MLP output joins x here
            calls.append(kernels.bind_rms_norm(self.x, norm.weight, norm.eps, self.h, residual))
            calls += _linears(_parts(attn, "qkv", ("q_proj", "k_proj", "v_proj")), self.h, self.qkv)
            k, v = cache.k_layers[i], cache.v_layers[i]
            calls.append(kernels.bind_rope_kv(self.state, self.qkv, h, k, v, self.q))
            calls.append(kernels.bind_decode_attention(self.state, self.q, k, v, self.scratch, self.attn32))
            if widen:
                calls.append(kernels.bind_to_bfloat16(self.attn32.view(-1), self.attn))
            calls += _linears([attn.o_proj], self.attn, self.o)
            norm = layer.post_attention_layernorm
            calls.append(kernels.bind_rms_norm(self.x, norm.weight, norm.eps, self.h, self.o))
            calls += _linears(_parts(mlp, "gate_up", ("gate_proj", "up_proj")), self.h, self.gate_up)
            calls.append(kernels.bind_silu_mul(self.gate_up, self.act))
            calls += _linears([mlp.down_proj], self.act, self.down)
        norm = text.norm
        calls.append(kernels.bind_rms_norm(self.x, norm.weight, norm.eps, self.h, self.down))
        self.calls = tuple(calls)

    @classmethod
    def build(cls, model, cache: KVCache) -> NativeStep | None:
        """The bound step, or None: no native kernels, not on the CPU, a batch, a dtype other than float32 or
        bfloat16 (model or cache), or a shape the kernels refuse (they say so by ValueError)."""
        kernels = native.kernels()
        if (kernels is None or model.device.type != "cpu" or model.dtype not in (torch.float32, torch.bfloat16)
                or cache.k.shape[1] != 1 or cache.k.dtype != model.dtype or cache.k.device.type != "cpu"):
            return None
        try:
            return cls(model, cache, kernels)
        except ValueError:
            return None

    def begin(self, first_slot: int) -> None:
        """A new answer on the bound cache: nothing to reset (each step reads only the slots written)."""

    @torch.inference_mode()
    def step(self, token: torch.Tensor, index: int, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        """token # (1, 1) long at cache slot `index`; cos, sin_signed # (1, 1, hd) in the model's dtype ->
        (1, V) float32, Generator.decode_step's answer."""
        if not 0 <= index < self.max_len:
            raise IndexError(f"cache slot {index} outside a cache of {self.max_len}")
        if (cos.dtype != self.x.dtype or sin_signed.dtype != cos.dtype or cos.shape[-1] != self.head_dim
                or sin_signed.shape[-1] != self.head_dim or cos.stride(-1) != 1 or sin_signed.stride(-1) != 1):
            raise ValueError(f"rope tables {cos.dtype}/{sin_signed.dtype} for {self.x.dtype} activations")
        self.x.copy_(self.model.model.embed_tokens(token).view(-1))
        state = self.state
        state.index, state.cos, state.sin = index, cos.data_ptr(), sin_signed.data_ptr()
        for call in self.calls:
            if call() == 0:
                raise MemoryError("a native decode op found no memory")
        return self.model.logits(self.h.view(1, -1))  # the head as a module: one product, a new tensor


def _parts(owner: nn.Module, fused: str, names: tuple[str, ...]) -> list[nn.Module]:
    """The fused projection if loading made one, else the checkpoint's matrices (outputs side by side)."""
    module = getattr(owner, fused, None)
    return [module] if module is not None else [getattr(owner, n) for n in names]


def _linears(modules: list[nn.Module], x: torch.Tensor, y: torch.Tensor) -> list:
    """Calls computing modules side by side from x # (K,) into consecutive slices of y # (sum N,)."""
    calls, start = [], 0
    for module in modules:
        n = module.out_features
        out = y[start : start + n]
        bind = getattr(module, "decode_call", None)
        call = bind(x, out) if bind is not None else None
        calls.append(call if call is not None else functools.partial(_run_module, module, x, out))
        start += n
    if start != y.numel():
        raise ValueError(f"projections of {start} outputs into {y.numel()}")
    return calls


def _run_module(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    y.copy_(module(x.view(1, 1, -1)).view(-1))
