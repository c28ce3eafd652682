"""Video sampling against a port of qwen-vl-utils 0.0.14's rules, and decoding of clips made on the fly
with PyAV: each frame's grey levels encode its index, so the frames that come back can be identified."""

from __future__ import annotations

import math
import random
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from qwenvl_cli.errors import InputError, UsageError
from qwenvl_cli.media import video as V
from qwenvl_cli.media import video_decode as D
from qwenvl_cli.media.image import smart_resize
from qwenvl_cli.media.video import (
    VideoOptions,
    choose_frames,
    format_time,
    frame_pixels,
    parse_time,
    probe_video,
    sample_video,
    smart_nframes,
)
from qwenvl_cli.sheet import contact_sheet
from video_fixtures import index_of, picture, write_clip, zero_frame_clip

SMALL = dict(min_pixels=56 * 56, max_pixels=56 * 56)  # keeps decoded test frames at 56x56


# ---------------------------------------------------------------------------------------------- reference port
def ref_smart_nframes(total, video_fps, fps=2.0, nframes=None, min_frames=4, max_frames=None):
    """qwen-vl-utils 0.0.14 smart_nframes, literally."""
    if nframes is not None:
        n = round(nframes / 2) * 2
    else:
        min_frames = math.ceil(min_frames / 2) * 2
        max_frames = math.floor((max_frames if max_frames is not None else min(768, total)) / 2) * 2
        n = total / video_fps * fps
        n = min(min(max(n, min_frames), max_frames), total)
        n = math.floor(n / 2) * 2
    if not (2 <= n <= total):
        raise ValueError(n)
    return n


def _snap(x: float) -> float:
    """start*fps lands a hair off an integer in floating point (0.3 * 10 = 3.0000000000000004)."""
    return round(x) if abs(x - round(x)) < 1e-9 else x


def ref_range(total, fps, start, end, literal=False):
    """calculate_video_frame_range: (start_frame, end_frame). literal=False snaps float noise."""
    snap = (lambda x: x) if literal else _snap
    max_duration = total / fps
    s = 0 if start is None else math.ceil(snap(max(0.0, min(start, max_duration)) * fps))
    e = total - 1 if end is None else min(math.floor(snap(max(0.0, min(end, max_duration)) * fps)), total - 1)
    return s, e


def ref_indices(start_frame, end_frame, n):
    return torch.linspace(start_frame, end_frame, n).round().long().tolist()


# ---------------------------------------------------------------------------------------------- clips
@pytest.fixture(scope="module")
def clip37(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("v") / "c37.mp4", 37, fps=10)


# ---------------------------------------------------------------------------------------------- times
@pytest.mark.parametrize(
    "text, seconds",
    [("12.5", 12.5), ("0", 0.0), ("1:04", 64.0), ("01:02:03.250", 3723.25), ("0:00.5", 0.5), (".5", 0.5),
     (" 7 ", 7)],
)
def test_parse_time(text, seconds):
    assert parse_time(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "1:60", "1:75:00", "-3", "1::2", "1:2:3:4", "12s"])
def test_parse_time_rejects(text):
    with pytest.raises(UsageError):
        parse_time(text)


def test_format_time():
    assert format_time(64) == "00:01:04.000"
    assert format_time(3723.25) == "01:02:03.250"
    assert format_time(0.0005) == "00:00:00.000" or format_time(0.0005) == "00:00:00.001"
    assert parse_time(format_time(4000.125)) == pytest.approx(4000.125)


# ---------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(fps=0), "--fps"),
        (dict(fps=-1.0), "--fps"),
        (dict(fps=float("nan")), "--fps"),
        (dict(fps=2.0, nframes=8), "--nframes"),
        (dict(nframes=1), "--nframes"),
        (dict(start=-1.0), "--start"),
        (dict(start=5.0, end=5.0), "--end"),
        (dict(max_frames=1), "--max-frames"),
        (dict(min_pixels=0), "--min-pixels"),
        (dict(total_pixels=-5), "--total-pixels"),
        (dict(min_pixels=10_000, max_pixels=5_000), "--max-pixels"),
    ],
)
def test_options_validated(kwargs, option):
    with pytest.raises(UsageError, match=option):
        VideoOptions(**kwargs)


