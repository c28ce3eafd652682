"""Video clips made on the fly with PyAV for the tests: frame i's grey levels encode i, so the frames that
come back from sampling can be identified (`index_of`)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def level(i: int) -> tuple[int, int]:
    """The (left, right) grey levels that encode frame index i (up to 255)."""
    return 16 * (i // 16) + 8, 16 * (i % 16) + 8


def picture(i: int, w: int = 64, h: int = 48) -> np.ndarray:
    a = np.empty((h, w, 3), np.uint8)
    left, right = level(i)
    a[:, : w // 2], a[:, w // 2 :] = left, right
    return a


def index_of(frame: np.ndarray) -> int:
    """Frame index from a decoded (H, W, 3) frame (upright), read at the centres of its halves."""
    h, w, _ = frame.shape
    left = float(frame[h // 2 - 2 : h // 2 + 2, w // 4 - 2 : w // 4 + 2].mean())
    right = float(frame[h // 2 - 2 : h // 2 + 2, 3 * w // 4 - 2 : 3 * w // 4 + 2].mean())
    return round((left - 8) / 16) * 16 + round((right - 8) / 16)


def write_clip(
    path: Path,
    n: int,
    fps: int = 10,
    size: tuple[int, int] = (64, 48),
    codec: str = "mpeg4",
    pts: list[int] | None = None,
    time_base: Fraction | None = None,
    rotation: int | None = None,
    gop: int = 12,
    draw=None,
) -> Path:
    """n frames, frame i coloured by level(i); pts in `time_base` (default 1/fps) when given."""
    w, h = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.bit_rate = 4_000_000
        stream.codec_context.gop_size = gop
        if time_base is not None:
            stream.codec_context.time_base = time_base
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(n):
            frame = av.VideoFrame.from_ndarray((draw or picture)(i, w, h), format="rgb24")
            frame.pts = i if pts is None else pts[i]
            if time_base is not None:
                frame.time_base = time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def zero_frame_clip(path: Path) -> Path:
    """A Matroska file with a video stream that holds no frame (and an audio stream, so it is written)."""
    with av.open(str(path), "w") as out:
        video = out.add_stream("mpeg4", rate=10)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = out.add_stream("mp2", rate=48000, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 2 * 1152 * 4), np.int16), format="s16", layout="stereo")
        frame.sample_rate = 48000
        for packet in [*audio.encode(frame), *audio.encode()]:
            out.mux(packet)
    return path
