"""The GPU decode step's body (model/graph_step.py: TextModel.decode_static with the slot as a tensor,
attention over the whole cache under a mask) against the module step, on the CPU; and the Generator's
graph bookkeeping (capture once, reuse the cache and the graph across answers, fall back with a reason)
with an eager stand-in for the CUDA graph recorder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qwenvl_cli.engine import Engine
from qwenvl_cli.generate import Generator, SamplingParams, reference_generate
from qwenvl_cli.media.image import preprocess_image
from qwenvl_cli.model import graph_step
from qwenvl_cli.model.graph_step import StaticStep
from qwenvl_cli.model.loader import load_model, open_checkpoint
from qwenvl_cli.model.rope import signed_sin
from qwenvl_cli.model.text import KVCache

PROMPT = [151644, 872, 198, 3838, 374, 279, 6722, 315, 9625, 30, 151645, 198, 151644, 77091, 198]
TOKENS = [9707, 0, 151645, 17, 3838, 2, 11, 77091]


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return open_checkpoint(make_ckpt())


@pytest.mark.parametrize("dtype, pack, tol", [
    (torch.float32, True, 1e-5), (torch.float32, False, 1e-5), (torch.bfloat16, True, 2**-6),
])
def test_static_step_answers_what_the_module_step_does(ckpt, dtype, pack, tol):
    """Step after step from a real prefill, into a cache whose unwritten slots hold NaN (torch.empty may):
    the static step's logits are the module step's within `tol` of their range (another attention kernel
    sums in another order), and it writes the same keys and values to the same slots."""
    model = load_model(ckpt, "cpu", dtype, pack=pack)
    prompt = model.make_prompt(PROMPT)
    n, extra = prompt.length, len(TOKENS) + 5
    caches = [KVCache.allocate(model.config.text, 1, n + extra, "cpu", model.dtype) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            cache.k.fill_(float("nan"))
            cache.v.fill_(float("nan"))
            Generator(model).prefill(prompt, cache)
        static = StaticStep(model, caches[1], n)
        cos, sin = model.decode_tables(torch.arange(n, n + len(TOKENS)) + prompt.rope_delta)
        sin = signed_sin(sin)
        for i, token in enumerate(TOKENS):
            x = torch.tensor([[token]])
            want = model.logits(model.model.decode(model.model.embed_tokens(x), cos[:, i:i + 1], sin[:, i:i + 1],
                                                   caches[0], n + i)[:, -1])
            got = static.step(x, n + i, cos[:, i:i + 1], sin[:, i:i + 1])
            assert got.dtype == torch.float32 and torch.isfinite(got).all(), f"step {i}"
            torch.testing.assert_close(got, want, atol=tol * float(want.max() - want.min()), rtol=0)
        end = n + len(TOKENS)
        for a, b in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):
            torch.testing.assert_close(b[:, :, :, :end], a[:, :, :, :end], atol=tol, rtol=tol)
            assert torch.equal(b[:, :, :, end:], torch.zeros_like(b[:, :, :, end:]))  # zeroed, never written


def test_static_step_refuses_a_slot_outside_its_cache(ckpt):
    model = load_model(ckpt, "cpu", torch.float32)
    cache = KVCache.allocate(model.config.text, 1, 20, "cpu", model.dtype)
    static = StaticStep(model, cache, 10)
    cos = torch.zeros(1, 1, model.config.text.head_dim)
    with pytest.raises(IndexError, match="cache slot 20 outside a cache of 20"):
        static.step(torch.tensor([[1]]), 20, cos, cos)


def _image_prompt(engine: Engine, size: tuple[int, int], text: str):
    pixels = np.random.default_rng(size[0]).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return engine.prompt([preprocess_image(Image.fromarray(pixels), engine.preprocessor), text])


@pytest.fixture
def eager_graphs(monkeypatch):
    """The CUDA graph recorder replaced by one that runs the step eagerly at each replay, into the same
    output tensor (as a replay rewrites the graph's output): GraphStep and the Generator keep their own
    logic. Returns the list of recorded steps, one per capture."""
    recorded = []

    def record(run, device):
        out = run()  # the capture's placeholder step, as the warm-up runs would
        recorded.append(run)
        return (lambda: out.copy_(run())), out

    monkeypatch.setattr(graph_step, "_record", record)
    return recorded


def test_graph_generator_captures_once_and_answers_as_the_oracle(make_ckpt, eager_graphs):
    """Answers of an image prompt (rope_delta != 0) and then others that fit in its cache: the greedy
    tokens of the modules' generator and of the oracle, with one capture for all of them (the cache and
    its graph kept across answers, the slots after each prompt zeroed again); a prompt far longer than the
    cache gets a new cache and a new capture. With repetition penalty and sampling too, against the
    modules' generator with the same seed."""
    engine = Engine.load(str(make_ckpt()), "cpu", "float32")
    model = engine.model
    graphed, modules = Generator(model, step="graph"), Generator(model, step="modules")
    greedy = SamplingParams(max_new_tokens=12)
    prompts = [_image_prompt(engine, (112, 84), "Describe."), model.make_prompt(PROMPT),
               _image_prompt(engine, (84, 56), "What is it?")]
    assert prompts[0].rope_delta != 0
    for prompt in prompts:
        got = list(graphed.stream(prompt, greedy))
        assert got == list(modules.stream(prompt, greedy)) == reference_generate(model, prompt, greedy)
        assert graphed.decode_path == "one CUDA graph"
        with torch.inference_mode():  # what the next answer must not read: begin() zeroes it
            graphed._bound[0].k.fill_(float("nan"))
            graphed._bound[0].v.fill_(float("nan"))
    assert len(eager_graphs) == 1
    cache = graphed._bound[0]
    assert cache.max_len % 256 == 0 and cache.max_len >= prompts[0].length + 12

    long = _image_prompt(engine, (448, 448), "Describe.")  # 256 vision tokens: more than the cache holds
    assert long.length + 12 > cache.max_len
    assert list(graphed.stream(long, greedy)) == list(modules.stream(long, greedy))
    assert len(eager_graphs) == 2 and graphed._bound[0] is not cache

    sampled = SamplingParams(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=50,
                             repetition_penalty=1.3, seed=3)
    for prompt in prompts[:2]:
        assert list(graphed.stream(prompt, sampled)) == list(modules.stream(prompt, sampled))