# ---------------------------------------------------------------------------------------------- frame count
@pytest.mark.parametrize("total", [2, 3, 4, 5, 7, 9, 10, 37, 99, 100, 301, 767, 768, 769, 1537, 108_000])
@pytest.mark.parametrize("video_fps", [1.0, 10.0, 24.0, 29.97, 30.0, 60.0])
@pytest.mark.parametrize("fps", [None, 0.5, 1.0, 2.0, 4.0, 30.0])
def test_smart_nframes_matches_reference(total, video_fps, fps):
    assert smart_nframes(total, video_fps, fps=fps) == ref_smart_nframes(total, video_fps, fps=fps or 2.0)


def test_smart_nframes_cases():
    assert smart_nframes(3, 10.0) == 2  # shorter than FPS_MIN_FRAMES: all it can, even
    assert smart_nframes(37, 10.0) == 6  # 3.7 s at 2 fps = 7.4 -> 6
    assert smart_nframes(108_000, 30.0) == 768  # one hour at 30 fps hits FPS_MAX_FRAMES
    assert smart_nframes(108_000, 30.0, max_frames=101) == 100
    assert smart_nframes(37, 10.0, nframes=7) == 8  # round(3.5) = 4 (half to even) -> 8
    assert smart_nframes(37, 10.0, nframes=5) == 4
    for total, n in [(1, None), (37, 38), (37, 40), (5, 1)]:
        with pytest.raises(ValueError):
            smart_nframes(total, 10.0, nframes=n)


# ---------------------------------------------------------------------------------------------- frame choice
def test_linspace_matches_torch():
    rng = random.Random(1)
    for _ in range(3000):
        n = rng.randint(2, 768)
        a = rng.randint(0, 100_000)
        b = a + rng.randint(n - 1, 200_000)
        assert np.array_equal(V._linspace_f32(a, b, n), torch.linspace(a, b, n).numpy()), (a, b, n)


def _combos():
    rng = random.Random(0)
    starts = [None, 0.0, 0.3, 0.5, 1.0, 1.05, 2.0, 2.5, 7.77]
    ends = [None, 1.0, 2.0, 2.95, 3.0, 4.4, 9.9, 60.0]
    rates = (10.0, 24.0, 25.0, 30.0)
    out = [(t, f, s, e) for t in (9, 10, 37, 100, 251) for f in rates for s in starts for e in ends]
    out += [
        (rng.randint(2, 5000), rng.choice([5.0, 12.5, 23.976, 29.97, 30.0, 59.94, 60.0]),
         rng.choice([None, round(rng.uniform(0, 60), 3)]), rng.choice([None, round(rng.uniform(0, 200), 3)]))
        for _ in range(4000)
    ]
    return out


def test_choose_frames_equals_reference_on_constant_rate():
    checked = literal_differs = 0
    for total, fps, start, end in _combos():
        s, e = ref_range(total, fps, start, end)
        if s >= e:  # the reference refuses this range; so do we (fewer than 2 frames)
            continue
        try:
            n = ref_smart_nframes(e - s + 1, fps)
        except ValueError:
            continue
        times = [i / fps for i in range(total)]
        lo, hi = V.frame_range(times, start, end)
        assert (lo, hi) == (s, e), (total, fps, start, end)
        assert smart_nframes(hi - lo + 1, fps) == n
        assert choose_frames(times, n, start, end) == ref_indices(s, e, n), (total, fps, start, end)
        literal_differs += ref_range(total, fps, start, end, literal=True) != (s, e)
        checked += 1
    assert checked > 3000
    # The literal reference differs only where start*fps is an integer plus float noise (ceil(0.3*10) = 4).
    assert literal_differs < checked // 20


