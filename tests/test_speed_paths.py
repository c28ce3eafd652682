"""The CPU speed paths against their slow oracles: oneDNN-packed linears == plain F.linear, int8 linears ==
dequantize-then-matmul, packed / native / quantized models against the plain float32 model on the tiny
checkpoint, and the dtype policy with the CPU check injected."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from checkpoints import reference_model
from oracles import assert_greedy_as_the_oracle
from qwenvl_cli.errors import ModelError
from qwenvl_cli.generate import Generator, SamplingParams, reference_generate
from qwenvl_cli.model import native
from qwenvl_cli.model.loader import cpu_has_native_bf16, explain_dtype, load_model, open_checkpoint, resolve_dtype
from qwenvl_cli.model.quant import Int8Linear, NativeLinear, PackedLinear, onednn_packs, quantize_int8

PROMPTS = [
    [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 9707, 0, 151645, 198],
    [151644, 872, 198, 3838, 374, 279, 6722, 315, 9625, 30, 151645, 198, 151644, 77091, 198],
    [151644, 872, 198, 7985, 264, 32794, 911, 279, 9396, 13, 151645, 198],
    [151644, 872, 198, 16, 11, 17, 11, 18, 11, 19, 11],
    [151644, 872, 198, 785, 3974, 13876, 38835, 34208, 916, 279, 15678, 5562, 13],
]


def _linear(out_f: int, in_f: int, bias: bool, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    lin.weight.data.normal_(0, in_f**-0.5)
    return lin.requires_grad_(False)


def _tracks(model, oracle, max_error: float) -> float:
    """How closely a quantized model follows the float one over PROMPTS: asserts every logit within
    `max_error` of the oracle's logit range, per prompt, and returns the share of positions whose top-1 agrees."""
    agree = total = 0
    for ids in PROMPTS:
        with torch.inference_mode():
            want = oracle(oracle.make_prompt(ids))[0]  # (L, V)
            got = model(model.make_prompt(ids))[0]
        agree += int((want.argmax(-1) == got.argmax(-1)).sum())
        total += len(ids)
        assert (got - want).abs().max() < max_error * (want.max() - want.min())
    return agree / total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (1, 1, 64), (7, 64), (2, 5, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_plain_linear(dtype, shape, bias):
    if not onednn_packs(dtype):
        pytest.skip(f"oneDNN packs no {dtype} weights on this CPU (the loader leaves them plain)")
    lin = _linear(96, 64, bias, seed=1).to(dtype)
    packed = PackedLinear.from_linear(lin)
    x = torch.randn(shape).to(dtype)
    with torch.inference_mode():
        fast, oracle, plain = packed(x), packed.reference(x), lin(x)
    assert fast.shape == (*shape[:-1], 96) and fast.dtype == dtype
    assert torch.equal(packed.dense_weight(), lin.weight)  # repacking is lossless
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(fast, oracle, **tol)
    torch.testing.assert_close(fast, plain, **tol)


def test_quantize_int8_rounds_to_the_nearest_step_of_each_row():
    w = torch.tensor([[0.5, -1.27, 0.0, 1.0], [2.54, 0.01, -2.54, 1.27]])
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.dtype == torch.bfloat16 and scales.shape == (2,)
    assert q.abs().max() <= 127
    step = scales.float()[:, None]
    assert ((q.float() * step - w).abs() <= step / 2 + 1e-7).all()  # |error| <= half a step, row by row
    assert q[1].tolist() == [127, 0, -127, 63] or q[1].tolist() == [127, 0, -127, 64]


@pytest.mark.parametrize("rows", [1, 3, 16, 17, 40])  # <= 16 rows: the int8 kernel; more: dequantize + GEMM
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_fast_path_equals_dequantize_then_matmul(rows, dtype, decode_kernels):
    lin = _linear(160, 96, True, seed=2)
    q = Int8Linear.from_float(lin.weight, lin.bias, dtype)
    x = torch.randn(1, rows, 96).to(dtype)
    with torch.inference_mode():
        fast = q(x)
        if decode_kernels == "native" and rows == 1:  # the kernel's activations, one rounding to the output dtype
            group = native.kernels().int8_group  # float32 activations, or (AVX2) their int16 form
            oracle = q.reference(x if group is None else native.quantized_activations(x.view(-1).float(), group)
                                 .to(dtype).view(x.shape))
            tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=2**-8)
        else:  # torch's paths round activations to bfloat16 and return through bfloat16: so does the oracle input
            oracle = q.reference(x.bfloat16().to(dtype))
            tol = dict(atol=2e-2, rtol=1e-2)
    assert fast.shape == (1, rows, 160) and fast.dtype == dtype
    torch.testing.assert_close(fast, oracle, **tol)
    # ... and the quantized layer is within int8's error of the float one: < 2% of the output's scale.
    err = (q.reference(x.float()) - lin(x.float())).abs().max()
    assert err < 0.02 * lin(x.float()).abs().max()


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return open_checkpoint(make_ckpt())


