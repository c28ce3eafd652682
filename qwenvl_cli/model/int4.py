"""Weight-only int4 linear (`Int4Linear`) on torch's CPU int4 kernel, beside its float32 oracle: groupwise
4-bit quantization (`quantize_int4`), packing into the kernel's nibble layout (`pack_int4`) and a decoder
of that layout in plain torch ops (`unpack_int4`), so prefill and other devices dequantize the one packed
copy instead of holding the weights twice. The one-row decode product runs in the native kernel
(model/native, `gemv_int4`) where it reads this process's layout, else in torch's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwenvl_cli.model import native
from qwenvl_cli.model.upcast import upcasts


GROUP_SIZES = (32, 64, 128, 256)  # the ones `_weight_int4pack_mm_for_cpu` accepts

# Up to this many rows the int4 kernel beats dequantize-then-bfloat16-GEMM. Its time grows linearly with the
# rows (measured on 2 Zen 4 cores, torch 2.13, kernel vs dequantize + GEMM: 2048x11008 at 64 rows 17 vs
# 44 ms, at 128 rows 33 vs 47, even near 300; LM head 151936x512 at 128 rows 132 vs 167, even near 192;
# 2048x2048 even at 128). Beyond it (long prefill) one transient bfloat16 copy of the matrix and a GEMM win.
_INT4_KERNEL_ROWS = 128

# Dequantize in chunks of about this many weights: the uint8 and float32 temporaries (~7 bytes a weight,
# 3.5 MB) stay in L3, where the whole-matrix version streams each pass through DRAM (2x slower on 2048x11008).
_CHUNK = 1 << 19


@dataclass(frozen=True)
class Int4Layout:
    """Where `_convert_weight_to_int4pack_for_cpu` puts the nibble of weight (n, k) in its (N, K/2) uint8
    output. Rows go in blocks of `block_n`; block b holds bytes [b*block_n*K/2, (b+1)*block_n*K/2), k-major:
    for each k, block_n/2 bytes, byte j holding two rows of the block, low nibble first. `interleaved`:
    rows j and j + block_n/2 (the AVX2/AVX512 builds: the low nibbles of one vector of bytes are the block's
    first half of rows, the high nibbles its second half); otherwise rows 2j and 2j+1. A last partial block
    (N % block_n rows, a multiple of 16) always pairs rows 2j and 2j+1."""

    block_n: int
    interleaved: bool


# The kernel's builds as of torch 2.13: AVX512 (64, True), AVX2 (32, True), no SIMD (32, False).
_CANDIDATE_LAYOUTS = (Int4Layout(64, True), Int4Layout(32, True), Int4Layout(32, False))


def native_layout(kernels: native.Kernels) -> Int4Layout | None:
    """The pack the native int4 kernel reads (torch's for the kernels' instruction set), or None."""
    return _interleaved_layout(kernels.int4_rows)


@functools.cache
def _interleaved_layout(block_n: int | None) -> Int4Layout | None:  # one object per size: decode asks per call
    return Int4Layout(block_n, True) if block_n else None


def check_int4_shape(n: int, k: int, group_size: int) -> None:
    """Raise ValueError unless the CPU kernel takes an (N, K) weight in groups of `group_size`."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size {group_size} is not one of {GROUP_SIZES}")
    if n % 16 or k % group_size:
        raise ValueError(f"int4 needs out_features divisible by 16 and in_features by the group size "
                         f"{group_size}; the weight is {n}x{k}")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q # (N, K) integers in [0, 15] -> (N, K/2) uint8 in the CPU kernel's layout, on q's device. Packs
    slabs of whole row blocks one at a time (blocks pack independently), so the int32 copy the op insists
    on stays small."""
    n, k = q.shape
    if n % 16 or k % 2:
        raise ValueError(f"int4 packing needs N divisible by 16 and K even; q is {n}x{k}")
    if q.numel() and (q.min() < 0 or q.max() > 15):
        raise ValueError(f"int4 values must lie in [0, 15], got [{q.min().item()}, {q.max().item()}]")
    packed = torch.empty(n, k // 2, dtype=torch.uint8, device=q.device)
    rows = _slab_rows(k)
    for start in range(0, n, rows):
        slab = q[start : start + rows].to("cpu", torch.int32)
        packed[start : start + rows] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(slab, 1)
    return packed


def _slab_rows(k: int) -> int:
    # A multiple of 64 rows (a whole number of blocks in every layout), about _CHUNK weights a slab.
    return max(64, _CHUNK // k // 64 * 64)


@functools.cache
def cpu_int4_layout() -> Int4Layout:
    """The layout this process's kernel packs to (it follows the CPU capability torch dispatched to),
    found by packing rows whose two nibbles spell the row number: 2 blocks of 64 and a 48-row tail."""
    n = torch.arange(176)
    q = torch.stack((n % 16, n // 16), 1)  # (176, 2): row n holds (n mod 16, n div 16)
    packed = pack_int4(q)
    for layout in _CANDIDATE_LAYOUTS:
        if torch.equal(unpack_int4(packed, 176, 2, layout), q.to(torch.uint8)):
            return layout
    raise RuntimeError(f"unknown int4 pack layout on CPU capability {torch.backends.cpu.get_cpu_capability()}")


def _nibbles(b: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """b # (B, K', bn/2) uint8 bytes of B row blocks -> (B, K', bn): [.., i] is row i of each block."""
    pair = 2 if interleaved else 3  # (B, K', 2, bn/2): row h*bn/2 + j; (B, K', bn/2, 2): row 2j + h
    return torch.stack((b & 15, b >> 4), pair).flatten(2)


