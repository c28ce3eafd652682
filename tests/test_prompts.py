"""Chat ids equal, token for token, what transformers' Qwen2_5_VLProcessor builds from the same chat."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from checkpoints import reference_processor
from qwenvl_cli.errors import PromptError
from qwenvl_cli.prompts import DEFAULT_SYSTEM, ImagePart, TextPart, VideoPart, build_chat_ids, token_types
from qwenvl_cli.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt()


@pytest.fixture(scope="module")
def tok(ckpt):
    return Tokenizer.from_dir(ckpt)


@pytest.fixture(scope="module")
def processor(ckpt):
    return reference_processor(ckpt)


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# Each case: the user's content in order (an (width, height) tuple is an image, a str is text), system prompt.
CASES = {
    "text only": (["What is 2+2?"], None),
    "one image": ([(451, 300), "Describe this image."], None),
    "two images with text between": (["First:", (300, 200), "and second:", (90, 400), "Compare them."], None),
    "custom system prompt": ([(200, 200), "What is this?"], "You are a terse assistant. Answer in one word."),
    "unicode text": ([(64, 64), "Décris l'image 🙂🐈‍⬛🪿, s'il te plaît — 谢谢! Ångström\n\tnaïve"],
                     "Tu es concis. 你好"),
    "image with no text": ([(120, 80)], None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_chat_ids_equal_the_transformers_processor(tok, processor, case):
    content, system = CASES[case]
    images = [picture(*item, seed=i) for i, item in enumerate(content) if isinstance(item, tuple)]
    messages = [{"role": "user", "content": [
        {"type": "image"} if isinstance(item, tuple) else {"type": "text", "text": item} for item in content]}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    chat = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = processor(text=[chat], images=images or None, return_tensors="pt")

    grid_list = expected["image_grid_thw"].tolist() if images else []
    grids = iter(grid_list)
    parts = [ImagePart(tuple(next(grids))) if isinstance(item, tuple) else TextPart(item) for item in content]
    ids = build_chat_ids(tok, parts, system=DEFAULT_SYSTEM if system is None else system)

    assert ids == expected["input_ids"][0].tolist()
    assert token_types(ids) == expected["mm_token_type_ids"][0].tolist()
    assert token_types(ids).count(1) == sum(t * h * w // 4 for t, h, w in grid_list)


def test_video_pads_equal_the_template_expanded_by_hand(tok, processor):
    # transformers' video processor needs torchvision; expand the pad in the rendered text instead.
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"},
                                             {"type": "image"}]}]
    chat = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat = chat.replace("<|video_pad|>", "<|video_pad|>" * (3 * 8 * 6 // 4))
    chat = chat.replace("<|image_pad|>", "<|image_pad|>" * (1 * 2 * 4 // 4))
    expected = processor.tokenizer(chat, add_special_tokens=False)["input_ids"]
    ids = build_chat_ids(tok, [VideoPart((3, 8, 6)), TextPart("What happens?"), ImagePart((1, 2, 4))])
    assert ids == expected
    types = token_types(ids)
    assert types.count(2) == 36 and types.count(1) == 2
    assert types.index(1) > max(i for i, t in enumerate(types) if t == 2)  # in the order given


def test_no_system_turn(tok):
    ids = build_chat_ids(tok, [TextPart("Hi")], system=None)
    assert ids == tok.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert build_chat_ids(tok, [TextPart("Hi")])[:3] == [151644, 8948, 198]  # <|im_start|>system\n


def test_merge_size_sets_the_pad_count(tok):
    ids = build_chat_ids(tok, [ImagePart((1, 6, 9))], system=None, merge_size=3)
    assert token_types(ids).count(1) == 6


@pytest.mark.parametrize("text", ["look: <|image_pad|>", "<|video_pad|>"])
def test_pad_tokens_typed_in_the_text_are_refused(tok, text):
    with pytest.raises(PromptError, match="contains <\\|image_pad\\|> or <\\|video_pad\\|>"):
        build_chat_ids(tok, [ImagePart((1, 2, 2)), TextPart(text)])


@pytest.mark.parametrize("grid", [(1, 3, 4), (0, 2, 2), (1, 2, 5)])
def test_grids_the_merger_cannot_produce_are_refused(tok, grid):
    with pytest.raises(PromptError, match="vision grid"):
        build_chat_ids(tok, [ImagePart(grid)])