@pytest.fixture(scope="module")
def plain(ckpt):
    return load_model(ckpt, "cpu", torch.float32, pack=False)


def _decode_linear(decode_kernels: str, dtype: torch.dtype = torch.float32) -> type:
    """The decode form pack_linears gives a float linear: plain where neither kernel takes the dtype."""
    if decode_kernels == "native":
        return NativeLinear
    return PackedLinear if onednn_packs(dtype) else nn.Linear


def test_cpu_load_packs_the_decoder_and_keeps_transformers_parity(ckpt, plain, make_ckpt, decode_kernels):
    packed = load_model(ckpt, "cpu", torch.float32)
    fast = _decode_linear(decode_kernels)
    assert isinstance(packed.lm_head, fast)
    layer = packed.model.layers[0]
    assert isinstance(layer.self_attn.qkv, fast) and isinstance(layer.mlp.gate_up, fast)
    assert not hasattr(layer.self_attn, "q_proj") and not hasattr(layer.mlp, "up_proj")  # fused, not kept twice
    assert isinstance(packed.visual.blocks[0].attn.qkv, nn.Linear)  # the vision tower stays as it is
    assert packed.visual.blocks[0].mlp.gate_up is None
    assert isinstance(plain.lm_head, nn.Linear)
    ref = reference_model(make_ckpt())
    for ids in PROMPTS[:2]:
        with torch.inference_mode():
            fast, slow = packed(packed.make_prompt(ids)), plain(plain.make_prompt(ids))
            expected = ref(input_ids=torch.tensor([ids])).logits
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
        torch.testing.assert_close(fast, expected, atol=1e-4, rtol=0)
        params = SamplingParams(max_new_tokens=8)
        assert list(Generator(packed).stream(packed.make_prompt(ids), params)) == \
            reference_generate(plain, plain.make_prompt(ids), params)


def test_tied_checkpoint_shares_one_table_between_the_lm_head_and_the_embedding(make_ckpt):
    """Float: the head is the embedding's nn.Parameter. int8: one int8 table, the embeddings dequantized from
    its rows; greedy top-1 agrees with float32 at >= 90% of the positions and the logit error stays under 3%
    of their range (measured: 94% and 0.9%)."""
    from qwenvl_cli.model.quant import Int8Embedding

    ckpt = open_checkpoint(make_ckpt(tied=True, dtype="bfloat16", shards=3))
    full = load_model(ckpt, "cpu", torch.float32, pack=False)
    assert full.lm_head.weight is full.model.embed_tokens.weight
    q8 = load_model(ckpt, "cpu", torch.float32, quantize="int8")
    assert isinstance(q8.lm_head, Int8Linear) and isinstance(q8.model.embed_tokens, Int8Embedding)
    assert q8.model.embed_tokens.weight is q8.lm_head.weight and q8.lm_head.weight.dtype == torch.int8
    assert q8.dtype == torch.float32 and isinstance(q8.model.layers[1].mlp.down_proj, Int8Linear)
    ids = torch.tensor([[3, 500, 151644, 17]])
    with torch.inference_mode():
        rows = q8.model.embed_tokens(ids)
        expected = q8.lm_head.dequantize(torch.float32)[ids]
    assert torch.equal(rows, expected)
    assert _tracks(q8, full, max_error=0.03) >= 0.9
    params = SamplingParams(max_new_tokens=6)
    prompt = q8.make_prompt(PROMPTS[0])
    assert list(Generator(q8).stream(prompt, params)) == reference_generate(q8, prompt, params)


