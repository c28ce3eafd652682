"""Fast linear layers for CPU decoding, each beside its slow oracle (`reference`): float weights as loaded
with one-row products in the native kernels (`NativeLinear`, model/native) or, without them, in oneDNN's
blocked layout (`PackedLinear`), int8 weight-only quantization (`Int8Linear`, and `Int8Embedding` for a
tied head's table), and q/k/v, gate/up fused into one matrix each (`fuse_projections`).

A one-token decode step is a matrix-vector product per linear, bound by the weight bytes it reads.
Measured on 2 Zen 4 cores (benchmarks/bench_gemv.py): plain `F.linear` (MKL) reads the LM head
151936x512 at 9 GB/s fp32 / 13 GB/s bf16, oneDNN on prepacked weights at 20-26 GB/s, and
`_weight_int8pack_mm` with bfloat16 activations at ~85% of a streaming read of its int8 bytes (with
float32 activations it is 10x slower, so activations go to bfloat16 around it). On 2 Xeon (Emerald Rapids)
cores the native kernels step through a 3B-shape decoder 1.13x (fp32), 1.20x (bf16) and 1.34x (int8)
faster than those.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from qwenvl_cli.model import native
from qwenvl_cli.model.int4 import Int4Linear, check_int4_shape, pack_int4, unpack_int4
from qwenvl_cli.model.upcast import upcast_linear, upcasts

QUANTIZATIONS = ("int8", "int4")

# int4 groups: the largest of these dividing a matrix's in_features (128 for every real Qwen2.5-VL width).
_INT4_GROUPS = (128, 64, 32)

# Above this many rows (prefill) the int8 kernel loses to dequantize-then-bfloat16-GEMM (measured at 300
# rows: 190-260 ms vs 130 ms on 2048x11008); at decode it reads 4x fewer bytes than float32.
_INT8_KERNEL_ROWS = 16


def _linear_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (rows, K), contiguous as the CPU kernels need."""
    return x.reshape(-1, x.shape[-1]).contiguous()


@functools.cache
def onednn_packs(dtype: torch.dtype) -> bool:
    """oneDNN packs and multiplies `dtype` weights on this CPU: float32 everywhere; bfloat16 only with
    AVX512BW/VL/DQ or AVX-NE-CONVERT (torch refuses it on AVX2 CPUs such as Zen 3). Found by trying."""
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 16, dtype=dtype), 1)
        torch.ops.mkldnn._linear_pointwise(torch.ones(1, 16, dtype=dtype), w, None, "none", [], "")
    except RuntimeError:
        return False
    return True


