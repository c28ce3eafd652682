"""The test-checkpoint factory itself: every variant loads into transformers with no missing, unexpected or
changed tensor; files are laid out like the hub's; the random init is the loud one we asked for."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from checkpoints import CHAT_TEMPLATE, TINY, read_weights, reference_model, reference_processor

VARIANTS = {
    "flat, hub keys, fp32, one file": dict(),
    "tied, bf16, 3 shards": dict(tied=True, dtype="bfloat16", shards=3),
    "nested, transformers5 keys": dict(config_style="nested", key_layout="transformers5"),
    "nested, hub keys, fp16, 2 shards, tied": dict(config_style="nested", dtype="float16", shards=2, tied=True),
    "flat, transformers5 keys, tied": dict(key_layout="transformers5", tied=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformers_loads_every_tensor_unchanged(make_ckpt, variant):
    kwargs = VARIANTS[variant]
    path = make_ckpt(**kwargs)
    model = reference_model(path)  # asserts: no missing/unexpected/mismatched keys, parameters == files
    tied = kwargs.get("tied", False)
    assert model.config.tie_word_embeddings is tied
    assert (model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()) is tied
    vision = model.config.vision_config
    assert (vision.depth, vision.hidden_size, vision.tokens_per_second) == (4, 64, 2)
    assert list(vision.fullatt_block_indexes) == [1, 3] and vision.out_hidden_size == 64
    assert model.config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]

    weights = read_weights(path)
    assert {str(t.dtype) for t in weights.values()} == {"torch." + kwargs.get("dtype", "float32")}
    assert ("lm_head.weight" in weights) is not tied
    prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in weights if k != "lm_head.weight"}
    if kwargs.get("key_layout") == "transformers5":
        assert prefixes == {"model.language_model", "model.visual"}
    else:
        assert prefixes == {"model.embed_tokens", "model.layers", "model.norm", "visual.blocks", "visual.merger",
                            "visual.patch_embed"}


def test_shards_and_index(make_ckpt):
    path = make_ckpt(shards=3, tied=True, dtype="bfloat16")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    names = sorted(p.name for p in path.glob("*.safetensors"))
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert not (path / "model.safetensors").exists()
    held = {}
    for name in names:
        with safe_open(path / name, "pt") as f:
            held.update(dict.fromkeys(f.keys(), name))
    assert index["weight_map"] == held
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in read_weights(path).values())
    assert "visual.merger.mlp.0.weight" in held and "model.norm.weight" in held


def test_config_styles(make_ckpt):
    flat = json.loads((make_ckpt() / "config.json").read_text())
    assert flat["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    assert flat["hidden_size"] == 64 and "text_config" not in flat and flat["torch_dtype"] == "float32"
    assert flat["vision_config"]["in_chans"] == 3 and flat["vision_config"]["tokens_per_second"] == 2
    nested = json.loads((make_ckpt(config_style="nested") / "config.json").read_text())
    assert "hidden_size" not in nested and nested["text_config"]["hidden_size"] == 64
    assert nested["text_config"]["rope_parameters"]["mrope_section"] == [2, 3, 3]
    assert nested["vision_config"]["in_channels"] == 3


def test_our_config_reads_both_styles_alike(make_ckpt):
    from qwenvl_cli.config import ModelConfig

    flat = ModelConfig.from_file(make_ckpt() / "config.json")
    nested = ModelConfig.from_file(make_ckpt(config_style="nested") / "config.json")
    assert flat == nested
    assert flat.text.hidden_size == TINY["text"]["hidden_size"] and flat.vision.depth == TINY["vision"]["depth"]


def test_initialisation_is_loud_and_seeded(make_ckpt):
    w = read_weights(make_ckpt())
    biases = [t for k, t in w.items() if k.endswith(".bias")]
    assert all(t.abs().min() > 0 for t in biases)
    assert 0.08 < torch.cat(biases).std() < 0.12
    norm_names = ("norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight")
    norms = torch.cat([t for k, t in w.items() if k.endswith(norm_names)])
    assert 0.95 < norms.mean() < 1.05 and 0.07 < norms.std() < 0.13
    assert 0.98 < w["model.embed_tokens.weight"].std() < 1.02
    fan_ins = {"model.layers.0.mlp.down_proj.weight": 128, "visual.patch_embed.proj.weight": 3 * 2 * 14 * 14,
               "visual.merger.mlp.0.weight": 256, "lm_head.weight": 64}
    for key, fan_in in fan_ins.items():
        assert abs(w[key].std() * math.sqrt(fan_in) - 1) < 0.1, key
    again, other = read_weights(make_ckpt(seed=0, dtype="float32")), read_weights(make_ckpt(seed=1))
    assert all(torch.equal(w[k], again[k]) for k in w)
    assert not torch.equal(w["model.layers.0.self_attn.q_proj.bias"], other["model.layers.0.self_attn.q_proj.bias"])


def test_generation_and_preprocessor_files(make_ckpt):
    from transformers import GenerationConfig

    path = make_ckpt()
    generation = GenerationConfig.from_pretrained(path)
    assert (generation.do_sample, generation.temperature, generation.top_p, generation.top_k) == (True, 0.1, 0.001, 1)
    assert generation.repetition_penalty == 1.05 and generation.eos_token_id == [151645, 151643]
    assert generation.pad_token_id == generation.bos_token_id == 151643
    custom = make_ckpt(generation={"do_sample": False, "repetition_penalty": 1.0}, min_pixels=1000, max_pixels=50000)
    assert GenerationConfig.from_pretrained(custom).do_sample is False
    pre = json.loads((custom / "preprocessor_config.json").read_text())
    assert (pre["min_pixels"], pre["max_pixels"], pre["image_processor_type"]) == (1000, 50000, "Qwen2VLImageProcessor")
    size = reference_processor(custom).image_processor.size
    assert (size.shortest_edge, size.longest_edge) == (1000, 50000)


def test_reference_processor_reads_the_checkpoint_files(make_ckpt):
    processor = reference_processor(make_ckpt())
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert processor.chat_template == processor.tokenizer.chat_template == CHAT_TEMPLATE
    assert (processor.image_token_id, processor.video_token_id) == (151655, 151656)
    assert len(processor.tokenizer) == 151665


def test_reference_model_refuses_a_checkpoint_it_cannot_load_fully(make_ckpt, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    path = shutil.copytree(make_ckpt(), tmp_path / "ckpt")
    weights = load_file(path / "model.safetensors")
    weights["model.norm.weights"] = weights.pop("model.norm.weight")  # a typo'd key
    save_file(weights, path / "model.safetensors")
    with pytest.raises(AssertionError, match="did not load .* cleanly.*model.norm"):
        reference_model(path)
