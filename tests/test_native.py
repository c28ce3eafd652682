"""The native decode kernels (model/native) against float64 products on awkward shapes, NativeLinear against
F.linear, the model on them against the plain oracle, and the ways they go missing (no compiler, a failed
build, a corrupt cache, QWENVL_NATIVE=0), each leaving torch's kernels in charge with a reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from oracles import assert_greedy_as_the_oracle
from qwenvl_cli.generate import Generator, SamplingParams, reference_generate
from qwenvl_cli.model import native
from qwenvl_cli.model.int4 import Int4Layout
from qwenvl_cli.model.loader import load_model, open_checkpoint
from qwenvl_cli.model.quant import NativeLinear, quantize_int8

PROMPT = [151644, 872, 198, 3838, 374, 279, 6722, 315, 9625, 30, 151645, 198, 151644, 77091, 198]
# Rows around the 8-row blocks, K around the 16/32/64-element vectors; the last shapes are big enough to
# run on both threads; K = 4500 takes the AVX2 int8 loop's 8-row blocks (longer rows than 4096), with a
# short last group of activations (4500 = 35 * 128 + 20).
SHAPES = [(1, 1), (7, 15), (8, 16), (9, 17), (17, 31), (33, 64), (5, 100), (64, 2048), (1000, 160), (17, 4500)]


@pytest.fixture(scope="module", params=native.usable_sets() or ["none"])
def kernels(request):
    """Each instruction set's loops that this CPU runs, in turn (an AVX-512 machine tests the AVX2 ones as
    well), made the process's kernels while the module's tests use them (so models loaded in them run on
    that set); a skip only where the platform rules them out (not x86-64 Linux with AVX2 and FMA, no
    compiler): a build or check that fails on a capable machine fails the tests."""
    status = native.status()
    if status.kernels is None:
        if status.broken and "no C compiler" not in status.reason:
            pytest.fail(status.reason)
        pytest.skip(f"native kernels unavailable here: {status.reason}")
    chosen = status.kernels if request.param == status.kernels.isa else native.load(request.param)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(native, "status", lambda: native.Status(chosen, chosen.describe()))
        yield chosen


def _ulp_bf16(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at |x| (2^(e-7) for x in [2^e, 2^(e+1)))."""
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp(min=2**-100))) - 7)


@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_float32_gemv_equals_the_float64_product(kernels, n, k, bias):
    g = torch.Generator().manual_seed(n * 1000 + k)
    w, x, b = torch.randn(n, k, generator=g), torch.randn(k, generator=g), torch.randn(n, generator=g)
    got = kernels.gemv(w, x, b if bias else None)
    want = w.double() @ x.double() + (b.double() if bias else 0)
    assert got.dtype == torch.float32 and got.shape == (n,)
    # float32 sums: within a few ulps of the terms' magnitude
    bound = 4 * k * 2**-24 * (w.double().abs() @ x.double().abs() + (b.double().abs() if bias else 0))
    assert ((got.double() - want).abs() <= bound + 1e-30).all()


@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_bfloat16_gemv_is_the_float32_sum_rounded_once(kernels, n, k, bias):
    g = torch.Generator().manual_seed(n * 1000 + k + 1)
    w, x, b = (torch.randn(s, generator=g).bfloat16() for s in ((n, k), (k,), (n,)))
    got = kernels.gemv(w, x, b if bias else None)
    want = w.double() @ x.double() + (b.double() if bias else 0)
    assert got.dtype == torch.bfloat16 and got.shape == (n,)
    sum_error = 4 * k * 2**-24 * (w.double().abs() @ x.double().abs() + (b.double().abs() if bias else 0))
    # one rounding to bfloat16 (half an ulp) on top of the float32 sum's own error
    assert ((got.double() - want).abs() <= _ulp_bf16(want) / 2 + sum_error + 1e-30).all()


@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_bfloat16_weights_under_float32_activations_are_their_exact_upcast(kernels, n, k, bias):
    """A float32 model on a bfloat16 checkpoint keeps the weights in bfloat16: the product is that of their
    float32 upcast within float32 summation error, and on activations and bias that bfloat16 holds exactly
    it is the bfloat16 kernel's float32 sum (same order, same bits) before that kernel's one rounding."""
    g = torch.Generator().manual_seed(n * 1000 + k + 2)
    w = torch.randn(n, k, generator=g).bfloat16()
    x, b = torch.randn(k, generator=g), torch.randn(n, generator=g)
    got = kernels.gemv(w, x, b if bias else None)
    assert got.dtype == torch.float32 and got.shape == (n,)
    want = w.double() @ x.double() + (b.double() if bias else 0)
    bound = 4 * k * 2**-24 * (w.double().abs() @ x.double().abs() + (b.double().abs() if bias else 0))
    assert ((got.double() - want).abs() <= bound + 1e-30).all()
    xb, bb = x.bfloat16(), b.bfloat16()
    widened = kernels.gemv(w, xb.float(), bb.float() if bias else None)
    narrow = kernels.gemv(w, xb, bb if bias else None)
    if kernels.bf16_set == "avx2":  # AVX512-BF16 pairs (vdpbf16ps) sum otherwise
        assert torch.equal(widened.bfloat16(), narrow)


