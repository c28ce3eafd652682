"""qwenvl against llama.cpp on the same random weights, alternating in one run: decode speed per precision
(fp32, bf16, 8-bit, 4-bit) and the whole describe job (a process that loads, encodes an image and writes
32 tokens).

    python benchmarks/bench_llamacpp.py --llama-cpp ~/src/llama.cpp        # a tree with build/bin
    python benchmarks/bench_llamacpp.py --llama-cpp DIR --only decode --rounds 5

llama.cpp's side: `llama-bench -p 0 -n N -d DEPTH` for decode (tokens/s after DEPTH tokens of context, the
depth of qwenvl's image prompt), `llama-mtmd-cli` for the whole job, both on 2 threads. GGUF files come
from its own `convert_hf_to_gguf.py` (text and --mmproj) and `llama-quantize` (Q8_0, Q4_K_M), made once
into --work and reused. The README says how to build llama.cpp. Needs the test extra (the checkpoints).
Every figure is the best of --rounds: on a shared machine noise only adds time.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_cpu import PRESETS, read_bandwidth  # noqa: E402
from timing import step_bytes  # noqa: E402
from prompts import image_prompt  # noqa: E402
from checkpoints import make_checkpoint  # noqa: E402

from qwenvl_cli.generate import Generator, SamplingParams  # noqa: E402
from qwenvl_cli.model import native  # noqa: E402
from qwenvl_cli.model.loader import load_model, open_checkpoint, resolve_dtype  # noqa: E402
from qwenvl_cli.model.quant import QUANTIZATIONS  # noqa: E402

# (label, qwenvl --dtype, qwenvl --quantize, llama.cpp text GGUF type, llama.cpp mmproj type, the checkpoint
# file's dtype). "auto" is qwenvl's default: bfloat16 where the CPU computes it natively, the vision tower in
# float32 where bfloat16 matmuls are no faster (loader.explain_vision_dtype); it is timed on the whole job
# only (its decode is the bf16 row's). "fp32, bf16 file" is float32 arithmetic on a bfloat16 checkpoint (the
# hub's; --dtype auto on a CPU without native bfloat16): qwenvl keeps the file's weights and computes on
# their exact upcast; llama.cpp's nearest is its bf16 GGUF (the same bytes; it rounds the activations to
# bfloat16).
PRECISIONS = [
    ("fp32", "float32", None, "f32", "f32", "float32"),
    ("bf16", "bfloat16", None, "bf16", "bf16", "float32"),
    ("fp32, bf16 file", "float32", None, "bf16", "bf16", "bfloat16"),
    ("auto", "auto", None, "bf16", "bf16", "float32"),
    ("auto, bf16 file", "auto", None, "bf16", "bf16", "bfloat16"),
    ("8-bit", "auto", "int8", "Q8_0", "bf16", "float32"),
    ("4-bit", "auto", "int4", "Q4_K_M", "bf16", "float32"),
]

# Qwen's tokenizer is BPE: the converter tries a sentencepiece vocabulary first and falls back to BPE when
# tokenizer.model is missing, but it imports the sentencepiece package before looking. Make that attempt
# fail the way a missing file does, so the package is not needed.
CONVERT = """
import os, runpy, sys
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))  # as `python convert_hf_to_gguf.py` would
import conversion.base

def no_sentencepiece(self, *args, **kwargs):
    raise FileNotFoundError("no tokenizer.model (BPE tokenizer)")

