"""qwenvl against transformers on a GPU, on the same random weights built on the device (no checkpoint on
disk, no weight copied: qwenvl's parameters are transformers' tensors).

Prints, and writes as JSON to --out, per test image the vision tower seconds (qwenvl's also with its padded
attention call: on CUDA in half precision its default is variable-length flash attention) and the time to
the first token (vision + prefill + the first pick); on the first image's prompt the decode tokens/s timed
inside one answer (benchmarks/timing.py) of qwenvl's step as it runs (on CUDA one captured graph a step),
qwenvl's eager module step and transformers', and the decode as a share of the device's streaming-read
bandwidth (weight bytes a step reads / step time). Also the ratios (> 1: qwenvl faster), best of --rounds
alternating passes; how many greedy tokens the graph and the eager step agree on; the largest difference
between the varlen and the padded vision features; and peak memory.

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
from timing import ours_run, step_bytes, theirs_run  # noqa: E402
from checkpoints import TEXT, VISION, _config  # noqa: E402

from qwenvl_cli.config import ModelConfig  # noqa: E402
from qwenvl_cli.generate import Generator, SamplingParams  # noqa: E402
from qwenvl_cli.model.loader import _assign, _meta_build, canonical_key  # noqa: E402
from qwenvl_cli.model import vision  # noqa: E402
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


class Case:
    """One test image's prompt, for both models."""

    def __init__(self, size: str, ours, ref, device: torch.device, dtype: torch.dtype) -> None:
        width, height = map(int, size.split("x"))
        processed, vis, ids = image_prompt(width, height)
        self.size, self.ours, self.ref, self.vis, self.dtype = size, ours, ref, vis, dtype
        self.vision_tokens = ids.count(151655)  # image pads
        self.pv, self.thw = processed.pixel_values.to(device), grid_tensor(processed, device)
        input_ids = torch.tensor([ids], device=device)
        self.kw = dict(input_ids=input_ids, pixel_values=self.pv, image_grid_thw=self.thw,
                       mm_token_type_ids=(input_ids == 151655).int(), attention_mask=torch.ones_like(input_ids))
        self.prompt = ours.make_prompt(ids, vis)

    def ours_vision(self, attention: str = "batched") -> torch.Tensor:
        return self.ours.vision_features(self.vis, attention)

    def vision_diff(self) -> float:
        """Max |default - padded| of qwenvl's vision features (on CUDA in half precision the default is
        variable-length flash attention; padded is one SDPA call over padded segments)."""
        return (self.ours_vision() - self.ours_vision("padded")).abs().max().item()

    def ref_vision(self) -> None:
        self.ref.model.get_image_features(self.pv.to(self.dtype), self.thw)

    def logits_diff(self) -> float:
        mine = self.ours(self.prompt)[0, -1]
        kw = {k: v for k, v in self.kw.items() if k != "attention_mask"}
        theirs = self.ref(**kw).logits[0, -1].float()
        return (mine - theirs).abs().max().item()


def read_bandwidth(device: torch.device, sync, nbytes: int = 4 << 30) -> float:
    """Streaming-read GB/s: the best of 5 reductions over a buffer far larger than any cache."""
    buf = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    best = float("inf")
    for _ in range(5):
        sync()
        t = time.perf_counter()
        buf.sum()
        sync()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="3b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--image", nargs="+", default=["2000x1000", "1036x1036"],
                    help="WIDTHxHEIGHT of the random test images, pixels (decode is timed on the first)")
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

    n = args.new_tokens
    cases = [Case(size, ours, ref, device, dtype) for size in args.image]

    def timed(fn, *a):
        sync()
        t = time.perf_counter()
        fn(*a)
        sync()
        return time.perf_counter() - t

    best: dict[tuple, float] = {}

    def keep(key, value):
        best[key] = min(best.get(key, float("inf")), value)

    graphed, eager = Generator(ours), Generator(ours, step="modules")
    decode = cases[0]  # decode is timed on the first image's prompt
    runs = {"qwenvl": lambda c, k: ours_run(graphed, c.prompt, k), "qwenvl eager": lambda c, k: ours_run(eager, c.prompt, k),
            "transformers": lambda c, k: theirs_run(ref, c.kw, k)}
    with torch.inference_mode():
        # Same weights, same answer: the last position's logits of both (a check, not a parity test).
        logits_diff = max(c.logits_diff() for c in cases)
        vision_diff = max(c.vision_diff() for c in cases)
        for c in cases:  # warm-up: kernels chosen, the graph captured
            c.ours_vision(), c.ref_vision()
            for run in runs.values():
                run(c, 2)
        for _ in range(args.rounds):
            for c in cases:
                keep((c.size, "qwenvl", "vision_s"), timed(c.ours_vision))
                keep((c.size, "qwenvl padded", "vision_s"), timed(c.ours_vision, "padded"))
                keep((c.size, "transformers", "vision_s"), timed(c.ref_vision))
                for who, run in runs.items():
                    if c is decode:
                        first, rest = run(c, n)
                        keep(("decode", who), rest / (n - 1))
                    else:
                        first, _ = run(c, 1)
                    keep((c.size, who, "first_token_s"), first)
        # The graph's greedy tokens against the eager modules' (bfloat16 attention sums in another order,
        # so a near tie may part them late; float32 should agree throughout).
        got = [s.token_id for s in graphed.stream(decode.prompt, SamplingParams(max_new_tokens=n))]
        want = [s.token_id for s in eager.stream(decode.prompt, SamplingParams(max_new_tokens=n))]
        same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    bandwidth = read_bandwidth(device, sync)
    nbytes = step_bytes(ours)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "preset": args.preset, "dtype": args.dtype, "build_s": built,
              "read_GBps": bandwidth, "decode_weight_MB_per_token": nbytes / 1e6,
              "decode_path": graphed.decode_path, "tokens_equal_to_the_eager_step": f"{same} of {n}",
              "last_logits_max_abs_diff": logits_diff, "vision_varlen_vs_padded_max_abs_diff": vision_diff,
              "vision_varlen_off": vision.varlen_off}
    step = {who: best["decode", who] for who in runs}
    result["decode"] = {
        "image": decode.size, "prompt_tokens": decode.prompt.length, "new_tokens": n,
        **{f"{who} tok/s": 1 / t for who, t in step.items()},
        "qwenvl % of read bandwidth": 100 * nbytes / 1e9 / step["qwenvl"] / bandwidth,
        "ratio qwenvl / transformers": step["transformers"] / step["qwenvl"],
        "ratio qwenvl / qwenvl eager": step["qwenvl eager"] / step["qwenvl"],
    }
    for c in cases:
        row = {"vision_tokens": c.vision_tokens, "prompt_tokens": c.prompt.length,
               "qwenvl padded vision_s": best[c.size, "qwenvl padded", "vision_s"]}
        for key in ("vision_s", "first_token_s"):
            for who in ("qwenvl", "transformers"):
                row[f"{who} {key}"] = best[c.size, who, key]
            row[f"ratio {key} transformers / qwenvl"] = best[c.size, "transformers", key] / best[c.size, "qwenvl", key]
        result[c.size] = row
    if device.type == "cuda":
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
