"""Time to first token and decode time of one greedy answer, qwenvl's and transformers', each inside ONE
run: the first new token's arrival to the last's. (Subtracting a 1-token run from an n-token run mixes two
runs' noise; on a GPU, where 64 tokens take ~0.1 s, that noise can outweigh the decode itself.)

Both return (first_s, rest_s): seconds from the call to the first new token, and from it to the last, so
the decode rate is (count - 1) / rest_s. Every token reaches the host before its stamp (qwenvl's stream
yields ids; transformers' streamer is handed `next_tokens.cpu()`), so GPU work is included without extra
syncs.
"""

from __future__ import annotations

import time

from qwenvl_cli.generate import Generator, SamplingParams
from qwenvl_cli.model.quant import decoder_linear_names


def step_bytes(model) -> int:
    """Weight bytes one decode step reads: every decoder linear and the LM head (norms are negligible)."""
    modules = (model.get_submodule(name) for name in decoder_linear_names(model))
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def ours_run(generator: Generator, prompt, count: int) -> tuple[float, float]:
    steps = generator.stream(prompt, SamplingParams(max_new_tokens=count))
    t = time.perf_counter()
    next(steps)
    first = time.perf_counter()
    for _ in steps:
        pass
    return first - t, time.perf_counter() - first


class _Stamps:
    """transformers' streamer protocol (put per step, end): the time of every put. The first put is the
    prompt, each later one a new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def theirs_run(model, inputs: dict, count: int) -> tuple[float, float]:
    """inputs: generate()'s model inputs (input_ids, pixel_values, ...); greedy, exactly `count` tokens."""
    stamps = _Stamps()
    t = time.perf_counter()
    model.generate(**inputs, max_new_tokens=count, min_new_tokens=count, do_sample=False, repetition_penalty=1.0,
                   pad_token_id=0, streamer=stamps)
    if len(stamps.times) != count + 1:
        raise RuntimeError(f"transformers' streamer saw {len(stamps.times) - 1} new tokens, expected {count}")
    return stamps.times[1] - t, stamps.times[-1] - stamps.times[1]
