"""qwenvl against transformers on a GPU, on the same random weights built on the device (no checkpoint on
disk, no weight copied: qwenvl's parameters are transformers' tensors).

Prints, and writes as JSON to --out, the vision tower seconds, the time to the first token (vision +
prefill + one step), decode tokens/s timed inside the same answer (benchmarks/timing.py) and the ratios
transformers / qwenvl (> 1: qwenvl faster), best of --rounds alternating passes, plus peak memory.

    python benchmarks/bench_gpu.py --preset 3b --out $OUT/gpu.json          # what benchmarks/gpu.sh runs
    python benchmarks/bench_gpu.py --preset tiny --device cpu --rounds 1 --new-tokens 32  # smoke test without a GPU

Needs transformers (the test extra) for the reference.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from prompts import grid_tensor, image_prompt  # noqa: E402
from timing import ours_run, theirs_run  # noqa: E402
from checkpoints import TEXT, VISION, _config  # noqa: E402

from qwenvl_cli.config import ModelConfig  # noqa: E402
from qwenvl_cli.generate import Generator  # noqa: E402
from qwenvl_cli.model.loader import _assign, _meta_build, canonical_key  # noqa: E402
from qwenvl_cli.model.qwen2_5_vl import Qwen2_5_VL  # noqa: E402

PRESETS = {
    "3b": dict(text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, mrope_section=[16, 24, 24]),
               vision=dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420,
                           fullatt_block_indexes=[7, 15, 23, 31]), tied=True),
    "7b": dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, mrope_section=[16, 24, 24], vocab_size=152064),
               vision=dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420,
                           fullatt_block_indexes=[7, 15, 23, 31]), tied=False),
    "tiny": dict(text={}, vision={}, tied=False),
}


def build_pair(preset: dict, device: torch.device, dtype: torch.dtype):
    """transformers' model initialised on the device as the test checkpoints are (N(0, 1/fan_in) matrices,
    N(0, 0.1) biases, 1 + N(0, 0.1) norms, N(0, 1) embeddings), and qwenvl's model on the same tensors."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text, vision = {**TEXT, **preset["text"]}, {**VISION, **preset["vision"]}
    raw = _config(text, vision, preset["tied"], "bfloat16" if dtype == torch.bfloat16 else "float32", "nested")
    # Built on the device by transformers itself (its buffers, e.g. rotary inv_freq, initialised as it does),
    # then every parameter redrawn below.
    with torch.device(device):
        ref = Qwen2_5_VLForConditionalGeneration._from_config(Qwen2_5_VLConfig.from_dict(raw), dtype=dtype)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in ref.named_parameters():  # tied: the shared tensor is listed (and drawn) once
            if name.endswith(".bias"):
                p.normal_(0, 0.1, generator=g)
            elif p.ndim == 1:
                p.normal_(1, 0.1, generator=g)
            elif name.endswith("embed_tokens.weight"):
                p.normal_(0, 1, generator=g)
            else:
                p.normal_(0, 1 / math.sqrt(p[0].numel()), generator=g)
    ref.eval()
    with _meta_build():
        ours = Qwen2_5_VL(ModelConfig.from_dict(raw))
    for name, p in ref.named_parameters(remove_duplicate=False):
        _assign(ours, canonical_key(name), p.detach())
    if preset["tied"]:
        ours.lm_head.weight = ours.model.embed_tokens.weight
    assert not any(p.is_meta for p in ours.parameters()), "a parameter was not shared"
    return ours.eval().requires_grad_(False), ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="3b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--image", default="1600x1146", help="WIDTHxHEIGHT of the random test image, pixels")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t = time.perf_counter()
    ours, ref = build_pair(PRESETS[args.preset], device, dtype)
    sync()
    built = time.perf_counter() - t

    width, height = map(int, args.image.split("x"))
    processed, vis, ids = image_prompt(width, height)
    n_vis = ids.count(151655)  # image pads
    pv, thw = processed.pixel_values.to(device), grid_tensor(processed, device)
    input_ids = torch.tensor([ids], device=device)
    n = args.new_tokens

    def ours_vision():
        ours.vision_features(vis)

    def ref_vision():
        ref.model.get_image_features(pv.to(dtype), thw)

    kw = dict(input_ids=input_ids, pixel_values=pv, image_grid_thw=thw, mm_token_type_ids=(input_ids == 151655).int(),
              attention_mask=torch.ones_like(input_ids))
    prompt = ours.make_prompt(ids, vis)
    generator = Generator(ours)

    def run_one(who, count):
        return ours_run(generator, prompt, count) if who == "qwenvl" else theirs_run(ref, kw, count)

    def timed(fn, *a):
        sync()
        t = time.perf_counter()
        fn(*a)
        sync()
        return time.perf_counter() - t

    best: dict[tuple[str, str], float] = {}

    def keep(who, key, value):
        best[who, key] = min(best.get((who, key), float("inf")), value)

    with torch.inference_mode():
        # Same weights, same answer: the last position's logits of both (a check, not a parity test).
        mine = ours(ours.make_prompt(ids, vis))[0, -1]
        theirs = ref(input_ids=input_ids, pixel_values=pv, image_grid_thw=thw,
                     mm_token_type_ids=(input_ids == 151655).int()).logits[0, -1].float()
        logits_diff = (mine - theirs).abs().max().item()
        for fn in (ours_vision, ref_vision):
            fn()
        run_one("qwenvl", 2)
        run_one("transformers", 2)
        for _ in range(args.rounds):
            for who, vision in (("qwenvl", ours_vision), ("transformers", ref_vision)):
                keep(who, "vision_s", timed(vision))
                first, rest = run_one(who, n)
                keep(who, "first_token_s", first)
                keep(who, "step_s", rest / (n - 1))
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "preset": args.preset, "dtype": args.dtype, "image": args.image,
              "vision_tokens": n_vis, "prompt_tokens": len(ids), "new_tokens": n, "build_s": built,
              "last_logits_max_abs_diff": logits_diff}
    for who in ("qwenvl", "transformers"):
        result[who] = {"vision_s": best[who, "vision_s"], "first_token_s": best[who, "first_token_s"],
                       "decode_tok_s": 1 / best[who, "step_s"]}
    result["ratio_transformers_over_qwenvl"] = {
        "vision": result["transformers"]["vision_s"] / result["qwenvl"]["vision_s"],
        "first_token": result["transformers"]["first_token_s"] / result["qwenvl"]["first_token_s"],
        "decode": result["qwenvl"]["decode_tok_s"] / result["transformers"]["decode_tok_s"],
    }
    if device.type == "cuda":
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