def test_mixed_gemv_refuses_what_it_does_not_take(kernels):
    w = torch.randn(8, 16).bfloat16()
    with pytest.raises(ValueError):
        kernels.gemv(w, torch.randn(16).half(), None)  # float16 activations
    with pytest.raises(ValueError):
        kernels.gemv(w, torch.randn(16), torch.randn(8).bfloat16())  # a bias not in the activations' dtype
    with pytest.raises(ValueError):
        kernels.gemv(w.float(), torch.randn(16).bfloat16(), None)  # float32 weights under bfloat16


@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_int8_gemv_applies_row_scales_and_bias_in_float32(kernels, n, k, bias):
    """The product of its activations (float32 on AVX-512, quantized_activations on AVX2) with the int8
    rows, scaled per row, within float32 summation error; activations spread over 2^-6..2^6 so that a group
    taken with another's power of two shows."""
    g = torch.Generator().manual_seed(n * 1000 + k + 2)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = (torch.rand(n, generator=g) / 64).bfloat16()
    x = torch.randn(k, generator=g) * torch.exp2(torch.randint(-6, 7, (k,), generator=g).float())
    b = torch.randn(n, generator=g)
    got = kernels.gemv_int8(q, s, x, b if bias else None)
    xq = x.double() if kernels.int8_group is None else native.quantized_activations(x, kernels.int8_group)
    want = (q.double() @ xq) * s.double() + (b.double() if bias else 0)
    bound = 4 * k * 2**-24 * ((q.double().abs() @ x.double().abs()) * s.double() + (b.double().abs() if bias else 0))
    assert got.dtype == torch.float32 and ((got.double() - want).abs() <= bound + 1e-30).all()


@pytest.mark.parametrize("k, group", [(1, 128), (300, 128), (256, 32)])
def test_quantized_activations_round_each_group_to_16_bits_of_its_largest(k, group):
    """The int16 form of x (gemv.c: quantize_x): off by at most 2^-15 of its group's largest |x|, exact for
    bfloat16 values within 2^7 of it; a group of zeros stays zero, one of subnormals stays finite."""
    g = torch.Generator().manual_seed(k)
    x = torch.randn(k, generator=g) * torch.exp2(torch.randint(-20, 20, (k,), generator=g).float())
    xq = native.quantized_activations(x, group)
    top = torch.nn.functional.pad(x.double().abs(), (0, -k % group)).view(-1, group).amax(1)
    top = top.repeat_interleave(group)[:k]
    assert ((xq - x.double()).abs() <= top * 2**-15).all()
    near = x.bfloat16().float()  # 8 significant bits: within 2^7 of the largest, a multiple of its step
    exact = near.double().abs() >= top * 2**-7
    assert torch.equal(native.quantized_activations(near, group)[exact], near.double()[exact])
    tiny = torch.cat([torch.full((group,), 3e-41), torch.zeros(group)])
    assert torch.allclose(native.quantized_activations(tiny, group), tiny.double(), rtol=1e-4, atol=0)


def test_nan_and_infinity_reach_the_output(kernels):
    w = torch.ones(9, 40)
    x = torch.ones(40)
    x[3] = float("nan")
    assert kernels.gemv(w, x, None).isnan().all()
    assert kernels.gemv(w.bfloat16(), x.bfloat16(), None).isnan().all()
    big = torch.full((40,), 3e38).bfloat16()
    assert kernels.gemv(w.bfloat16(), big, None).isinf().all()  # the bfloat16 rounding overflows to inf
    assert kernels.gemv_int8(w.to(torch.int8), torch.ones(9).bfloat16(), x, None).isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 96), (1, 1, 96), (5, 96), (2, 3, 96)])