def test_int8_model_holds_int8_weights_and_tracks_the_float_model(ckpt, plain):
    """Quality on a handful of prompts against the unquantized float32 model: top-1 agreement at >= 90% of
    the positions and a max logit error under 3% of the logits' range (measured: 96% and 1.0%)."""
    q8 = load_model(ckpt, "cpu", torch.float32, quantize="int8")
    linears = [m for name, m in q8.named_modules() if name.startswith("model.layers.") and isinstance(m, Int8Linear)]
    # Seven checkpoint matrices a layer, as four after fusing (qkv, o_proj, gate_up, down_proj).
    assert len(linears) == 4 * q8.config.text.num_hidden_layers and isinstance(q8.lm_head, Int8Linear)
    assert q8.lm_head.weight.dtype == torch.int8 and not any(p.is_meta for p in q8.parameters())
    assert isinstance(q8.visual.blocks[0].attn.qkv, nn.Linear) and q8.model.embed_tokens.weight.dtype == torch.float32
    assert _tracks(q8, plain, max_error=0.03) >= 0.9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_cached_generation_equals_its_no_cache_oracle(ckpt, dtype):
    q8 = load_model(ckpt, "cpu", dtype, quantize="int8")
    params = SamplingParams(max_new_tokens=10)
    for ids in PROMPTS[:2]:
        prompt = q8.make_prompt(ids)
        assert_greedy_as_the_oracle(q8, prompt, params)


def test_int8_quantized_while_loading_keeps_the_strict_key_check(make_ckpt, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    path = tmp_path / "ckpt"
    shutil.copytree(make_ckpt(), path)
    tensors = load_file(path / "model.safetensors")
    tensors.pop("model.layers.0.mlp.up_proj.weight")
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ModelError, match=r"missing 1 key\(s\): model.layers.0.mlp.up_proj.weight"):
        load_model(open_checkpoint(path), quantize="int8")
    with pytest.raises(ModelError, match="unknown quantization 'int3'"):
        load_model(open_checkpoint(path), quantize="int3")


def test_bfloat16_packed_model_stays_close_to_float32(ckpt, plain, decode_kernels):
    bf16 = load_model(ckpt, "cpu", torch.bfloat16)
    fast = _decode_linear(decode_kernels, torch.bfloat16)
    assert isinstance(bf16.lm_head, fast) and bf16.lm_head.weight.dtype == torch.bfloat16
    assert isinstance(bf16.model.layers[0].mlp.down_proj, fast)
    for ids in PROMPTS[:3]:
        with torch.inference_mode():
            full, half = plain(plain.make_prompt(ids))[0, -1], bf16(bf16.make_prompt(ids))[0, -1]
        assert F.cosine_similarity(full, half, dim=0) > 0.99


def test_auto_dtype_follows_native_bfloat16_with_a_reason():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert explain_dtype("auto", cpu, bf16_ok=lambda d: True) == (
        torch.bfloat16, "auto: bfloat16, the CPU has native bfloat16 (AVX512-BF16/AMX)")
    dtype, reason = explain_dtype("auto", cpu, bf16_ok=lambda d: False)
    assert dtype == torch.float32 and "no native bfloat16" in reason
    assert explain_dtype("auto", cuda, bf16_ok=lambda d: False)[0] == torch.float16
    assert explain_dtype("float32", cpu, bf16_ok=lambda d: True) == (torch.float32, "float32 as asked")
    assert resolve_dtype("auto", cpu) == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    with pytest.raises(ModelError, match="unknown dtype 'float8'"):
        explain_dtype("float8", cpu)


def test_engine_load_quantized_answers(make_ckpt):
    from qwenvl_cli.engine import Engine

    engine = Engine.load(str(make_ckpt()), "cpu", "float32", quantize="int8")
    assert isinstance(engine.model.lm_head, Int8Linear)
    assert engine.dtype_reason == "float32 as asked"
    answer = engine.answer(engine.prompt(["Hello"]), SamplingParams(max_new_tokens=3))
    assert answer.completion_tokens == 3


