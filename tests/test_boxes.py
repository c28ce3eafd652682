"""Reading detections from model JSON, and mapping them to the original image, by hand-computed values."""

from __future__ import annotations

import pytest

from qwenvl_cli.boxes import Detection, detections_from_json, to_original
from qwenvl_cli.jsonfix import parse_lenient


def box(label: str, *xyxy: float) -> Detection:
    return Detection(label, bbox=tuple(xyxy))


def pt(label: str, x: float, y: float) -> Detection:
    return Detection(label, point=(x, y))


# ---- detections_from_json


def test_list_of_boxes_and_points() -> None:
    value = [
        {"bbox_2d": [12, 30, 200, 310], "label": "cat"},
        {"point_2d": [5, 6], "label": "eye"},
        {"bbox_2d": [1, 2, 3, 4], "point_2d": [2, 3], "label": "both"},
    ]
    assert detections_from_json(value) == [
        box("cat", 12, 30, 200, 310),
        pt("eye", 5, 6),
        Detection("both", bbox=(1, 2, 3, 4), point=(2, 3)),
    ]


def test_alternative_keys() -> None:
    value = [{"bbox": [1, 2, 3, 4], "name": "a"}, {"point": [1.5, 2.5], "text": "b"}]
    assert detections_from_json(value) == [box("a", 1, 2, 3, 4), pt("b", 1.5, 2.5)]


def test_label_fallbacks() -> None:
    value = [
        {"bbox_2d": [0, 0, 1, 1], "label": "first", "text_content": "second"},
        {"bbox_2d": [0, 0, 1, 1], "text_content": " Total: 12 "},
        {"bbox_2d": [0, 0, 1, 1], "text": "t"},
        {"bbox_2d": [0, 0, 1, 1], "name": "n"},
        {"bbox_2d": [0, 0, 1, 1], "label": 7},
        {"bbox_2d": [0, 0, 1, 1], "label": None, "name": "after a null"},
        {"bbox_2d": [0, 0, 1, 1]},
    ]
    assert [d.label for d in detections_from_json(value)] == [
        "first", "Total: 12", "t", "n", "7", "after a null", ""
    ]


def test_wrapped_list_and_single_item() -> None:
    item = {"bbox_2d": [1, 2, 3, 4], "label": "x"}
    assert detections_from_json({"objects": [item]}) == [box("x", 1, 2, 3, 4)]
    assert detections_from_json({"note": "two lists", "empty": [], "boxes": [item]}) == [box("x", 1, 2, 3, 4)]
    assert detections_from_json(item) == [box("x", 1, 2, 3, 4)]


def test_nothing_usable() -> None:
    assert detections_from_json(None) == []
    assert detections_from_json("cat") == []
    assert detections_from_json([]) == []
    assert detections_from_json({"answer": "none"}) == []


def test_malformed_items_are_skipped() -> None:
    good = {"bbox_2d": [1, 2, 3, 4], "label": "ok"}
    value = [
        {"bbox_2d": [1, 2, 3], "label": "three numbers"},
        {"bbox_2d": [1, 2, 3, 4, 5], "label": "five"},
        {"bbox_2d": ["1", 2, 3, 4], "label": "a string"},
        {"bbox_2d": [True, 2, 3, 4], "label": "a bool"},
        {"bbox_2d": [float("nan"), 2, 3, 4], "label": "nan"},
        {"bbox_2d": "1 2 3 4", "label": "not a list"},
        {"point_2d": [1], "label": "short point"},
        {"bbox_2d": [1, 2, 3, 4], "point_2d": [1, 2, 3], "label": "good box, bad point"},
        {"label": "no geometry"},
        "a string",
        [1, 2, 3, 4],
        None,
        good,
    ]
    assert detections_from_json(value) == [box("ok", 1, 2, 3, 4)]


def test_from_a_cut_off_answer() -> None:
    text = '```json\n[\n\t{"bbox_2d": [12, 30, 200, 310], "label": "cat"},\n\t{"bbox_2d": [5, 6, 7'
    assert detections_from_json(parse_lenient(text)) == [box("cat", 12, 30, 200, 310)]


