"""Checkpoint loading: every hub/transformers-5 layout gives transformers' logits; broken checkpoints give
one clear ModelError; configs fill what older files omit with what the real checkpoints need."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from checkpoints import reference_model
from qwenvl_cli.config import GenerationConfig, ModelConfig, PreprocessorConfig
from qwenvl_cli.errors import ConfigError, ModelError
from qwenvl_cli.model.loader import load_model, open_checkpoint
from qwenvl_cli.model.quant import NativeLinear

IDS = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 9707, 0, 151645, 198]


def _text_logits_both(path, dtype=torch.float32):
    ckpt = open_checkpoint(path)
    ours = load_model(ckpt, "cpu", dtype)
    ref = reference_model(path)
    prompt = ours.make_prompt(IDS)
    with torch.inference_mode():
        return ours(prompt), ref(input_ids=torch.tensor([IDS])).logits, ours


VARIANTS = {
    "untied fp32 single file, flat config": dict(),
    "tied bf16 sharded, flat config": dict(tied=True, dtype="bfloat16", shards=3),
    "transformers-5 keys and nested config": dict(config_style="nested", key_layout="transformers5"),
    "fp16 sharded, nested config, hub keys": dict(dtype="float16", shards=2, config_style="nested"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_checkpoint_variants_load_to_transformers_logits(make_ckpt, variant):
    ours, ref, model = _text_logits_both(make_ckpt(**VARIANTS[variant]))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    if VARIANTS[variant].get("tied"):  # one table for the head and the lookups
        assert torch.equal(model.lm_head.dense_weight(), model.model.embed_tokens.weight.float())
        if isinstance(model.lm_head, NativeLinear):  # the head reads the (cast) table itself
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        else:  # packed from it (TiedHead), the lookups in the table as loaded
            assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_weights_are_cast_as_they_load(make_ckpt):
    ckpt = open_checkpoint(make_ckpt(dtype="bfloat16", shards=3, tied=True))
    model = load_model(ckpt, "cpu", torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_missing_shard_is_named(make_ckpt, tmp_path):
    path = _copy(make_ckpt(shards=2), tmp_path)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelError, match="missing weight shard.*model-00002-of-00002"):
        open_checkpoint(path)


def test_corrupt_safetensors_header(make_ckpt, tmp_path):
    path = _copy(make_ckpt(), tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(b"\xff" * 8 + data[8:200])
    with pytest.raises(ModelError, match="model.safetensors"):
        load_model(open_checkpoint(path))


def test_missing_and_unexpected_keys_are_listed(make_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _copy(make_ckpt(), tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors.pop("model.norm.weight")
    tensors["model.extra.weight"] = torch.zeros(2)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ModelError, match=r"missing 1 key\(s\): model.norm.weight.*unexpected 1 key\(s\): model.extra.weight"):
        load_model(open_checkpoint(path))


def test_shape_mismatch_is_reported_with_shapes(make_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _copy(make_ckpt(), tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 96  # the weights hold 128: caught from the headers, before the build
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"config.json says intermediate_size 96 but model.safetensors holds "
                                         r"model.layers.0.mlp.gate_proj.weight with shape \(128, 64\)"):
        open_checkpoint(path)
    # A tensor the header check does not look at: the strict load names it with both shapes.
    path = _copy(make_ckpt(), tmp_path / "second")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 96)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ModelError, match=r"down_proj.weight has shape \(64, 96\), the config needs \(64, 128\)"):
        load_model(open_checkpoint(path))


def test_no_weights_or_only_pickles(tmp_path, make_ckpt):
    path = _copy(make_ckpt(), tmp_path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(ModelError, match="safetensors only"):
        open_checkpoint(path)
    with pytest.raises(ModelError, match="model directory not found"):
        open_checkpoint(tmp_path / "nope")


def test_impossible_config_sizes(make_ckpt, tmp_path):
    path = _copy(make_ckpt(), tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["num_key_value_heads"] = 3  # 4 heads are not divisible into 3 groups
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="num_attention_heads 4 is not divisible by num_key_value_heads 3"):
        open_checkpoint(path)


# A 7B-style config.json: flat, with almost no vision fields.
SEVEN_B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"hidden_size": 1280, "in_chans": 3, "model_type": "qwen2_5_vl", "spatial_patch_size": 14},
}


def test_sparse_7b_config_gets_the_real_vision_values():
    cfg = ModelConfig.from_dict(SEVEN_B)
    v = cfg.vision
    assert (v.depth, v.hidden_size, v.num_heads, v.intermediate_size) == (32, 1280, 16, 3420)
    assert v.tokens_per_second == 2  # transformers' class default (4) would be wrong
    assert v.window_size == 112 and v.fullatt_block_indexes == (7, 15, 23, 31)
    assert v.out_hidden_size == 3584
    assert cfg.text.head_dim == 128 and cfg.text.mrope_section == (16, 24, 24)


def test_nested_transformers5_config():
    raw = {
        "model_type": "qwen2_5_vl",
        "text_config": {
            "hidden_size": 2048, "intermediate_size": 11008, "num_attention_heads": 16, "num_hidden_layers": 36,
            "num_key_value_heads": 2, "vocab_size": 151936,
            "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
        },
        "vision_config": {"depth": 32, "hidden_size": 1280, "out_hidden_size": 2048, "tokens_per_second": 2},
        "tie_word_embeddings": True,
    }
    cfg = ModelConfig.from_dict(raw)
    assert cfg.text.tie_word_embeddings and cfg.text.num_hidden_layers == 36 and cfg.text.rope_theta == 1e6


def test_generation_and_preprocessor_configs():
    gen = GenerationConfig.from_dict({"do_sample": True, "eos_token_id": [151645, 151643], "repetition_penalty": 1.05,
                                      "temperature": 0.1, "top_p": 0.001, "top_k": 1})
    assert gen.eos_token_ids == (151645, 151643) and gen.do_sample and gen.temperature > 0 and gen.top_k == 1
    assert GenerationConfig.from_dict({"eos_token_id": 151645}).eos_token_ids == (151645,)
    assert GenerationConfig.from_dict({"eos_token_id": None}).eos_token_ids == (151645, 151643)  # null: the default
    pre = PreprocessorConfig.from_dict({"size": {"shortest_edge": 100, "longest_edge": 2000}})
    assert (pre.min_pixels, pre.max_pixels, pre.factor) == (100, 2000, 28)
    with pytest.raises(ConfigError, match="min_pixels 5000 is larger than max_pixels 4000"):
        PreprocessorConfig(min_pixels=5000, max_pixels=4000)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(rope_scaling=5), "rope_scaling must be an object"),
        (lambda c: c.update(vision_config=[1]), "vision_config must be an object"),
        (lambda c: c.update(num_hidden_layers=2.5), "num_hidden_layers must be a whole number, got 2.5"),
        (lambda c: c.update(rms_norm_eps="x"), "rms_norm_eps must be a finite number, got 'x'"),
        (lambda c: c.update(image_token_id=5), "image/video token ids"),
    ],
)
def test_malformed_config_values_are_config_errors(make_ckpt, tmp_path, edit, message):
    path = _copy(make_ckpt(), tmp_path)
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        open_checkpoint(path)


def test_preprocessor_must_agree_with_the_vision_tower(make_ckpt, tmp_path):
    path = _copy(make_ckpt(), tmp_path)
    pre = json.loads((path / "preprocessor_config.json").read_text())
    pre["merge_size"] = 1
    (path / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(ModelError, match="do not match the vision config"):
        open_checkpoint(path)


def test_auto_dtype_per_device():
    import torch

    from qwenvl_cli.model.loader import resolve_dtype

    cuda = torch.device("cuda")
    assert resolve_dtype("auto", torch.device("cpu"), bf16_ok=lambda d: False) == torch.float32  # no AVX512-BF16/AMX
    assert resolve_dtype("auto", torch.device("cpu"), bf16_ok=lambda d: True) == torch.bfloat16
    assert resolve_dtype("auto", cuda, bf16_ok=lambda d: True) == torch.bfloat16
    assert resolve_dtype("auto", cuda, bf16_ok=lambda d: False) == torch.float16  # T4, V100
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