conversion.base.TextModel._set_vocab_sentencepiece = no_sentencepiece
runpy.run_path(script, run_name="__main__")
"""


class Gguf:
    """GGUF files of one checkpoint, made on first use into `work` and reused: text "f32", "bf16" (by
    convert_hf_to_gguf.py), "Q8_0", "Q4_K_M" (by llama-quantize from f32), and mmproj "f32", "bf16"."""

    def __init__(self, llama: Path, ckpt: Path, work: Path) -> None:
        self.llama, self.ckpt, self.work = llama, ckpt, work

    def text(self, kind: str) -> Path:
        path = self.work / f"text-{kind}.gguf"
        if not path.exists():
            if kind in ("f32", "bf16"):
                self._convert([], kind, path)
            else:
                subprocess.run([str(self.llama / "build/bin/llama-quantize"), str(self.text("f32")), str(path), kind],
                               check=True, capture_output=True)
        return path

    def mmproj(self, kind: str) -> Path:
        path = self.work / f"mmproj-{kind}.gguf"
        if not path.exists():
            self._convert(["--mmproj"], kind, path)
        return path

    def _convert(self, flags: list[str], outtype: str, path: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(self.llama / "gguf-py")}
        subprocess.run([sys.executable, "-c", CONVERT, str(self.llama / "convert_hf_to_gguf.py"), str(self.ckpt),
                        *flags, "--outtype", outtype, "--outfile", str(path)], env=env, check=True, capture_output=True)


# llama.cpp repacks weights for its CPU kernels by default (on CPUs with AMX, into its AMX layout); on some
# CPUs that is slower (2 Xeon vCPUs with AMX, bf16: 73 tok/s repacked vs 85 not) or crashes (the same box,
# Q8_0 at depth: SIGSEGV in ggml_backend_amx_mul_mat). Both settings are timed and llama.cpp gets its best;
# a setting that crashes is dropped for that file and reported.
REPACK = {"llama-bench": (["--repack", "1"], ["--repack", "0"]), "llama-mtmd-cli": ([], ["--no-repack"])}
CRASHED: dict[tuple[str, str], str] = {}  # (tool, model file) -> the flags that crashed


def llama_best(tool: str, model: Path, run) -> tuple[float, str]:
    """The best `run(flags) -> (seconds or rate, detail)` over llama.cpp's repack settings, by `tool`'s
    ordering (llama-bench: the highest rate; llama-mtmd-cli: the least time). Detail names the setting."""
    results = []
    for flags in REPACK[tool]:
        if CRASHED.get((tool, model.name)) == " ".join(flags):
            continue
        try:
            value, detail = run(flags)
        except subprocess.CalledProcessError as exc:
            CRASHED[(tool, model.name)] = " ".join(flags)
            print(f"  {tool} {model.name} {' '.join(flags) or '(defaults)'}: exit {exc.returncode}, dropped",
                  file=sys.stderr)
            continue
        results.append((value, (detail + "; " if detail else "") + (" ".join(flags) or "repack on")))
    if not results:
        raise RuntimeError(f"{tool} failed on {model} with every repack setting")
    return max(results) if tool == "llama-bench" else min(results)


def llama_decode(llama: Path, model: Path, depth: int, n: int) -> tuple[float, str]:
    """llama-bench's tokens/s for n tokens after `depth` tokens of context (one repetition), and the repack
    setting that gave it."""
    def run(flags):
        cmd = [str(llama / "build/bin/llama-bench"), "-m", str(model), "-p", "0", "-n", str(n), "-d", str(depth),
               "-t", "2", "-r", "1", "-o", "json", *flags]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        return json.loads(out)[0]["avg_ts"], ""
    return llama_best("llama-bench", model, run)


def ours_decode(model, ids, vis, n: int) -> float:
    """qwenvl's tokens/s over n greedy tokens after the image prompt (the prefill not counted)."""
    steps = Generator(model).stream(model.make_prompt(ids, vis), SamplingParams(max_new_tokens=n + 1))
    next(steps)
    t = time.perf_counter()
    count = sum(1 for _ in steps)
    return count / (time.perf_counter() - t)


def whole_llama(llama: Path, text: Path, mmproj: Path, image: Path, n: int) -> tuple[float, str]:
    def run(flags):
        cmd = [str(llama / "build/bin/llama-mtmd-cli"), "-m", str(text), "--mmproj", str(mmproj), "--image",
               str(image), "-p", "Describe this image.", "-n", str(n), "--temp", "0", "--repeat-penalty", "1.0",
               "--jinja", "-t", "2", "--image-max-tokens", "16384", *flags]
        t = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t
        encode = re.search(r"batch encoding done in (\d+) ms", run.stderr)
        return wall, f"image encode {int(encode.group(1)) / 1e3:.1f} s" if encode else ""
    return llama_best("llama-mtmd-cli", text, run)