def synthetic_probe(total: int, fps: Fraction, time_base: Fraction) -> V._Probe:
    """What _probe finds in a constant-rate file: pts i * (1 / fps) in `time_base` ticks."""
    step = 1 / (fps * time_base)
    assert step.denominator == 1
    pts = [i * int(step) for i in range(total)]
    info = V.VideoInfo(float(total / fps), total, float(fps), 640, 360, 0, "synthetic")
    return V._Probe(info, pts, [float(p * time_base) for p in pts], [], time_base, Fraction(0), fps)


@pytest.mark.parametrize(
    "fps, time_base",
    [(Fraction(10), Fraction(1, 10240)), (Fraction(24), Fraction(1, 12288)), (Fraction(25), Fraction(1, 90000)),
     (Fraction(30000, 1001), Fraction(1, 30000)), (Fraction(30), Fraction(1, 15360)),
     (Fraction(60), Fraction(1, 90000))],
)
def test_plan_equals_reference(fps, time_base):
    """Frame count and indices of the whole planning step (timestamps as a demuxer gives them)."""
    rng = random.Random(int(fps * 1000))
    for _ in range(150):
        total = rng.randint(2, 3000)
        start = rng.choice([None, 0.0, 1.0, 2.5, round(rng.uniform(0, total / float(fps)), 2)])
        end = rng.choice([None, 3.0, 10.0, round(rng.uniform(0, 1.2 * total / float(fps)), 2)])
        if start is not None and end is not None and end <= start:
            continue
        video_fps = float(fps)
        s, e = ref_range(total, video_fps, start, end)
        try:
            if s >= e:
                raise ValueError("range")
            n = ref_smart_nframes(e - s + 1, video_fps)
        except ValueError:
            with pytest.raises(InputError):
                V._plan(synthetic_probe(total, fps, time_base), "x", VideoOptions(start=start, end=end))
            continue
        plan = V._plan(synthetic_probe(total, fps, time_base), "x", VideoOptions(start=start, end=end))
        assert plan.indices == ref_indices(s, e, n), (total, start, end)
        assert len(plan.indices) / plan.span == pytest.approx(n / (e - s + 1) * video_fps, rel=1e-12)


def test_choose_frames_variable_rate_nearest_in_time():
    times = [0.0, 0.1, 0.2, 0.3, 1.5, 1.6, 3.0, 3.05, 3.1, 4.0]
    assert choose_frames(times, 5, None, None) == [0, 4, 5, 6, 9]  # targets 0, 1, 2, 3, 4 s: 1.5 beats 0.3
    assert choose_frames(times, 2, 0.15, 3.2) == [2, 8]
    with pytest.raises(ValueError):
        choose_frames([0.0, 0.2, 0.1], 2, None, None)


# ---------------------------------------------------------------------------------------------- pixels
def test_frame_pixels_reference_rule():
    lo, hi = frame_pixels(768, total_pixels=V.REFERENCE_TOTAL_PIXELS)
    assert (lo, hi) == (V.VIDEO_MIN_PIXELS, 90_316_800 / 768 * 2)
    assert frame_pixels(8) == (V.VIDEO_MIN_PIXELS, V.VIDEO_MAX_PIXELS)
    # A given min_pixels floor beats the budget, as in the reference.
    given = V.VIDEO_MIN_PIXELS
    assert frame_pixels(768, min_pixels=given) == (given, int(given * 1.05))
    assert frame_pixels(8, max_pixels=200_000)[1] == 200_000
    assert frame_pixels(768, min_pixels=given, max_pixels=10**9)[1] == int(given * 1.05)  # only lowers


