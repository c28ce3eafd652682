"""Video sampling rules: which frames the model sees, at what size, and their true presentation times.

Owns the qwen-vl-utils 0.0.14 rules (frame count, per-frame pixel budget) applied to the frames'
presentation timestamps instead of index / average fps, and `sample_video`, which plans by them and asks
media/video_decode.py (the PyAV side) for only the chosen frames. Importing this module loads no PyAV.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import numpy as np

from qwenvl_cli.errors import InputError, UsageError
from qwenvl_cli.media.image import smart_resize


DEFAULT_FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
FRAME_FACTOR = 2  # temporal_patch_size: frames (2k, 2k+1) form one temporal patch
PATCH_FACTOR = 28  # patch_size 14 x spatial merge 2: one video token per 28x28 px per temporal patch
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
REFERENCE_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)  # qwen-vl-utils' default budget (~115k tokens)
# Ours is lower: Qwen's report evaluated video with at most 24,576 tokens and their README advises a
# total_pixels below 24576*28*28; the reference's ~115k tokens runs a 24 GB GPU out of memory on a
# 30-s 720p clip and leaves no room for the prompt in a 128k context.
DEFAULT_TOTAL_PIXELS = 24576 * 28 * 28
# Without --min-pixels, the per-frame minimum gives way to the budget, down to this floor (the cookbook's
# long-video setting): the reference's fixed 128*28*28 would need 768 / 2 * 134 = 51k tokens for a long
# clip, twice our budget. Short clips are unaffected: for them the budget's per-frame share is larger.
BUDGET_MIN_PIXELS = 16 * 28 * 28
_TIE = 1e-9  # s: a frame this close to --start/--end counts as inside the range (float noise in pts*tb)


# ---------------------------------------------------------------------------------------------- times
_TIME = re.compile(r"^(?:(?:(\d+):)?(\d+):)?(\d+(?:\.\d*)?|\.\d+)$")


def parse_time(text: str) -> float:
    """'12.5', '1:04', '01:02:03.250' ([hh:]mm:ss(.fff)) -> seconds. Minutes and seconds after a colon
    must be below 60. Anything else is a UsageError."""
    m = _TIME.match(text.strip())
    if not m:
        raise UsageError(f"time {text!r} is not seconds or [hh:]mm:ss(.fff) (e.g. 12.5, 1:04, 01:02:03.250)")
    hours, minutes, seconds = int(m[1] or 0), int(m[2] or 0), float(m[3])
    if m[2] is not None and seconds >= 60 or m[1] is not None and minutes >= 60:
        raise UsageError(f"time {text!r}: minutes and seconds after a colon must be below 60")
    return hours * 3600 + minutes * 60 + seconds


def format_time(seconds: float) -> str:
    """Seconds -> 'hh:mm:ss.fff' (negative times keep a '-')."""
    sign = "-" if seconds < 0 else ""
    ms = round(abs(seconds) * 1000)
    return f"{sign}{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"


# ---------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class VideoOptions:
    fps: float | None = None  # sampling rate; None -> DEFAULT_FPS unless nframes given; fps and nframes exclusive
    nframes: int | None = None
    start: float | None = None  # seconds of the source file
    end: float | None = None
    max_frames: int = FPS_MAX_FRAMES
    min_pixels: int | None = None  # per frame; None -> VIDEO_MIN_PIXELS, lowered where the budget needs it
    max_pixels: int | None = None  # per-frame cap; a user value can only lower the computed one
    total_pixels: int | None = None  # budget over all frames; None -> DEFAULT_TOTAL_PIXELS

    def __post_init__(self) -> None:
        if self.fps is not None and self.nframes is not None:
            raise UsageError("--fps and --nframes are exclusive: give one")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise UsageError(f"--fps must be a positive number of frames per second, got {self.fps:g}")
        if self.nframes is not None and self.nframes < FRAME_FACTOR:
            raise UsageError(f"--nframes must be at least {FRAME_FACTOR}, got {self.nframes}")
        for option, value in (("--start", self.start), ("--end", self.end)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise UsageError(f"{option} must be a time of at least 0 s, got {value:g}")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise UsageError(f"--end {format_time(self.end)} must be after --start {format_time(self.start)}")
        if self.max_frames < FRAME_FACTOR:
            raise UsageError(f"--max-frames must be at least {FRAME_FACTOR}, got {self.max_frames}")
        for option, value in (
            ("--min-pixels", self.min_pixels),
            ("--max-pixels", self.max_pixels),
            ("--total-pixels", self.total_pixels),
        ):
            if value is not None and value < 1:
                raise UsageError(f"{option} must be a positive number of pixels, got {value}")
        if self.min_pixels is not None and self.max_pixels is not None and self.max_pixels < self.min_pixels:
            raise UsageError(f"--max-pixels {self.max_pixels:,} is below --min-pixels {self.min_pixels:,}")


# ---------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class VideoInfo:
    duration: float  # seconds, from the frames' presentation timestamps (never trust the header)
    frame_count: int  # frames actually there (packets with a timestamp, not the header's count)
    average_fps: float
    width: int  # display size in px, after rotation
    height: int
    rotation: int  # degrees clockwise applied to get the upright picture (0/90/180/270)
    codec: str

    def __post_init__(self) -> None:
        if self.frame_count < 1 or self.duration <= 0 or self.width < 1 or self.height < 1:
            raise ValueError(
                f"impossible video: {self.frame_count} frames, {self.duration} s, {self.width}x{self.height} px"
            )
        if self.rotation not in (0, 90, 180, 270):
            raise ValueError(f"rotation must be 0/90/180/270, got {self.rotation}")


@dataclass(frozen=True)
class SampledVideo:
    frames: np.ndarray  # (n, H, W, 3) uint8 RGB, upright, already resized to the model size
    timestamps: tuple[float, ...]  # presentation time of each frame (s from the file's start, as a player shows)
    start: float  # the range that was sampled, seconds of the source
    end: float
    sample_fps: float  # the reference's formula: n / (duration of the range)
    second_per_grid_t: float  # FRAME_FACTOR / sample_fps (temporal_patch_size 2)
    info: VideoInfo
    resized_size: tuple[int, int]  # (width, height) of each frame
    notes: tuple[str, ...] = ()  # one line each, for stderr: budget lowered size/count, corrupt packets, ...

    def __post_init__(self) -> None:
        n, h, w, c = self.frames.shape
        if c != 3 or self.frames.dtype != np.uint8 or (w, h) != self.resized_size or len(self.timestamps) != n:
            raise ValueError(
                f"frames {self.frames.shape} {self.frames.dtype} do not match size {self.resized_size} "
                f"and {len(self.timestamps)} timestamps"
            )

    @property
    def tokens(self) -> int:
        """Video tokens the model spends: (n / 2) temporal patches of (H/28)*(W/28) merged patches."""
        w, h = self.resized_size
        return math.ceil(len(self.timestamps) / FRAME_FACTOR) * (h // PATCH_FACTOR) * (w // PATCH_FACTOR)


# ---------------------------------------------------------------------------------------------- rules
def _floor_even(x: float) -> int:
    return math.floor(x / FRAME_FACTOR) * FRAME_FACTOR


def _ceil_even(x: float) -> int:
    return math.ceil(x / FRAME_FACTOR) * FRAME_FACTOR


def smart_nframes(
    total_frames: int,
    video_fps: float,
    *,
    fps: float | None = None,
    nframes: int | None = None,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int = FPS_MAX_FRAMES,
) -> int:
    """Frames to sample from a clip of `total_frames` at `video_fps` (the reference's rule, for the
    range sampled). ValueError unless 2 <= result <= total_frames."""
    if fps is not None and nframes is not None:
        raise ValueError("give fps or nframes, not both")
    if not video_fps > 0:
        raise ValueError(f"video fps must be positive, got {video_fps}")
    if nframes is not None:
        n = round(nframes / FRAME_FACTOR) * FRAME_FACTOR
    else:
        wanted = total_frames / video_fps * (DEFAULT_FPS if fps is None else fps)
        cap = _floor_even(min(max_frames, total_frames))
        n = _floor_even(min(max(wanted, _ceil_even(min_frames)), cap, total_frames))
    if not FRAME_FACTOR <= n <= total_frames:
        raise ValueError(f"{n} frames to sample, need between {FRAME_FACTOR} and the {total_frames} there")
    return n


def frame_pixels(
    nframes: int,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    total_pixels: int | None = None,
) -> tuple[int, float]:
    """(min_pixels, max_pixels) per frame for `nframes` frames, the reference's rule. max_pixels stays a
    float when the budget divides unevenly, as the reference passes it to smart_resize. Without a given
    min_pixels, the default minimum (VIDEO_MIN_PIXELS) is lowered, not below BUDGET_MIN_PIXELS, to the
    budget's share per frame, so that the budget holds (the reference lets its floor win)."""
    total = DEFAULT_TOTAL_PIXELS if total_pixels is None else total_pixels
    share = total / nframes * FRAME_FACTOR  # pixels per frame the budget allows
    if min_pixels is None:
        lo = min(VIDEO_MIN_PIXELS, max(BUDGET_MIN_PIXELS, int(share / 1.05)))
        if max_pixels is not None:
            lo = min(lo, max_pixels)  # a given maximum below the default minimum lowers the minimum too
    else:
        lo = min_pixels
    hi = max(min(VIDEO_MAX_PIXELS, share), int(lo * 1.05))
    if max_pixels is not None:
        hi = min(max_pixels, hi)
    return lo, hi


