"""JSON-schema-constrained generation on the tiny random checkpoint: whatever a random model wants to say, the
constrained answer parses and validates; without the constraint the same prompt gives no JSON.

The test schemas are the task schemas with bounds added so that a random model finishes well inside
max_new_tokens: strings maxLength 16, box/point arrays 1 to 3 items, coordinates 0..1000. Without them a
random model writes strings (or lists of boxes) until the token budget runs out, which is finish_reason
"length", a case the task layer handles, not a constraint failure.
"""

from __future__ import annotations

import json

import pytest
import torch

from qwenvl_cli.constrain import ConstraintViolation, JsonConstraint
from qwenvl_cli.engine import Engine
from qwenvl_cli.errors import UsageError
from qwenvl_cli.generate import SamplingParams, reference_generate

IM_END = 151645
TOKENIZER_VOCAB = 151665
MAX_NEW = 400
SEEDS = (1, 2, 3)

STRING = {"type": "string", "maxLength": 16}
COORD = {"type": "integer", "minimum": 0, "maximum": 1000}


def _located(key: str, n: int) -> dict:
    item = {
        "type": "object",
        "properties": {key: {"type": "array", "items": COORD, "minItems": n, "maxItems": n}, "label": STRING},
        "required": [key, "label"],
        "additionalProperties": False,
    }
    return {"type": "array", "items": item, "minItems": 1, "maxItems": 3}


FIELDS = ["invoice number", "date", "total"]
SCHEMAS = {
    "boxes": _located("bbox_2d", 4),
    "points": _located("point_2d", 2),
    "key-value": {
        "type": "object",
        "properties": {k: {"type": ["string", "null"], "maxLength": 16} for k in FIELDS},
        "required": FIELDS,
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "kind": {"enum": ["cat", "dog", "bird"]},
            "score": {"type": "number"},
            "visible": {"type": "boolean"},
            "meta": {
                "type": "object",
                "properties": {"count": {"type": "integer"}, "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                                                      "maxItems": 3}},
                "required": ["count", "tags"],
                "additionalProperties": False,
            },
        },
        "required": ["kind", "score", "visible", "meta"],
        "additionalProperties": False,
    },
}