def test_engine_says_when_float32_keeps_a_bfloat16_checkpoints_weights(make_ckpt, decode_kernels):
    from qwenvl_cli.engine import Engine

    path = str(make_ckpt(dtype="bfloat16"))
    kept = "decoder weights kept in the checkpoint's bfloat16, float32 arithmetic"
    engine = Engine.load(path, "cpu", "float32")
    assert engine.dtype_reason == "float32 as asked" + (f"; {kept}" if decode_kernels == "native" else "")
    assert Engine.load(path, "cpu", "bfloat16").dtype_reason == "bfloat16 as asked"
    assert Engine.load(str(make_ckpt()), "cpu", "float32").dtype_reason == "float32 as asked"  # a float32 file


def test_float16_on_cpu_stays_plain_linear(ckpt):
    """oneDNN's CPU float16 reorder needs AVX512-FP16/AVX-NE-CONVERT (not on Zen 4): float16 is never packed."""
    half = load_model(ckpt, "cpu", torch.float16)
    assert type(half.lm_head) is nn.Linear and half.lm_head.weight.dtype == torch.float16
    with torch.inference_mode():
        assert half(half.make_prompt(PROMPTS[0][:6])).dtype == torch.float32


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("keys", [1, 7, 300])
def test_decode_attention_equals_sdpa(dtype, tol, keys):
    from qwenvl_cli.model.text import decode_attention

    g = torch.Generator().manual_seed(keys)
    q = torch.randn(2, 8, 1, 16, generator=g).to(dtype)
    k, v = (torch.randn(2, 2, keys, 16, generator=g).to(dtype) for _ in range(2))
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
    torch.testing.assert_close(decode_attention(q, k, v).float(), expected, atol=tol, rtol=0)


def test_repetition_penalty_on_the_seen_ids_equals_the_mask_rule():
    from qwenvl_cli.generate import apply_repetition_penalty, penalize_seen

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 1000, generator=g) * 5
    logits[0, 3] = float("-inf")  # a constrained-out id stays out
    ids = torch.tensor([0, 3, 17, 500, 999])
    seen = torch.zeros(1, 1000, dtype=torch.bool)
    seen[0, ids] = True
    for penalty in (1.0, 1.05, 1.3, 0.8):
        expected = apply_repetition_penalty(logits.clone(), seen, penalty)
        assert torch.equal(penalize_seen(logits.clone(), ids, penalty), expected)
    assert torch.equal(penalize_seen(logits.clone(), torch.tensor([], dtype=torch.long), 1.3), logits)


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_fused_projections_equal_the_checkpoint_matrices(ckpt, quantize):
    from qwenvl_cli.model.quant import fuse_projections

    separate = load_model(ckpt, "cpu", torch.float32, quantize=quantize, pack=False)
    fused = load_model(ckpt, "cpu", torch.float32, quantize=quantize, pack=False)
    fuse_projections(fused)
    x = torch.randn(1, 5, separate.config.text.hidden_size, generator=torch.Generator().manual_seed(3))
    a, b = separate.model.layers[1], fused.model.layers[1]
    with torch.inference_mode():
        for got, want in zip(b.self_attn.project(x), a.self_attn.project(x)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(b.mlp(x), a.mlp(x), atol=1e-5, rtol=0)


def test_signed_sin_turns_rotate_half_into_a_roll():
    from qwenvl_cli.model.rope import rotate_half, signed_sin

    x, sin = torch.randn(3, 5, 16), torch.randn(1, 5, 16)
    assert torch.equal(x.roll(8, -1) * signed_sin(sin), rotate_half(x) * sin)  # bit for bit


@pytest.mark.parametrize("dtype, quantize, pack", [
    (torch.float32, None, True), (torch.float32, None, False), (torch.bfloat16, None, True),
    (torch.bfloat16, "int8", True), (torch.float32, "int8", False), (torch.bfloat16, "int4", True),
])
def test_lean_decode_step_equals_the_cached_forward(ckpt, dtype, quantize, pack, decode_kernels):
    """TextModel.decode (one token, fewer ops) against forward with the same cache, step after step from a
    real prefill: identical bits, with fused (packed) and checkpoint (plain) projections."""
    from qwenvl_cli.model.rope import signed_sin
    from qwenvl_cli.model.text import KVCache

    model = load_model(ckpt, "cpu", dtype, quantize=quantize, pack=pack)
    prompt = model.make_prompt(PROMPTS[0])
    n = prompt.length
    caches = [KVCache.allocate(model.config.text, 1, n + 6, "cpu", model.dtype) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            Generator(model).prefill(prompt, cache)
        cos, sin = model.decode_tables(torch.arange(n, n + 6) + prompt.rope_delta)
        for i, token in enumerate([9707, 0, 151645, 17, 3838, 2]):
            x = model.model.embed_tokens(torch.tensor([[token]]))
            slow = model.model(x, cos[:, i:i + 1], sin[:, i:i + 1], caches[0], n + i)
            fast = model.model.decode(x, cos[:, i:i + 1], signed_sin(sin[:, i:i + 1]), caches[1], n + i)
            assert torch.equal(fast, slow), f"step {i}"
        assert torch.equal(caches[0].k[:, :, :, : n + 6], caches[1].k[:, :, :, : n + 6])
        assert torch.equal(caches[0].v[:, :, :, : n + 6], caches[1].v[:, :, :, : n + 6])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 512), (300, 640), (2, 7, 2048)])
