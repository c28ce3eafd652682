"""Test-side comparisons with the no-cache oracle that more than one test module uses."""

from __future__ import annotations

import torch

from qwenvl_cli.generate import Generator, reference_generate
from qwenvl_cli.model.qwen2_5_vl import Prompt


def assert_greedy_as_the_oracle(model, prompt, params) -> None:
    """Cached generation gives the no-cache oracle's greedy tokens, up to a tie: where they part, the oracle's
    logits (in the model's dtype; bfloat16 ones tie often, e.g. two tokens at 4.8125) must hold both tokens
    within one rounding of each other, and the rest is not compared (the texts differ from there on)."""
    got, want = list(Generator(model).stream(prompt, params)), reference_generate(model, prompt, params)
    if got == want:
        return
    i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    assert i is not None, f"{len(got)} tokens where the oracle gave {len(want)}, the same as far as both go"
    ids = torch.cat([prompt.input_ids, torch.tensor([[s.token_id for s in want[:i]]], dtype=torch.long)], 1)
    ahead = torch.arange(i).view(1, 1, -1).expand(3, 1, i) + prompt.input_ids.shape[1] + prompt.rope_delta
    prefix = Prompt(ids, torch.cat([prompt.positions, ahead], 2), prompt.rope_delta, prompt.images, prompt.videos)
    with torch.inference_mode():
        logits = model(prefix)[0, -1]
    best, other = logits[want[i].token_id].double(), logits[got[i].token_id].double()
    ulp = torch.finfo(logits.dtype).eps * best.abs()
    assert best - other <= ulp, f"step {i}: {got[i]} where the oracle chose {want[i]} by {float(best - other)}"