def validate(value, schema: dict, where: str = "$") -> None:
    """The JSON-schema subset the test schemas use; raises AssertionError naming the path."""
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        checks = {"object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
                  "string": lambda v: isinstance(v, str), "null": lambda v: v is None,
                  "boolean": lambda v: isinstance(v, bool),
                  "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
                  "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)}
        assert any(checks[t](value) for t in types), f"{where}: {value!r} is not {types}"
    if isinstance(value, dict):
        for key in schema.get("required", []):
            assert key in value, f"{where}: missing {key!r}"
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(props), f"{where}: extra keys {set(value) - set(props)}"
        for key, item in value.items():
            if key in props:
                validate(item, props[key], f"{where}.{key}")
    if isinstance(value, list):
        low, high = schema.get("minItems", 0), schema.get("maxItems", len(value))
        assert low <= len(value) <= high, f"{where}: {len(value)} items"
        for i, item in enumerate(value):
            validate(item, schema.get("items", {}), f"{where}[{i}]")
    if isinstance(value, str):
        assert len(value) <= schema.get("maxLength", len(value)), f"{where}: {len(value)} characters"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        assert schema.get("minimum", value) <= value <= schema.get("maximum", value), f"{where}: {value} out of range"


def test_the_validator_rejects_what_it_should():
    with pytest.raises(AssertionError):
        validate([{"bbox_2d": [1, 2, 3], "label": "x"}], SCHEMAS["boxes"])
    with pytest.raises(AssertionError):
        validate({"invoice number": 1, "date": None, "total": None}, SCHEMAS["key-value"])
    with pytest.raises(AssertionError):
        validate({"kind": "fish", "score": 1, "visible": True, "meta": {"count": 1, "tags": []}}, SCHEMAS["nested"])
    validate({"kind": "cat", "score": 1.5, "visible": True, "meta": {"count": 1, "tags": ["a"]}}, SCHEMAS["nested"])


@pytest.fixture(scope="module")
def engine(make_ckpt):
    return Engine.load(str(make_ckpt()), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def prompt(engine):
    return engine.prompt(["Find every cat and answer in JSON."])


def _runs():
    yield SamplingParams(max_new_tokens=MAX_NEW)
    for seed in SEEDS:
        yield SamplingParams(max_new_tokens=MAX_NEW, do_sample=True, temperature=1.0, seed=seed)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_greedy_and_sampled_answers_validate(engine, prompt, name):
    schema = SCHEMAS[name]
    constraint = engine.json_constraint(schema)  # one constraint, reset by the generator for every answer
    texts = set()
    for params in _runs():
        answer = engine.answer(prompt, params, constraint=constraint)
        assert answer.finish_reason == "stop", (params.seed, answer.text)
        assert constraint.finished
        validate(json.loads(answer.text), schema)
        texts.add(answer.text)
    assert len(texts) > 1  # the seeds really sampled different answers


def test_fenced_answers_are_fenced_json(engine, prompt):
    schema = SCHEMAS["boxes"]
    constraint = engine.json_constraint(schema, fenced=True)
    for params in _runs():
        answer = engine.answer(prompt, params, constraint=constraint)
        assert answer.finish_reason == "stop"
        assert answer.text.startswith("```json\n") and answer.text.endswith("\n```"), answer.text
        validate(json.loads(answer.text[len("```json\n") : -len("\n```")]), schema)


def test_without_the_constraint_the_random_model_writes_no_json(engine, prompt):
    for params in _runs():
        text = engine.answer(prompt, SamplingParams(**{**params.__dict__, "max_new_tokens": 40})).text
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)


def test_cached_generation_equals_the_reference_under_a_constraint(engine, prompt):
    constraint = engine.json_constraint(SCHEMAS["nested"])
    for params in (
        SamplingParams(max_new_tokens=64, repetition_penalty=1.05),
        SamplingParams(max_new_tokens=64, do_sample=True, temperature=0.9, top_k=50, top_p=0.95, seed=4),
    ):
        cached = list(engine.generator.stream(prompt, params, constraint))
        oracle = reference_generate(engine.model, prompt, params, constraint)
        assert cached == oracle
        # The answer ends ("stop") with the JSON's last token: the grammar is complete, so the EOS it alone
        # allows next is not spent; params name no EOS at all.
        assert cached[-1].finish_reason == "stop" and cached[-1].token_id != IM_END
        assert constraint.finished
        assert json.loads(engine.tokenizer.decode([s.token_id for s in cached]))


def test_a_complete_answer_fits_a_budget_without_room_for_the_eos(engine, prompt):
    constraint = engine.json_constraint(SCHEMAS["nested"], fenced=True)
    steps = list(engine.generator.stream(prompt, SamplingParams(max_new_tokens=200), constraint))
    json_tokens = [s.token_id for s in steps if s.token_id != IM_END]
    exact = SamplingParams(max_new_tokens=len(json_tokens))  # the JSON's tokens, no room for an EOS
    again = list(engine.generator.stream(prompt, exact, constraint))
    assert [s.token_id for s in again] == json_tokens and again[-1].finish_reason == "stop"


def test_padding_ids_are_never_chosen(make_ckpt, prompt):
    # A model whose logits favour the embedding's padding rows (ids the tokenizer cannot decode) by far.
    engine = Engine.load(str(make_ckpt()), device="cpu", dtype="float32")
    plain = engine.model.logits

    def logits(hidden):
        out = plain(hidden)
        out[..., TOKENIZER_VOCAB:] += 1e4
        return out

    engine.model.logits = logits
    unconstrained = [s.token_id for s in engine.generator.stream(prompt, SamplingParams(max_new_tokens=4))]
    assert all(t >= TOKENIZER_VOCAB for t in unconstrained)  # the boost works: this test can fail
    constraint = engine.json_constraint(SCHEMAS["key-value"])
    for params in _runs():
        steps = list(engine.generator.stream(prompt, params, constraint))
        assert all(s.token_id < TOKENIZER_VOCAB for s in steps)
        assert steps[-1].finish_reason == "stop"
        validate(json.loads(engine.tokenizer.decode([s.token_id for s in steps])), SCHEMAS["key-value"])


def test_mask_over_the_model_vocab_and_only_eos_once_complete(engine):
    constraint = engine.json_constraint(SCHEMAS["key-value"])
    for vocab in (151936, 152064):
        mask = constraint.allowed(vocab, "cpu")
        assert mask.shape == (vocab,) and mask.dtype == torch.bool
        assert not mask[TOKENIZER_VOCAB:].any()
        assert mask[engine.tokenizer.encode("{")[0]] and not mask[engine.tokenizer.encode("[")[0]]
        assert not mask[151643:].any()  # no special token inside the JSON, EOS included
    text = '{"invoice number": "A-17", "date": null, "total": "12.50"}'
    for token in engine.tokenizer.encode(text):
        assert not constraint.finished
        assert constraint.allowed(151936, "cpu")[token]
        constraint.advance(token)
    assert constraint.finished
    assert constraint.allowed(151936, "cpu").nonzero().flatten().tolist() == [IM_END]
    with pytest.raises(ConstraintViolation):
        constraint.advance(engine.tokenizer.encode("}")[0])
    constraint.reset()  # a failed matcher is rebuilt
    assert not constraint.finished and constraint.allowed(151936, "cpu")[engine.tokenizer.encode("{")[0]]


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "if"),
        ({"type": "string", "format": "zip-code"}, "zip-code"),
        ({"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}}, "https://example.com/a.json"),
    ],
)
def test_unsupported_schema_is_a_usage_error_at_construction(engine, schema, named):
    for fenced in (False, True):
        with pytest.raises(UsageError, match="JSON schema") as info:
            JsonConstraint.from_schema(engine.tokenizer, schema, fenced=fenced)
        assert named in str(info.value) and "\n" not in str(info.value)