def test_rms_norm_equals_the_reference_form_bit_for_bit(dtype, shape):
    from qwenvl_cli.model.vision import RMSNorm

    norm = RMSNorm(shape[-1], 1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(shape[-1]))
    norm = norm.to(dtype)
    x = (3 * torch.randn(shape)).to(dtype)
    with torch.inference_mode():
        assert torch.equal(norm(x), norm.reference(x))


def test_int4_model_holds_int4_weights_and_tracks_the_float_model(ckpt, plain):
    """--quantize int4: every decoder matrix and the untied LM head in groupwise int4 (fused by repacking the
    nibbles), within int4's error of float32: on random weights, whose top logits sit close together, top-1
    agrees at 64% of the positions and the max logit error is 13% of the logits' range (int8: 96%, 1.0%)."""
    from qwenvl_cli.model.int4 import Int4Linear

    q4 = load_model(ckpt, "cpu", torch.float32, quantize="int4")
    layer = q4.model.layers[0]
    assert all(isinstance(m, Int4Linear) for m in (layer.self_attn.qkv, layer.self_attn.o_proj, layer.mlp.gate_up,
                                                     layer.mlp.down_proj, q4.lm_head))
    assert q4.lm_head.weight.dtype == torch.uint8 and q4.lm_head.weight.shape == (151936, 32)  # 2 weights a byte
    assert q4.model.embed_tokens.weight.dtype == torch.float32 and isinstance(q4.visual.blocks[0].attn.qkv, nn.Linear)
    assert _tracks(q4, plain, max_error=0.2) >= 0.55


def test_int4_cached_generation_equals_its_no_cache_oracle(ckpt):
    """float32 activations around the kernel: the same greedy tokens. (In bfloat16 the cached step and the
    full-sequence oracle attend differently, as for every dtype, and on int4's noisier random-weight logits
    that flips near-tied tokens at 2 of 5 prompts; TextModel.decode itself is bit-tested above.)"""
    q4 = load_model(ckpt, "cpu", torch.float32, quantize="int4")
    params = SamplingParams(max_new_tokens=10)
    for ids in PROMPTS[:2]:
        prompt = q4.make_prompt(ids)
        assert list(Generator(q4).stream(prompt, params)) == reference_generate(q4, prompt, params)