def test_native_linear_equals_f_linear_and_keeps_the_weight_tensor(kernels, dtype, shape):
    assert kernels.supports(dtype)
    torch.manual_seed(0)
    w, b = torch.randn(200, 96).to(dtype), torch.randn(200).to(dtype)
    lin = NativeLinear(w, b, kernels)
    assert lin.weight.data_ptr() == w.data_ptr()  # as loaded: no copy
    x = torch.randn(shape).to(dtype)
    with torch.inference_mode():
        got, want = lin(x), lin.reference(x)
    assert got.shape == (*shape[:-1], 200) and got.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2**-7)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_model_on_native_kernels_generates_what_the_oracle_does(make_ckpt, kernels, dtype, quantize):
    """Untied and tied (the head is the embedding table itself: one tensor) checkpoints: cached generation on
    the native kernels gives the no-cache oracle's greedy tokens, and float32 logits match the plain model."""
    for tied in (False, True):
        ckpt = open_checkpoint(make_ckpt(tied=tied, dtype="bfloat16", shards=3) if tied else make_ckpt())
        fast = load_model(ckpt, "cpu", dtype, quantize=quantize)
        if quantize is None:
            assert isinstance(fast.lm_head, NativeLinear)
            assert isinstance(fast.model.layers[0].mlp.down_proj, NativeLinear)
            if tied:
                assert fast.lm_head.weight.data_ptr() == fast.model.embed_tokens.weight.data_ptr()
        prompt = fast.make_prompt(PROMPT)
        assert_greedy_as_the_oracle(fast, prompt, SamplingParams(max_new_tokens=8))
        if dtype == torch.float32 and quantize is None:
            plain = load_model(ckpt, "cpu", dtype, pack=False)
            with torch.inference_mode():
                from qwenvl_cli.model.rope import signed_sin
                from qwenvl_cli.model.text import KVCache

                caches = [KVCache.allocate(m.config.text, 1, prompt.length + 1, "cpu", dtype) for m in (fast, plain)]
                cos, sin = fast.decode_tables(torch.arange(prompt.length, prompt.length + 1) + prompt.rope_delta)
                steps = []
                for model, cache in zip((fast, plain), caches):
                    Generator(model).prefill(model.make_prompt(PROMPT), cache)
                    token = torch.tensor([[9707]])
                    steps.append(Generator(model).decode_step(token, prompt.length, cos, signed_sin(sin), cache))
            torch.testing.assert_close(steps[0], steps[1], atol=1e-4, rtol=0)  # the parity standard


# ---- the bound decode step (model/native_step.py) against the modules' (TextModel.decode)


def _steps(model, native_step: bool, n: int = 4, past: int = 20):
    """n decode steps after `past` random cache entries: the logits of each and the cache."""
    from qwenvl_cli.model.rope import signed_sin
    from qwenvl_cli.model.text import KVCache

    g = torch.Generator().manual_seed(7)
    cache = KVCache.allocate(model.config.text, 1, past + n, "cpu", model.dtype)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    cos, sin = model.decode_tables(torch.arange(past, past + n) + 3)
    gen, out = Generator(model, step="native" if native_step else "modules"), []
    with torch.inference_mode():
        for i in range(n):
            token = torch.tensor([[9707 + 1000 * i]])
            out.append(gen.decode_step(token, past + i, cos[:, i : i + 1], signed_sin(sin[:, i : i + 1]), cache))
    return out, cache


@pytest.mark.parametrize("dtype, quantize, tol", [
    (torch.float32, None, 1e-5), (torch.bfloat16, None, 2**-7), (torch.float32, "int8", 2e-3),
    (torch.float32, "int4", 2e-3), (torch.bfloat16, "int8", 2**-7),
])
def test_native_step_answers_what_the_module_step_does(make_ckpt, kernels, dtype, quantize, tol):
    """Step after step, the bound step's logits are the module path's within `tol` of their largest (float32:
    silu's exp is libm's, not torch's; int8 and int4 take activations as int16, where an ulp can move a
    rounding), and the cache slots it writes hold the same keys and values; the first step's first layer,
    before any silu, to the bit. A bfloat16 model's int8 matrices (no bound call) run as their modules."""
    from qwenvl_cli.model.native_step import NativeStep

    for tied in (False, True):
        ckpt = open_checkpoint(make_ckpt(tied=tied, dtype="bfloat16", shards=3) if tied else make_ckpt())
        model = load_model(ckpt, "cpu", dtype, quantize=quantize)
        fast, fast_cache = _steps(model, True)
        slow, slow_cache = _steps(model, False)
        step = NativeStep.build(model, fast_cache)
        assert step is not None and len(step.calls) >= 9 * model.config.text.num_hidden_layers
        for i, (a, b) in enumerate(zip(fast, slow)):
            assert a.dtype == torch.float32 and a.shape == b.shape == (1, model.config.text.vocab_size)
            assert (a - b).abs().max() <= tol * b.abs().max(), f"step {i}"
        assert torch.equal(fast_cache.k[0, :, :, 20], slow_cache.k[0, :, :, 20])
        assert torch.equal(fast_cache.v[0, :, :, 20], slow_cache.v[0, :, :, 20])
        torch.testing.assert_close(fast_cache.k, slow_cache.k, atol=tol * 8, rtol=tol)
        torch.testing.assert_close(fast_cache.v, slow_cache.v, atol=tol * 8, rtol=tol)


