"""Frozen, validated configuration read from a checkpoint directory.

Reads config.json in both styles the hub holds (the flat 4.x one with a partial `vision_config` and
`rope_scaling`, and transformers-5's nested `text_config` / `vision_config` / `rope_parameters`),
generation_config.json and preprocessor_config.json. Fields that older files omit are filled with the
values the real Qwen2.5-VL checkpoints need (not transformers' class defaults).
"""

from __future__ import annotations

import json
import math
import reprlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from qwenvl_cli.errors import ConfigError

# Token ids shared by every Qwen2.5-VL checkpoint.
ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
VISION_START_ID = 151652
VISION_END_ID = 151653
IMAGE_PAD_ID = 151655
VIDEO_PAD_ID = 151656

# Upper bounds far above every Qwen2.5-VL checkpoint (the 72B: 80 layers, hidden 8192, intermediate 29568,
# vocab 152064; every vision tower: 32 blocks of 1280), so that a damaged config.json cannot make the
# meta build create 10^5 layers (minutes, gigabytes) before the weights are looked at.
MAX_LAYERS = 1000
MAX_HIDDEN = 65536
MAX_INTERMEDIATE = 4 * MAX_HIDDEN
MAX_VOCAB = 10_000_000
MAX_POSITIONS = 10_000_000
# An image is upscaled to at least min_pixels: 128000 context tokens of 28x28 pixels is already more than
# the decoder can take (the real value is 3136).
MAX_MIN_PIXELS = 128000 * 28 * 28
# The largest JSON file read here; the largest real one (the 72B's index) is about 100 KB.
MAX_JSON_BYTES = 16 << 20

_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxdict, _SHOW.maxstring, _SHOW.maxlong, _SHOW.maxother = 2, 6, 4, 40, 24, 40