def test_int4_on_a_tied_checkpoint_shares_one_int4_table(make_ckpt):
    """The tied head is also the embedding table: one packed int4 copy, the lookups dequantizing their rows
    from its nibbles, equal to the head's own dequantized rows; the model tracks float32 as the untied one."""
    from qwenvl_cli.model.int4 import Int4Embedding, Int4Linear

    ckpt = open_checkpoint(make_ckpt(tied=True))
    q4 = load_model(ckpt, "cpu", torch.float32, quantize="int4")
    assert isinstance(q4.lm_head, Int4Linear) and isinstance(q4.model.embed_tokens, Int4Embedding)
    assert q4.model.embed_tokens.weight is q4.lm_head.weight and q4.lm_head.weight.dtype == torch.uint8
    assert isinstance(q4.model.layers[0].mlp.down_proj, Int4Linear)
    ids = torch.tensor([[0, 63, 64, 500, 151644, 151935]])  # block edges and the last row
    with torch.inference_mode():
        assert torch.equal(q4.model.embed_tokens(ids)[0], q4.lm_head.dequantize(torch.float32)[ids[0]])
    full = load_model(ckpt, "cpu", torch.float32, pack=False)
    assert _tracks(q4, full, max_error=0.2) >= 0.5


def test_quantized_linear_falls_back_to_int8_for_shapes_int4_cannot_take():
    from qwenvl_cli.model.int4 import Int4Linear
    from qwenvl_cli.model.quant import quantized_linear

    assert quantized_linear("int4", 2048, 11008, False, torch.bfloat16).group_size == 128
    assert quantized_linear("int4", 96, 64, True, torch.bfloat16).group_size == 32  # 96 = 3 groups of 32
    assert isinstance(quantized_linear("int4", 64, 24, False, torch.bfloat16), Int8Linear)  # 24 rows: not 16k
    assert isinstance(quantized_linear("int4", 40, 64, False, torch.bfloat16), Int8Linear)  # no group divides 40
    assert not isinstance(quantized_linear("int8", 2048, 11008, False, torch.bfloat16), Int4Linear)
    with pytest.raises(ValueError, match="unknown quantization"):
        quantized_linear("int2", 64, 64, False, torch.bfloat16)


