"""parse_lenient on the kinds of answers Qwen2.5-VL writes, each with the exact value expected."""

from __future__ import annotations

import pytest

from qwenvl_cli.jsonfix import LenientJSONError, parse_lenient

CAT = {"bbox_2d": [12, 30, 200, 310], "label": "cat"}
DOG = {"bbox_2d": [5, 6, 70, 80], "label": "dog"}

CASES = [
    # (id, model output, expected value)
    ("strict list", '[{"a": 1}, {"a": 2}]', [{"a": 1}, {"a": 2}]),
    ("strict scalar", " 42 ", 42),
    (
        "cookbook fence, tabs, trailing comma",
        '```json\n[\n\t{"bbox_2d": [12, 30, 200, 310], "label": "cat"},\n]\n```',
        [CAT],
    ),
    (
        "prose before and after the fence",
        'Sure! Here are the boxes:\n```json\n[{"bbox_2d": [12, 30, 200, 310], "label": "cat"}]\n```\n'
        "Hope it helps [1].",
        [CAT],
    ),
    ("fence without a language", '```\n{"a": [1, 2]}\n```', {"a": [1, 2]}),
    ("fence on one line", '```json [1, 2]```', [1, 2]),
    (
        "first fence is not JSON, second is",
        "```python\nprint('hi')\n```\nand\n```json\n[{\"a\": 1}]\n```",
        [{"a": 1}],
    ),
    ("two JSON fences: the first wins", '```json\n[1]\n```\n```json\n[2]\n```', [1]),
    ("trailing commas in objects and arrays", '{"a": [1, 2,], "b": {"c": 3,},}', {"a": [1, 2], "b": {"c": 3}}),
    ("cut mid-key", '[{"a":1},{"a":2},{"a', [{"a": 1}, {"a": 2}]),
    (
        "cut mid-string inside a fence",
        '```json\n[\n\t{"bbox_2d": [12, 30, 200, 310], "label": "cat"},\n\t{"bbox_2d": [5, 6, 70, 80], "label": "do',
        [CAT],
    ),
    (
        "cut inside a box's coordinates",
        '[{"bbox_2d": [12, 30, 200, 310], "label": "cat"}, {"bbox_2d": [5, 6, 7',
        [CAT],
    ),
    ("cut after a comma", '[{"bbox_2d": [12, 30, 200, 310], "label": "cat"},', [CAT]),
    ("cut mid-number in a flat list", "[1, 2, 3", [1, 2]),
    ("cut list of lists keeps the open row", "[[1, 2], [3, 4, ", [[1, 2], [3, 4]]),
    ("cut top-level object keeps complete members", '{"company": "ACME", "date": "2024-0', {"company": "ACME"}),
    (
        "cut list wrapped in an object",
        '{"objects": [{"label": "a"}, {"label": "b"}, {"lab',
        {"objects": [{"label": "a"}, {"label": "b"}]},
    ),
    ("Python literals", "[True, False, None]", [True, False, None]),
    ("Python dict with single quotes", "{'label': 'cat', 'ok': True}", {"label": "cat", "ok": True}),
    (
        "single-quoted string holding a double quote",
        """{'text': 'say "hi"', 'n': 'it\\'s'}""",
        {"text": 'say "hi"', "n": "it's"},
    ),
    (
        "line and block comments",
        '[\n  {"a": 1}, // the first\n  /* the second */ {"a": 2} # and done\n]',
        [{"a": 1}, {"a": 2}],
    ),
    ("comment-like text inside a string", '{"url": "http://x.org/#a"}', {"url": "http://x.org/#a"}),
    ("unquoted keys", "{bbox_2d: [1, 2, 3, 4], label: 'cat',}", {"bbox_2d": [1, 2, 3, 4], "label": "cat"}),
    ("no fence, prose around", 'The answer is {"date": "2024-01-02"} as shown.', {"date": "2024-01-02"}),
    ("bare object instead of a list", '{"bbox_2d": [12, 30, 200, 310], "label": "cat"}', CAT),
    (
        "several objects in a row become a list",
        '{"bbox_2d": [12, 30, 200, 310], "label": "cat"}\n{"bbox_2d": [5, 6, 70, 80], "label": "dog"}',
        [CAT, DOG],
    ),
    ("missing commas between items", '[{"a": 1} {"a": 2}]', [{"a": 1}, {"a": 2}]),
    ("bracket in prose before the JSON", 'See [figure 1]: [{"a": 1}]', [{"a": 1}]),
    ("raw newline inside a string", '{"text": "line one\nline two",}', {"text": "line one\nline two"}),
    ("escapes and unicode", r'{"t": "a\tb\u00e9\ud83d\ude00\d",}', {"t": "a\tb\u00e9\U0001F600\\d"}),
    ("numbers: negative, float, exponent", "[-3, 2.5, 1e3, +4, ]", [-3, 2.5, 1000.0, 4]),
    ("unclosed fence, complete JSON", '```json\n[{"a": 1}]', [{"a": 1}]),
    ("text after the value is ignored", '[1, 2] and then {"b": 3}', [1, 2]),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_parse_lenient(text: str, expected: object) -> None:
    got = parse_lenient(text)
    assert got == expected
    assert type(got) is type(expected)


def test_table_is_big_enough() -> None:
    assert len(CASES) >= 20


def test_types_exact() -> None:
    assert parse_lenient("[1, 2.0, True]") == [1, 2.0, True]
    assert [type(v) for v in parse_lenient("[1, 2.0, True, ]")] == [int, float, bool]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n\t ",
        "I could not find any cat in the image.",
        "```json\n```",
        "Values: [not, json, here]",
        "{maybe} or [perhaps]",
        "a } b ] c",
    ],
)
def test_no_json_raises(text: str) -> None:
    with pytest.raises(LenientJSONError):
        parse_lenient(text)


def test_error_is_a_value_error_with_a_snippet() -> None:
    with pytest.raises(ValueError, match="no JSON list or object in the answer: 'No boxes here.'"):
        parse_lenient("No boxes\n here.")
    with pytest.raises(LenientJSONError, match="empty"):
        parse_lenient("")


def test_never_evaluates() -> None:
    # A Python expression is not a value: refused, not run.
    with pytest.raises(LenientJSONError):
        parse_lenient("[__import__('os').system('true')]")


def test_deep_nesting_does_not_crash() -> None:
    with pytest.raises(LenientJSONError):
        parse_lenient("x" + "[" * 20000 + "oops]")
    nested: list = []
    for _ in range(49):
        nested = [nested]
    assert parse_lenient("[" * 50 + "]" * 50) == nested
    assert parse_lenient("[" * 50 + "]" * 49 + ",") == nested  # the lenient path, not json.loads