def test_default_minimum_gives_way_to_the_budget():
    share = V.DEFAULT_TOTAL_PIXELS / 768 * 2  # 50,176 px per frame: 64 tokens per temporal patch
    lo, hi = frame_pixels(768)
    assert (lo, hi) == (int(share / 1.05), share)
    tokens = 768 // 2 * (smart_resize(360, 640, 28, lo, hi)[0] // 28) * (smart_resize(360, 640, 28, lo, hi)[1] // 28)
    assert tokens <= 24_576
    # ... not below the cookbook's long-video floor, and not at all for short clips.
    assert frame_pixels(768, total_pixels=10 * 28 * 28)[0] == V.BUDGET_MIN_PIXELS
    assert frame_pixels(20)[0] == V.VIDEO_MIN_PIXELS
    # A --max-pixels below the default minimum lowers the minimum with it, instead of being refused.
    assert frame_pixels(20, max_pixels=50_000) == (50_000, 50_000)


def test_cookbook_one_hour_640x360():
    """Qwen2.5-VL cookbook: total_pixels 20480*28*28, min_pixels 16*28*28 -> 768 frames of 140x252."""
    n = smart_nframes(3600 * 30, 30.0)
    lo, hi = frame_pixels(n, min_pixels=16 * 28 * 28, total_pixels=20480 * 28 * 28)
    h, w = smart_resize(360, 640, 28, lo, hi)
    assert (n, h, w) == (768, 140, 252)  # 140 high, 252 wide
    assert n // 2 * (h // 28) * (w // 28) == 17_280
    # The default minimum gives way to the budget: the same frames without naming min_pixels.
    assert smart_resize(360, 640, 28, *frame_pixels(n, total_pixels=20480 * 28 * 28)) == (140, 252)
    # The reference's fixed floor (128*28*28) would win over that budget: 224x420, 46,080 tokens.
    assert smart_resize(360, 640, 28, *frame_pixels(n, min_pixels=V.VIDEO_MIN_PIXELS, total_pixels=20480 * 28 * 28)) == (224, 420)


# ---------------------------------------------------------------------------------------------- decoding
def test_constant_rate_clip(clip37):
    info = probe_video(clip37, "c37.mp4")
    assert (info.frame_count, info.width, info.height, info.rotation, info.codec) == (37, 64, 48, 0, "mpeg4")
    assert info.duration == pytest.approx(3.7) and info.average_fps == pytest.approx(10.0)
    got = sample_video(clip37, "c37.mp4", VideoOptions(**SMALL))
    want = ref_indices(0, 36, ref_smart_nframes(37, 10.0))
    assert [index_of(f) for f in got.frames] == want == [0, 7, 14, 22, 29, 36]
    assert got.timestamps == pytest.approx([i / 10 for i in want])
    assert got.frames.shape == (6, 56, 56, 3) and got.frames.dtype == np.uint8 and got.resized_size == (56, 56)
    assert got.sample_fps == pytest.approx(6 / 3.7) and got.second_per_grid_t == pytest.approx(2 / (6 / 3.7))
    assert (got.start, got.end, got.notes) == (0.0, pytest.approx(3.7), ())


def test_default_size_is_the_reference_floor(clip37):
    got = sample_video(clip37, "c37.mp4", VideoOptions())
    assert got.resized_size == (392, 280)  # 64x48 scaled up to min_pixels 128*28*28, as the reference does
    assert got.tokens == 3 * 10 * 14


@pytest.mark.parametrize(
    "options",
    [
        VideoOptions(nframes=7, **SMALL),
        VideoOptions(fps=4.0, **SMALL),
        VideoOptions(start=1.05, end=2.95, **SMALL),
        VideoOptions(start=0.5, fps=10.0, **SMALL),
        VideoOptions(end=1.0, **SMALL),
        VideoOptions(fps=30.0, max_frames=9, **SMALL),
    ],
)
def test_sampling_options_match_reference(clip37, options):
    got = sample_video(clip37, "c37.mp4", options)
    s, e = ref_range(37, 10.0, options.start, options.end)
    n = ref_smart_nframes(e - s + 1, 10.0, fps=options.fps or 2.0, nframes=options.nframes,
                          max_frames=options.max_frames if options.max_frames != 768 else None)
    assert [index_of(f) for f in got.frames] == ref_indices(s, e, n)
    assert got.sample_fps == pytest.approx(n / (e - s + 1) * 10.0)  # the reference's n / total * video_fps