def test_a_schema_that_is_not_an_object_is_a_usage_error(engine):
    with pytest.raises(UsageError, match="expected an object"):
        engine.json_constraint(["not", "a", "schema"])


@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "#"},
        {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    ],
)
def test_a_schema_that_allows_no_value_is_a_usage_error_at_construction(engine, schema):
    # It compiles; llguidance finds out at the first mask, where the JSON starts (after the fence when fenced),
    # and used to answer with its parser state dump from inside generation.
    for fenced in (False, True):
        with pytest.raises(UsageError, match="refers to itself") as info:
            JsonConstraint.from_schema(engine.tokenizer, schema, fenced=fenced)
        assert "<state>" not in str(info.value) and "\n" not in str(info.value)


def test_a_deeply_nested_schema_is_a_usage_error_not_a_recursion_error(engine):
    schema: dict = {"type": "integer"}
    for _ in range(600):  # deepcopy alone would overflow Python's stack
        schema = {"type": "object", "properties": {"a": schema}}
    with pytest.raises(UsageError, match="nested too deeply"):
        engine.json_constraint(schema)


def test_long_llguidance_errors_are_cut_to_one_line_of_200_characters(engine):
    schema = {"type": "string", "pattern": "((((" + "x" * 500}
    with pytest.raises(UsageError) as info:
        engine.json_constraint(schema)
    reason = str(info.value).split("constrained output: ", 1)[-1].split("JSON schema: ", 1)[-1]
    assert "\n" not in reason and len(reason) <= 200 and reason.endswith("...")


def test_a_constraint_is_still_fresh_after_the_construction_probe(engine):
    constraint = engine.json_constraint(SCHEMAS["key-value"], fenced=True)
    first = engine.tokenizer.encode("```json\n")[0]
    assert constraint.allowed(151936, "cpu")[first]  # the probe through the fence was undone