def whole_ours(ckpt: Path, image: Path, dtype: str, quantize: str | None, n: int) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "qwenvl_cli", "describe", str(image), "--model", str(ckpt), "--max-new-tokens",
           str(n), "--temperature", "0", "--repetition-penalty", "1.0", "--dtype", dtype, "-v", "-q"]
    if quantize:
        cmd += ["--quantize", quantize]
    t = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    timing = re.search(r"prefill ([\d.]+)s; (\d+) tokens, decode ([\d.]+) tok/s", run.stderr)
    detail = f"prefill (vision + prompt) {timing.group(1)} s, {timing.group(2)} tokens at {timing.group(3)} tok/s" \
        if timing else ""
    return wall, detail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree with build/bin")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "qwenvl-bench-llamacpp",
                    help="where the checkpoint and GGUF files are made once and reused")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="issue")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--decode-image", default="448x448", help="image of the decode prompt (sets the depth)")
    ap.add_argument("--image", default="1600x1146", help="image of the whole describe job")
    ap.add_argument("--only", choices=["decode", "whole"])
    ap.add_argument("--torch-kernels", action="store_true",
                    help="also time qwenvl's decode without the native kernels (torch's, as where none build)")
    args = ap.parse_args()
    llama = args.llama_cpp.expanduser().resolve()
    work = args.work.expanduser() / args.preset
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "ckpt"
    # the same random weights (one seed) as float32 and as bfloat16 files: GGUFs come from the float32 one
    files = {"float32": ckpt, "bfloat16": work / "ckpt-bf16"}
    for dtype, path in files.items():
        if not (path / "config.json").exists():
            preset = PRESETS[args.preset]
            make_checkpoint(path, text=preset["text"], vision=preset["vision"], tied=preset["tied"], dtype=dtype)
    ggufs = Gguf(llama, ckpt, work)
    precisions = [p for p in PRECISIONS if p[2] is None or p[2] in QUANTIZATIONS]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; llama.cpp {llama}; preset {args.preset}")
    if args.only != "whole":
        decode(args, llama, files, ggufs, [p for p in precisions if not p[0].startswith("auto")])
    if args.only != "decode":
        whole(args, llama, files, ggufs, precisions)


@contextmanager
def torch_kernels():
    """qwenvl as it runs where the native kernels cannot be built: oneDNN-packed floats, torch's int8."""
    saved = native.status
    native.status = lambda: native.Status(None, "torch's kernels (benchmark)")
    try:
        yield
    finally:
        native.status = saved