class PackedLinear(nn.Module):
    """A float nn.Linear whose weight lives in oneDNN's blocked layout (one copy; the plain one is freed).
    Same dtype in as the weight; any number of rows."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight.detach(), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        y = torch.ops.mkldnn._linear_pointwise(_linear_rows(x), self.weight, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:  # (N, K)
        return self.weight.to_dense()

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)


class NativeLinear(nn.Module):
    """A float linear on CPU keeping the weight # (N, K) as loaded (a checkpoint tensor in the model's dtype
    stays the file's mapped bytes: no copy, no repacking): one-row inputs, the decode step, go through the
    native matrix-vector kernel, any other through F.linear, which is also its oracle.

    `dtype`, the activations' (default: the weight's), may be float32 over a bfloat16 weight: a float32
    model on a bfloat16 checkpoint keeps the file's weights (loader.load_model), every product that of their
    exact float32 upcast (F.linear on `weight.float()`, the oracle), half the bytes a decode step reads."""

    upcast = False  # long bfloat16 inputs as float32 GEMMs (loader.load_model's upcast_prefill)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernels: native.Kernels,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dtype = dtype or weight.dtype
        if dtype != weight.dtype and (weight.dtype, dtype) != (torch.bfloat16, torch.float32):
            raise ValueError(f"{dtype} activations over {weight.dtype} weights")
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype
        self.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.kernels = kernels

    @classmethod
    def from_linear(cls, linear: nn.Module, kernels: native.Kernels, dtype: torch.dtype | None = None) -> NativeLinear:
        return cls(linear.weight, linear.bias, kernels, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        if x.numel() == self.in_features and x.dtype == self.dtype:
            y = self.kernels.gemv(self.weight, x.reshape(-1).contiguous(), self.bias)
            return y.view(*x.shape[:-1], self.out_features)
        if x.dtype != self.weight.dtype or upcasts(self, x):
            return upcast_linear(x, self.weight, self.bias)  # float32 on the weight's exact upcast
        return F.linear(x, self.weight, self.bias)

    def decode_call(self, x: torch.Tensor, y: torch.Tensor):
        """forward's one-row product bound to x # (K,) and y # (N,) (model/native_step.py), or None where x
        is not in the activations' dtype."""
        return self.kernels.bind_gemv(self.weight, self.bias, x, y) if x.dtype == self.dtype else None

    def dense_weight(self) -> torch.Tensor:  # (N, K), the weight itself
        return self.weight

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class TiedHead(nn.Module):
    """A tied LM head # (V, D) (the 3B's: the embedding table is its weight) packed for oneDNN in chunks of
    rows, so that it reads at the packed GEMV's bandwidth (151936x2048 bfloat16: 22 ms, 28 GB/s, against
    33 ms for F.linear on the plain table) while the lookups read rows of the checkpoint's own table
    (MappedEmbedding). Chunks of `chunk_rows` are converted and packed one at a time, each chunk's source
    rows handed to `on_packed` when done: no second whole copy of the table exists at any moment. The
    chunks' outputs concatenate to the same bits as one packed matrix (8 chunks cost ~5% over one)."""

    def __init__(self, table: torch.Tensor, dtype: torch.dtype, chunk_rows: int = 1 << 14, on_packed=None) -> None:
        super().__init__()
        self.out_features, self.in_features = table.shape
        chunks = []
        with one_thread():
            for start in range(0, self.out_features, chunk_rows):
                rows = table[start : start + chunk_rows]
                packed = torch.ops.mkldnn._reorder_linear_weight(rows.to(dtype).contiguous(), 1)
                chunks.append(nn.Parameter(packed, requires_grad=False))
                if on_packed is not None:
                    on_packed(rows)
        self.chunks = nn.ParameterList(chunks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., V)
        rows = _linear_rows(x)
        y = torch.cat([torch.ops.mkldnn._linear_pointwise(rows, w, None, "none", [], "") for w in self.chunks], -1)
        return y.view(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:  # (V, D)
        return torch.cat([w.to_dense() for w in self.chunks])

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight())