def test_short_clips(tmp_path):
    got = sample_video(write_clip(tmp_path / "c3.mp4", 3), "c3.mp4", VideoOptions(**SMALL))
    assert [index_of(f) for f in got.frames] == [0, 2]
    with pytest.raises(InputError, match=r"^c1\.mp4: a single frame"):
        sample_video(write_clip(tmp_path / "c1.mp4", 1), "c1.mp4", VideoOptions())


HAS_X264 = "libx264" in av.codecs_available


@pytest.mark.parametrize(
    "name, codec",
    [
        ("long.mp4", "mpeg4"),
        pytest.param("long.mkv", "libx264", marks=pytest.mark.skipif(not HAS_X264, reason="no libx264")),
        # MPEG-TS seeks land on the keyframe after the one asked for: the decoder steps back until it fits.
        pytest.param("long.ts", "libx264", marks=pytest.mark.skipif(not HAS_X264, reason="no libx264")),
    ],
)
def test_sparse_frames_seek(tmp_path, name, codec):
    """Frames far apart are reached by seeking to keyframes; the content must still be right."""
    path = write_clip(tmp_path / name, 240, fps=24, codec=codec, gop=24)
    got = sample_video(path, name, VideoOptions(nframes=4, **SMALL))
    assert [index_of(f) for f in got.frames] == ref_indices(0, 239, 4) == [0, 80, 159, 239]
    assert got.notes == ()
    got = sample_video(path, name, VideoOptions(**SMALL))  # 20 frames, every 12th: decoded straight through
    assert [index_of(f) for f in got.frames] == ref_indices(0, 239, 20)


@pytest.mark.skipif(not HAS_X264, reason="no libx264")
def test_b_frames_and_raw_stream(tmp_path):
    got = sample_video(write_clip(tmp_path / "b.mp4", 37, codec="libx264"), "b.mp4", VideoOptions(**SMALL))
    assert [index_of(f) for f in got.frames] == [0, 7, 14, 22, 29, 36]  # B-frames: pts order, not dts order
    raw = write_clip(tmp_path / "raw.h264", 37, codec="libx264")  # an elementary stream: no timestamps
    with pytest.raises(InputError, match=r"^raw\.h264: 37 of the video packets carry no timestamp"):
        sample_video(raw, "raw.h264", VideoOptions())


def test_variable_rate_clip(tmp_path):
    pts = [0, 100, 200, 300, 1500, 1600, 3000, 3050, 3100, 4000]  # ms
    path = write_clip(tmp_path / "vfr.mkv", len(pts), pts=pts, time_base=Fraction(1, 1000))
    info = probe_video(path, "vfr.mkv")
    assert info.frame_count == 10 and info.duration == pytest.approx(4.0 * 10 / 9)
    got = sample_video(path, "vfr.mkv", VideoOptions(nframes=6, **SMALL))
    want = choose_frames([p / 1000 for p in pts], 6, None, None)
    assert [index_of(f) for f in got.frames] == want == [0, 3, 5, 6, 8, 9]  # nearest to 0, .8, 1.6, 2.4, 3.2, 4 s
    assert got.timestamps == pytest.approx([pts[i] / 1000 for i in want])  # the true times


def _patch_avi_lengths(path: Path, frames: int) -> None:
    """Make an AVI's header claim `frames` frames: avih dwTotalFrames and strh dwLength."""
    data = bytearray(path.read_bytes())
    avih = data.index(b"avih") + 8
    data[avih + 16 : avih + 20] = frames.to_bytes(4, "little")
    strh = data.index(b"strh") + 8
    assert data[strh : strh + 4] == b"vids"
    data[strh + 32 : strh + 36] = frames.to_bytes(4, "little")
    path.write_bytes(bytes(data))


