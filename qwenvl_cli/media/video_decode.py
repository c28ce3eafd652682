"""PyAV side of video input: open a file, scan its packets' timestamps, decode chosen frames.

One demux pass (no decoding) finds every frame's presentation time and the keyframes; a second pass
decodes only the frames asked for, seeking over long gaps, each turned upright and resized as it comes
out, so memory stays bounded on hour-long 4K files. The rules for which frames live in media/video.py.
"""

from __future__ import annotations

import bisect
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from qwenvl_cli.errors import InputError, UsageError
from qwenvl_cli.media.video import VideoInfo, _Probe, format_time

MAX_SIDE = 16384  # px; FFmpeg's decoders handle more, but no real video is this large


def _one_line(exc: BaseException | str) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _upright(rgb: np.ndarray, rotation: int) -> np.ndarray:
    """(H, W, 3) as stored -> (H', W', 3) as displayed, turned `rotation` degrees clockwise."""
    return np.rot90(rgb, k=-(rotation // 90)) if rotation else rgb


# ---------------------------------------------------------------------------------------------- opening
@contextmanager
def reading(name: str) -> Iterator[None]:
    """Every failure inside becomes an InputError starting with `name` (PyAV raises assorted errors on
    malformed files)."""
    try:
        yield
    except (InputError, UsageError):
        raise
    except MemoryError as exc:
        raise InputError(f"{name}: out of memory while decoding") from exc
    except Exception as exc:
        raise InputError(f"{name}: unreadable video ({type(exc).__name__}: {_one_line(exc)})") from exc


def _open(source: Path | bytes, name: str) -> av.container.InputContainer:
    """A fresh container for each pass: raw streams and pipes cannot seek back to the start."""
    if isinstance(source, bytes):
        if not source:
            raise InputError(f"{name}: empty (0 bytes)")
        target: object = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.exists():
            raise InputError(f"{name}: file not found")
        if path.is_dir():
            raise InputError(f"{name}: is a directory, not a video")
        if path.stat().st_size == 0:
            raise InputError(f"{name}: empty file (0 bytes)")
        target = str(path)
    try:
        return av.open(target, mode="r", metadata_errors="ignore")
    except PermissionError as exc:
        raise InputError(f"{name}: permission denied") from exc
    except av.error.FFmpegError as exc:
        reason = _one_line(getattr(exc, "strerror", None) or exc)  # without the path FFmpeg appends
        raise InputError(f"{name}: not a video FFmpeg can read{_mp4_hint(source)} ({reason})") from exc


def _mp4_hint(source: Path | bytes) -> str:
    """An MP4/MOV that starts with its 'ftyp' box but will not open has lost its index (the moov atom,
    which most writers put last): a copy cut short, or a recording still being written."""
    try:
        head = source[:12] if isinstance(source, bytes) else Path(source).read_bytes()[:12]
    except OSError:
        return ""
    if head[4:8] != b"ftyp":
        return ""
    return ": an MP4 without its index (moov atom), truncated or still being written"


def _video_stream(container: av.container.InputContainer, name: str) -> av.video.stream.VideoStream:
    """The first video stream that is not cover art, its decoder set to use threads."""
    videos = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not videos:
        kinds = ", ".join(s.type for s in container.streams) or "no streams at all"
        raise InputError(f"{name}: no video stream (it holds: {kinds})")
    stream = videos[0]
    ctx = stream.codec_context
    if ctx is None or not ctx.codec.is_decoder:
        raise InputError(f"{name}: unsupported video codec (this FFmpeg has no decoder for it)")
    stream.thread_type = "AUTO"  # before the codec opens: frame and slice threads, as many as cores
    w, h = ctx.width, ctx.height
    if w > MAX_SIDE or h > MAX_SIDE:
        raise InputError(f"{name}: video is {w}x{h} pixels, over the limit of {MAX_SIDE} px a side")
    return stream


# ---------------------------------------------------------------------------------------------- scanning
def scan(source: Path | bytes, name: str) -> _Probe:
    """Every frame's presentation time and the keyframes, from one demux pass (no decoding), checked
    against the header; then the first frame that decodes, for the rotation and upright size."""
    with _open(source, name) as container:
        stream = _video_stream(container, name)
        tb = stream.time_base or Fraction(1, 1)
        codec = stream.codec_context.name
        stamps: set[int] = set()
        keyframes: list[int] = []
        notes: list[str] = []
        missing = 0
        try:
            for packet in container.demux(stream):
                if packet.size == 0 or packet.is_discard:  # flush packets; edit-list leaders the decoder drops
                    continue
                pts = packet.pts if packet.pts is not None else packet.dts
                if pts is None:
                    missing += 1
                    continue
                stamps.add(pts)
                if packet.is_keyframe:
                    keyframes.append(pts)
        except av.error.FFmpegError as exc:
            notes.append(f"{name}: the file ends early or is damaged; reading stopped ({_one_line(exc)})")
        start_time, header_duration = container.start_time, container.duration
        declared = [r for r in (stream.average_rate, stream.base_rate) if r]  # hints, checked below
    if missing:
        raise InputError(f"{name}: {missing} of the video packets carry no timestamp (a raw {codec} stream?)")
    if not stamps:
        raise InputError(f"{name}: the video stream holds no frames")
    pts = sorted(stamps)
    origin = pts[0] * tb if start_time is None else min(Fraction(start_time, av.time_base), pts[0] * tb)
    rotation, width, height = _first_frame(source, name)
    count = len(pts)
    if count < 2:
        raise InputError(f"{name}: a single frame, not a video (duration 0 s)")
    # The span of n frames is (last - first) stretched by n/(n-1): one mean interval for the last frame.
    # Exact in Fraction, so a 30-fps file gives 30.0 fps, as its header would.
    span = (pts[-1] - pts[0]) * tb * Fraction(count, count - 1)
    # Containers with coarse clocks (Matroska: 1 ms) round each pts, so 240 frames at 24 fps measure
    # 9.9996 s and the frame count rule (floor to even of 19.999) would lose two frames. When the
    # header's rate agrees with the timestamps to 0.1%, take its exact value; a lying header does not.
    rate = next((Fraction(r) for r in declared if abs(count / span - r) <= Fraction(r) / 1000), None)
    if rate is not None:
        span = count / rate
    info = VideoInfo(
        duration=float(span),
        frame_count=count,
        average_fps=float(count / span),
        width=width,
        height=height,
        rotation=rotation,
        codec=codec,
    )
    claimed = None if header_duration is None else header_duration / av.time_base  # s, a hint only
    if claimed is not None and claimed > info.duration + max(1.0, 0.1 * info.duration):
        notes.append(
            f"{name}: frames stop at {format_time(info.duration)} but the header says "
            f"{format_time(claimed)}: the file looks truncated; sampled what is there"
        )
    times = [float(p * tb - origin) for p in pts]
    return _Probe(info, pts, times, sorted(set(keyframes)), tb, origin, rate, notes)


def _first_frame(source: Path | bytes, name: str) -> tuple[int, int, int]:
    """(rotation clockwise, display width, display height) from the first frame that decodes."""
    with _open(source, name) as container:
        stream = _video_stream(container, name)
        try:
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.error.FFmpegError:
                    continue
                for frame in frames:
                    rotation = (-round(frame.rotation / 90) * 90) % 360
                    w, h = (frame.height, frame.width) if rotation in (90, 270) else (frame.width, frame.height)
                    if max(w, h) > MAX_SIDE:
                        raise InputError(
                            f"{name}: video is {w}x{h} pixels, over the limit of {MAX_SIDE} px a side"
                        )
                    return rotation, w, h
        except av.error.FFmpegError as exc:
            raise InputError(f"{name}: no frame decodes ({_one_line(exc)})") from exc
        raise InputError(f"{name}: no frame decodes ({stream.codec_context.name} stream)")


# ---------------------------------------------------------------------------------------------- decoding
@dataclass
class Decoded:
    frames: np.ndarray  # (targets, H, W, 3) uint8, resized; the first len(pts) are filled
    pts: list[int]  # pts of the frame used for each target (the next one that decoded if its own did not)
    reached: int | None  # highest pts decoded
    corrupt: list[int | None]  # pts of packets that failed to decode (None: the demuxer gave up)


# Seek to the next keyframe instead of decoding forward when that skips at least this many frames: a
# seek flushes the decoder and its frame threads, which costs about as much as decoding a dozen frames.
_SEEK_MIN_SKIP = 16


def decode_frames(
    source: Path | bytes, name: str, targets: list[int], probe: _Probe, size: tuple[int, int]
) -> Decoded:
    """Decode the frames at `targets` (ascending pts), seeking to keyframes over long gaps; each frame is
    turned upright and resized as it comes out, so only the chosen ones stay in memory."""
    width, height = size
    out = Decoded(np.empty((len(targets), height, width, 3), np.uint8), [], None, [])  # filled in place
    with _open(source, name) as container:
        done = _decode_run(container, _video_stream(container, name), targets, probe, size, out, can_seek=True)
    if not done:  # a seek landed past its keyframe (imprecise index) or failed: once more from the top
        with _open(source, name) as container:
            _decode_run(container, _video_stream(container, name), targets, probe, size, out, can_seek=False)
    return out


def _decode_run(container, stream, targets: list[int], probe: _Probe, size: tuple[int, int], out: Decoded,
                can_seek: bool) -> bool:
    """Fill `out` from the container's current position on; False when it must start again from the top.
    Forward seeks go to ever later keyframes; after one that overshoots, step back 1, 2, 4... keyframes."""
    keys = probe.keyframes
    furthest = at = -1  # keyframe indices: the furthest sought, the last sought
    back = 0
    seek_to: int | None = None
    while len(out.pts) < len(targets):
        just_sought = seek_to is not None
        if seek_to is not None:
            try:
                container.seek(keys[seek_to], stream=stream, backward=True, any_frame=False)
            except (av.error.FFmpegError, OSError):
                return False
            at, furthest, seek_to = seek_to, max(furthest, seek_to), None
        restart: int | str | None = None
        for frame in _frames(container, stream, out):
            i = len(out.pts)
            if just_sought and frame.pts > targets[i]:
                restart = "back"
                break
            just_sought = False
            out.reached = frame.pts if out.reached is None else max(out.reached, frame.pts)
            if frame.pts < targets[i]:
                continue
            picture = _resize(_upright(frame.to_ndarray(format="rgb24"), probe.info.rotation), size)
            while i < len(targets) and targets[i] <= frame.pts:
                out.frames[i] = picture
                out.pts.append(frame.pts)
                i += 1
            if i == len(targets):
                break
            k = bisect.bisect_right(keys, targets[i]) - 1
            skipped = bisect.bisect_left(probe.pts, keys[k]) - bisect.bisect_right(probe.pts, frame.pts)
            if can_seek and k > furthest and skipped >= _SEEK_MIN_SKIP:
                restart = k
                break
        if restart is None and just_sought:
            restart = "back"  # the seek landed at the end: nothing decoded after it
        if restart is None:
            return True  # every target found, or the end of what is readable
        if restart == "back":
            if at <= 0:
                return False
            back = max(1, 2 * back)
            seek_to = max(0, at - back)
        else:
            seek_to, back = restart, 0
    return True


def _frames(container: av.container.InputContainer, stream, out: Decoded) -> Iterator[av.VideoFrame]:
    """Decoded frames in presentation order; packets that fail to decode are skipped and recorded."""
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                out.corrupt.append(packet.pts)
                continue
            for frame in frames:
                if frame.pts is not None:
                    yield frame
    except av.error.FFmpegError:
        out.corrupt.append(None)  # the demuxer itself gave up: truncated or damaged container


def _resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 for size (w, h), bicubic in PIL (antialiased, like the
    reference's torchvision resize with antialias=True)."""
    image = Image.fromarray(np.ascontiguousarray(rgb))
    if image.size != size:
        image = image.resize(size, resample=Image.Resampling.BICUBIC)
    return np.asarray(image)