def _blocks(packed: torch.Tensor, k: int, layout: Int4Layout):
    """Yield (row0, rows, bytes # (B, K, bn/2), interleaved) for the full blocks, then the tail."""
    n = packed.shape[0]
    full = n // layout.block_n * layout.block_n
    if full:
        yield 0, full, packed[:full].view(full // layout.block_n, k, layout.block_n // 2), layout.interleaved
    if n > full:
        yield full, n - full, packed[full:].view(1, k, (n - full) // 2), False


def unpack_int4(packed: torch.Tensor, n: int, k: int, layout: Int4Layout | None = None) -> torch.Tensor:
    """packed # (N, K/2) uint8 from `pack_int4` -> q # (N, K) uint8 in [0, 15], on packed's device.
    `layout` defaults to this process's (`cpu_int4_layout`)."""
    if packed.shape != (n, k // 2) or packed.dtype != torch.uint8 or n % 16 or k % 2:
        raise ValueError(f"expected a ({n}, {k // 2}) uint8 int4 pack with N % 16 == 0, K even; "
                         f"got {tuple(packed.shape)} {packed.dtype}")
    layout = layout or cpu_int4_layout()
    q = torch.empty(n, k, dtype=torch.uint8, device=packed.device)
    for row0, rows, b, interleaved in _blocks(packed.contiguous(), k, layout):
        q[row0 : row0 + rows] = _nibbles(b, interleaved).transpose(1, 2).reshape(rows, k)
    return q


def quantize_int4(weight: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric groupwise int4 in the kernel's form: weight # (N, K) any float dtype -> packed # (N, K/2)
    uint8 (`pack_int4`), scales_and_zeros # (K/group, N, 2) bfloat16 with weight[n, k] ~=
    (q[n, k] - 8) * scale[g, n] + zero[g, n], g = k // group (the kernel's formula).

    Per group, the scale is (max - min) / 15 rounded *up* to bfloat16 and zero = min + 8 * scale rounded to
    bfloat16; q is rounded against those stored values. So every weight is within half a step (scale / 2)
    of its dequantized value, or |zero| * 2^-9 (bfloat16's own rounding of the zero) if that is larger.
    Works through slabs of ~0.5M weights and never writes `weight`."""
    n, k = weight.shape
    check_int4_shape(n, k, group_size)
    weight = weight.detach()
    groups = k // group_size
    packed = torch.empty(n, k // 2, dtype=torch.uint8, device=weight.device)
    scales_and_zeros = torch.empty(groups, n, 2, dtype=torch.bfloat16, device=weight.device)
    rows = _slab_rows(k)
    for start in range(0, n, rows):
        w = weight[start : start + rows].to(torch.float32).reshape(-1, groups, group_size)  # (r, G, group)
        lo, hi = w.amin(2), w.amax(2)  # (r, G)
        exact = ((hi - lo) / 15).clamp_(min=1e-12)
        scale = exact.to(torch.bfloat16)
        scale = (scale.view(torch.int16) + (scale.float() < exact)).view(torch.bfloat16)  # round up: +1 ulp
        zero = (lo + 8 * scale.float()).to(torch.bfloat16)
        base = zero.float() - 8 * scale.float()  # the value q = 0 dequantizes to
        q = w.sub(base[..., None]).div_(scale.float()[..., None]).round_().clamp_(0, 15)
        packed[start : start + rows] = pack_int4(q.view(-1, k))
        scales_and_zeros[:, start : start + rows] = torch.stack((scale, zero), 2).transpose(0, 1)
    return packed, scales_and_zeros


def dequantize_int4_reference(packed: torch.Tensor, scales_and_zeros: torch.Tensor, n: int, k: int,
                              group_size: int, layout: Int4Layout | None = None) -> torch.Tensor:
    """The oracle: (q - 8) * scale + zero in float32 over the whole matrix -> (N, K) float32."""
    q = unpack_int4(packed, n, k, layout).float()
    scale, zero = scales_and_zeros.float().repeat_interleave(group_size, 0).unbind(2)  # (K, N) each
    return (q - 8) * scale.t() + zero.t()


def dequantize_int4_rows(packed: torch.Tensor, scales_and_zeros: torch.Tensor, n: int, k: int, group_size: int,
                         ids: torch.Tensor, layout: Int4Layout | None = None) -> torch.Tensor:
    """Rows `ids` # (R,) long of the dequantized matrix -> (R, K) float32, equal to
    dequantize_int4_reference(...)[ids], reading only those rows' nibbles: row r of a full block sits in
    byte column r % (bn/2) (interleaved) or r // 2 of the block's (K, bn/2) bytes, high nibble for the
    second half (or odd rows); rows of the tail block pair 2j / 2j+1. For an int4 table that is also the
    embedding (a tied LM head)."""
    layout = layout or cpu_int4_layout()
    bn = layout.block_n
    full = n // bn * bn
    q = torch.empty(ids.shape[0], k, dtype=torch.uint8, device=packed.device)
    in_full = ids < full
    if in_full.any():
        r = ids[in_full]
        local = r % bn
        if layout.interleaved:
            col, high = local % (bn // 2), local >= bn // 2
        else:
            col, high = local // 2, local % 2 == 1
        blocks = packed[:full].view(full // bn, k, bn // 2)
        byte = blocks[r // bn, :, col]  # (R', K)
        q[in_full] = (byte >> (4 * high.to(torch.uint8))[:, None]) & 15
    if (~in_full).any():
        local = ids[~in_full] - full
        tail = packed[full:].view(k, (n - full) // 2)
        byte = tail[:, local // 2].t()  # (R'', K)
        q[~in_full] = (byte >> (4 * (local % 2).to(torch.uint8))[:, None]) & 15
    scale, zero = scales_and_zeros[:, ids].float().repeat_interleave(group_size, 0).unbind(2)  # (K, R) each
    return (q.float() - 8) * scale.t() + zero.t()


def dequantize_int4_t(packed: torch.Tensor, scales_and_zeros: torch.Tensor, n: int, k: int, group_size: int,
                      dtype: torch.dtype, layout: Int4Layout | None = None) -> torch.Tensor:
    """The fast path of the same: -> W^T # (K, N) in `dtype`, contiguous. W^T because the layout is
    k-major inside each row block, so a chunk of k decodes to whole contiguous runs of n (W would need an
    element-wise transpose); F.linear takes W^T.t() at the same GEMM speed. Chunks of ~0.5M weights,
    computed in float32 (q * scale + (zero - 8 * scale)) and rounded once to `dtype`."""
    layout = layout or cpu_int4_layout()
    groups = k // group_size
    out = torch.empty(k, n, dtype=dtype, device=packed.device)
    scale, zero = scales_and_zeros.float().unbind(2)  # (G, N) each
    scale, base = scale.view(groups, 1, n), (zero - 8 * scale).view(groups, 1, n)
    for row0, rows, b, interleaved in _blocks(packed.contiguous(), k, layout):
        block = b.shape[2] * 2
        # Chunk over groups of k, and over row blocks too when one group of all N rows is too big (LM head).
        gc = max(1, _CHUNK // (group_size * rows))
        bc = max(1, _CHUNK // (group_size * block * gc))
        for g0 in range(0, groups, gc):
            g1 = min(groups, g0 + gc)
            for b0 in range(0, b.shape[0], bc):
                b1 = min(b.shape[0], b0 + bc)
                n0, n1 = row0 + b0 * block, row0 + b1 * block
                nib = _nibbles(b[b0:b1, g0 * group_size : g1 * group_size], interleaved)  # (B', kc, bn)
                w = torch.empty(g1 - g0, group_size, n1 - n0, device=packed.device)  # (G', group, N') float32
                w.view(-1, b1 - b0, block).copy_(nib.transpose(0, 1))  # to k-major and to float in one pass
                torch.addcmul(base[g0:g1, :, n0:n1], w, scale[g0:g1, :, n0:n1], out=w)
                out[g0 * group_size : g1 * group_size, n0:n1] = w.view(-1, n1 - n0)
    return out


class Int4Linear(nn.Module):
    """Weight-only int4 linear holding only the packed nibbles `weight` # (N, K/2) uint8 and the per-group
    bfloat16 `scales_and_zeros` # (K/group, N, 2); the bias stays in the model's dtype. Output in the
    input's dtype. The CPU kernel serves <= 128 rows; longer prefills, and any other device, dequantize to
    a transient bfloat16 W^T and run a GEMM (float32 with `upcast`, see loader.load_model)."""

    upcast = False

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 group_size: int = 128, device=None) -> None:
        super().__init__()
        check_int4_shape(out_features, in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.layout = cpu_int4_layout()  # what this process's packer writes; a constant of the format

        def empty(*shape, dtype):
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)

        self.weight = empty(out_features, in_features // 2, dtype=torch.uint8)
        self.scales_and_zeros = empty(in_features // group_size, out_features, 2, dtype=torch.bfloat16)
        self.bias = empty(out_features, dtype=dtype) if bias else None

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                   group_size: int = 128) -> Int4Linear:
        """Raises ValueError for a shape the kernel cannot take (see `check_int4_shape`)."""
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, bias is not None, dtype, group_size, "meta")
        module.set_weight(weight)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        return module

    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize a float weight # (N, K) in place of this module's (on the weight's device)."""
        packed, scales_and_zeros = quantize_int4(weight.detach(), self.group_size)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.scales_and_zeros = nn.Parameter(scales_and_zeros, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        kernels = native.kernels() if x.device.type == "cpu" and x.numel() == self.in_features else None
        if kernels is not None and self.layout == native_layout(kernels):  # the decode step: float32
            # activations (the kernel takes each group of them as int16 itself), the bias added in float32
            bias = None if self.bias is None else self.bias.float()
            y = kernels.gemv_int4(self.weight, self.scales_and_zeros, x.reshape(-1).float().contiguous(), bias,
                                  self.group_size)
            return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        flat = x.reshape(-1, x.shape[-1])  # (rows, K)
        if flat.device.type == "cpu" and flat.shape[0] <= _INT4_KERNEL_ROWS:
            # torch's kernel wants contiguous bfloat16 activations (and bfloat16 scales)
            rows = flat.contiguous().to(torch.bfloat16)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.weight, self.group_size, self.scales_and_zeros)
        elif upcasts(self, x):  # one transient float32 copy of W^T: a float32 GEMM (bfloat16 x upcast exactly)
            y = F.linear(flat.float(), self._dequantize_t(torch.float32).t())
        else:  # a long prefill, or a device without the CPU kernel: one transient bfloat16 copy of W^T
            y = F.linear(flat.to(torch.bfloat16), self._dequantize_t(torch.bfloat16).t())
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def decode_call(self, x: torch.Tensor, y: torch.Tensor):
        """forward's native one-row product bound to x # (K,) and y # (N,) float32 (model/native_step.py),
        or None (no native kernels or not their pack, or a model in another dtype)."""
        kernels = native.kernels()
        if (kernels is None or self.layout != native_layout(kernels) or x.dtype != torch.float32
                or (self.bias is not None and self.bias.dtype != x.dtype)):
            return None
        return kernels.bind_gemv_int4(self.weight, self.scales_and_zeros, self.bias, x, y, self.group_size)

    def _dequantize_t(self, dtype: torch.dtype) -> torch.Tensor:  # (K, N)
        return dequantize_int4_t(self.weight, self.scales_and_zeros, self.out_features, self.in_features,
                                 self.group_size, dtype, self.layout)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # (N, K), a transposed view
        return self._dequantize_t(dtype).t()

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The oracle: dequantize to float32 the plain way, plain matmul in float32."""
        w = dequantize_int4_reference(self.weight, self.scales_and_zeros, self.out_features, self.in_features,
                                      self.group_size, self.layout)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), w, bias).to(x.dtype)


class Int4Embedding(nn.Module):
    """Token embeddings read from a tied LM head's int4 table (the 3B ties them): one packed copy serves
    both, each looked-up row dequantized from its own nibbles and group scales, as the head's oracle sees
    it (`dequantize_int4_rows`)."""

    def __init__(self, head: Int4Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = head.weight  # (V, D/2) uint8, the same Parameter as the head's
        self.scales_and_zeros = head.scales_and_zeros  # (D/group, V, 2) bfloat16
        self.vocab, self.dim = head.out_features, head.in_features
        self.group_size, self.layout = head.group_size, head.layout
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (...,) long -> (..., D)
        rows = dequantize_int4_rows(self.weight, self.scales_and_zeros, self.vocab, self.dim, self.group_size,
                                    ids.reshape(-1), self.layout)
        return rows.to(self.dtype).view(*ids.shape, self.dim)
