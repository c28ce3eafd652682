"""Tokenizer, streaming detokenisation and chat ids against transformers' processor."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from checkpoints import reference_processor
from qwenvl_cli.errors import ModelError
from qwenvl_cli.media.image import preprocess_image
from qwenvl_cli.config import PreprocessorConfig
from qwenvl_cli.prompts import ImagePart, TextPart, build_chat_ids, token_types
from qwenvl_cli.tokenizer import StreamDecoder, Tokenizer


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt()


@pytest.fixture(scope="module")
def tok(ckpt):
    return Tokenizer.from_dir(ckpt)


def test_special_ids_and_vocab(tok):
    ids = tok.encode("<|im_start|>user<|image_pad|><|im_end|>")
    assert ids[0] == 151644 and ids[-2:] == [151655, 151645]
    assert tok.vocab_size == 151665  # the Qwen3-only tokens are gone from the test tokenizer


TEXTS = ["Hello, world!", "Ça coûte 12 € — très cher.", "猫が好きです。", "emoji 🐈‍⬛ and 👩🏽‍🚀 mixed", "  spaces\n\ttabs"]


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_pieces_concatenate_to_the_full_decode(tok, text):
    ids = tok.encode(text)
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)  # never half a character


def test_stream_skips_special_and_out_of_vocab_ids(tok):
    decoder = StreamDecoder(tok)
    out = [decoder.push(i) for i in tok.encode("Hi") + [151645, 151900]]
    assert "".join(out) + decoder.flush() == "Hi"


def test_missing_or_wrong_tokenizer(tmp_path, ckpt):
    with pytest.raises(ModelError, match="tokenizer.json: tokenizer file not found"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot load tokenizer"):
        Tokenizer.from_dir(tmp_path)
    data = json.loads((ckpt / "tokenizer.json").read_text())
    for t in data["added_tokens"]:
        if t["content"] == "<|image_pad|>":
            t["content"] = "<|img|>"
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="<\\|image_pad\\|>"):
        Tokenizer.from_dir(tmp_path)


def _processor_ids(processor, images, texts, system=None):
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": t} for t in texts]
    messages = [{"role": "user", "content": content}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    chat = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out = processor(text=[chat], images=images or None, return_tensors="pt")
    return out["input_ids"][0].tolist(), out.get("image_grid_thw")


@pytest.mark.parametrize(
    "sizes,texts,system",
    [
        ([], ["What is 2+2?"], None),
        ([(451, 300)], ["Describe this image."], None),
        ([(300, 200), (90, 400)], ["Compare these."], None),
        ([(200, 200)], ["Décris l'image 🙂, s'il te plaît — 谢谢"], "Tu es un assistant concis."),
    ],
)
def test_chat_ids_equal_the_transformers_processor(tok, ckpt, sizes, texts, system):
    processor = reference_processor(ckpt)
    images = [Image.new("RGB", size, (i * 40, 100, 200)) for i, size in enumerate(sizes)]
    expected, grids = _processor_ids(processor, images, texts, system)
    ours_grids = [preprocess_image(im, PreprocessorConfig()).grid_thw for im in images]
    if images:
        assert [list(g) for g in ours_grids] == grids.tolist()
    parts = [ImagePart(g) for g in ours_grids] + [TextPart(t) for t in texts]
    ids = build_chat_ids(tok, parts, system=system or "You are a helpful assistant.")
    assert ids == expected
    assert token_types(ids).count(1) == sum(t * h * w // 4 for t, h, w in ours_grids)


def test_text_between_images_and_no_system_turn(tok):
    ids = build_chat_ids(tok, [ImagePart((1, 4, 4)), TextPart("and"), ImagePart((1, 2, 4))], system=None)
    assert ids[:3] == [151644] + tok.encode("user\n")
    types = token_types(ids)
    assert types.count(1) == 4 + 2
    assert tok.decode(ids, skip_special_tokens=False).count("<|vision_start|>") == 2
