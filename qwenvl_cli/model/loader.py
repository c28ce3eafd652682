"""Checkpoint directory -> ModelConfig -> model built on the meta device -> strict, tensor-by-tensor load.

Reads only safetensors (never pickle). Accepts the hub key layout (`model.layers.*`, `visual.*`) and
transformers-5 saves (`model.language_model.*`, `model.visual.*`), single files and sharded ones with an
index, and tied embeddings (no `lm_head.weight`). Before anything is built, config.json is held against
the tensor names and shapes in the shards' headers (layer counts, widths, vocabulary). Each tensor is
cast and moved as it is read (safetensors maps the file: a tensor already in the wanted dtype is used in
place, not copied), quantized as it is read under `quantize`, so the weights are never held twice. On
CPU the decoder's float linears then go to the native decode kernels as they are (model/native), or, where
those are missing, are repacked for oneDNN one matrix at a time (model/quant.py).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qwenvl_cli.config import GenerationConfig, ModelConfig, PreprocessorConfig, read_json, show
from qwenvl_cli.errors import ModelError
from qwenvl_cli.model import native
from qwenvl_cli.model.int4 import Int4Embedding
from qwenvl_cli.model.quant import (
    QUANTIZATIONS,
    Int8Embedding,
    Int8Linear,
    MappedEmbedding,
    TiedHead,
    decoder_linear_names,
    fuse_projections,
    one_thread,
    onednn_packs,
    pack_linears,
    quantized_linear,
    replace_module,
)
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
        bad = [n for n in weight_map.values() if not _is_shard_name(n)]
        if bad:
            raise ModelError(
                f"{index}: weight_map must name shard files inside the checkpoint directory, got {show(bad[0])}"
            )
        files = tuple(path / name for name in sorted(set(weight_map.values())))
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
        raise ModelError(f"{path}: missing weight shard(s) {_first(missing)}")
    preprocessor = PreprocessorConfig.from_dir(path)
    v = config.vision
    ours = (preprocessor.patch_size, preprocessor.merge_size, preprocessor.temporal_patch_size)
    theirs = (v.patch_size, v.spatial_merge_size, v.temporal_patch_size)
    if ours != theirs:
        raise ModelError(
            f"{path}: preprocessor_config.json patch/merge/temporal sizes {ours} do not match the vision "
            f"config's {theirs}"
        )
    check_against_weights(path, config, read_shapes(files))
    return Checkpoint(
        path=path,
        config=config,
        generation=GenerationConfig.from_dir(path),
        preprocessor=preprocessor,
        weight_files=files,
    )


def _is_shard_name(name: object) -> bool:
    return (
        isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
        and name.isprintable()
    )


def _first(names: list[str], n: int = 5) -> str:
    """At most `n` names, then how many in all: an error stays one short line."""
    more = f" ... ({len(names)} in all)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


@dataclass(frozen=True)
class HeldTensor:
    file: str  # shard file name
    key: str  # as the file spells it (either layout)
    shape: tuple[int, ...]


def read_shapes(files: tuple[Path, ...]) -> dict[str, HeldTensor]:
    """Canonical key -> where it is and its shape, from the shards' headers only (safetensors reads the
    8-byte length and the JSON header, at most 100 MB, and validates the offsets; no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    held: dict[str, HeldTensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as reader:
                for raw_key in reader.keys():
                    key = canonical_key(raw_key)
                    if key in held:
                        raise ModelError(f"{file}: {raw_key} is also in {held[key].file} (as {held[key].key})")
                    held[key] = HeldTensor(file.name, raw_key, tuple(reader.get_slice(raw_key).get_shape()))
        except SafetensorError as exc:
            raise ModelError(f"{file}: not a valid safetensors file ({exc})") from exc
        except OSError as exc:
            raise ModelError(f"{file}: cannot read ({exc})") from exc
    return held


def _spans(numbers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8" (the first few spans)."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    text = [f"{a}-{b}" if b > a else f"{a}" for a, b in spans[:4]]
    return ", ".join(text) + (", ..." if len(spans) > 4 else "")


def _check_count(path: Path, held: dict[str, HeldTensor], prefix: str, field: str, wanted: int, unit: str) -> None:
    numbers = {k[len(prefix):].partition(".")[0] for k in held if k.startswith(prefix)}
    found = sorted(int(n) for n in numbers if n.isdigit())
    if found == list(range(wanted)):
        return
    if not found:
        holds = f"no {unit} (no {prefix}* tensors)"
    else:
        holds = f"{len(found)} {unit if len(found) != 1 else unit[:-1]} ({prefix}{_spans(found)})"
    raise ModelError(f"{path}: config.json says {field} {wanted} but the weights hold {holds}")


def check_against_weights(path: Path, config: ModelConfig, held: dict[str, HeldTensor]) -> None:
    """ModelError, with the numbers, where config.json disagrees with what the shards hold: checked before
    the model is built, so a config claiming 10^5 layers fails in milliseconds instead of building them.
    Only the sizes that shape the build are checked here; the strict load still checks every tensor."""
    t, v = config.text, config.vision
    _check_count(path, held, "model.layers.", "num_hidden_layers", t.num_hidden_layers, "layers")
    _check_count(path, held, "visual.blocks.", "vision_config depth", v.depth, "blocks")
    # (canonical key, axis, what config.json says, its value)
    sizes = (
        ("model.embed_tokens.weight", 0, "vocab_size", t.vocab_size),
        ("model.embed_tokens.weight", 1, "hidden_size", t.hidden_size),
        ("model.layers.0.mlp.gate_proj.weight", 0, "intermediate_size", t.intermediate_size),
        ("model.layers.0.self_attn.k_proj.weight", 0, "num_key_value_heads * head_dim",
         t.num_key_value_heads * t.head_dim),
        ("visual.patch_embed.proj.weight", 0, "vision_config hidden_size", v.hidden_size),
        ("visual.patch_embed.proj.weight", 1, "vision_config in_channels", v.in_channels),
        ("visual.patch_embed.proj.weight", 2, "vision_config temporal_patch_size", v.temporal_patch_size),
        ("visual.patch_embed.proj.weight", 3, "vision_config patch_size", v.patch_size),
        ("visual.blocks.0.mlp.gate_proj.weight", 0, "vision_config intermediate_size", v.intermediate_size),
        ("visual.merger.mlp.0.weight", 1, "vision_config hidden_size * spatial_merge_size**2",
         v.hidden_size * v.merge_unit),
        ("visual.merger.mlp.2.weight", 0, "vision_config out_hidden_size", v.out_hidden_size),
    )
    for key, axis, field, wanted in sizes:
        tensor = held.get(key)
        if tensor is None:
            continue  # the strict load names every missing key
        if len(tensor.shape) <= axis or tensor.shape[axis] != wanted:
            raise ModelError(
                f"{path}: config.json says {field} {wanted} but {tensor.file} holds {tensor.key} "
                f"with shape {tensor.shape}"
            )


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 in /proc/cpuinfo (Linux): bfloat16 matmuls in hardware, so a bfloat16 model
    reads half the bytes per token at no compute cost. Elsewhere bfloat16 is emulated: stay in float32."""
    return bool(native.cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_bf16_matmul_is_slow() -> bool:
    """bfloat16 matmuls no faster than float32 ones: on CPUs without native bfloat16 (AVX2 ones such as Zen 3,
    where torch emulates it: a 270-row int4 prefill in bfloat16 took 13 s against ~1 s in float32), and on
    Intel's AVX512-BF16 without AMX (Cooper Lake, or a Sapphire/Emerald Rapids whose hypervisor hides AMX),
    which issues one vdpbf16ps a cycle, the FLOPs of its two float32 FMAs: oneDNN's bfloat16 GEMM reaches
    146-153 GFLOP/s there against 210-236 for float32 (2 Emerald Rapids cores, benchmarks/RESULTS.md).
    AMD's Zen 4 runs it at twice its float32 rate, AMX at five times."""
    if not cpu_has_native_bf16():
        return True
    flags = native.cpu_flags()
    return native.cpu_vendor() == "GenuineIntel" and "avx512_bf16" in flags and "amx_bf16" not in flags


def explain_vision_dtype(dtype: str, device: torch.device, text_dtype: torch.dtype,
                         bf16_slow=None) -> tuple[torch.dtype, str]:
    """The vision tower's dtype and why ("" when it is the text model's): under auto, float32 on CPUs whose
    bfloat16 matmuls are no faster than float32 ones, where the compute-bound tower would only lose by
    bfloat16 (the text model keeps bfloat16: decode is bound by the bytes it reads). Costs the tower's
    weights twice the memory (0.67B parameters on every Qwen2.5-VL size). `bf16_slow()` is injectable."""
    slow = bf16_slow or cpu_bf16_matmul_is_slow
    if dtype == "auto" and device.type == "cpu" and text_dtype == torch.bfloat16 and slow():
        return torch.float32, "vision tower float32: bfloat16 matmuls are no faster on this CPU (AVX512-BF16 without AMX)"
    return text_dtype, ""


def explain_dtype(dtype: str, device: torch.device, bf16_ok=None) -> tuple[torch.dtype, str]:
    """The dtype to load in and why (a phrase for --verbose). auto: bfloat16 where the device computes it
    natively (CUDA with bfloat16, CPUs with AVX512-BF16 or AMX), else float16 on older GPUs (T4, V100)
    and float32 on other CPUs. `bf16_ok(device) -> bool` is injectable for tests."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ModelError(f"unknown dtype {dtype!r} (choose auto, {', '.join(DTYPES)})")
        return DTYPES[dtype], f"{dtype} as asked"
    if device.type == "cuda":
        supported = bf16_ok or (lambda d: torch.cuda.is_bf16_supported(including_emulation=False))
        if supported(device):
            return torch.bfloat16, "auto: bfloat16, the GPU supports it"
        return torch.float16, "auto: float16, the GPU has no bfloat16"
    if device.type == "cpu":
        supported = bf16_ok or (lambda d: cpu_has_native_bf16())
        if supported(device):
            return torch.bfloat16, "auto: bfloat16, the CPU has native bfloat16 (AVX512-BF16/AMX)"
        return torch.float32, "auto: float32, the CPU has no native bfloat16 (AVX512-BF16/AMX)"
    return torch.float32, f"auto: float32 on {device.type}"


def resolve_dtype(dtype: str, device: torch.device, bf16_ok=None) -> torch.dtype:
    """explain_dtype without the reason."""
    return explain_dtype(dtype, device, bf16_ok)[0]


# The modules whose initialisers _meta_build skips (each defines reset_parameters; Conv3d's is _ConvNd's).
_INITIALISED = (nn.Embedding, nn.Linear, nn.modules.conv._ConvNd)


@contextmanager
def _meta_build():
    """Build on the meta device without initialisers (the checkpoint supplies every weight). nn.Embedding's
    normal_ on a meta tensor imports torch._dynamo: 1.0-1.4 s of start-up, measured; the Linear and Conv3d
    kaiming_uniform_ calls cost another 10 ms for nothing."""
    inits = [cls.reset_parameters for cls in _INITIALISED]
    for cls in _INITIALISED:
        cls.reset_parameters = lambda self: None
    try:
        with torch.device("meta"):
            yield
    finally:
        for cls, init in zip(_INITIALISED, inits):
            cls.reset_parameters = init


def load_model(
    ckpt: Checkpoint,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    quantize: str | None = None,
    pack: bool | None = None,
    vision_dtype: torch.dtype | None = None,
    upcast_prefill: bool | None = None,
) -> Qwen2_5_VL:
    """`quantize="int8"` / `"int4"`: weight-only int8 / groupwise int4 for the decoder's linears and an
    untied LM head, quantized tensor by tensor as read (everything else in `dtype`); a tied head, the
    embedding table too, is quantized once after loading and serves the lookups from its own rows.
    quant.quantized_linear says which matrices int4 takes (the others are int8).
    A float32 model on a bfloat16 checkpoint with the native kernels keeps the decoder's matrices and the
    embedding table in the file's bfloat16 (narrow_weights), computing on their exact float32 upcast.
    `pack` (default: on CPU) fuses each text layer's q/k/v and gate/up matrices and gives the decoder's
    float linears their decode form (quant.pack_linears: NativeLinear, else oneDNN's PackedLinear);
    pack=False keeps the checkpoint's plain nn.Linear modules (the slow oracle). `vision_dtype` (default:
    `dtype`) is the vision tower's (explain_vision_dtype). `upcast_prefill` (default: a bfloat16 or quantized
    model on a CPU where cpu_bf16_matmul_is_slow) lets the decoder's fast linears compute long inputs as
    float32 GEMMs: bfloat16 ones on exactly upcast operands (the same products and float32 sums as a
    bfloat16 GEMM, rounded once to bfloat16 alike, ~1.5x faster there), float32 ones of int8/int4 weights
    on their float32 dequantization instead of a bfloat16 one."""
    from safetensors import SafetensorError, safe_open

    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ModelError(f"unknown quantization {quantize!r} (choose {', '.join(QUANTIZATIONS)})")
    device = torch.device(device)
    vision_dtype = vision_dtype or dtype
    if upcast_prefill is None:
        upcast_prefill = (device.type == "cpu" and (dtype == torch.bfloat16 or quantize is not None)
                          and cpu_bf16_matmul_is_slow())
    with _meta_build():
        model = Qwen2_5_VL(ckpt.config)
    tied = ckpt.config.text.tie_word_embeddings
    pack = pack if pack is not None else device.type == "cpu"
    table_key = "model.embed_tokens.weight"
    kernels = native.kernels() if pack and device.type == "cpu" else None
    # A tied float head on CPU: with the native kernels it reads the shared table itself (NativeLinear);
    # without them it is packed apart from the table (TiedHead).
    native_head = tied and not quantize and kernels is not None and kernels.supports(dtype)
    split_tied = (tied and pack and not quantize and device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
                  and not native_head and onednn_packs(dtype))
    table: torch.Tensor | None = None
    # A float32 model on a checkpoint's bfloat16 weights (the hub's) with the native kernels: the decoder's
    # matrices and the embedding table stay the file's bytes, NativeLinear computing on their exact float32
    # upcast and MappedEmbedding casting the rows it looks up. The same numbers as a float32 copy, without
    # the copy (2x the file's bytes, written at load) and at half the bytes a decode step reads.
    narrow_keys = set()
    if kernels is not None and dtype == torch.float32 and not quantize and kernels.supports(torch.bfloat16):
        narrow_keys = {name + ".weight" for name in decoder_linear_names(model)} | {table_key}
    expected = {name: p.shape for name, p in model.named_parameters()}
    if tied:
        expected.pop("lm_head.weight")
    # A tied LM head is also the embedding table: quantized with it after loading (Int8Embedding reads the
    # int8 rows), or, in float on CPU, packed apart from it (TiedHead; MappedEmbedding reads the file's rows).
    fast_linears = [name for name in decoder_linear_names(model) if not (tied and name == "lm_head")]
    quantized: set[str] = set()
    if quantize:
        for name in fast_linears:
            linear = model.get_submodule(name)
            replace_module(model, name, quantized_linear(quantize, linear.in_features, linear.out_features,
                                                         linear.bias is not None, dtype, "meta"))
            quantized.add(name + ".weight")
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
                    if split_tied and key == table_key:
                        table = tensor  # stays mapped, in the file's dtype: see TiedHead below
                    elif key in narrow_keys and tensor.dtype == torch.bfloat16 and tensor.device == device:
                        _assign(model, key, tensor)  # the mapped file bytes, computed on in float32
                    elif key in quantized:
                        with one_thread():
                            model.get_submodule(key.rpartition(".")[0]).set_weight(tensor.to(device))
                        drop_pages(tensor)
                    else:
                        value = tensor.to(device=device, dtype=vision_dtype if key.startswith("visual.") else dtype)
                        _assign(model, key, value)
                        if value.data_ptr() != tensor.data_ptr():
                            drop_pages(tensor)  # cast or moved: the mapped file bytes are not needed again
                    seen.add(key)
        except SafetensorError as exc:
            raise ModelError(f"{file}: not a valid safetensors file ({exc})") from exc
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"{file}: cannot read ({exc})") from exc
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
    if tied and quantize:
        # The head is the embedding table: quantize it once and read the embeddings from its int8 / int4 rows.
        table = model.model.embed_tokens.weight
        vocab, hidden = table.shape
        head = quantized_linear(quantize, hidden, vocab, False, dtype, "meta")
        with one_thread():
            head.set_weight(table)
        model.lm_head = head
        embedding = Int8Embedding if isinstance(head, Int8Linear) else Int4Embedding
        model.model.embed_tokens = embedding(head, dtype)
        drop_pages(table)
    elif split_tied:
        model.lm_head = TiedHead(table, dtype, on_packed=drop_pages)
        model.model.embed_tokens = MappedEmbedding(table, dtype)
    elif tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    embedding = model.model.embed_tokens
    if isinstance(embedding, nn.Embedding) and embedding.weight.dtype != dtype:  # kept in the file's bfloat16
        model.model.embed_tokens = MappedEmbedding(embedding.weight, dtype)
    if pack:
        fuse_projections(model, on_fused=drop_pages)
        fast = [name for name in decoder_linear_names(model) if name != "lm_head" or not tied or native_head]
        pack_linears(model, fast, on_packed=drop_pages)
    if upcast_prefill:
        for name in decoder_linear_names(model):
            module = model.get_submodule(name)
            if hasattr(module, "upcast"):
                module.upcast = True
    return model.eval().requires_grad_(False)


def narrow_weights(model: Qwen2_5_VL) -> torch.dtype | None:
    """The dtype the decoder's weights kept from the checkpoint where it is narrower than the model's (a
    float32 model on bfloat16 weights: load_model), else None."""
    head = model.lm_head.weight if hasattr(model.lm_head, "weight") else None
    if head is not None and head.dtype != model.dtype and head.is_floating_point():
        return head.dtype
    return None


def drop_pages(tensor: torch.Tensor) -> None:
    """Tell the kernel the pages wholly inside a CPU tensor we are done with are not needed (madvise
    DONTNEED). safetensors maps the whole file and keeps the mapping while any tensor of the file lives, so
    the file pages under a weight that was cast, quantized or repacked stayed resident: +80 MiB peak over
    transformers (bf16) and +190 MiB (fp32), measured. Only pages wholly inside the tensor are dropped, so no
    neighbour is touched; no-op off Linux or for non-CPU tensors."""
    import ctypes
    import mmap
    import sys

    if tensor.device.type != "cpu" or not sys.platform.startswith("linux") or tensor.is_mkldnn:
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=False))