def _linspace_f32(a: int, b: int, n: int) -> np.ndarray:
    """torch.linspace(a, b, n) (float32) bit for bit, as the reference builds its indices: a float32
    step, the first half counted up from a and the rest down from b, each a fused multiply-add."""
    a32, b32 = np.float32(a), np.float32(b)
    step = np.float64(np.float32((b - a) / max(n - 1, 1)))
    i = np.arange(n, dtype=np.float64)
    up = (np.float64(a32) + step * i).astype(np.float32)
    down = (np.float64(b32) - step * (n - 1 - i)).astype(np.float32)
    return np.where(i < n // 2, up, down)


def _is_constant_rate(times: np.ndarray) -> bool:
    """Frame intervals all within 10% of their mean: ms-rounded (Matroska) 29.97 fps still counts."""
    if len(times) < 3:
        return True
    gaps = np.diff(times)
    mean = gaps.mean()
    return bool(mean > 0 and np.abs(gaps - mean).max() <= 0.1 * mean)


def frame_range(timestamps: Sequence[float], start: float | None, end: float | None) -> tuple[int, int]:
    """(first, last) indices of the frames shown within [start, end] (seconds; None = the file's ends)."""
    lo = 0 if start is None else bisect.bisect_left(timestamps, start - _TIE)
    hi = len(timestamps) - 1 if end is None else bisect.bisect_right(timestamps, end + _TIE) - 1
    return lo, hi


def choose_frames(timestamps: Sequence[float], n: int, start: float | None, end: float | None) -> list[int]:
    """Indices into `timestamps` (ascending presentation times, s) of `n` frames spread over [start, end].

    Constant frame rate: the reference's round(linspace(start_frame, end_frame, n)), start_frame the first
    frame at or after `start`, end_frame the last at or before `end` (= ceil(start*fps), floor(end*fps)
    up to float noise). Variable rate: the frame nearest to each of n evenly spaced times."""
    times = np.asarray(timestamps, dtype=np.float64)  # (T,) seconds
    if times.ndim != 1 or np.any(np.diff(times) <= 0):
        raise ValueError("timestamps must be strictly increasing")
    lo, hi = frame_range(timestamps, start, end)
    if n < 1 or hi - lo + 1 < n:
        raise ValueError(f"cannot choose {n} frames from the {max(hi - lo + 1, 0)} between {start} and {end}")
    if _is_constant_rate(times[lo : hi + 1]):
        return np.rint(_linspace_f32(lo, hi, n)).astype(np.int64).tolist()  # rint: half to even, like torch
    targets = np.linspace(times[lo], times[hi], n)  # (n,) seconds
    # Interpolated index position: its fraction is < 0.5 exactly when the earlier frame is nearer.
    position = np.interp(targets, times[lo : hi + 1], np.arange(lo, hi + 1, dtype=np.float64))
    return np.rint(position).astype(np.int64).tolist()


# ---------------------------------------------------------------------------------------------- probe results
# Filled by video_decode.scan; defined here because the plan below reads it and this module loads no PyAV.
@dataclass
class _Probe:
    """What one demux pass (no decoding) found, plus the first decoded frame's geometry."""

    info: VideoInfo
    pts: list[int]  # (T,) presentation timestamps in stream time_base, ascending, unique
    times: list[float]  # (T,) the same in seconds from the file's start
    keyframes: list[int]  # pts of keyframe packets, ascending
    time_base: Fraction
    origin: Fraction  # seconds: the player's zero (the container's start time)
    rate: Fraction | None  # frames/s: the header's rate where the timestamps confirm it
    notes: list[str] = field(default_factory=list)

    def seconds(self, pts: int) -> float:
        return float(pts * self.time_base - self.origin)

    def fps_over(self, lo: int, hi: int) -> float:
        """Frames per second of presentation time over frames lo..hi: the reference's video_fps for a
        --start/--end range. Exact from the integer pts (a 30-fps file gives 30.0, not 29.999...)."""
        if hi - lo + 1 == self.info.frame_count:
            return self.info.average_fps
        fps = Fraction(hi - lo) / ((self.pts[hi] - self.pts[lo]) * self.time_base)
        if self.rate is not None and abs(fps - self.rate) <= self.rate / 1000:
            fps = self.rate
        return float(fps)


# ---------------------------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class _Plan:
    indices: list[int]  # into probe.times
    start: float
    end: float
    span: float  # seconds the range's frames cover: count / fps, the reference's total / video_fps
    size: tuple[int, int]  # (width, height)
    notes: tuple[str, ...]


def _plan(probe: _Probe, name: str, options: VideoOptions, limit: int | None = None) -> _Plan:
    """The reference's rules over [start, end] (and at most up to frame index `limit`)."""
    info, times = probe.info, probe.times
    if limit is not None:
        times = times[: limit + 1]
    last = times[-1] + info.duration / info.frame_count  # the end of the last frame shown
    if options.start is not None and options.start >= last - _TIE:
        raise InputError(
            f"{name}: --start {format_time(options.start)} is past the end of the video "
            f"(duration {format_time(info.duration)})"
        )
    lo, hi = frame_range(times, options.start, options.end)
    count = hi - lo + 1
    if count < FRAME_FACTOR:
        raise InputError(
            f"{name}: {count} frame(s) between {format_time(options.start or 0)} and "
            f"{format_time(min(options.end or last, last))}; need at least {FRAME_FACTOR}"
        )
    # The reference's video_fps over the range: frames per second of presentation time there.
    fps_range = probe.fps_over(lo, hi)
    if options.nframes is not None and round(options.nframes / FRAME_FACTOR) * FRAME_FACTOR > count:
        raise UsageError(f"{name}: --nframes {options.nframes} but the range sampled holds only {count} frames")
    n = smart_nframes(count, fps_range, fps=options.fps, nframes=options.nframes, max_frames=options.max_frames)
    notes: list[str] = []
    if options.nframes is None:
        fps = DEFAULT_FPS if options.fps is None else options.fps
        wanted = _floor_even(min(max(count / fps_range * fps, _ceil_even(FPS_MIN_FRAMES)), count))
        if wanted > n:
            gap = (times[hi] - times[lo]) / (n - 1)
            notes.append(
                f"{name}: {n} frames instead of the {wanted:,} that {fps:g} fps asks for: --max-frames "
                f"{options.max_frames} capped the count (one frame every {gap:.2f} s)"
            )
    width, height = info.width, info.height
    lo_px, hi_px = frame_pixels(
        n, min_pixels=options.min_pixels, max_pixels=options.max_pixels, total_pixels=options.total_pixels
    )
    new_h, new_w = smart_resize(height, width, PATCH_FACTOR, lo_px, hi_px)
    tokens = math.ceil(n / FRAME_FACTOR) * (new_h // PATCH_FACTOR) * (new_w // PATCH_FACTOR)
    budget = (DEFAULT_TOTAL_PIXELS if options.total_pixels is None else options.total_pixels) // PATCH_FACTOR**2
    reference = frame_pixels(
        n, min_pixels=options.min_pixels, max_pixels=options.max_pixels, total_pixels=REFERENCE_TOTAL_PIXELS
    )
    ref_h, ref_w = smart_resize(height, width, PATCH_FACTOR, *reference)
    if tokens > budget:  # the reference's per-frame floor, int(min_pixels * 1.05), outranks the budget
        notes.append(
            f"{name}: {n} frames of {new_h}x{new_w} take {tokens:,} tokens, over the budget of {budget:,}: "
            f"the per-frame minimum (--min-pixels {lo_px:,}) wins; lower it or --max-frames to fit"
        )
    elif options.total_pixels is None and ref_h * ref_w > new_h * new_w:
        notes.append(
            f"{name}: {n} frames of {new_h}x{new_w} ({tokens:,} tokens): the token budget lowered the "
            f"frame size from {ref_h}x{ref_w}; raise --total-pixels for more"
        )
    indices = choose_frames(times, n, options.start, options.end)
    start = times[lo] if options.start is None else options.start
    end = last if options.end is None or options.end > last else options.end
    return _Plan(indices, start, end, count / fps_range, (new_w, new_h), tuple(notes))


class VideoFile:
    """A video scanned once (one demux pass for the timestamps, one decoded frame for the geometry), then
    sampled as often as needed (--segment: one range after another) without scanning it again. Every
    failure is an InputError starting with `name`."""

    def __init__(self, source: Path | bytes, name: str) -> None:
        from qwenvl_cli.media import video_decode as decode  # not at the top: it imports this module's types

        self.source, self.name = source, name
        with decode.reading(name):
            self._probe = decode.scan(source, name)

    @property
    def info(self) -> VideoInfo:
        return self._probe.info

    @property
    def notes(self) -> tuple[str, ...]:
        """What the scan found worth saying once (a header promising more than the frames hold, ...)."""
        return tuple(self._probe.notes)

    def sample(self, options: VideoOptions) -> SampledVideo:
        """Plan by the reference's rules, decode only the chosen frames. A file that stops decoding part-way
        is sampled again over what decoded, with a note saying how far it got. The scan's own notes are
        `self.notes`, not repeated here."""
        from qwenvl_cli.media import video_decode as decode

        source, name, probe = self.source, self.name, self._probe
        with decode.reading(name):
            plan = _plan(probe, name, options)
            targets = [probe.pts[i] for i in plan.indices]
            decoded = decode.decode_frames(source, name, sorted(set(targets)), probe, plan.size)
            notes = list(plan.notes)
            if len(decoded.pts) < len(set(targets)):
                if decoded.reached is None:
                    raise InputError(f"{name}: no frame decodes ({probe.info.codec} stream)")
                reached = bisect.bisect_right(probe.pts, decoded.reached) - 1
                notes.append(
                    f"{name}: decoding stopped at {format_time(probe.times[reached])} of "
                    f"{format_time(probe.info.duration)}; sampled what decoded"
                )
                plan = _plan(probe, name, options, limit=reached)
                targets = [probe.pts[i] for i in plan.indices]
                decoded = decode.decode_frames(source, name, sorted(set(targets)), probe, plan.size)
                if len(decoded.pts) < len(set(targets)):
                    raise InputError(f"{name}: frames before {format_time(probe.times[reached])} did not decode again")
            if decoded.corrupt:
                first = next((p for p in decoded.corrupt if p is not None), None)
                where = "" if first is None else f", the first at {format_time(probe.seconds(first))}"
                notes.append(f"{name}: skipped {len(decoded.corrupt)} packet(s) that did not decode{where}")

        unique = sorted(set(targets))  # targets ascend (choose_frames is monotone)
        shown = dict(zip(unique, decoded.pts))  # a target whose packet was lost shows the next frame that decoded
        frames = decoded.frames  # (n, H, W, 3) uint8, no copy unless nearest-in-time picked a frame twice
        if len(unique) < len(targets):
            frames = frames[[bisect.bisect_left(unique, p) for p in targets]]
        sample_fps = len(targets) / plan.span
        return SampledVideo(
            frames=frames,
            timestamps=tuple(probe.seconds(shown[p]) for p in targets),
            start=plan.start,
            end=plan.end,
            sample_fps=sample_fps,
            second_per_grid_t=FRAME_FACTOR / sample_fps,
            info=probe.info,
            resized_size=plan.size,
            notes=tuple(notes),
        )


def probe_video(source: Path | bytes, name: str) -> VideoInfo:
    """Duration, frame count, fps and upright size from the packets' timestamps."""
    return VideoFile(source, name).info


def sample_video(source: Path | bytes, name: str, options: VideoOptions) -> SampledVideo:
    """The frames of `options`' range, as VideoFile.sample, with the scan's notes first."""
    video = VideoFile(source, name)
    sampled = video.sample(options)
    return replace(sampled, notes=video.notes + sampled.notes)


__all__ = [
    "DEFAULT_FPS",
    "DEFAULT_TOTAL_PIXELS",
    "FPS_MAX_FRAMES",
    "FPS_MIN_FRAMES",
    "FRAME_FACTOR",
    "REFERENCE_TOTAL_PIXELS",
    "SampledVideo",
    "VideoFile",
    "VIDEO_MAX_PIXELS",
    "VIDEO_MIN_PIXELS",
    "VideoInfo",
    "VideoOptions",
    "choose_frames",
    "format_time",
    "frame_pixels",
    "parse_time",
    "probe_video",
    "sample_video",
    "smart_nframes",
]
