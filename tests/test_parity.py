"""End-to-end parity with transformers on the same tiny random checkpoint: our preprocessing, prompt ids
and model against transformers' PIL processor and Qwen2_5_VLForConditionalGeneration.

float32 prefill logits within 1e-4 and 32 greedy tokens identical (EOS ignored)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoints import assert_same_as_reference, reference_model, reference_processor
from qwenvl_cli.engine import Engine
from qwenvl_cli.generate import Generator, SamplingParams, reference_generate
from qwenvl_cli.media.image import preprocess_image
from qwenvl_cli.model.loader import load_model, open_checkpoint
from qwenvl_cli.model.qwen2_5_vl import VisionInput
from qwenvl_cli.tokenizer import Tokenizer

IMAGE_ID = 151655
NEW_TOKENS = 32


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    """Smooth-ish random picture: noise plus gradients, so resizing matters."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], -1)
    pixels = np.clip(base * 0.6 + rng.integers(0, 100, (height, width, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def setup(make_ckpt):
    path = make_ckpt(max_pixels=64 * 28 * 28)  # small pixel budget keeps the vision tower quick
    ckpt = open_checkpoint(path)
    engine = Engine("tiny", ckpt, load_model(ckpt), Tokenizer.from_dir(path))
    return engine, reference_model(path), reference_processor(path)


def _reference_inputs(processor, images, text, system=None):
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    chat = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[chat], images=images or None, return_tensors="pt")
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == IMAGE_ID).int()
    return inputs


CASES = {
    "text only": ([], "Write a haiku about the sea."),
    "odd size 451x300": ([(451, 300)], "Describe this image."),
    "below min_pixels 20x30": ([(20, 30)], "What is this?"),
    "wide ratio 8": ([(800, 100)], "Read the banner."),
    "two images": ([(300, 200), (150, 260)], "Compare them."),
    "grid not a multiple of the window": ([(250, 170)], "Describe this image."),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_logits_and_greedy_tokens_match_transformers(setup, case):
    engine, ref, processor = setup
    sizes, text = CASES[case]
    images = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    inputs = _reference_inputs(processor, images, text)

    processed = [preprocess_image(im, engine.preprocessor) for im in images]
    prompt = engine.prompt([*processed, text])
    assert prompt.input_ids.tolist() == inputs["input_ids"].tolist()
    if images:
        assert [list(p.grid_thw) for p in processed] == inputs["image_grid_thw"].tolist()
        grid_sides = {(g[1] // 2) % 4 for g in inputs["image_grid_thw"].tolist()}
        if case == "grid not a multiple of the window":
            assert grid_sides != {0}

    assert_same_as_reference(engine, ref, prompt, inputs, NEW_TOKENS)


def test_positions_and_rope_delta_match_transformers(setup):
    engine, ref, processor = setup
    images = [noise_image(300, 200, 0), noise_image(120, 400, 1)]
    inputs = _reference_inputs(processor, images, "Compare.")
    prompt = engine.prompt([preprocess_image(im, engine.preprocessor) for im in images] + ["Compare."])
    positions, delta = ref.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
    )
    assert torch.equal(prompt.positions, positions)
    assert prompt.rope_delta == delta.item()


def test_vision_tower_matches_transformers_and_its_slow_oracle(setup):
    engine, ref, processor = setup
    images = [noise_image(451, 300, 3), noise_image(60, 500, 4)]
    inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|>" * 2], images=images, return_tensors="pt")
    vis = VisionInput(inputs["pixel_values"], tuple(map(tuple, inputs["image_grid_thw"].tolist())))
    with torch.inference_mode():
        expected = torch.cat(ref.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
        fast = engine.model.vision_features(vis)
        padded = engine.model.vision_features(vis, attention="padded")  # torch's SDPA, no native kernels
        slow = engine.model.vision_features(vis, attention="loop")
    torch.testing.assert_close(fast, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(padded, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


def test_repetition_penalty_matches_transformers(setup):
    engine, ref, processor = setup
    image = noise_image(200, 200, 5)
    inputs = _reference_inputs(processor, [image], "Describe.")
    prompt = engine.prompt([preprocess_image(image, engine.preprocessor), "Describe."])
    params = SamplingParams(max_new_tokens=24, repetition_penalty=1.3)
    tokens = [s.token_id for s in engine.generator.stream(prompt, params)]
    with torch.inference_mode():
        ref_out = ref.generate(**inputs, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                               repetition_penalty=1.3, top_k=None, top_p=None, temperature=None)
    assert tokens == ref_out[0, prompt.length:].tolist()


def test_cached_generation_equals_the_no_cache_reference(setup):
    engine, _, _ = setup
    image = noise_image(180, 240, 6)
    prompt = engine.prompt([preprocess_image(image, engine.preprocessor), "Describe."])
    for params in (
        SamplingParams(max_new_tokens=12, repetition_penalty=1.05),
        SamplingParams(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=40, top_p=0.9, seed=7),
    ):
        cached = list(engine.generator.stream(prompt, params))
        oracle = reference_generate(engine.model, prompt, params)
        assert cached == oracle


def test_seeded_sampling_is_reproducible_and_seed_dependent(setup):
    engine, _, _ = setup
    prompt = engine.prompt(["Tell me a story."])
    params = SamplingParams(max_new_tokens=16, do_sample=True, temperature=1.0, top_k=0, seed=1)
    first = [s.token_id for s in engine.generator.stream(prompt, params)]
    again = [s.token_id for s in engine.generator.stream(prompt, params)]
    other = [s.token_id for s in engine.generator.stream(prompt, SamplingParams(**{**params.__dict__, "seed": 2}))]
    assert first == again
    assert first != other


def test_stop_rules(setup):
    engine, _, _ = setup
    prompt = engine.prompt(["Hello"])
    greedy = list(engine.generator.stream(prompt, SamplingParams(max_new_tokens=5)))
    assert [s.finish_reason for s in greedy] == [None, None, None, None, "length"]
    # Declare the third greedy token an end-of-sequence id: generation stops right there.
    third = greedy[2].token_id
    stopped = list(engine.generator.stream(prompt, SamplingParams(max_new_tokens=5, eos_token_ids=(third,))))
    assert [s.token_id for s in stopped] == [s.token_id for s in greedy[:3]]
    assert stopped[-1].finish_reason == "stop"


def test_bfloat16_engine_stays_close_to_float32(setup, make_ckpt):
    engine, _, _ = setup
    ckpt = open_checkpoint(make_ckpt(max_pixels=64 * 28 * 28))
    bf16 = load_model(ckpt, "cpu", torch.bfloat16)
    image = noise_image(200, 150, 8)
    prompt = engine.prompt([preprocess_image(image, engine.preprocessor), "Describe."])
    with torch.inference_mode():
        full = engine.model(prompt)[0, -1]
        half = bf16(prompt)[0, -1]
    assert half.dtype == torch.float32  # logits are always returned in float32
    cos = torch.nn.functional.cosine_similarity(full, half, dim=0)
    assert cos > 0.99
    assert Generator(bf16).stream(prompt, SamplingParams(max_new_tokens=2)).__next__().token_id >= 0


@pytest.mark.parametrize("tied", [False, True])
def test_float32_on_a_bfloat16_checkpoint_matches_transformers(make_ckpt, decode_kernels, tied):
    """The hub's checkpoints are bfloat16: in float32 with the native kernels the decoder keeps the file's
    weights (half the bytes a step reads) and computes on their exact upcast, as transformers does on its
    float32 copy: logits within 1e-4, 32 greedy tokens identical; a tied head (the 3B's) reads the same
    table as the lookups. With torch's kernels the weights are cast at load as before."""
    from qwenvl_cli.model.loader import narrow_weights
    from qwenvl_cli.model.quant import MappedEmbedding, NativeLinear

    path = make_ckpt(max_pixels=64 * 28 * 28, dtype="bfloat16", tied=tied)
    ckpt = open_checkpoint(path)
    model = load_model(ckpt)
    engine = Engine("tiny", ckpt, model, Tokenizer.from_dir(path))
    native = decode_kernels == "native"
    assert narrow_weights(model) == (torch.bfloat16 if native else None)
    assert model.dtype == torch.float32 and model.model.norm.weight.dtype == torch.float32
    if native:
        assert isinstance(model.lm_head, NativeLinear) and model.lm_head.weight.dtype == torch.bfloat16
        assert isinstance(model.model.embed_tokens, MappedEmbedding)
        assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
        if tied:
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    processor = reference_processor(path)
    image = noise_image(451, 300, seed=3)
    inputs = _reference_inputs(processor, [image], "Describe this image.")
    prompt = engine.prompt([preprocess_image(image, engine.preprocessor), "Describe this image."])
    ref = reference_model(path)
    assert_same_as_reference(engine, ref, prompt, inputs, NEW_TOKENS)
    # the decode steps' own logits (the products on the kept weights), not only the tokens they chose
    steps, decode = [], engine.generator.decode_step
    engine.generator.decode_step = lambda *args: steps.append(decode(*args)) or steps[-1]
    list(engine.generator.stream(prompt, SamplingParams(max_new_tokens=8, repetition_penalty=1.0)))
    with torch.inference_mode():
        out = ref.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False, repetition_penalty=1.0,
                           top_k=None, top_p=None, temperature=None, output_logits=True,
                           return_dict_in_generate=True)
    assert len(steps) == 7
    for i, logits in enumerate(steps):
        torch.testing.assert_close(logits, out.logits[i + 1].float(), atol=1e-4, rtol=0)
