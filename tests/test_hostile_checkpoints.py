"""Damaged model directories: each is one stderr line naming the file and the field with the numbers, exit 1,
before any model is built (no hang, no memory), and QWENVL_DEBUG=1 still shows the cause. Each directory is a
good tiny checkpoint with one field or one file changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qwenvl_cli.cli import app
from qwenvl_cli.errors import ConfigError, ModelError
from qwenvl_cli.model import loader
from qwenvl_cli.model.loader import load_model, open_checkpoint

SHAPES = Path(__file__).resolve().parents[1] / "samples" / "shapes.png"
DEEP = "[" * 100_000 + "]" * 100_000  # json's recursion: RecursionError, not a ValueError


def _json(name: str, edit):
    def apply(path: Path) -> None:
        data = json.loads((path / name).read_text())
        edit(data)
        (path / name).write_text(json.dumps(data))

    return apply


def _text(name: str, text):
    def apply(path: Path) -> None:
        (path / name).write_text(text(path) if callable(text) else text)

    return apply


def _config_with(extra: str):
    """config.json with `extra` spliced in as raw JSON text (NaN, deep nesting: what json.dumps won't write)."""
    return _text("config.json", lambda p: (p / "config.json").read_text().rstrip().rstrip("}") + f", {extra}}}")


def _sparse(name: str, size: int):
    def apply(path: Path) -> None:
        with open(path / name, "r+b") as f:
            f.truncate(size)  # a sparse file: no disk, no time

    return apply


def _vision(**values):
    return _json("config.json", lambda c: c["vision_config"].update(values))


def _weights(edit):
    def apply(path: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(path / "model.safetensors")
        edit(tensors)
        save_file(tensors, path / "model.safetensors")

    return apply


def _move_layer(tensors, old: str, new: str) -> None:
    for key in [k for k in tensors if k.startswith(old)]:
        tensors[new + key[len(old):]] = tensors.pop(key)


# name -> (damage, the file the line names, words it must contain)
DAMAGED = {
    # A number, a string or an object where a list belongs.
    "fullatt_block_indexes 3": (_vision(fullatt_block_indexes=3), "config.json",
                                "vision_config: fullatt_block_indexes must be a list of block numbers, got 3"),
    "mrope_section 4": (_json("config.json", lambda c: c["rope_scaling"].update(mrope_section=4)), "config.json",
                        "text_config: mrope_section must be a list of 3 whole numbers, got 4"),
    "mrope_section string": (_json("config.json", lambda c: c["rope_scaling"].update(mrope_section="16,24,24")),
                             "config.json", "mrope_section must be a list of 3 whole numbers, got '16,24,24'"),
    "fullatt_block_indexes floats": (_vision(fullatt_block_indexes=[1.5, 3]), "config.json",
                                     "fullatt_block_indexes must be a list of block numbers, got [1.5, 3]"),
    "vision hidden_act 5": (_vision(hidden_act=5), "config.json", "hidden_act must be a string, got 5"),
    "tie_word_embeddings yes": (_json("config.json", lambda c: c.update(tie_word_embeddings="yes")), "config.json",
                                "tie_word_embeddings must be true or false, got 'yes'"),
    "torch_dtype list": (_json("config.json", lambda c: c.update(torch_dtype=["float32"])), "config.json",
                         "torch_dtype must be a string"),
    "rms_norm_eps NaN": (_config_with('"rms_norm_eps": NaN'), "config.json",
                         "rms_norm_eps must be a finite number, got nan"),
    "image_mean 3": (_json("preprocessor_config.json", lambda c: c.update(image_mean=3)), "preprocessor_config.json",
                     "image_mean must be a list of 3 numbers, got 3"),
    "image_std 2 values": (_json("preprocessor_config.json", lambda c: c.update(image_std=[0.2, 0.3])),
                           "preprocessor_config.json", "image_mean/image_std must be 3 values"),
    "size 5": (_json("preprocessor_config.json", lambda c: c.update(size=5)), "preprocessor_config.json",
               "size must be an object, got 5"),
    "eos_token_id object": (_json("generation_config.json", lambda c: c.update(eos_token_id={"id": 1})),
                            "generation_config.json", "eos_token_id must be a token id or a list of them"),
    "eos_token_id float": (_json("generation_config.json", lambda c: c.update(eos_token_id=[151645.5])),
                           "generation_config.json", "eos_token_id must be a token id or a list of them"),
    "temperature Infinity": (_text("generation_config.json", '{"temperature": Infinity}'), "generation_config.json",
                             "temperature must be a finite number, got inf"),
    # Nesting and size.
    "config.json nested 100k deep": (_text("config.json", DEEP), "config.json", "nested too deeply"),
    "generation_config.json nested 100k deep": (_text("generation_config.json", DEEP), "generation_config.json",
                                                "nested too deeply"),
    "index nested 100k deep": (_text("model.safetensors.index.json", DEEP), "model.safetensors.index.json",
                               "nested too deeply"),
    "nested value in a field": (_config_with('"rope_scaling": ' + "[" * 500 + "]" * 500), "config.json",
                                "rope_scaling must be an object, got [[[...]]]"),
    "config.json of 17 MiB": (_text("config.json", " " * (17 << 20)), "config.json", "larger than 16 MiB"),
    "int of 5000 digits": (_config_with('"vocab_size": 1' + "0" * 5000), "config.json", "not valid JSON"),
    "tokenizer.json nested 100k deep": (_text("tokenizer.json", '{"model": ' + DEEP + "}"), "tokenizer.json",
                                        "cannot load tokenizer"),
    "tokenizer.json of 65 MiB": (_sparse("tokenizer.json", 65 << 20), "tokenizer.json",
                                 "68,157,440 bytes, larger than a tokenizer (64 MiB at most)"),
    # Absurd sizes are refused by the config checks themselves.
    "num_hidden_layers 10**9": (_json("config.json", lambda c: c.update(num_hidden_layers=10**9)), "config.json",
                                "num_hidden_layers 1000000000 is more than 1,000"),
    "vision depth 100000": (_vision(depth=100_000), "config.json", "depth 100000 is more than 1,000"),
    "hidden_size 131072": (_json("config.json", lambda c: c.update(hidden_size=131072)), "config.json",
                           "hidden_size 131072 is more than 65,536"),
    "vocab_size 10**8": (_json("config.json", lambda c: c.update(vocab_size=10**8)), "config.json",
                         "vocab_size 100000000 is more than 10,000,000"),
    "min_pixels 10**12": (_json("preprocessor_config.json",
                                lambda c: c.update(min_pixels=10**12, max_pixels=10**13)),
                          "preprocessor_config.json", "min_pixels 1000000000000 is more than 100,352,000"),
    # Plausible sizes that the weights do not hold: caught from the safetensors headers.
    "num_hidden_layers 500": (_json("config.json", lambda c: c.update(num_hidden_layers=500)), "",
                              "config.json says num_hidden_layers 500 but the weights hold 2 layers "
                              "(model.layers.0-1)"),
    "vision depth 8": (_vision(depth=8, fullatt_block_indexes=[3, 7]), "",
                       "config.json says vision_config depth 8 but the weights hold 4 blocks (visual.blocks.0-3)"),
    "layers 0 and 5": (_weights(lambda t: _move_layer(t, "model.layers.1.", "model.layers.5.")), "",
                       "config.json says num_hidden_layers 2 but the weights hold 2 layers (model.layers.0, 5)"),
    "vocab_size 152064": (_json("config.json", lambda c: c.update(vocab_size=152064)), "",
                          "config.json says vocab_size 152064 but model.safetensors holds model.embed_tokens.weight "
                          "with shape (151936, 64)"),
    "num_key_value_heads 1": (_json("config.json", lambda c: c.update(num_key_value_heads=1)), "",
                              "config.json says num_key_value_heads * head_dim 16 but model.safetensors holds "
                              "model.layers.0.self_attn.k_proj.weight with shape (32, 64)"),
    "vision intermediate_size 128": (_vision(intermediate_size=128), "",
                                     "config.json says vision_config intermediate_size 128 but model.safetensors "
                                     "holds visual.blocks.0.mlp.gate_proj.weight with shape (96, 64)"),
    # The index.
    "weight_map value a list": (_text("model.safetensors.index.json", json.dumps({"weight_map": {"a": ["x"]}})),
                                "model.safetensors.index.json", "must name shard files inside the checkpoint"),
    "weight_map name with NUL": (_text("model.safetensors.index.json", json.dumps({"weight_map": {"a": "x\0y"}})),
                                 "model.safetensors.index.json", "must name shard files inside the checkpoint"),
    "1000 missing shards": (_text("model.safetensors.index.json",
                                  json.dumps({"weight_map": {f"k{i}": f"s{i:04d}.safetensors" for i in range(1000)}})),
                            "", "missing weight shard(s) s0000.safetensors, s0001.safetensors, s0002.safetensors, "
                                "s0003.safetensors, s0004.safetensors ... (1000 in all)"),
}


@pytest.fixture
def damaged(make_ckpt, tmp_path):
    def make(name: str) -> Path:
        path = tmp_path / "model"
        shutil.copytree(make_ckpt(), path)
        DAMAGED[name][0](path)
        return path

    return make


@pytest.fixture
def never_built(monkeypatch):
    """Fail the test if a model is built: every damage must be caught before the meta build."""
    def build(*args, **kwargs):
        raise AssertionError("the model was built from a damaged checkpoint")

    monkeypatch.setattr(loader, "Qwen2_5_VL", build)


@pytest.mark.parametrize("name", list(DAMAGED))
def test_damaged_directory_is_one_line_naming_file_and_field(damaged, never_built, name):
    path = damaged(name)
    _, file, words = DAMAGED[name]
    r = CliRunner().invoke(app, ["describe", str(SHAPES), "--model", str(path), "--max-new-tokens", "1"])
    assert r.exit_code == 1, (r.exit_code, r.stderr)
    assert r.stdout == ""
    [line] = r.stderr.splitlines()
    assert "Traceback" not in line and "internal error" not in line, line
    assert line.startswith(f"qwenvl: {path / file}" if file else f"qwenvl: {path}: "), line
    assert words in line, line
    assert len(line) < 400, line


def test_the_header_check_names_the_transformers5_layout_too(make_ckpt, tmp_path, never_built):
    path = tmp_path / "model"
    shutil.copytree(make_ckpt(config_style="nested", key_layout="transformers5", shards=2), path)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"num_hidden_layers 3 but the weights hold 2 layers \(model.layers.0-1\)"):
        open_checkpoint(path)


def test_a_tensor_in_two_shards_is_named(make_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "model"
    shutil.copytree(make_ckpt(shards=2), path)
    first, second = sorted(path.glob("model-*.safetensors"))
    tensors = load_file(second)
    tensors["model.norm.weight"] = torch.ones(64)  # also in one of the shards already
    save_file(tensors, second)
    with pytest.raises(ModelError, match=r"model.norm.weight is also in model-0000[12]-of-00002.safetensors"):
        open_checkpoint(path)


def test_good_checkpoints_pass_the_header_check(make_ckpt):
    for kwargs in (dict(), dict(tied=True, shards=3), dict(config_style="nested", key_layout="transformers5")):
        ckpt = open_checkpoint(make_ckpt(**kwargs))
        assert len(loader.read_shapes(ckpt.weight_files)) > 50


def test_bad_model_references_are_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for ref, words in [("/tmp/" + "x" * 300, "File name too long"), ("a/" + "x" * 300, "not a valid hub id"),
                       ("a/b c", "not a valid hub id")]:
        r = CliRunner().invoke(app, ["describe", str(SHAPES), "--model", ref])
        assert r.exit_code == 1, r.stderr
        [line] = r.stderr.splitlines()
        assert "internal error" not in line and words in line, line


@pytest.mark.parametrize(
    "name, cause",
    [("config.json nested 100k deep", RecursionError), ("int of 5000 digits", ValueError),
     ("tokenizer.json nested 100k deep", Exception), ("fullatt_block_indexes 3", ConfigError)],
)
def test_debug_shows_the_cause(damaged, monkeypatch, name, cause):
    path = damaged(name)
    monkeypatch.setenv("QWENVL_DEBUG", "1")
    r = CliRunner().invoke(app, ["describe", str(SHAPES), "--model", str(path)])
    assert isinstance(r.exception, ModelError), r.exception
    assert isinstance(r.exception.__cause__, cause), repr(r.exception.__cause__)


def test_causes_are_chained(make_ckpt, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from qwenvl_cli.hub import resolve_model

    path = tmp_path / "model"
    shutil.copytree(make_ckpt(), path)
    (path / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ModelError, match="not a valid safetensors file") as info:
        open_checkpoint(path)
    assert isinstance(info.value.__cause__, SafetensorError)

    (path / "config.json").write_text('{"vision_config": {"depth": 2.5}}')
    with pytest.raises(ConfigError, match=r"config.json: vision_config: depth must be a whole number, got 2.5") as info:
        open_checkpoint(path)
    assert isinstance(info.value.__cause__, ConfigError)  # the message without the file name

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as info:
        resolve_model("a/b c")
    assert isinstance(info.value.__cause__, ValueError)  # huggingface_hub's HFValidationError


def test_a_good_load_still_works_after_the_checks(make_ckpt):
    model = load_model(open_checkpoint(make_ckpt()))
    assert len(model.model.layers) == 2 and len(model.visual.blocks) == 4