def decode(args, llama: Path, files: dict[str, Path], ggufs: Gguf, precisions) -> None:
    width, height = map(int, args.decode_image.split("x"))
    _, vis, ids = image_prompt(width, height)
    checkpoints = {dtype: open_checkpoint(path) for dtype, path in files.items()}
    kinds = {"qwenvl": nullcontext}
    if args.torch_kernels:
        kinds["qwenvl, torch kernels"] = torch_kernels
    models = {}
    for who, context in kinds.items():
        with context():
            for label, dtype, q, _, _, file in precisions:
                models[label, who] = load_model(checkpoints[file], "cpu", resolve_dtype(dtype, torch.device("cpu")),
                                                quantize=q)
    bandwidth = read_bandwidth()
    best: dict[tuple[str, str], float] = {}  # (label, qwenvl kind) -> tokens/s
    llama_best_run: dict[str, tuple[float, str]] = {}  # label -> (tokens/s, llama.cpp's repack setting)

    def ours(label, who):
        with kinds[who]():
            return ours_decode(models[label, who], ids, vis, args.new_tokens)

    with torch.inference_mode():
        for (label, who), model in models.items():
            with kinds[who]():
                ours_decode(model, ids, vis, 2)  # warm-up: kernels built, weights faulted in
        for r in range(args.rounds):
            for label, _, _, gtype, _, _ in precisions:
                runs = [(who, functools.partial(ours, label, who)) for who in kinds]
                for who, rate in runs:
                    best[(label, who)] = max(best.get((label, who), 0.0), rate())
                theirs = llama_decode(llama, ggufs.text(gtype), len(ids), args.new_tokens)
                llama_best_run[label] = max(llama_best_run.get(label, (0.0, "")), theirs)
            print(f"  decode round {r + 1}/{args.rounds} done", file=sys.stderr)
    print(f"\ndecode after a {len(ids)}-token image prompt, {args.new_tokens} tokens, tokens/s (best of "
          f"{args.rounds}); streaming read {bandwidth:.1f} GB/s; qwenvl on {native.status().reason}")
    extra = f" {'torch kernels':>14s} {'t / l':>6s}" if args.torch_kernels else ""
    print(f"{'precision':23s} {'qwenvl':>7s} {'llama.cpp':>10s} {'q / l':>6s}{extra} {'qwenvl MB/token':>16s} "
          f"{'% of read':>10s}")
    for label, _, _, gtype, _, _ in precisions:
        q, theirs = best[(label, "qwenvl")], llama_best_run[label][0]
        mb = step_bytes(models[label, "qwenvl"]) / 1e6
        extra = ""
        if args.torch_kernels:
            t = best[(label, "qwenvl, torch kernels")]
            extra = f" {t:14.1f} {t / theirs:5.2f}x"
        print(f"{label + ' / ' + gtype:23s} {q:7.1f} {theirs:10.1f} {q / theirs:5.2f}x{extra} {mb:16.0f} "
              f"{mb / 1e3 * q / bandwidth:9.0%}  (llama.cpp {llama_best_run[label][1]})")
    report_crashes()


def report_crashes() -> None:
    for (tool, name), flags in sorted(CRASHED.items()):
        print(f"llama.cpp crashed: {tool} {flags or '(repack on)'} on {name} (its other setting timed)")


def whole(args, llama: Path, files: dict[str, Path], ggufs: Gguf, precisions) -> None:
    import numpy as np
    from PIL import Image

    width, height = map(int, args.image.split("x"))
    image = files["float32"].parent / f"image-{width}x{height}.png"
    if not image.exists():
        pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(image)
    best: dict[tuple, tuple[float, str]] = {}  # (label, "qwenvl") or ((gtype, mtype), "llama.cpp") -> best

    def keep(key, result):
        if key not in best or result[0] < best[key][0]:
            best[key] = result

    for r in range(args.rounds):
        timed = set()  # llama.cpp's job once a round per pair of GGUF types
        for label, dtype, q, gtype, mtype, file in precisions:
            keep((label, "qwenvl"), whole_ours(files[file], image, dtype, q, args.new_tokens))
            if (gtype, mtype) not in timed:
                timed.add((gtype, mtype))
                keep(((gtype, mtype), "llama.cpp"), whole_llama(llama, ggufs.text(gtype), ggufs.mmproj(mtype), image,
                                                                args.new_tokens))
        print(f"  whole-job round {r + 1}/{args.rounds} done", file=sys.stderr)
    print(f"\nwhole describe job: one process, a {width}x{height} image, {args.new_tokens} tokens, seconds (best of "
          f"{args.rounds})")
    print(f"{'precision':30s} {'qwenvl s':>9s} {'llama.cpp s':>12s} {'l / q':>7s}  details")
    for label, _, _, gtype, mtype, _ in precisions:
        (ours, od), (theirs, td) = best[(label, "qwenvl")], best[((gtype, mtype), "llama.cpp")]
        print(f"{label + f' ({gtype}+{mtype})':30s} {ours:8.1f} {theirs:12.1f} {theirs / ours:6.2f}x  qwenvl: {od}; "
              f"llama.cpp: {td}")
    report_crashes()


if __name__ == "__main__":
    main()
