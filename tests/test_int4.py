"""Int4 weight-only linears against their oracles: the pack layout against a loop-by-loop packer, unpack
against pack, the CPU kernel and the dequantize-then-GEMM prefill path against the float32 reference,
the quantization error against half a step, and the module holding one packed copy of the weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwenvl_cli.model.int4 import (
    _CANDIDATE_LAYOUTS,
    Int4Layout,
    Int4Linear,
    cpu_int4_layout,
    dequantize_int4_reference,
    dequantize_int4_t,
    pack_int4,
    quantize_int4,
    unpack_int4,
)


def _random_q(n: int, k: int, seed: int = 0) -> torch.Tensor:  # (N, K) uint8 in [0, 15]
    return torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _pack_by_loops(q: torch.Tensor, layout: Int4Layout) -> torch.Tensor:
    """The layout as Int4Layout's docstring states it, one byte at a time: q # (N, K) -> (N, K/2) uint8."""
    n, k = q.shape
    out = torch.zeros(n * k // 2, dtype=torch.uint8)
    for row0 in range(0, n, layout.block_n):
        rows = min(layout.block_n, n - row0)
        interleaved = layout.interleaved and rows == layout.block_n  # a partial tail block pairs 2j, 2j+1
        for kk in range(k):
            for j in range(rows // 2):
                lo, hi = (j, j + rows // 2) if interleaved else (2 * j, 2 * j + 1)
                byte = int(q[row0 + lo, kk]) | int(q[row0 + hi, kk]) << 4
                out[row0 * k // 2 + kk * rows // 2 + j] = byte
    return out.view(n, k // 2)


def _linear(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:  # weight (N, K), bias (N,)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * k**-0.5, torch.randn(n, generator=g)


def _x(shape, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --- the layout -------------------------------------------------------------------------------------------


def test_this_cpu_packs_to_a_known_layout_byte_for_byte():
    # 2 blocks of 64 and a 48-row tail (AVX512), 5 blocks of 32 and a 16-row tail (AVX2 / no SIMD).
    q = _random_q(176, 4)
    layout = cpu_int4_layout()
    assert layout in _CANDIDATE_LAYOUTS
    assert torch.equal(pack_int4(q), _pack_by_loops(q, layout))


def test_pack_layout_by_hand_on_avx512():
    if cpu_int4_layout() != Int4Layout(64, True):
        pytest.skip("not the AVX512 kernel")
    n = torch.arange(64)
    q = torch.stack((n % 16, n // 16), 1)  # (64, 2): row n holds (n mod 16, n div 16)
    packed = pack_int4(q).flatten()  # k = 0 in bytes 0..31, k = 1 in bytes 32..63
    # Byte j of a k holds row j (low nibble) and row j + 32 (high), so at k = 1 (the row's div 16):
    assert packed[32 + 5] == 0x20  # rows 5 (0) and 37 (2)
    assert packed[32 + 20] == 0x31  # rows 20 (1) and 52 (3)
    assert packed[17] == 0x11  # k = 0 (mod 16): rows 17 and 49 are both 1


@pytest.mark.parametrize("layout", _CANDIDATE_LAYOUTS, ids=str)
@pytest.mark.parametrize("n, k", [(16, 2), (48, 8), (64, 6), (96, 4), (176, 4)])
def test_unpack_inverts_every_known_layout(layout, n, k):
    q = _random_q(n, k, seed=n + k)
    assert torch.equal(unpack_int4(_pack_by_loops(q, layout), n, k, layout), q)


@pytest.mark.parametrize("n, k", [(16, 128), (64, 128), (96, 256), (80, 384), (176, 128), (2048, 512),
                                  (3 * 64 + 48, 11008)])
def test_unpack_of_pack_is_the_identity(n, k):
    q = _random_q(n, k, seed=n)
    assert torch.equal(unpack_int4(pack_int4(q), n, k), q)


def test_unpack_of_pack_is_the_identity_on_the_lm_head_shape():
    # 151936 rows: many pack slabs (the packer works through ~0.5M weights at a time), one tail-free grid.
    q = _random_q(151936, 512, seed=7)
    assert torch.equal(unpack_int4(pack_int4(q), 151936, 512), q)


def test_pack_rejects_bad_values_and_shapes():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(torch.full((16, 2), 16))
    with pytest.raises(ValueError, match="24x2"):
        pack_int4(torch.zeros(24, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\(16, 2\)"):
        unpack_int4(torch.zeros(16, 3, dtype=torch.uint8), 16, 4)


# --- quantization -----------------------------------------------------------------------------------------


def test_quantize_a_group_that_sits_on_the_grid_exactly():
    # Every group cycles -1.00, -0.75, ..., 2.75: min -1, max 2.75, so scale = 3.75 / 15 = 0.25 and
    # zero = min + 8 * scale = 1.0 (both exact in bfloat16), q = 0..15, and it dequantizes exactly.
    w = (torch.arange(128) % 16 * 0.25 - 1).repeat(16, 2)  # (16, 256): 2 groups a row
    packed, sz = quantize_int4(w, group_size=128)
    assert packed.shape == (16, 128) and packed.dtype == torch.uint8
    assert sz.shape == (2, 16, 2) and sz.dtype == torch.bfloat16
    assert torch.equal(sz[..., 0], torch.full((2, 16), 0.25, dtype=torch.bfloat16))
    assert torch.equal(sz[..., 1], torch.full((2, 16), 1.0, dtype=torch.bfloat16))
    assert torch.equal(unpack_int4(packed, 16, 256), (torch.arange(256) % 16).repeat(16, 1).to(torch.uint8))
    assert torch.equal(dequantize_int4_reference(packed, sz, 16, 256, 128), w)


@pytest.mark.parametrize("group_size", [32, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_is_within_half_a_step_of_each_group(group_size, dtype):
    n, k = 96, 512
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(3)) * 0.02 + 0.01).to(dtype)
    before = w.clone()
    packed, sz = quantize_int4(w, group_size)
    assert torch.equal(w, before)  # the float weight is not written
    err = (dequantize_int4_reference(packed, sz, n, k, group_size) - w.float()).abs()  # (N, K)
    scale, zero = sz.float().repeat_interleave(group_size, 0).unbind(2)  # (K, N) each
    # Half a step of the stored (rounded-up) scale, or bfloat16's rounding of the stored zero if larger.
    bound = torch.maximum(scale.t() / 2, zero.t().abs() * 2**-9) * (1 + 1e-6)
    assert (err <= bound).all()
    assert err.max() > 0.3 * scale.max() / 2  # ... and the bound is not vacuous
    # The stored scale is (max - min) / 15 rounded up, so the 16 levels span each group with no clamping.
    groups = w.float().view(n, k // group_size, group_size)
    assert (sz[..., 0].float().t() >= (groups.amax(2) - groups.amin(2)) / 15).all()


def test_quantize_rejects_shapes_the_kernel_cannot_take():
    with pytest.raises(ValueError, match="24x128"):
        quantize_int4(torch.zeros(24, 128))  # N not a multiple of 16
    with pytest.raises(ValueError, match="64x192"):
        quantize_int4(torch.zeros(64, 192))  # K not a multiple of the group
    with pytest.raises(ValueError, match="group size 16"):
        quantize_int4(torch.zeros(64, 128), group_size=16)
    with pytest.raises(ValueError, match="24x128"):
        Int4Linear.from_float(torch.zeros(24, 128), None, torch.float32)


# --- the module -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 3, 16, 40, 128, 129, 200])  # <= 128 rows: the kernel; more: dequantize + GEMM
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, k", [(96, 256), (176, 384)])  # 176: two 64-row blocks and a 48-row tail
def test_int4_linear_fast_paths_equal_the_float32_oracle(rows, dtype, n, k):
    weight, bias = _linear(n, k, seed=rows)
    layer = Int4Linear.from_float(weight, bias, dtype)
    x = _x((rows, k)).to(dtype)
    y, ref = layer(x), layer.reference(x)
    assert y.dtype == dtype and y.shape == (rows, n)
    # bfloat16 activations and output: 2^-8 relative per rounding, a few roundings deep.
    assert (y.float() - ref.float()).abs().max() <= 1e-2 * ref.float().abs().max()
    # ... and the quantized layer tracks the float one within int4's error (~10% RMS for normal weights).
    exact = F.linear(x.float(), weight, bias)
    assert (y.float() - exact).pow(2).mean().sqrt() < 0.15 * (exact - bias).std()


def test_int4_linear_takes_the_kernel_up_to_128_rows_and_dequantizes_beyond():
    layer = Int4Linear.from_float(_linear(96, 256, seed=8)[0], None, torch.bfloat16)
    for rows, kernel in ((128, True), (129, False)):
        x = _x((rows, 256)).to(torch.bfloat16)
        if kernel:
            expected = torch.ops.aten._weight_int4pack_mm_for_cpu(x, layer.weight, 128, layer.scales_and_zeros)
        else:
            expected = F.linear(x, layer.dequantize(torch.bfloat16))
        assert torch.equal(layer(x), expected)


def test_int4_linear_keeps_leading_dims_and_adds_the_bias():
    weight, bias = _linear(64, 128, seed=5)
    with_bias = Int4Linear.from_float(weight, bias, torch.float32)
    without = Int4Linear.from_float(weight, None, torch.float32)
    x = _x((2, 5, 128))  # 10 rows: the kernel
    y = with_bias(x)
    assert y.shape == (2, 5, 64) and without.bias is None
    # The bias is added to the kernel's bfloat16 output in bfloat16 (as Int8Linear does): exactly that sum.
    assert torch.equal(y, (without(x).bfloat16() + bias.bfloat16()).float())
    ref = with_bias.reference(x)
    assert (y - ref).abs().max() <= 1e-2 * ref.abs().max()
    assert with_bias.bias.dtype == torch.float32
    assert Int4Linear.from_float(weight, bias, torch.bfloat16).bias.dtype == torch.bfloat16


@pytest.mark.parametrize("n, k", [(96, 256), (176, 384), (4096 + 48, 128)])  # the last: several n chunks
def test_fast_dequantize_equals_the_oracle(n, k):
    packed, sz = quantize_int4(_linear(n, k, seed=2)[0])
    ref = dequantize_int4_reference(packed, sz, n, k, 128)
    fast = dequantize_int4_t(packed, sz, n, k, 128, torch.float32)
    assert fast.shape == (k, n) and fast.is_contiguous()
    torch.testing.assert_close(fast.t(), ref, rtol=1e-6, atol=1e-7)
    # bfloat16: the same float32 values, rounded once.
    assert torch.equal(dequantize_int4_t(packed, sz, n, k, 128, torch.bfloat16), fast.to(torch.bfloat16))


def test_the_module_holds_one_packed_copy():
    n, k = 2048, 512
    weight, bias = _linear(n, k, seed=4)
    layer = Int4Linear.from_float(weight, bias, torch.bfloat16)
    tensors = dict(layer.named_parameters()) | dict(layer.named_buffers())
    assert set(tensors) == {"weight", "scales_and_zeros", "bias"}
    assert layer.weight.shape == (n, k // 2) and layer.weight.dtype == torch.uint8
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    # N*K/2 bytes of nibbles, plus 2 bfloat16 per group of 128 (1/16 more) and the bfloat16 bias.
    assert total == n * k // 2 + (k // 128) * n * 2 * 2 + n * 2
    assert total < 1.08 * (n * k // 2)  # 6.25% scales and zeros, 0.8% bias at K = 512


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_int4_linear_on_cuda_dequantizes_its_cpu_pack():
    weight, bias = _linear(176, 256, seed=6)
    layer = Int4Linear.from_float(weight, bias, torch.bfloat16)
    x = _x((3, 256)).to(torch.bfloat16)
    ref = layer.reference(x)
    y = layer.to("cuda")(x.cuda())
    assert y.device.type == "cuda" and y.dtype == torch.bfloat16
    assert (y.float().cpu() - ref.float()).abs().max() <= 1e-2 * ref.float().abs().max()


@pytest.mark.parametrize("n", [176, 240, 256])  # 2 blocks + a 48-row tail, 3 blocks + 48, whole blocks
def test_dequantize_rows_reads_each_row_of_every_layout(n):
    from qwenvl_cli.model.int4 import _CANDIDATE_LAYOUTS, dequantize_int4_reference, dequantize_int4_rows

    k, group = 256, 64
    g = torch.Generator().manual_seed(n)
    q = torch.randint(0, 16, (n, k), generator=g)
    sz = torch.randn(k // group, n, 2, generator=g).bfloat16()
    ids = torch.tensor([0, 1, 31, 32, 33, 63, 64, n - 49, n - 48, n - 17, n - 2, n - 1, 5, 5])
    for layout in _CANDIDATE_LAYOUTS:
        packed = _pack_by_loops(q, layout)
        want = dequantize_int4_reference(packed, sz, n, k, group, layout)[ids]
        assert torch.equal(dequantize_int4_rows(packed, sz, n, k, group, ids, layout), want), layout