def test_graph_step_falls_back_to_the_modules_and_says_why(make_ckpt):
    """Without CUDA (or where a capture fails) the graph step is the modules', decode_path gives the reason,
    and no capture is tried again."""
    model = load_model(open_checkpoint(make_ckpt()), "cpu", torch.float32)
    gen = Generator(model, step="graph")
    params = SamplingParams(max_new_tokens=6)
    prompt = model.make_prompt(PROMPT)
    assert list(gen.stream(prompt, params)) == reference_generate(model, prompt, params)
    assert gen.decode_path == "modules (CUDA graph capture failed: CUDA graphs need a CUDA device, not cpu)"
    assert gen._kind() == "modules"
    with pytest.raises(ValueError, match="decode step 'fast': choose one of auto, native, graph, static, modules"):
        Generator(model, step="fast")


def test_generator_says_which_step_served(make_ckpt):
    """Each step kind on the CPU gives the oracle's greedy tokens and says what it was."""
    model = load_model(open_checkpoint(make_ckpt()), "cpu", torch.float32)
    prompt, params = model.make_prompt(PROMPT), SamplingParams(max_new_tokens=8)
    want = reference_generate(model, prompt, params)
    for step, path in (("modules", "modules"), ("static", "a static step, eager")):
        gen = Generator(model, step=step)
        assert list(gen.stream(prompt, params)) == want
        assert gen.decode_path == path


def test_overlapped_steps_answer_the_same_and_stop_cleanly(make_ckpt):
    """overlap=True (the GPU default: each step queued before its token is handed out) on the CPU: the same
    steps as without, greedy, sampled and constrained to stop early; a caller that stops reading after a
    few tokens leaves the generator ready for the next answer."""
    model = load_model(open_checkpoint(make_ckpt()), "cpu", torch.float32)
    prompt = model.make_prompt(PROMPT)
    plain, ahead = Generator(model), Generator(model, overlap=True)
    for params in (SamplingParams(max_new_tokens=10), SamplingParams(max_new_tokens=1),
                   SamplingParams(max_new_tokens=10, do_sample=True, temperature=0.9, repetition_penalty=1.2, seed=5),
                   SamplingParams(max_new_tokens=10, eos_token_ids=(reference_generate(model, prompt, SamplingParams(max_new_tokens=4))[2].token_id,))):
        assert list(ahead.stream(prompt, params)) == list(plain.stream(prompt, params)) == reference_generate(model, prompt, params)
    steps = ahead.stream(prompt, SamplingParams(max_new_tokens=10))
    first = [next(steps) for _ in range(3)]
    steps.close()
    assert first == reference_generate(model, prompt, SamplingParams(max_new_tokens=10))[:3]
    assert ahead._bound is None  # the CPU's bound step went with the answer