def test_native_step_is_not_bound_where_it_does_not_apply(make_ckpt, kernels):
    """A batch's cache, or a cache in another dtype than the model's: the module path serves."""
    from qwenvl_cli.model.native_step import NativeStep
    from qwenvl_cli.model.text import KVCache

    model = load_model(open_checkpoint(make_ckpt()), "cpu", torch.float32)
    cfg = model.config.text
    assert NativeStep.build(model, KVCache.allocate(cfg, 2, 8, "cpu", torch.float32)) is None
    assert NativeStep.build(model, KVCache.allocate(cfg, 1, 8, "cpu", torch.bfloat16)) is None
    step = NativeStep.build(model, KVCache.allocate(cfg, 1, 8, "cpu", torch.float32))
    cos, sin = model.decode_tables(torch.arange(8, 9))
    with pytest.raises(IndexError):
        step.step(torch.tensor([[1]]), 8, cos, sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kv_rotates_as_the_module_step_and_writes_the_cache_slot(kernels, dtype):
    """step.c's rope_kv against text.Attention.decode's torch ops, to the bit: q heads out in float32, the
    rotated k heads and the v heads in slot `index` of every kv head, nothing else of the cache touched."""
    h, kv, hd, max_len, index = 4, 2, 32, 9, 5
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn((h + 2 * kv) * hd, generator=g).to(dtype)
    cos, sin = torch.randn(hd, generator=g).to(dtype), torch.randn(hd, generator=g).to(dtype)
    k, v = torch.zeros(1, kv, max_len, hd, dtype=dtype), torch.zeros(1, kv, max_len, hd, dtype=dtype)
    q = torch.empty(h, hd)
    state = native.StepState(index, cos.data_ptr(), sin.data_ptr())
    kernels.bind_rope_kv(state, qkv, h, k, v, q)()
    qk = qkv[: (h + kv) * hd].view(h + kv, hd)
    want = qk * cos + qk.roll(hd // 2, -1) * sin
    assert torch.equal(q, want[:h].float())
    assert torch.equal(k[0, :, index], want[h:]) and torch.equal(v[0, :, index], qkv[(h + kv) * hd :].view(kv, hd))
    assert not k[0, :, :index].any() and not v[0, :, index + 1 :].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_norm_silu_and_narrowing_ops_are_the_torch_ops(kernels, dtype):
    """add + rms_norm to the bit (x updated in place, as `x = x + o` before the next norm); silu * up within
    an ulp of the dtype (libm's exp against torch's); float32 -> bfloat16 to the bit."""
    from qwenvl_cli.model.vision import RMSNorm

    g = torch.Generator().manual_seed(2)
    x, d = (3 * torch.randn(96, generator=g)).to(dtype), torch.randn(96, generator=g).to(dtype)
    norm = RMSNorm(96, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(96, generator=g))
    want_x = x + d
    y, x0 = torch.empty_like(x), x.clone()
    kernels.bind_rms_norm(x, norm.weight, norm.eps, y, d)()
    with torch.inference_mode():
        assert torch.equal(x, want_x) and torch.equal(y, norm.reference(want_x))
        kernels.bind_rms_norm(x0, norm.weight, norm.eps, y)()
        assert torch.equal(y, norm.reference(x0))
    gu = (4 * torch.randn(2 * 96, generator=g)).to(dtype)
    act = torch.empty(96, dtype=dtype)
    kernels.bind_silu_mul(gu, act)()
    want = F.silu(gu[:96]) * gu[96:]
    ulp = torch.finfo(dtype).eps * want.abs()
    assert ((act.double() - want.double()).abs() <= 2 * ulp.double() + 1e-30).all()
    wide = torch.randn(50, generator=g) * 1e3
    narrow = torch.empty(50, dtype=torch.bfloat16)
    kernels.bind_to_bfloat16(wide, narrow)()
    assert torch.equal(narrow, wide.bfloat16())


def test_bound_calls_refuse_tensors_they_cannot_take(kernels):
    """Checked once when bound, in words: a wrong dtype, shape or a strided view is a ValueError, never a
    call reading past a tensor."""
    w, x, y = torch.randn(8, 16), torch.randn(16), torch.empty(8)
    with pytest.raises(ValueError, match="gemv"):
        kernels.bind_gemv(w, None, x.bfloat16(), y)
    with pytest.raises(ValueError, match="gemv"):
        kernels.bind_gemv(w, None, torch.randn(32)[::2], y)
    with pytest.raises(ValueError, match="silu_mul"):
        kernels.bind_silu_mul(torch.randn(15), torch.empty(8))
    with pytest.raises(ValueError, match="rms_norm"):
        kernels.bind_rms_norm(torch.randn(4), torch.ones(4), 1e-6, torch.empty(4))


def test_int8_native_path_matches_the_quantized_oracle(kernels):
    """One row through Int8Linear on the native kernel against dequantize-then-matmul in float32 (of the
    activations the kernel takes: on AVX2 their int16 form, a few ulps of float32 from x)."""
    from qwenvl_cli.model.quant import Int8Linear

    torch.manual_seed(3)
    w, b = torch.randn(300, 256) / 16, torch.randn(300)
    layer = Int8Linear.from_float(w, b, torch.float32)
    x = torch.randn(1, 1, 256)
    taken = x if kernels.int8_group is None else native.quantized_activations(x.view(-1), kernels.int8_group)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), layer.reference(taken.float().view(x.shape)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer(x), layer.reference(x), atol=1e-4, rtol=1e-4)
    q, s = quantize_int8(w)
    assert torch.equal(layer.weight, q) and torch.equal(layer.scales, s)


# int4 (N, K, group): a tail block only, one block, a block and a tail, several blocks, and shapes big enough
# to run on both threads; groups of 32 to 256.
INT4_SHAPES = [(16, 64, 32), (64, 32, 32), (80, 96, 32), (208, 256, 128), (1024, 512, 128), (3072, 512, 256),
               (960, 1024, 64)]


def _int4_kernels(kernels):
    if not kernels.int4:
        pytest.skip("this CPU's AVX-512 has no VBMI and VNNI (its AVX2 loops serve torch's AVX2 pack only)")
    return kernels


@pytest.mark.parametrize("n, k, group", INT4_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_int4_gemv_is_exact_where_every_sum_is(kernels, n, k, group, bias):
    """Integer activations (each group's int16 form is then exact), power-of-two scales and zeros on a 1/4
    grid: every product and partial sum of the kernel is a float32 number, so its result equals the float64
    product of the dequantized weights bit for bit, whatever the order of summation; a nibble read from the
    wrong row, k or half, or a scale from the wrong group, shows."""
    kernels = _int4_kernels(kernels)
    g = torch.Generator().manual_seed(n + k + group)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = torch.exp2(torch.randint(-2, 2, (k // group, n), generator=g).double())
    zero = torch.randint(-32, 33, (k // group, n), generator=g).double() / 4
    sz = torch.stack((scale, zero), 2).bfloat16()
    x = torch.randint(-4, 5, (k,), generator=g).float()
    b = torch.randint(-64, 65, (n,), generator=g).float() / 8
    w = (q.double() - 8) * scale.repeat_interleave(group, 0).t() + zero.repeat_interleave(group, 0).t()
    want = w @ x.double() + (b.double() if bias else 0)
    got = kernels.gemv_int4(native.pack_int4_spelled(q, kernels.int4_rows), sz, x, b if bias else None, group)
    assert got.dtype == torch.float32 and got.shape == (n,)
    assert torch.equal(got.double(), want)


@pytest.mark.parametrize("n, k, group", INT4_SHAPES)
def test_int4_gemv_on_real_values_is_within_its_activation_rounding(kernels, n, k, group):
    """Random values, as a checkpoint has them: within the int16 rounding of each group of x (half a step
    of 2^-14 of the group's largest |x| at most, times the weights) and float32 summation error of the
    float64 product."""
    kernels = _int4_kernels(kernels)
    g = torch.Generator().manual_seed(7 * n + k)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    sz = torch.stack((torch.rand(k // group, n, generator=g) / 50, torch.randn(k // group, n, generator=g) / 10),
                     2).bfloat16()
    x = torch.randn(k, generator=g) * torch.exp2(torch.randint(-6, 6, (k,), generator=g).float())
    scale, zero = sz.double().repeat_interleave(group, 0).unbind(2)
    w = (q.double() - 8) * scale.t() + zero.t()
    got = kernels.gemv_int4(native.pack_int4_spelled(q, kernels.int4_rows), sz, x, None, group).double()
    step = x.double().abs().view(-1, group).amax(1).repeat_interleave(group) * 2**-14  # per k, at most
    bound = w.abs() @ (step / 2) + 4 * (group + k // group) * 2**-24 * ((w.abs() + 16 * scale.t()) @ x.double().abs())
    error = (got - w @ x.double()).abs()
    assert (error <= bound).all()
    assert error.max() > 0  # not exact: the bound is what is tested


def test_int4_gemv_answers_nan_for_a_non_finite_activation_and_rejects_other_dtypes(kernels):
    kernels = _int4_kernels(kernels)
    q, sz = torch.zeros(64, 64, dtype=torch.uint8), torch.ones(2, 64, 2).bfloat16()
    for bad in (float("nan"), float("inf")):
        x = torch.ones(64)
        x[5] = bad
        assert kernels.gemv_int4(native.pack_int4_spelled(q, kernels.int4_rows), sz, x, None, 32).isnan().all()
    with pytest.raises(ValueError, match="x"):
        kernels.gemv_int4(native.pack_int4_spelled(q, kernels.int4_rows), sz, torch.ones(64).bfloat16(), None, 32)
    # a group of subnormals (its power of two is below float32's range) and a group of zeros: finite
    x = torch.cat([torch.full((32,), 3e-41), torch.zeros(32)])
    q = torch.randint(0, 16, (64, 64), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    got = kernels.gemv_int4(native.pack_int4_spelled(q, kernels.int4_rows), sz, x, None, 32)
    want = ((q.double() - 8) + 1) @ x.double()
    assert torch.isfinite(got).all() and torch.allclose(got.double(), want, rtol=1e-3, atol=1e-44)


@pytest.mark.parametrize("block_rows", [64, 32])
def test_int4_pack_spelled_out_is_torchs(block_rows):
    """native.pack_int4_spelled (the layouts gemv.c reads) against torch's packer, for the layout this
    process's torch packs to (64-row blocks in its AVX-512 build, 32 in its AVX2 one)."""
    from qwenvl_cli.model.int4 import cpu_int4_layout, pack_int4

    if cpu_int4_layout() != Int4Layout(block_rows, True):
        pytest.skip(f"torch packs int4 as {cpu_int4_layout()} here")
    q = torch.randint(0, 16, (176, 256), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    assert torch.equal(native.pack_int4_spelled(q, block_rows), pack_int4(q))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_native_path_matches_the_quantized_oracle(kernels, dtype):
    """One row through Int4Linear on the native kernel against dequantize-then-matmul in float32, within the
    kernel's int16 rounding of the activations; more rows go to torch's kernel."""
    from qwenvl_cli.model.int4 import Int4Linear, native_layout

    _int4_kernels(kernels)
    torch.manual_seed(4)
    w, b = torch.randn(320, 256) / 16, torch.randn(320)
    layer = Int4Linear.from_float(w, b, dtype)
    if layer.layout != native_layout(kernels):
        pytest.skip(f"torch packs int4 as {layer.layout} here, the {kernels.isa} kernel reads {native_layout(kernels)}")
    x = torch.randn(1, 1, 256).to(dtype)
    with torch.inference_mode():
        got, want = layer(x), layer.reference(x)
    assert got.dtype == dtype and got.shape == (1, 1, 320)
    tol = dict(atol=2e-3, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2**-7)
    torch.testing.assert_close(got, want, **tol)
    calls = []
    real = kernels.gemv_int4
    kernels.gemv_int4 = lambda *a: calls.append(1) or real(*a)
    try:
        with torch.inference_mode():
            layer(x)
            layer(torch.randn(2, 256).to(dtype))
    finally:
        del kernels.gemv_int4
    assert calls == [1]


# ---- RMSNorm ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [8, 64, 100, 512, 1280, 2048, 3584, 8192])
def test_native_rms_norm_is_the_reference_to_the_bit(kernels, dtype, dim):
    """The native RMSNorm, 50 rows at once and one at a time, against transformers' form op for op and
    against torch's rms_norm path: equal bits on 50 random rows each, so its sum of squares runs in
    torch's order (a plain 16-lane sum differs in about one row of eight)."""
    from qwenvl_cli.model.vision import RMSNorm

    g = torch.Generator().manual_seed(dim)
    norm = RMSNorm(dim, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(dim, generator=g))
    norm = norm.to(dtype)
    rows = (3 * torch.randn(50, dim, generator=g)).to(dtype)
    with torch.inference_mode():
        torch_path = norm.weight * torch.rms_norm(rows.float(), (dim,), eps=norm.eps).to(dtype)
        many = kernels.rms_norm(rows.view(5, 10, dim), norm.weight, norm.eps).view(50, dim)
        assert torch.equal(many, torch_path) and torch.equal(norm(rows), many)
        assert torch.equal(many, norm.reference(rows))
        for i in range(50):
            one = kernels.rms_norm(rows[i], norm.weight, norm.eps)
            assert torch.equal(one, norm.reference(rows[i])) and torch.equal(one, many[i]), f"row {i}"
            assert torch.equal(norm(rows[i].view(1, 1, dim)), one.view(1, 1, dim))


def test_native_rms_norm_declines_what_torch_sums_another_way(kernels):
    x, w = torch.randn(7), torch.ones(7)
    assert kernels.rms_norm(x, w, 1e-6) is None  # rows under 8 values: torch's scalar sum
    assert kernels.rms_norm(x.double(), w.double(), 1e-6) is None
    assert kernels.rms_norm(torch.randn(16), torch.ones(16).bfloat16(), 1e-6) is None


# ---- one-query attention over the cache ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv, hd, length", [(8, 2, 64, 1), (8, 2, 64, 300), (16, 2, 128, 5000),
                                                  (4, 4, 16, 37), (28, 4, 128, 1000), (4, 2, 40, 33),
                                                  (8, 2, 96, 13), (4, 1, 200, 70)])
def test_decode_attention_native_is_the_torch_form_and_sdpa(kernels, dtype, heads, kv, hd, length):
    """On views of a preallocated cache (rows of a longer buffer), as the decode step passes them: within
    float32 summation error of the two-matmul torch form and of SDPA, in the query's dtype."""
    from qwenvl_cli.model.text import decode_attention_torch

    g = torch.Generator().manual_seed(length + heads)
    cache_k = torch.randn(1, kv, length + 9, hd, generator=g).to(dtype)
    cache_v = torch.randn(1, kv, length + 9, hd, generator=g).to(dtype)
    k, v = cache_k.narrow(2, 0, length), cache_v.narrow(2, 0, length)
    q = (2 * torch.randn(1, heads, 1, hd, generator=g)).to(dtype)
    got = kernels.decode_attention(q, k, v)
    if hd % (16 if kernels.isa == "avx512" else 8):
        assert got is None  # 40: the AVX2 loops take it, the AVX-512 ones (16 lanes) decline
        return
    assert got.dtype == dtype and got.shape == (1, heads, 1, hd)
    torch_form = decode_attention_torch(q, k, v)
    sdpa = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=kv != heads).to(dtype)
    tol = dict(atol=2e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=2**-7)
    torch.testing.assert_close(got, torch_form, **tol)
    torch.testing.assert_close(got, sdpa, **tol)


def test_decode_attention_native_declines_what_it_does_not_take(kernels):
    q, k = torch.randn(1, 4, 1, 20), torch.randn(1, 2, 5, 20)  # head size not a multiple of 16 nor of 8
    assert kernels.decode_attention(q, k, k) is None
    q, k = torch.randn(2, 4, 1, 32), torch.randn(2, 2, 5, 32)  # a batch
    assert kernels.decode_attention(q, k, k) is None
    q, k = torch.randn(1, 4, 1, 32).double(), torch.randn(1, 2, 5, 32).double()
    assert kernels.decode_attention(q, k, k) is None


# ---- the vision tower's attention on the native gather/scatter ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grids", [((1, 10, 14),), ((2, 8, 12), (1, 6, 6))])
def test_vision_attention_native_path_is_the_torch_path_bit_for_bit(kernels, dtype, grids):
    """Windows with padding (a 10x14 grid leaves partial windows), and frames of a video beside an image:
    the native rotary + gather, the same SDPA call and the scatter give the torch path's bits."""
    from qwenvl_cli.model import vision
    from qwenvl_cli.model.rope import vision_layout

    heads, hd = 4, 16
    layout = vision_layout(grids, hd, 2, 4)
    n = layout.cos.shape[0]
    g = torch.Generator().manual_seed(n)
    qkv = torch.randn(n, 3 * heads * hd, generator=g).to(dtype)
    for seg in (layout.windows, layout.frames):
        got = vision._segment_attention_native(kernels, qkv, seg, layout.cos, layout.sin, heads, hd)
        q, k, v = qkv.view(n, 3, heads, hd).unbind(1)
        q, k = (vision.apply_vision_rotary(t, layout.cos, layout.sin) for t in (q, k))
        want = vision._segment_attention(q, k, v, seg).reshape(n, -1)
        assert got.dtype == dtype and torch.equal(got, want)
    assert layout.windows.key_mask is not None  # the padded case was among them


def test_rope_gather_rotates_copies_and_pads(kernels):
    """One token per slot: rotated as apply_vision_rotary (bit for bit), plain copies without cos/sin, zeros
    in padding slots; and scatter_rows puts every token back where it came from."""
    from qwenvl_cli.model.vision import apply_vision_rotary

    n, heads, hd = 7, 3, 8
    src = torch.randn(n, 2 + heads * hd)  # the heads start at column 2
    cos, sin = torch.randn(n, hd), torch.randn(n, hd)
    gather = torch.tensor([[3, 0, n], [6, 1, 2], [5, 4, n]])
    rotated = kernels.rope_gather(src, 2, heads, hd, cos, sin, gather)
    copied = kernels.rope_gather(src, 2, heads, hd, None, None, gather)
    x = src[:, 2:].reshape(n, heads, hd)
    want = apply_vision_rotary(x, cos, sin)
    for s in range(3):
        for slot, token in enumerate(gather[s].tolist()):
            if token == n:
                assert not rotated[s, :, slot].any() and not copied[s, :, slot].any()
            else:
                assert torch.equal(rotated[s, :, slot], want[token]) and torch.equal(copied[s, :, slot], x[token])
    scatter = torch.tensor([1, 4, 5, 0, 7, 6, 3])  # token t's slot in the flat (S * Lmax) order
    back = kernels.scatter_rows(copied, scatter)
    assert torch.equal(back, x.reshape(n, -1))
    with pytest.raises(ValueError, match="slot"):
        kernels.scatter_rows(copied, torch.tensor([9]))


# ---- when the kernels are missing: each case in a fresh process with its own cache directory ----

STATUS = """
import torch
from qwenvl_cli.model import native
print(native.status().reason)
"""


def _status(tmp_path: Path, **env) -> str:
    run = subprocess.run([sys.executable, "-c", STATUS], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "QWENVL_NATIVE_CACHE": str(tmp_path / "cache"), **env})
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def test_missing_compiler_failed_build_and_switch_leave_torch_in_charge(tmp_path, kernels):
    assert _status(tmp_path, QWENVL_NATIVE="0") == "torch's kernels (QWENVL_NATIVE=0)"
    reason = _status(tmp_path, CC=str(tmp_path / "no-such-cc"))
    assert reason.startswith("torch's kernels (native ones unavailable:") and "no-such-cc" in reason
    failing = tmp_path / "failing-cc"
    failing.write_text("#!/bin/sh\necho 'gemv.c:1: error: this compiler is broken' >&2\nexit 1\n")
    failing.chmod(0o755)
    reason = _status(tmp_path, CC=str(failing))
    assert "failing-cc failed: gemv.c:1: error: this compiler is broken" in reason
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-written left behind


def test_library_is_built_once_and_a_corrupt_cache_is_rebuilt(tmp_path, kernels):
    """A compiler wrapper counts its runs: the second process loads the cached library without compiling;
    a cached file overwritten with garbage is compiled again and used."""
    from qwenvl_cli.model.native import SET_NAMES, compiler, usable_sets

    log = tmp_path / "runs.log"
    cc = tmp_path / "counting-cc"
    cc.write_text(f"#!/bin/sh\necho run >> {log}\nexec {compiler()} \"$@\"\n")
    cc.chmod(0o755)
    assert _status(tmp_path, CC=str(cc)).startswith(f"native {SET_NAMES[usable_sets()[0]]} kernels (")
    assert _status(tmp_path, CC=str(cc)).startswith(f"native {SET_NAMES[usable_sets()[0]]} kernels (")
    assert log.read_text().count("run") == 1
    (built,) = (tmp_path / "cache").glob("gemv-*.so")
    built.write_bytes(b"not an ELF file")
    assert _status(tmp_path, CC=str(cc)).startswith(f"native {SET_NAMES[usable_sets()[0]]} kernels (")
    assert log.read_text().count("run") == 2


def test_cli_verbose_names_the_decode_kernels(make_ckpt, tmp_path):
    from typer.testing import CliRunner

    from qwenvl_cli.cli import app

    image = tmp_path / "tiny.png"
    from PIL import Image

    Image.new("RGB", (56, 56), (200, 30, 30)).save(image)
    result = CliRunner().invoke(app, ["describe", str(image), "--model", str(make_ckpt()), "--max-new-tokens", "2",
                                      "--verbose"])
    assert result.exit_code == 0, result.output
    assert native.status().reason in result.stderr
