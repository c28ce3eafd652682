"""`qwenvl video` (and videos in `describe`) as a user runs them, on clips made with PyAV.

Two kinds of test, as for documents: the tiny random model end to end (--find and --events output must
parse and hold times inside the file however random the weights: constrained decoding), and canned
answers whose times are checked against hand-computed offsets for --start and --segment.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner
from video_fixtures import write_clip

from qwenvl_cli.cli import app
from qwenvl_cli.tasks.video import EVENTS_PROMPT, FIND_PROMPT

SHAPES = str(Path(__file__).resolve().parents[1] / "samples" / "shapes.png")
# Small frames keep the tiny model quick: 56x56 = 4 video tokens per temporal patch.
SMALL = ("--min-pixels", "3136", "--max-pixels", "3136")
CLOCK = r"\d\d:\d\d:\d\d\.\d{3}"


@pytest.fixture(scope="module")
def model_dir(make_ckpt):
    return str(make_ckpt(max_pixels=64 * 28 * 28))


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """5 s at 10 fps: frames at 0.0, 0.1, ... 4.9 s."""
    return write_clip(tmp_path_factory.mktemp("v") / "clip.mp4", 50, fps=10)


def run(*args: str, stdin: bytes | None = None):
    return CliRunner().invoke(app, list(args), input=stdin)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_video_json_record_carries_the_timing(model_dir, clip):
    r = run("video", str(clip), "--model", model_dir, "--json", "--max-new-tokens", "3", *SMALL)
    assert r.exit_code == 0, r.stderr
    [rec] = json_lines(r.stdout)
    # 5 s at 2 fps: 10 frames, the reference's indices round(linspace(0, 49, 10)) at 10 fps.
    assert rec["frames"] == [0.0, 0.5, 1.1, 1.6, 2.2, 2.7, 3.3, 3.8, 4.4, 4.9]
    assert rec["fps"] == 2.0 and rec["second_per_grid_t"] == 1.0
    assert (rec["duration"], rec["start"], rec["end"]) == (5.0, 0.0, 5.0)
    assert rec["video_grid_thw"] == [5, 4, 4]
    # 5 temporal patches x 2x2 merged tokens = 20 video pads in the prompt.
    text_only = json_lines(run("describe", SHAPES, "--model", model_dir, "--json", "--max-new-tokens", "1").stdout)[0]
    assert rec["prompt_tokens"] > 20 and isinstance(rec["text"], str) and text_only["prompt_tokens"] > 0
    assert r.stderr == ""


def test_describe_mixes_images_and_videos_and_nframes(model_dir, clip):
    r = run("describe", SHAPES, str(clip), "--model", model_dir, "--json", "--max-new-tokens", "2", *SMALL)
    assert r.exit_code == 0, r.stderr
    image, video = json_lines(r.stdout)
    assert "frames" not in image and len(video["frames"]) == 10
    r = run("video", str(clip), "--nframes", "4", "--model", model_dir, "--json", "--max-new-tokens", "1", *SMALL)
    assert json_lines(r.stdout)[0]["video_grid_thw"][0] == 2
    r = run("describe", SHAPES, str(clip), "--together", "--model", model_dir, "--json", "--max-new-tokens", "1", *SMALL)
    [rec] = json_lines(r.stdout)
    assert rec["file"] == [SHAPES, str(clip)] and rec["videos"][0]["file"] == str(clip)


def test_find_on_the_random_model_always_parses(model_dir, clip):
    r = run("video", str(clip), "--find", "the grey bar moves", "--model", model_dir, "--json", *SMALL)
    assert r.exit_code == 0, r.stderr
    [rec] = json_lines(r.stdout)
    [event] = rec["events"]
    assert rec["query"] == "the grey bar moves" and event["label"] == "the grey bar moves"
    assert 0.0 <= event["start"] <= event["end"] <= 5.0
    text = run("video", str(clip), "--find", "the grey bar moves", "--model", model_dir, *SMALL).stdout
    assert re.fullmatch(rf"{CLOCK} - {CLOCK}  the grey bar moves\n", text)


def test_find_adds_the_start_offset_back_and_clamps(model_dir, clip, canned):
    calls = canned("The given query happens in 1.0 - 2.5 seconds.")
    r = run("video", str(clip), "--find", "x", "--start", "1.5", "--end", "0:03.5", "--model", model_dir, "--json", *SMALL)
    assert r.exit_code == 0, r.stderr
    [rec] = json_lines(r.stdout)
    assert rec["frames"][0] == 1.5 and (rec["start"], rec["end"]) == (1.5, 3.5)
    # The model's time 0 is the first frame it saw (1.5 s of the file); 2.5 s later is past --end: clamped.
    assert rec["events"] == [{"start": 2.5, "end": 3.5, "label": "x"}]
    assert calls[0] is not None  # constrained to the trained sentence


def test_events_on_the_random_model_validate(model_dir, clip):
    r = run("video", str(clip), "--events", "--model", model_dir, "--json", "--max-new-tokens", "160", *SMALL)
    assert r.exit_code in (0, 1), r.stderr
    for rec in json_lines(r.stdout):
        if "error" in rec:  # cut off before one complete event: said so, not invented
            assert "raise --max-new-tokens" in rec["error"]
            continue
        for event in rec["events"]:
            assert 0.0 <= event["start"] <= event["end"] <= 5.0 and isinstance(event["label"], str)


EVENTS = '```json\n[{"start_time": "00:00.50", "end_time": "00:01.20", "description": "a bar appears"},\n' \
         ' {"start_time": "00:01.20", "end_time": "00:09.00", "description": "it --> fades\\n\\nout"}]\n```'


def test_events_as_srt_and_vtt(model_dir, clip, canned, tmp_path):
    canned(EVENTS)
    srt = run("video", str(clip), "--events", "--format", "srt", "--model", model_dir, *SMALL)
    assert srt.exit_code == 0, srt.stderr
    assert srt.stdout == ("1\n00:00:00,500 --> 00:00:01,200\na bar appears\n\n"
                          "2\n00:00:01,200 --> 00:00:05,000\nit -> fades out\n")
    vtt = run("video", str(clip), "--events", "--format", "vtt", "--model", model_dir, "-o", str(tmp_path), *SMALL)
    assert vtt.exit_code == 0, vtt.stderr
    written = tmp_path / "clip.mp4.vtt"
    assert vtt.stdout.strip() == str(written)
    cues = written.read_text().split("\n\n")
    assert cues[0] == "WEBVTT" and cues[1].startswith("00:00:00.500 --> 00:00:01.200\n")
    r = run("video", str(clip), "--events", "--json", "--model", model_dir, *SMALL)
    assert [e["label"] for e in json_lines(r.stdout)[0]["events"]] == ["a bar appears", "it --> fades out"]


def test_segments_answer_each_range_with_absolute_times(model_dir, clip, canned):
    canned("The given query happens in 0.5 - 1.0 seconds.")
    r = run("video", str(clip), "--segment", "2", "--find", "x", "--model", model_dir, "--json", *SMALL)
    assert r.exit_code == 0, r.stderr
    recs = json_lines(r.stdout)
    # 5 s in 2-s segments: [0, 2), [2, 4), and [4, 5) (a half segment stays on its own).
    assert [(x["segment"], x["start"], x["end"]) for x in recs] == [(1, 0.0, 2.0), (2, 2.0, 4.0), (3, 4.0, 5.0)]
    assert [x["events"][0]["start"] for x in recs] == [0.5, 2.5, 4.5]
    text = run("video", str(clip), "--segment", "2", "--find", "x", "--model", model_dir, *SMALL).stdout
    assert f"==> {clip} (segment 2, 00:00:02.000-00:00:04.000) <==\n00:00:02.500 - 00:00:03.000  x\n" in text


def test_sheet_marks_the_frames_found(model_dir, clip, canned, tmp_path):
    canned("The given query happens in 1.0 - 2.0 seconds.")
    out = tmp_path / "sheet.png"
    r = run("video", str(clip), "--find", "x", "--sheet", str(out), "--model", model_dir, "--json", *SMALL)
    assert r.exit_code == 0, r.stderr
    assert json_lines(r.stdout)[0]["sheet"] == str(out)
    with Image.open(out) as sheet:
        assert sheet.width > 100 and sheet.height > 50
        rgb = np.asarray(sheet.convert("RGB")).astype(int)
        reds = int(((rgb[..., 0] > 200) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)).sum())
    assert reds > 0  # frames at 1.1 and 1.6 s are marked
    r = run("video", str(clip), "--sheet", str(tmp_path / "sheet.txt"), "--model", model_dir)
    assert r.exit_code == 2 and "--sheet" in r.stderr


def test_the_prompts_are_the_cookbooks(model_dir, clip, canned, monkeypatch):
    seen = []
    from qwenvl_cli.engine import Engine

    original = Engine.prompt

    def spy(self, parts, system=None):
        seen.append(parts[-1])
        return original(self, parts, system)

    monkeypatch.setattr(Engine, "prompt", spy)
    canned("The given query happens in 0.0 - 1.0 seconds.")
    run("video", str(clip), "--find", "a dog barks", "--model", model_dir, *SMALL)
    canned("[]")
    run("video", str(clip), "--events", "--model", model_dir, *SMALL)
    assert seen == [FIND_PROMPT.format(query="a dog barks"), EVENTS_PROMPT]
    assert seen[0] == "Give the query: 'a dog barks', when does the described content occur in the video?"


@pytest.mark.parametrize(
    "args, message",
    [
        (("--fps", "0"), "--fps"),
        (("--find", "x", "--events"), "--find and --events"),
        (("--format", "srt"), "--format is for --events"),
        (("--start", "1:75"), "--start"),
        (("--segment", "0"), "--segment"),
        (("--find", " "), "--find is empty"),
    ],
)
def test_bad_options_are_usage_errors(clip, args, message):
    r = run("video", str(clip), *args)
    assert r.exit_code == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_bad_videos_fail_alone_in_a_batch(model_dir, clip, tmp_path):
    audio = tmp_path / "tone.m4a.mp4"
    with av.open(str(audio), "w") as out:
        stream = out.add_stream("aac", rate=8000)

        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    truncated = tmp_path / "cut.mp4"
    truncated.write_bytes(clip.read_bytes()[:2000])
    r = run("video", str(audio), str(truncated), str(clip), "--start", "1", "--model", model_dir, "--json",
            "--max-new-tokens", "1", *SMALL)
    assert r.exit_code == 1
    recs = json_lines(r.stdout)
    assert [x["file"] for x in recs] == [str(audio), str(truncated), str(clip)]
    assert "error" in recs[0] and "error" in recs[1] and "frames" in recs[2]
    lines = r.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"qwenvl: {audio}: ") and lines[1].startswith(f"qwenvl: {truncated}: ")
    r = run("video", str(clip), "--start", "9", "--model", model_dir, *SMALL)
    assert r.exit_code == 1 and str(clip) in r.stderr and "5" in r.stderr


def test_image_commands_refuse_videos_and_directories_include_them(model_dir, clip, tmp_path):
    r = run("ground", str(clip), "a cat", "--model", model_dir)
    assert r.exit_code == 1 and r.stderr.startswith(f"qwenvl: {clip}: a video file")
    folder = tmp_path / "media"
    folder.mkdir()
    (folder / "a.png").write_bytes(Path(SHAPES).read_bytes())
    (folder / "b.mp4").write_bytes(clip.read_bytes())
    r = run("describe", str(folder), "-r", "--model", model_dir, "--json", "--max-new-tokens", "1", *SMALL)
    assert [x["file"] for x in json_lines(r.stdout)] == [str(folder / "a.png"), str(folder / "b.mp4")]
    r = run("extract", str(folder), "-r", "--model", model_dir, "--json", "--max-new-tokens", "1")
    assert [x["file"] for x in json_lines(r.stdout)] == [str(folder / "a.png")]


def test_subtitles_of_segments_form_one_file(model_dir, clip, canned, tmp_path):
    canned('[{"start_time": "00:00.50", "end_time": "00:01.00", "description": "step"}]')
    srt = run("video", str(clip), "--segment", "2", "--events", "--format", "srt", "--model", model_dir, *SMALL)
    assert srt.exit_code == 0, srt.stderr
    # One SubRip document: cues numbered on across the three segments, each at its absolute time.
    assert srt.stdout == ("1\n00:00:00,500 --> 00:00:01,000\nstep\n\n"
                          "2\n00:00:02,500 --> 00:00:03,000\nstep\n\n"
                          "3\n00:00:04,500 --> 00:00:05,000\nstep\n")
    r = run("video", str(clip), "--segment", "2", "--events", "--format", "vtt", "--model", model_dir,
            "-o", str(tmp_path), *SMALL)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines() == [str(tmp_path / "clip.mp4.vtt")]
    text = (tmp_path / "clip.mp4.vtt").read_text()
    assert text.count("WEBVTT") == 1 and text.count(" --> ") == 3
    assert text.split("\n\n")[3] == "00:00:04.500 --> 00:00:05.000\nstep\n"


def test_video_refuses_an_image_alone_and_answers_the_rest(model_dir, clip):
    r = run("video", SHAPES, str(clip), "--model", model_dir, "--json", "--max-new-tokens", "1", *SMALL)
    assert r.exit_code == 1
    image, video = json_lines(r.stdout)
    assert "error" in image and "frames" in video
    assert r.stderr.splitlines() == [f"qwenvl: {SHAPES}: an image or PDF, not a video (qwenvl describe, ground and extract read those)"]