def test_detection_checks_lengths() -> None:
    with pytest.raises(ValueError, match="4 numbers"):
        Detection("x", bbox=(1, 2, 3))
    with pytest.raises(ValueError, match="2 numbers"):
        Detection("x", point=(1, 2, 3))


# ---- to_original


def test_identity() -> None:
    dets = [box("a", 10, 20, 30, 40), pt("p", 5, 6)]
    assert to_original(dets, (100, 80), (100, 80)) == dets


def test_two_times_downscale() -> None:
    # The model saw 500x400; the original is 1000x800: everything doubles.
    dets = [box("a", 10, 20, 30.4, 40.6), pt("p", 100.2, 50.3)]
    assert to_original(dets, (500, 400), (1000, 800)) == [box("a", 20, 40, 61, 81), pt("p", 200, 101)]


def test_non_uniform_scale() -> None:
    # Original 1000x500, resized 812x420: sx = 1000/812 = 1.2315..., sy = 500/420 = 1.1905...
    # 100*sx = 123.15 -> 123; 50*sy = 59.52 -> 60; 406*sx = 500.0; 210*sy = 250.0.
    # 203*sx = 250.0; 105*sy = 125.0. 812, 420 -> 1000, 500 (the far corner).
    dets = [box("a", 100, 50, 406, 210), box("whole", 0, 0, 812, 420), pt("p", 203, 105)]
    assert to_original(dets, (812, 420), (1000, 500)) == [
        box("a", 123, 60, 500, 250),
        box("whole", 0, 0, 1000, 500),
        pt("p", 250, 125),
    ]


def test_rounding_halves_up() -> None:
    # 0.25*2 = 0.5 -> 1 and 2.5*1 -> 3 (round() would give 0 and 2).
    assert to_original([box("a", 0.25, 2.5, 10, 10)], (10, 10), (20, 10)) == [box("a", 1, 3, 20, 10)]


def test_inverted_corners_are_swapped() -> None:
    assert to_original([box("a", 50, 60, 10, 20)], (100, 100), (100, 100)) == [box("a", 10, 20, 50, 60)]
    assert to_original([box("a", 50, 20, 10, 60)], (100, 100), (200, 200)) == [box("a", 20, 40, 100, 120)]


def test_partly_outside_is_clamped() -> None:
    dets = [box("a", -10, 50, 150, 120), box("b", 90, -5, 99, 5)]
    assert to_original(dets, (100, 100), (100, 100)) == [box("a", 0, 50, 100, 100), box("b", 90, 0, 99, 5)]


def test_entirely_outside_is_dropped() -> None:
    dets = [box("right", 120, 10, 150, 20), box("above", 10, -30, 20, -5), box("kept", 1, 1, 2, 2)]
    assert to_original(dets, (100, 100), (100, 100)) == [box("kept", 1, 1, 2, 2)]


def test_zero_area_is_dropped() -> None:
    dets = [
        box("zero width", 10, 10, 10, 50),
        box("zero height", 10, 10, 50, 10),
        box("rounds to zero width", 10.1, 10, 10.3, 50),
        box("on the right edge", 100, 10, 130, 50),
    ]
    assert to_original(dets, (100, 100), (100, 100)) == []


def test_points_inside_and_outside() -> None:
    dets = [
        pt("in", 50, 50),
        pt("left", -1, 50),
        pt("below", 50, 101),
        pt("corner", 100, 100),  # on the far edge: kept, on the last pixel
        pt("origin", 0, 0),
    ]
    assert to_original(dets, (100, 100), (200, 100)) == [pt("in", 100, 50), pt("corner", 199, 99), pt("origin", 0, 0)]


def test_box_and_point_dropped_together() -> None:
    both = Detection("both", bbox=(10, 10, 20, 20), point=(500, 5))
    assert to_original([both], (100, 100), (100, 100)) == []


def test_bad_sizes() -> None:
    with pytest.raises(ValueError, match="resized 0x10"):
        to_original([], (0, 10), (10, 10))
