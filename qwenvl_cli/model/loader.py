"""Checkpoint directory -> ModelConfig -> model built on the meta device -> strict, tensor-by-tensor load.

Reads only safetensors (never pickle). Accepts the hub key layout (`model.layers.*`, `visual.*`) and
transformers-5 saves (`model.language_model.*`, `model.visual.*`), single files and sharded ones with an
index, and tied embeddings (no `lm_head.weight`). Each tensor is cast and moved as it is read, so the
weights are never held twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qwenvl_cli.config import GenerationConfig, ModelConfig, PreprocessorConfig, read_json
from qwenvl_cli.errors import ModelError
from qwenvl_cli.model.qwen2_5_vl import Qwen2_5_VL

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# transformers-5 prefixes -> hub prefixes (our module names).
_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint directory holds, validated, before any weight is read."""

    path: Path
    config: ModelConfig
    generation: GenerationConfig
    preprocessor: PreprocessorConfig
    weight_files: tuple[Path, ...]


def canonical_key(key: str) -> str:
    for old, new in _PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: model directory not found")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json (not a Qwen2.5-VL checkpoint directory)")
    config = ModelConfig.from_file(path / "config.json")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"{index}: no weight_map")
        names = set(weight_map.values())
        if not all(isinstance(n, str) and n and "/" not in n and "\\" not in n and n != ".." for n in names):
            raise ModelError(f"{index}: weight_map must name shard files inside the checkpoint directory")
        files = tuple(path / name for name in sorted(names))
    elif (path / "model.safetensors").is_file():
        files = (path / "model.safetensors",)
    else:
        files = tuple(sorted(path.glob("*.safetensors")))
    if not files:
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise ModelError(f"{path}: only pickle weights (*.bin/*.pt) found; qwenvl loads safetensors only")
        raise ModelError(f"{path}: no *.safetensors weights")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelError(f"{path}: missing weight shard(s) {', '.join(missing)}")
    preprocessor = PreprocessorConfig.from_dir(path)
    v = config.vision
    ours = (preprocessor.patch_size, preprocessor.merge_size, preprocessor.temporal_patch_size)
    theirs = (v.patch_size, v.spatial_merge_size, v.temporal_patch_size)
    if ours != theirs:
        raise ModelError(
            f"{path}: preprocessor_config.json patch/merge/temporal sizes {ours} do not match the vision "
            f"config's {theirs}"
        )
    return Checkpoint(
        path=path,
        config=config,
        generation=GenerationConfig.from_dir(path),
        preprocessor=preprocessor,
        weight_files=files,
    )


def resolve_dtype(dtype: str, device: torch.device, bf16_ok=None) -> torch.dtype:
    """auto: float32 on CPU; on CUDA bfloat16 (the checkpoints' dtype), or float16 on GPUs without
    bfloat16 (pre-Ampere, e.g. T4/V100). `bf16_ok(device)` is injectable for tests."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        supported = bf16_ok or (lambda d: torch.cuda.is_bf16_supported(including_emulation=False))
        return torch.bfloat16 if supported(device) else torch.float16
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r} (choose auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def load_model(ckpt: Checkpoint, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Qwen2_5_VL:
    from safetensors import SafetensorError, safe_open

    device = torch.device(device)
    with torch.device("meta"):
        model = Qwen2_5_VL(ckpt.config)
    tied = ckpt.config.text.tie_word_embeddings
    expected = {name: p.shape for name, p in model.named_parameters()}
    if tied:
        expected.pop("lm_head.weight")
    seen: set[str] = set()
    unexpected: list[str] = []
    for file in ckpt.weight_files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as reader:
                for raw_key in reader.keys():
                    key = canonical_key(raw_key)
                    if key not in expected:
                        unexpected.append(raw_key)
                        continue
                    tensor = reader.get_tensor(raw_key)
                    if tuple(tensor.shape) != tuple(expected[key]):
                        raise ModelError(
                            f"{file.name}: {raw_key} has shape {tuple(tensor.shape)}, the config needs "
                            f"{tuple(expected[key])}"
                        )
                    _assign(model, key, tensor.to(device=device, dtype=dtype))
                    seen.add(key)
        except SafetensorError as exc:
            raise ModelError(f"{file}: not a valid safetensors file ({exc})") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"{file}: cannot read ({exc})") from None
    missing = sorted(set(expected) - seen)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(
                f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"
            )
        raise ModelError(f"{ckpt.path}: checkpoint does not match config.json: {'; '.join(parts)}")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval().requires_grad_(False)


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=False))