class MappedEmbedding(nn.Module):
    """Token embeddings looked up in the checkpoint's table as loaded (memory-mapped, in the file's dtype),
    each looked-up row cast to the model's dtype: the same values as casting the whole table first (a cast
    is per element), without a resident copy of the table beside a TiedHead. Only the pages of the rows
    looked up become resident."""

    def __init__(self, table: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(table, requires_grad=False)  # (V, D) in the file's dtype
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (...,) long -> (..., D)
        return F.embedding(ids, self.weight).to(self.dtype)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: weight # (N, K) any float dtype -> q # (N, K) int8, scales # (N,)
    bfloat16, with weight ~= q * scales[:, None]. The rounding uses the bfloat16 scale actually stored.
    Works through blocks of ~1M weights (4 MB in float32, cache-resident) and never writes `weight`."""
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.int8, device=weight.device)
    scales = torch.empty(n, dtype=torch.bfloat16, device=weight.device)
    rows = max(1, (1 << 20) // k)
    for start in range(0, n, rows):
        w = weight[start : start + rows].to(torch.float32, copy=True)
        s = (torch.maximum(w.amax(1), -w.amin(1)) / 127).clamp_(min=1e-12).to(torch.bfloat16)
        scales[start : start + rows] = s
        q[start : start + rows] = w.div_(s.float()[:, None]).round_().clamp_(-127, 127)
    return q, scales


class Int8Linear(nn.Module):
    """Weight-only int8 linear: int8 weight # (N, K) and one bfloat16 scale per output row; the bias stays
    in the model's dtype. Output in the input's dtype."""

    upcast = False  # long inputs on the float32 dequantization, a float32 GEMM (see loader.load_model)

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

        def empty(*shape, dtype):
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)

        self.weight = empty(out_features, in_features, dtype=torch.int8)
        self.scales = empty(out_features, dtype=torch.bfloat16)
        self.bias = empty(out_features, dtype=dtype) if bias else None

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> Int8Linear:
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, bias is not None, dtype, "meta")
        module.set_weight(weight)
        if bias is not None:
            module.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        return module

    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize a float weight # (N, K) in place of this module's (on the weight's device)."""
        q, scales = quantize_int8(weight)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        kernels = native.kernels() if x.device.type == "cpu" and x.numel() == self.in_features else None
        if kernels is not None:  # the decode step: float32 activations, the scale and bias applied in float32
            bias = None if self.bias is None else self.bias.float()
            y = kernels.gemv_int8(self.weight, self.scales, x.reshape(-1).float().contiguous(), bias)
            return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        rows = _linear_rows(x).to(torch.bfloat16)
        if rows.device.type == "cpu" and rows.shape[0] <= _INT8_KERNEL_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scales)
        elif upcasts(self, x):
            return upcast_linear(x, self.dequantize(torch.float32), self.bias)
        else:  # prefill, or a device without the CPU kernel: one transient bfloat16 copy of this matrix
            y = F.linear(rows, self.dequantize(torch.bfloat16))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def decode_call(self, x: torch.Tensor, y: torch.Tensor):
        """forward's native one-row product bound to x # (K,) and y # (N,) float32 (model/native_step.py),
        or None (no native kernels, or a model in another dtype: forward converts around the kernel)."""
        kernels = native.kernels()
        if kernels is None or x.dtype != torch.float32 or (self.bias is not None and self.bias.dtype != x.dtype):
            return None
        return kernels.bind_gemv_int8(self.weight, self.scales, self.bias, x, y)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # (N, K)
        return (self.weight.to(dtype) * self.scales.to(dtype)[:, None]).to(dtype)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The oracle: dequantize to float32, plain matmul in float32."""
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.dequantize(torch.float32), bias).to(x.dtype)


class Int8Embedding(nn.Module):
    """Token embeddings read from a tied LM head's int8 table (the 3B ties them): one int8 copy serves
    both, each looked-up row dequantized with its own scale, exactly as the head's matmul sees it."""

    def __init__(self, head: Int8Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = head.weight  # (V, D) int8, the same Parameter as the head's
        self.scales = head.scales  # (V,) bfloat16
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (...,) long -> (..., D)
        rows = self.weight[ids].to(torch.float32) * self.scales[ids].to(torch.float32)[..., None]
        return rows.to(self.dtype)


def quantized_linear(kind: str, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                     device=None) -> nn.Module:
    """An empty weight-only linear of `kind` ("int8" or "int4") to `set_weight` into. int4 takes the largest
    group of _INT4_GROUPS dividing in_features; a matrix the int4 kernel cannot take (out_features not a
    multiple of 16, or no group fits) is int8 instead."""
    if kind == "int4":
        for group in _INT4_GROUPS:
            try:
                check_int4_shape(out_features, in_features, group)
            except ValueError:
                continue
            return Int4Linear(in_features, out_features, bias, dtype, group, device)
    elif kind != "int8":
        raise ValueError(f"unknown quantization {kind!r}")
    return Int8Linear(in_features, out_features, bias, dtype, device)


def _concat_int4(parts: list[nn.Module]) -> nn.Module:
    """Int4Linear parts side by side: the nibbles are unpacked, stacked and packed again (the pack layout
    works in row blocks, so packed bytes do not simply concatenate), per-group scales concatenate exactly.
    The transient uint8 copy is one layer's matrices."""
    first = parts[0]
    bias = first.bias
    out = Int4Linear(first.in_features, sum(p.out_features for p in parts), bias is not None,
                     bias.dtype if bias is not None else torch.bfloat16, first.group_size, "meta")
    q = torch.cat([unpack_int4(p.weight, p.out_features, p.in_features, p.layout) for p in parts])
    out.weight = nn.Parameter(pack_int4(q), requires_grad=False)
    out.scales_and_zeros = nn.Parameter(torch.cat([p.scales_and_zeros for p in parts], 1), requires_grad=False)
    out.bias = None if bias is None else nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return out


def fusable(parts: list[nn.Module]) -> bool:
    """Whether concat_linears can join `parts`: one kind among float nn.Linear, Int8Linear and Int4Linear,
    and for int4 one group size."""
    kinds = {type(p) for p in parts}
    if len(kinds) != 1 or not kinds <= {nn.Linear, Int8Linear, Int4Linear}:
        return False
    return kinds != {Int4Linear} or len({p.group_size for p in parts}) == 1


def concat_linears(parts: list[nn.Module]) -> nn.Module:
    """One linear computing `parts` side by side (outputs concatenated in order), parts that are `fusable`:
    float nn.Linear, Int8Linear (per-row scales concatenate exactly) or Int4Linear (repacked)."""
    if not fusable(parts):
        raise TypeError(f"cannot fuse {[type(p).__name__ for p in parts]}")
    first = parts[0]
    if isinstance(first, Int4Linear):
        return _concat_int4(parts)
    if isinstance(first, Int8Linear):
        out = Int8Linear(first.in_features, sum(p.out_features for p in parts), first.bias is not None,
                         first.bias.dtype if first.bias is not None else torch.bfloat16, "meta")
        out.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
        out.scales = nn.Parameter(torch.cat([p.scales for p in parts]), requires_grad=False)
        out.bias = None if first.bias is None else nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
        return out
    weight = torch.cat([p.weight for p in parts])
    out = nn.Linear(first.in_features, weight.shape[0], bias=first.bias is not None, device="meta")
    out.weight = nn.Parameter(weight, requires_grad=False)
    if first.bias is not None:
        out.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return out


def fuse_projections(model: nn.Module, on_fused=None) -> None:
    """Each text layer's q/k/v into one `qkv` matrix and gate/up into one `gate_up`: a decode step makes 4
    matrix-vector calls a layer instead of 7, and on small models each call costs 40-80 us of overhead
    whatever its size (benchmarks/RESULTS.md). The checkpoint-named modules are removed (their weights live
    on in the fused copy only); `on_fused(weight)` gets each original weight once it is no longer used."""
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        groups = ((attn, "qkv", ("q_proj", "k_proj", "v_proj")), (mlp, "gate_up", ("gate_proj", "up_proj")))
        for owner, fused, names in groups:
            parts = [getattr(owner, n) for n in names]
            if not fusable(parts):
                continue  # e.g. int4 q beside int8 k/v (a shape int4 cannot take): kept as the checkpoint's
            setattr(owner, fused, concat_linears(parts))
            for n, part in zip(names, parts):
                delattr(owner, n)
                if on_fused is not None:
                    on_fused(part.weight)


def decoder_linear_names(model: nn.Module) -> list[str]:
    """The linear modules of the text decoder and the LM head (`model.layers.*`, `lm_head`): the
    matrices a decode step reads. The vision tower runs once per image and stays as it is."""
    kinds = (nn.Linear, PackedLinear, NativeLinear, Int8Linear, Int4Linear, TiedHead)
    return [name for name, m in model.named_modules()
            if isinstance(m, kinds) and (name.startswith("model.layers.") or name == "lm_head")]


def pack_linears(model: nn.Module, names: list[str], on_packed=None) -> None:
    """Swap the named float nn.Linear modules (on CPU) for their decode form, one at a time: NativeLinear
    where the native kernels take the dtype (the weight kept as it is), else PackedLinear where oneDNN
    packs the dtype (else the module stays plain), repacked on one
    thread: a reorder is a memory copy, and with two threads each call paid ~8 ms of thread hand-off on the
    shared 2-core box (0.1-0.3 ms on one thread, the same 58 ms for 2048x11008 fp32). `on_packed(dense)`
    gets each plain weight once it is no longer used."""
    kernels = native.kernels()
    with one_thread():
        for name in names:
            module = model.get_submodule(name)
            # float16 stays plain: oneDNN's CPU float16 matmul needs AVX512-FP16, which Zen 4 lacks.
            w = module.weight if isinstance(module, nn.Linear) else None
            if w is None or w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16):
                continue
            if kernels is not None and kernels.supports(w.dtype):
                replace_module(model, name, NativeLinear.from_linear(module, kernels, model.dtype))
            elif onednn_packs(w.dtype):
                replace_module(model, name, PackedLinear.from_linear(module))
                if on_packed is not None:
                    on_packed(module.weight)


@contextmanager
def one_thread():
    """Intra-op threads down to one for a run of small memory-bound CPU ops (packing, quantizing)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
