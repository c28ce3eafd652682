"""Tokenizer: special ids checked at load, encode/decode equal to transformers' tokenizer on the same files,
streaming detokenisation that joins to the full decode and never emits half a character."""

from __future__ import annotations

import json
import shutil
import unicodedata

import pytest
import torch

from checkpoints import QWEN3_ONLY, tokenizer_dir
from qwenvl_cli.errors import ModelError
from qwenvl_cli.tokenizer import SPECIAL_TOKENS, StreamDecoder, Tokenizer

TEXTS = [
    "Hello, world!",
    "Ça coûte 12 € — très cher. Ångström, naïve, señor.",
    "猫が好きです。我喜欢猫。고양이를 좋아해요.",
    "emoji 🐈‍⬛ and 👩🏽‍🚀 mixed 🇯🇵 flags",
    "  spaces\n\ttabs\r\n and e\u0301 combining",
    "<|im_start|>user\nHi<|im_end|>\n",
    "rare ones split across tokens: 🪿𠀋🧬𝔘 end",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(tokenizer_dir())


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir())


def test_special_ids_match_the_config_constants(tok):
    assert tok.encode("<|im_start|>user<|image_pad|><|im_end|>") == [151644, 872, 151655, 151645]
    assert (tok.endoftext_id, tok.im_start_id, tok.im_end_id) == (151643, 151644, 151645)
    vision = (tok.vision_start_id, tok.vision_end_id, tok.image_pad_id, tok.video_pad_id)
    assert vision == (151652, 151653, 151655, 151656)
    for text, token_id in SPECIAL_TOKENS.items():
        assert tok.encode(text) == [token_id]


def test_test_tokenizer_has_no_qwen3_tokens(tok):
    assert tok.vocab_size == 151665  # ids 0..151664, like Qwen2.5-VL
    for text in QWEN3_ONLY:
        assert len(tok.encode(text)) > 1  # plain text now, not one added token
    config = json.loads((tokenizer_dir() / "tokenizer_config.json").read_text())
    assert max(int(k) for k in config["added_tokens_decoder"]) == 151664


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_equal_transformers(tok, hf_tok, text):
    ids = tok.encode(text)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    round_trip = unicodedata.normalize("NFC", text)  # the tokenizer normalises to NFC
    assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids, skip_special_tokens=False) == round_trip


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_pieces_join_to_the_full_decode(tok, text):
    ids = tok.encode(text)
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)  # never half a character


def test_streaming_random_ids_like_a_random_model(tok):
    # A random model samples any row of the padded embedding, invalid UTF-8 byte runs included.
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 151936, (400,), generator=generator).tolist()
    ids += torch.randint(120000, 151643, (400,), generator=generator).tolist()  # many multi-byte pieces
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == tok.decode(ids)


def test_stream_holds_back_a_split_character(tok):
    ids = tok.encode("🪿")
    assert len(ids) == 3  # the goose's 4 UTF-8 bytes span three tokens
    decoder = StreamDecoder(tok)
    assert [decoder.push(i) for i in ids] == ["", "", "🪿"]
    decoder.push(ids[0])
    assert decoder.flush() == "\ufffd"  # an unfinished character at the end is not lost silently


def test_stream_skips_special_and_out_of_vocab_ids(tok):
    decoder = StreamDecoder(tok)
    ids = [151644] + tok.encode("Hi") + [151645, 151665, 151935, 200000, -1] + tok.encode(" there") + [151643]
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == "Hi there"
    assert tok.decode([151700, 151935]) == ""


def test_missing_or_corrupt_tokenizer_file(tmp_path):
    with pytest.raises(ModelError, match="tokenizer.json: tokenizer file not found"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelError, match="tokenizer.json: cannot load tokenizer"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("change", ["renamed", "moved"])
def test_special_ids_that_disagree_are_refused(tmp_path, change):
    data = json.loads((tokenizer_dir() / "tokenizer.json").read_text())
    if change == "renamed":
        for t in data["added_tokens"]:
            if t["content"] == "<|image_pad|>":
                t["content"] = "<|img|>"
        message = r"<\|image_pad\|> is not an added token; Qwen2.5-VL needs id 151655"
    else:  # <|image_pad|> at another id, as in a different model family's tokenizer
        names = {"<|image_pad|>": "<|img|>", "<|vision_pad|>": "<|image_pad|>"}
        for t in data["added_tokens"]:
            t["content"] = names.get(t["content"], t["content"])
        message = r"<\|image_pad\|> has id 151654; Qwen2.5-VL needs id 151655"
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match=message):
        Tokenizer.from_dir(tmp_path)


def test_tokenizer_dir_is_cached_and_complete(tmp_path):
    assert tokenizer_dir() is tokenizer_dir()
    shutil.copytree(tokenizer_dir(), tmp_path / "copy")
    names = sorted(p.name for p in (tmp_path / "copy").iterdir())
    assert names == ["chat_template.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