@pytest.mark.parametrize("vocab", [151936, 1187 * 3, 97, 4096])
def test_greedy_argmax_is_torch_argmax_ties_and_nan_included(vocab):
    from qwenvl_cli.generate import greedy_argmax

    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(3, vocab, generator=g)
    logits[1, [5, vocab - 3, vocab // 2]] = 50.0  # three tied maxima: the first wins
    logits[2, [vocab - 2, vocab // 3]] = float("nan")  # NaN is the maximum: the first NaN wins
    for x in (logits, logits.bfloat16(), logits[:1]):
        assert torch.equal(greedy_argmax(x), x.argmax(-1))
    assert greedy_argmax(logits)[1] == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tied_float_head_is_packed_apart_from_the_mapped_table(make_ckpt, dtype, monkeypatch):
    """Float on CPU without the native kernels: the tied head is a TiedHead (row chunks packed for oneDNN),
    the embeddings read the checkpoint's own bfloat16 table (not a cast copy of it), and the model computes
    what the shared-table oracle does: the same logits and the same greedy tokens. Where oneDNN packs no
    bfloat16 (AVX2 CPUs), a bfloat16 model keeps the plain shared table and linears, and the same holds."""
    from qwenvl_cli.model import native
    from qwenvl_cli.model.quant import MappedEmbedding, TiedHead

    monkeypatch.setattr(native, "status", lambda: native.Status(None, "torch's kernels (test)"))

    ckpt = open_checkpoint(make_ckpt(tied=True, dtype="bfloat16", shards=3))
    plain = load_model(ckpt, "cpu", dtype, pack=False)
    fast = load_model(ckpt, "cpu", dtype)
    if onednn_packs(dtype):
        assert isinstance(fast.lm_head, TiedHead) and len(fast.lm_head.chunks) == 10  # 151936 rows, 16384 a chunk
        assert isinstance(fast.model.embed_tokens, MappedEmbedding)
        assert fast.model.embed_tokens.weight.dtype == torch.bfloat16  # the file's table, never cast whole
        assert isinstance(fast.model.layers[1].mlp.down_proj, PackedLinear)
    else:
        assert fast.lm_head.weight is fast.model.embed_tokens.weight  # one table, as the oracle's
        assert type(fast.model.layers[1].mlp.down_proj) is nn.Linear
    ids = torch.tensor([[3, 500, 151644, 17]])
    with torch.inference_mode():
        assert torch.equal(fast.model.embed_tokens(ids), plain.model.embed_tokens(ids))
        head = fast.lm_head.dense_weight() if isinstance(fast.lm_head, TiedHead) else fast.lm_head.weight
        assert torch.equal(head, plain.lm_head.weight)
        for prompt_ids in PROMPTS[:2]:
            torch.testing.assert_close(fast(fast.make_prompt(prompt_ids)), plain(plain.make_prompt(prompt_ids)),
                                       atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0)
    params = SamplingParams(max_new_tokens=8)
    assert list(Generator(fast).stream(fast.make_prompt(PROMPTS[0]), params)) == \
        reference_generate(plain, plain.make_prompt(PROMPTS[0]), params)


def test_tied_head_chunks_concatenate_to_one_matrix():
    from qwenvl_cli.model.quant import TiedHead

    table = torch.randn(300, 64)
    head = TiedHead(table, torch.float32, chunk_rows=128)  # 128 + 128 + 44 rows
    assert [c.shape[0] for c in head.chunks] == [128, 128, 44]
    x = torch.randn(2, 3, 64)
    with torch.inference_mode():
        torch.testing.assert_close(head(x), F.linear(x, table), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(head(x), head.reference(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(head.dense_weight(), table)


def test_fusable_takes_one_kind_and_one_int4_group():
    from qwenvl_cli.model.quant import concat_linears, fusable, quantized_linear

    int4 = [quantized_linear("int4", 128, 64, True, torch.float32) for _ in range(2)]
    other_group = quantized_linear("int4", 96, 64, True, torch.float32)  # group 32
    assert fusable(int4) and fusable([nn.Linear(8, 4), nn.Linear(8, 4)])
    assert not fusable([int4[0], quantized_linear("int8", 128, 64, True, torch.float32)])
    assert not fusable([int4[0], other_group])
    with pytest.raises(TypeError, match="cannot fuse"):
        concat_linears([nn.Linear(8, 4), PackedLinear.from_linear(nn.Linear(8, 4))])


def test_bfloat16_matmuls_count_as_slow_on_intel_without_amx_and_without_native_bfloat16(monkeypatch):
    from qwenvl_cli.model import loader, native

    for vendor, flags, slow in [("GenuineIntel", {"avx512_bf16"}, True), ("GenuineIntel", {"avx512_bf16", "amx_bf16"}, False),
                                ("AuthenticAMD", {"avx512_bf16"}, False), ("GenuineIntel", {"avx2"}, True),
                                ("AuthenticAMD", {"avx2", "fma"}, True)]:
        monkeypatch.setattr(native, "cpu_vendor", lambda v=vendor: v)
        monkeypatch.setattr(native, "cpu_flags", lambda f=flags: set(f))
        assert loader.cpu_bf16_matmul_is_slow() is slow, (vendor, flags)


def test_vision_tower_goes_float32_under_auto_where_bfloat16_matmuls_are_slow():
    from qwenvl_cli.model.loader import explain_vision_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    dtype, reason = explain_vision_dtype("auto", cpu, torch.bfloat16, bf16_slow=lambda: True)
    assert dtype == torch.float32 and "no faster on this CPU" in reason
    assert explain_vision_dtype("auto", cpu, torch.bfloat16, bf16_slow=lambda: False) == (torch.bfloat16, "")
    assert explain_vision_dtype("bfloat16", cpu, torch.bfloat16, bf16_slow=lambda: True) == (torch.bfloat16, "")  # as asked
    assert explain_vision_dtype("auto", cpu, torch.float32, bf16_slow=lambda: True) == (torch.float32, "")
    assert explain_vision_dtype("auto", cuda, torch.bfloat16, bf16_slow=lambda: True) == (torch.bfloat16, "")


def test_engine_loads_a_float32_vision_tower_beside_a_bfloat16_decoder(make_ckpt, monkeypatch):
    """Under auto on such a CPU: the tower's weights in float32, its features the float32 model's bit for bit
    (same weights, same dtype), the decoder in bfloat16, and --verbose's reason says so."""
    import numpy as np
    from PIL import Image

    from qwenvl_cli.engine import Engine
    from qwenvl_cli.media.image import preprocess_image
    from qwenvl_cli.model import loader
    from qwenvl_cli.model.qwen2_5_vl import VisionInput

    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(loader, "cpu_bf16_matmul_is_slow", lambda: True)
    path = make_ckpt()
    engine = Engine.load(str(path), "cpu", "auto")
    model = engine.model
    assert {p.dtype for p in model.visual.parameters()} == {torch.float32}
    assert model.dtype == torch.bfloat16 and model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert "vision tower float32" in engine.dtype_reason
    full = load_model(open_checkpoint(path), "cpu", torch.float32)
    pixels = np.random.default_rng(0).integers(0, 255, (84, 112, 3), dtype=np.uint8)
    image = preprocess_image(Image.fromarray(pixels), engine.preprocessor)
    vis = VisionInput(image.pixel_values, (image.grid_thw,))
    prompt = engine.prompt([image, "Describe."])
    with torch.inference_mode():
        assert torch.equal(model.vision_features(vis), full.vision_features(vis))
        logits, want = model(prompt)[0, -1].float(), full(prompt)[0, -1]
    assert F.cosine_similarity(logits, want, dim=0) > 0.99


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_float32_quantized_prefill_is_a_float32_gemm_where_bfloat16_is_slow(ckpt, quantize, monkeypatch):
    """A float32 model with int8/int4 weights on a CPU where bfloat16 matmuls are slow (AVX2: emulated) takes
    its multi-row inputs beyond torch's kernels through a float32 GEMM on the float32 dequantization: the
    float32 oracle's product to float32 summation error (a bfloat16 GEMM would round the activations), and
    by default only there."""
    from qwenvl_cli.model import loader

    for slow in (False, True):
        monkeypatch.setattr(loader, "cpu_bf16_matmul_is_slow", lambda s=slow: s)
        model = load_model(ckpt, "cpu", torch.float32, quantize=quantize)
        layer = model.model.layers[0].mlp.down_proj
        assert layer.upcast is slow
    x = torch.randn(1, 300, layer.in_features)
    with torch.inference_mode():
        got, want = layer(x), layer.reference(x)
        layer.upcast = False
        bfloat16 = layer(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (bfloat16 - want).abs().max() > 10 * (got - want).abs().max()


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_upcast_prefill_computes_what_the_bfloat16_gemm_does(ckpt, quantize, decode_kernels):
    """Long bfloat16 inputs as float32 GEMMs on upcast operands: the logits of the bfloat16 GEMMs to bfloat16
    rounding (float weights: the same operands, sums in another order; int8/int4: weights dequantized to
    float32 instead of bfloat16), and a one-row input still goes through the decode kernels. Where the
    float weights are oneDNN-packed (no native kernels) they are not upcast."""
    from qwenvl_cli.model.upcast import _UPCAST_ROWS

    ids = (PROMPTS[0] * 12)[: _UPCAST_ROWS + 40]  # a prompt long enough to upcast
    models = [load_model(ckpt, "cpu", torch.bfloat16, quantize=quantize, upcast_prefill=flag) for flag in (False, True)]
    takes = [getattr(m.model.layers[0].mlp.down_proj, "upcast", False) for m in models]
    assert takes == [False, quantize is not None or decode_kernels == "native"]
    with torch.inference_mode():
        plain, upcast = (m(m.make_prompt(ids))[0].float() for m in models)
        x = torch.randn(1, 1, models[1].config.text.hidden_size).bfloat16()
        layer = models[1].model.layers[0].mlp.gate_up
        assert torch.equal(layer(x), models[0].model.layers[0].mlp.gate_up(x))  # the decode step: untouched
    assert (plain - upcast).abs().max() < 0.03 * plain.abs().max()
    assert (plain.argmax(-1) == upcast.argmax(-1)).float().mean() > 0.9