def test_header_that_lies(tmp_path):
    path = write_clip(tmp_path / "lies.avi", 20)
    _patch_avi_lengths(path, 100_000)
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 100_000  # the header lies ...
    info = probe_video(path, "lies.avi")
    assert info.frame_count == 20 and info.duration == pytest.approx(2.0)  # ... and we never read it
    got = sample_video(path, "lies.avi", VideoOptions(**SMALL))
    assert [index_of(f) for f in got.frames] == ref_indices(0, 19, 4)


def corner(i, w, h):
    """A frame of grey level(i) with a white block in its top-left corner."""
    a = picture(i, w, h)
    a[:12, :12] = 255
    return a


@pytest.mark.parametrize("ccw, clockwise", [(90, 270), (-90, 90), (180, 180)])
def test_rotated_clip(tmp_path, ccw, clockwise):
    path = write_clip(tmp_path / "rot.mp4", 8, size=(96, 48), rotation=ccw, draw=corner)
    info = probe_video(path, "rot.mp4")
    assert info.rotation == clockwise
    assert (info.width, info.height) == ((48, 96) if clockwise in (90, 270) else (96, 48))
    got = sample_video(path, "rot.mp4", VideoOptions(nframes=2, min_pixels=28 * 28, max_pixels=100 * 100))
    w, h = got.resized_size
    assert (w < h) == (clockwise in (90, 270))
    frame = got.frames[0].astype(int)
    # Where the stored top-left corner ends up once the picture is turned `clockwise` degrees.
    corners = {90: (0, w - 1), 180: (h - 1, w - 1), 270: (h - 1, 0)}
    y, x = corners[clockwise]
    assert frame[y, x].min() > 200
    assert frame[h - 1 - y, w - 1 - x].max() < 200


def test_upright_on_arrays():
    a = np.arange(6).reshape(2, 3)[..., None].repeat(3, axis=2)  # (2, 3, 3): rows 0 1 2 / 3 4 5
    assert D._upright(a, 90)[:, :, 0].tolist() == [[3, 0], [4, 1], [5, 2]]  # clockwise
    assert D._upright(a, 270)[:, :, 0].tolist() == [[2, 5], [1, 4], [0, 3]]
    assert D._upright(a, 0) is a


def test_bytes_source(clip37):
    got = sample_video(clip37.read_bytes(), "-", VideoOptions(nframes=2, **SMALL))
    assert [index_of(f) for f in got.frames] == [0, 36]