def show(value: Any) -> str:
    """A config value for an error message, bounded in length and depth (a file may hold anything)."""
    return _SHOW.repr(value)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or a finite float (Python's json reads NaN and Infinity)."""
    return is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _positive(owner: str, **values: int | float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{owner}: {name} must be positive, got {value}")


def _at_most(owner: str, limit: int, **values: int) -> None:
    for name, value in values.items():
        if value > limit:
            raise ConfigError(f"{owner}: {name} {show(value)} is more than {limit:,} (no Qwen2.5-VL is near that)")


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower (ViT with window attention + 2x2 patch merger). Defaults are the real checkpoints'."""

    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    out_hidden_size: int = 2048
    hidden_act: str = "silu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # pixels of the resized image
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: float = 2  # temporal MRoPE positions per second of video
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        _positive(
            "vision_config",
            depth=self.depth,
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            out_hidden_size=self.out_hidden_size,
            patch_size=self.patch_size,
            temporal_patch_size=self.temporal_patch_size,
            spatial_merge_size=self.spatial_merge_size,
            window_size=self.window_size,
            tokens_per_second=self.tokens_per_second,
            rms_norm_eps=self.rms_norm_eps,
        )
        _at_most("vision_config", MAX_LAYERS, depth=self.depth)
        _at_most("vision_config", MAX_HIDDEN, hidden_size=self.hidden_size, out_hidden_size=self.out_hidden_size)
        _at_most("vision_config", MAX_INTERMEDIATE, intermediate_size=self.intermediate_size)
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision_config: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.head_dim % 4:
            raise ConfigError(f"vision_config: head_dim {self.head_dim} must be a multiple of 4 for 2D rotary")
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            raise ConfigError(
                f"vision_config: window_size {self.window_size} is not a multiple of "
                f"patch_size*spatial_merge_size = {self.patch_size * self.spatial_merge_size}"
            )
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(f"vision_config: fullatt_block_indexes {show(bad)} outside 0..{self.depth - 1}")
        if self.hidden_act != "silu":
            raise ConfigError(f"vision_config: hidden_act {self.hidden_act!r} is not supported (only 'silu')")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened input patch: C * t * p * p (1176 for the real models)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def window_merged(self) -> int:
        """Window side in merged tokens (4 for 112 px windows)."""
        return self.window_size // self.spatial_merge_size // self.patch_size


@dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder with multimodal RoPE."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)  # temporal, height, width frequencies
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        _positive(
            "text_config",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
        )
        _at_most("text_config", MAX_LAYERS, num_hidden_layers=self.num_hidden_layers)
        _at_most("text_config", MAX_HIDDEN, hidden_size=self.hidden_size)
        _at_most("text_config", MAX_INTERMEDIATE, intermediate_size=self.intermediate_size)
        _at_most("text_config", MAX_VOCAB, vocab_size=self.vocab_size)
        _at_most("text_config", MAX_POSITIONS, max_position_embeddings=self.max_position_embeddings)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"text_config: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"text_config: num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2:
            raise ConfigError(
                f"text_config: mrope_section {show(list(self.mrope_section))} must be 3 numbers summing to "
                f"head_dim // 2 = {self.head_dim // 2}"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"text_config: hidden_act {self.hidden_act!r} is not supported (only 'silu')")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int = IMAGE_PAD_ID
    video_token_id: int = VIDEO_PAD_ID
    vision_start_token_id: int = VISION_START_ID
    torch_dtype: str = "bfloat16"  # the dtype the weights were saved in

    def __post_init__(self) -> None:
        if (self.image_token_id, self.video_token_id) != (IMAGE_PAD_ID, VIDEO_PAD_ID):
            raise ConfigError(
                f"config.json: image/video token ids {self.image_token_id}/{self.video_token_id} differ from "
                f"Qwen2.5-VL's {IMAGE_PAD_ID}/{VIDEO_PAD_ID}"
            )
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ConfigError(
                f"config.json: vision out_hidden_size {self.vision.out_hidden_size} != text hidden_size "
                f"{self.text.hidden_size}"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Parse either config.json style. Raises ConfigError on impossible values."""
        model_type = raw.get("model_type", "qwen2_5_vl")
        if model_type != "qwen2_5_vl":
            raise ConfigError(f"config.json: model_type {show(model_type)} is not qwen2_5_vl")
        for key in ("text_config", "vision_config", "rope_scaling", "rope_parameters"):
            if raw.get(key) is not None and not isinstance(raw[key], dict):
                raise ConfigError(f"config.json: {key} must be an object, got {show(raw[key])}")
        text_raw = dict(raw.get("text_config") or {})
        # Flat 4.x style keeps the text fields at the top level; nested keeps them in text_config.
        for key in (f.name for f in fields(TextConfig)):
            if key not in text_raw and key in raw:
                text_raw[key] = raw[key]
        # mrope_section lives in rope_scaling (4.x) or rope_parameters (5.x), nested or at the top level.
        rope = next((d[k] for d in (text_raw, raw) for k in ("rope_parameters", "rope_scaling") if d.get(k)), {})
        if not isinstance(rope, dict):
            raise ConfigError(f"config.json: rope_scaling / rope_parameters must be an object, got {show(rope)}")
        if "mrope_section" in rope:
            text_raw["mrope_section"] = rope["mrope_section"]  # _build checks it is a list
        if "rope_theta" in rope and "rope_theta" not in text_raw:
            text_raw["rope_theta"] = rope["rope_theta"]
        if "tie_word_embeddings" in raw:
            text_raw["tie_word_embeddings"] = raw["tie_word_embeddings"]
        text = _build(TextConfig, text_raw, "text_config")

        vision_raw = dict(raw.get("vision_config") or {})
        if "in_chans" in vision_raw and "in_channels" not in vision_raw:
            vision_raw["in_channels"] = vision_raw["in_chans"]
        if "embed_dim" in vision_raw and "hidden_size" not in vision_raw:
            vision_raw["hidden_size"] = vision_raw["embed_dim"]
        vision_raw.setdefault("out_hidden_size", text.hidden_size)
        vision = _build(VisionConfig, vision_raw, "vision_config")

        top = {k: raw[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id") if k in raw}
        top["torch_dtype"] = raw.get("torch_dtype") or raw.get("dtype") or text_raw.get("torch_dtype")
        return _build(cls, {**top, "text": text, "vision": vision}, "config.json")

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        return _from_file(cls, path)


def _from_file(cls: type, path: Path):
    """`cls.from_dict` of a JSON file, naming the file the impossible numbers came from."""
    raw = read_json(path)
    try:
        return cls.from_dict(raw)
    except ConfigError as exc:
        message = str(exc).removeprefix(f"{Path(path).name}: ")  # from_dict's "config.json: ..." once
        raise ConfigError(f"{path}: {message}") from exc


# What a list-valued field holds, for its error message (the default says whole numbers or numbers).
_LIST_OF = {
    "fullatt_block_indexes": "a list of block numbers",
    "mrope_section": "a list of 3 whole numbers",
    "eos_token_ids": "a list of token ids",
    "image_mean": "a list of 3 numbers",
    "image_std": "a list of 3 numbers",
}


def _build(cls: type, raw: dict[str, Any], owner: str):
    """Construct `cls` from the known keys of `raw`, checking each value against its default's type: one
    ConfigError naming the field and the expected shape, before any value is iterated or compared."""
    kwargs = {}
    for f in fields(cls):
        value = raw.get(f.name)
        if value is None:
            continue
        default = f.default
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, want = is_int(value), "a whole number"
        elif isinstance(default, float):
            ok, want = is_number(value), "a finite number"
        elif isinstance(default, tuple):
            whole = all(is_int(v) for v in default)
            want = _LIST_OF.get(f.name, "a list of whole numbers" if whole else "a list of numbers")
            ok = isinstance(value, (list, tuple)) and all(is_int(v) if whole else is_number(v) for v in value)
            value = tuple(value) if ok else value
        elif isinstance(default, str):
            ok, want = isinstance(value, str), "a string"
        else:
            ok, want = True, ""
        if not ok:
            raise ConfigError(f"{owner}: {f.name} must be {want}, got {show(value)}")
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{owner}: {exc}") from exc


def check_sampling(temperature: float, top_p: float, top_k: int, repetition_penalty: float, max_new_tokens: int) -> None:
    """ConfigError on impossible values; a temperature too small to sample with is a UsageError."""
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    # Sampling divides float32 logits by the temperature: below ~max|logit| / 3.4e38 they overflow to inf and
    # the probabilities become NaN (measured: |logits| 1 fail below 1e-38, 1e4 below 1e-36; 1e-46 rounds to 0
    # in float32). 1e-30 leaves 8 orders of margin, and from 1e-3 down sampling already picks the greedy id.
    min_temperature = 1e-30
    if 0 < temperature < min_temperature:
        from qwenvl_cli.errors import UsageError

        raise UsageError(
            f"temperature {temperature:g} is too small to sample with (the smallest is {min_temperature:g}); "
            "use --temperature 0 for greedy decoding"
        )
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ConfigError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if repetition_penalty <= 0:
        raise ConfigError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling defaults, as transformers reads generation_config.json (its class defaults otherwise)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    eos_token_ids: tuple[int, ...] = (IM_END_ID, ENDOFTEXT_ID)
    max_new_tokens: int = 512

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_p, self.top_k, self.repetition_penalty, self.max_new_tokens)
        if not self.eos_token_ids:
            raise ConfigError("generation_config: no eos_token_id")
        if min(self.eos_token_ids) < 0:
            raise ConfigError(f"generation_config: eos_token_id {show(list(self.eos_token_ids))} holds a negative id")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GenerationConfig:
        eos = raw.get("eos_token_id")
        if eos is None:
            eos = cls.eos_token_ids
        elif is_int(eos):
            eos = (eos,)
        elif not isinstance(eos, list) or not all(is_int(t) and t >= 0 for t in eos):
            raise ConfigError(
                f"generation_config: eos_token_id must be a token id or a list of them, got {show(eos)}"
            )
        kwargs: dict[str, Any] = {"eos_token_ids": eos}
        for key in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens"):
            if raw.get(key) is not None:
                kwargs[key] = raw[key]
        return _build(cls, kwargs, "generation_config")

    @classmethod
    def from_dir(cls, path: Path) -> GenerationConfig:
        file = path / "generation_config.json"
        return _from_file(cls, file) if file.is_file() else cls()


@dataclass(frozen=True)
class PreprocessorConfig:
    """Image preprocessing constants (preprocessor_config.json)."""

    min_pixels: int = 3136
    max_pixels: int = 12845056
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self) -> None:
        _positive(
            "preprocessor_config",
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
            patch_size=self.patch_size,
            temporal_patch_size=self.temporal_patch_size,
            merge_size=self.merge_size,
        )
        _at_most("preprocessor_config", MAX_MIN_PIXELS, min_pixels=self.min_pixels)
        if self.min_pixels > self.max_pixels:
            raise ConfigError(f"min_pixels {self.min_pixels} is larger than max_pixels {self.max_pixels}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ConfigError(
                f"preprocessor_config: image_mean/image_std must be 3 values (std > 0), got "
                f"{show(list(self.image_mean))}, {show(list(self.image_std))}"
            )

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this many pixels (28)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PreprocessorConfig:
        kwargs: dict[str, Any] = {}
        size = raw.get("size")
        if size is None:
            size = {}
        if not isinstance(size, dict):
            raise ConfigError(f"preprocessor_config: size must be an object, got {show(size)}")
        if "shortest_edge" in size:  # transformers-5 style
            kwargs["min_pixels"] = size["shortest_edge"]
        if "longest_edge" in size:
            kwargs["max_pixels"] = size["longest_edge"]
        for key in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            if raw.get(key) is not None:
                kwargs[key] = raw[key]
        for key in ("image_mean", "image_std"):
            if raw.get(key) is not None:
                kwargs[key] = raw[key]  # _build checks it is a list of numbers
        return _build(cls, kwargs, "preprocessor_config")

    @classmethod
    def from_dir(cls, path: Path) -> PreprocessorConfig:
        file = path / "preprocessor_config.json"
        return _from_file(cls, file) if file.is_file() else cls()


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file of at most MAX_JSON_BYTES, nested no deeper than json's recursion allows."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
        if len(data) > MAX_JSON_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_JSON_BYTES >> 20} MiB, not a checkpoint's JSON file")
        data = json.loads(data.decode("utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file not found") from exc
    except RecursionError as exc:
        raise ConfigError(f"{path}: not valid JSON (nested too deeply)") from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: JSONDecodeError, ints over 4300 digits
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


__all__ = [
    "GenerationConfig",
    "ModelConfig",
    "PreprocessorConfig",
    "TextConfig",
    "VisionConfig",
]
