"""Video sampling on long files: time and peak memory of `sample_video` and the preprocess to pixel values.

Generates synthetic clips with PyAV (a moving gradient with the frame number burnt in as blocks;
libx264 ultrafast, else mpeg4; a keyframe every 2 s), cached in a temp dir, and runs each in a fresh
subprocess at the defaults (2 fps, at most 768 frames, the default token budget). Peak RSS is the
child's VmHWM: it should stay flat as the video grows, since only the chosen frames are kept.
Nothing is asserted.

    python benchmarks/bench_video.py                                  # 1, 3, 10 min at 1920x1080, 30 fps
    python benchmarks/bench_video.py --minutes 1,3,10,30 --size 1280x720 --fps 30

The default is 1080p30 at 1/3/10 min: on the 2-core dev machine, shared with other jobs (load ~7, this
run got about half a core), the first run took 8 min 49 s: 6.7 min generating (29, 94, 278 s; cached
for later runs) and 2.1 min sampling. Measured in that run (libx264; RSS in MB: the child's after its
imports, its peak through sampling, its peak with the preprocess to pixel values too):

    duration file MB frames frame WxH tokens sample s prep s wall s RSS base  peak +prep
       1.0 m    10.4    120   728x420  23400     12.4    3.7   21.8      238   394   850
       3.0 m    31.2    360   420x224  21600     24.2    7.4   35.3      238   382   772
      10.0 m   103.9    768   280x168  23040     58.1    8.3   70.3      238   391   806

A rerun on the cached files took 3 min 19 s (sample 13.2 / 40.2 / 104.6 s: the machine was busier), with
the same RSS to within 6 MB. Memory stays flat: the ~110 MB of kept frames (768 x 280 x 168 x 3 bytes at
10 min) and the ~440 MB of float32 pixel values are both bounded by the token budget, not the duration;
time grows with duration, as every frame is demuxed and, with a frame chosen every 0.5-0.8 s and a
keyframe every 2 s, few can be skipped by seeking (16,188 of the 18,000 at 10 min were decoded).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

VERSION = 1  # bump when the generated picture changes, so stale cached files are not reused


def codec_name() -> str:
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def generate(path: Path, seconds: float, size: tuple[int, int], fps: int) -> None:
    """A clip of `seconds` at `fps`: a diagonal gradient moving 4 levels a frame, the frame number in
    binary as 16 white/black blocks along the top. Written to a .part file, renamed when complete."""
    width, height = size
    part = path.with_suffix(".part")
    codec = codec_name()
    with av.open(str(part), "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = 2 * fps
        if codec == "libx264":
            stream.options = {"preset": "ultrafast"}
        else:
            stream.bit_rate = width * height * fps // 20
        # yuv420p as one (1.5 H, W) plane stack: luma rows, then U and V a quarter of the size each.
        x = np.arange(width, dtype=np.uint16)
        base = ((x + np.arange(height, dtype=np.uint16)[:, None]) & 255).astype(np.uint8)  # (H, W)
        yuv = np.empty((height * 3 // 2, width), np.uint8)
        yuv[height:] = (np.arange(width) * 255 // max(width - 1, 1)).astype(np.uint8)  # a chroma ramp
        block = max(8, width // 32)
        for i in range(round(seconds * fps)):
            luma = yuv[:height]
            np.add(base, np.uint8(4 * i % 256), out=luma)  # uint8: wraps around
            for bit in range(16):
                luma[:block, bit * block : (bit + 1) * block] = 255 if i >> bit & 1 else 0
            for packet in stream.encode(av.VideoFrame.from_ndarray(yuv, format="yuv420p")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(part, path)


def clip(cache: Path, minutes: float, size: tuple[int, int], fps: int) -> tuple[Path, float | None]:
    """(path, seconds spent generating it; None when it was cached)."""
    path = cache / f"v{VERSION}_{codec_name()}_{size[0]}x{size[1]}_{fps}fps_{minutes:g}min.mp4"
    if path.exists():
        return path, None
    started = time.perf_counter()
    generate(path, minutes * 60, size, fps)
    return path, time.perf_counter() - started


def _rss_mb(field: str) -> float:
    """VmRSS / VmHWM (peak) of this process in MB; ru_maxrss where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KB elsewhere


def child(path: Path) -> None:
    """One measurement in this (fresh) process; one JSON line on stdout."""
    from qwenvl_cli.config import PreprocessorConfig
    from qwenvl_cli.media.frames import preprocess_frames
    from qwenvl_cli.media.video import VideoOptions, sample_video

    base = _rss_mb("VmRSS")
    started = time.perf_counter()
    sampled = sample_video(path, path.name, VideoOptions())
    sampled_at = time.perf_counter()
    sample_peak = _rss_mb("VmHWM")
    processed = preprocess_frames(sampled.frames, PreprocessorConfig(), sampled.second_per_grid_t)
    done = time.perf_counter()
    print(json.dumps(dict(
        duration=sampled.info.duration,
        frames=len(sampled.timestamps),
        size=sampled.resized_size,
        tokens=sampled.tokens,
        pixel_values=list(processed.pixel_values.shape),
        sample_s=sampled_at - started,
        preprocess_s=done - sampled_at,
        base_mb=base,
        sample_peak_mb=sample_peak,
        peak_mb=_rss_mb("VmHWM"),
        notes=sampled.notes,
    )))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", default="1,3,10", help="clip durations, comma-separated")
    parser.add_argument("--size", default="1920x1080", help="WIDTHxHEIGHT of the generated clips")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "qwenvl-bench-video")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return

    minutes = [float(m) for m in args.minutes.split(",")]
    size = tuple(int(v) for v in args.size.lower().split("x"))
    args.cache.mkdir(parents=True, exist_ok=True)
    print(f"{codec_name()}, {size[0]}x{size[1]} at {args.fps} fps, cached in {args.cache}", file=sys.stderr)

    rows = []
    for m in minutes:
        path, generated = clip(args.cache, m, size, args.fps)
        made = "cached" if generated is None else f"generated in {generated:.0f} s"
        print(f"{path.name}: {path.stat().st_size / 1e6:.1f} MB, {made}", file=sys.stderr)
        started = time.perf_counter()
        run = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True)
        wall = time.perf_counter() - started
        if run.returncode:
            sys.exit(f"{path.name}: the child failed:\n{run.stderr}")
        result = json.loads(run.stdout.strip().splitlines()[-1])
        for note in result["notes"]:
            print(f"  note: {note}", file=sys.stderr)
        rows.append((path, result, wall))

    # RSS in MB: after the child's imports, its peak through sampling, its peak with the preprocess too.
    print(f"{'duration':>8} {'file MB':>7} {'frames':>6} {'frame WxH':>9} {'tokens':>6} {'sample s':>8} "
          f"{'prep s':>6} {'wall s':>6} {'RSS base':>8} {'peak':>5} {'+prep':>5}")
    for path, r, wall in rows:
        w, h = r["size"]
        print(f"{r['duration'] / 60:>6.1f} m {path.stat().st_size / 1e6:>7.1f} {r['frames']:>6} {f'{w}x{h}':>9} "
              f"{r['tokens']:>6} {r['sample_s']:>8.1f} {r['preprocess_s']:>6.1f} {wall:>6.1f} "
              f"{r['base_mb']:>8.0f} {r['sample_peak_mb']:>5.0f} {r['peak_mb']:>5.0f}")

if __name__ == "__main__":
    main()