# ---------------------------------------------------------------------------------------------- bad input
def test_audio_only(tmp_path):
    path = tmp_path / "tone.wav"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with pytest.raises(InputError, match=r"^tone\.wav: no video stream \(it holds: audio\)"):
        probe_video(path, "tone.wav")


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty"), (b"not a video at all " * 50, "not a video"),
     (None, "without its index .moov atom., truncated")],
)
def test_not_a_video(tmp_path, clip37, content, message):
    if content is None:
        content = clip37.read_bytes()[: len(clip37.read_bytes()) // 2]  # mp4 index (moov) comes last: gone
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    for source in (path, content):
        with pytest.raises(InputError, match=rf"^bad\.mp4: .*{message}"):
            sample_video(source, "bad.mp4", VideoOptions())


def test_unsupported_codec(tmp_path):
    path = write_clip(tmp_path / "c.avi", 10)
    path.write_bytes(path.read_bytes().replace(b"FMP4", b"QQQQ"))  # a FourCC no decoder knows
    with pytest.raises(InputError, match=r"^c\.avi: unsupported video codec"):
        sample_video(path, "c.avi", VideoOptions())


def test_zero_frames(tmp_path):
    path = zero_frame_clip(tmp_path / "z.mkv")
    with pytest.raises(InputError, match=r"^z\.mkv: the video stream holds no frames"):
        sample_video(path, "z.mkv", VideoOptions())


def test_missing_and_directory(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        probe_video(tmp_path / "nope.mp4", "nope.mp4")
    with pytest.raises(InputError, match="directory"):
        probe_video(tmp_path, "dir")


def test_truncated_mid_way(tmp_path):
    path = write_clip(tmp_path / "whole.mkv", 100, fps=10)
    data = path.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) * 6 // 10])
    got = sample_video(cut, "cut.mkv", VideoOptions(**SMALL))
    idx = [index_of(f) for f in got.frames]
    assert idx[0] == 0 and 40 <= idx[-1] < 99 and idx == sorted(idx)
    assert got.timestamps == pytest.approx([i / 10 for i in idx])
    assert got.info.duration == pytest.approx((idx[-1] + 1) / 10)
    assert any("cut.mkv: frames stop at" in note and "header says 00:00:10.000" in note for note in got.notes)


def test_corrupt_packets_mid_file(tmp_path):
    path = write_clip(tmp_path / "whole.mkv", 60, fps=10)
    data = bytearray(path.read_bytes())
    rng = random.Random(3)
    middle = len(data) // 2
    data[middle : middle + 600] = bytes(rng.randrange(256) for _ in range(600))
    bad = tmp_path / "bad.mkv"
    bad.write_bytes(bytes(data))
    got = sample_video(bad, "bad.mkv", VideoOptions(**SMALL))  # uses what decodes, never a traceback
    # The damaged cluster takes frames with it; the frames nearest in time around the hole may repeat.
    assert len(got.frames) >= 2 and all(t2 >= t1 for t1, t2 in zip(got.timestamps, got.timestamps[1:]))
    assert got.info.frame_count < 60 and got.timestamps[-1] == pytest.approx(5.9)
    assert all(note.startswith("bad.mkv: ") for note in got.notes)


def test_start_past_the_end(clip37):
    with pytest.raises(InputError, match=r"^c37\.mp4: --start 00:00:09\.000 is past the end .*00:00:03\.700"):
        sample_video(clip37, "c37.mp4", VideoOptions(start=9.0))
    with pytest.raises(UsageError, match="--nframes 40"):
        sample_video(clip37, "c37.mp4", VideoOptions(nframes=40))


def test_absurd_resolution(tmp_path, monkeypatch, clip37):
    monkeypatch.setattr(D, "MAX_SIDE", 32)
    with pytest.raises(InputError, match=r"^c37\.mp4: video is 64x48 pixels, over the limit of 32"):
        probe_video(clip37, "c37.mp4")


# ---------------------------------------------------------------------------------------------- notes
def test_budget_and_cap_notes(tmp_path):
    path = write_clip(tmp_path / "hd.mp4", 68, fps=2, size=(1280, 720), gop=30)
    got = sample_video(path, "hd.mp4", VideoOptions())
    assert got.resized_size == (980, 560) and len(got.frames) == 68
    assert got.notes == (
        "hd.mp4: 68 frames of 560x980 (23,800 tokens): the token budget lowered the frame size from 560x1008; "
        "raise --total-pixels for more",
    )
    got = sample_video(path, "hd.mp4", VideoOptions(max_frames=10, total_pixels=10 * 28 * 28 * 64))
    assert len(got.frames) == 10
    assert got.notes == ("hd.mp4: 10 frames instead of the 68 that 2 fps asks for: --max-frames 10 capped the "
                         "count "
                         "(one frame every 3.72 s)",)


# ---------------------------------------------------------------------------------------------- sheet
def test_contact_sheet(clip37):
    got = sample_video(clip37, "c37.mp4", VideoOptions(**SMALL))
    sheet = contact_sheet(got.frames, got.timestamps, marked={2}, columns=3, thumb_width=100)
    cols, rows = 3, 2
    cell_w, cell_h = sheet.width // cols, sheet.height // rows
    assert sheet.width == cols * cell_w and cell_w >= 100 and cell_h > 100  # thumb + label
    a = np.asarray(sheet).astype(int)
    red = (a[..., 0] > 200) & (a[..., 1] < 60) & (a[..., 2] < 60)
    assert red[:, 2 * cell_w : 3 * cell_w][:cell_h].any()  # frame 2 (row 0, column 2) outlined
    assert not red[:, : 2 * cell_w].any() and not red[cell_h:].any()
