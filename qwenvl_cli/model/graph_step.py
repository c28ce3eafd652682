"""The GPU decode step: `TextModel.decode_static` over one answer's KV cache, its inputs in fixed buffers,
captured once in a CUDA graph and replayed for every token.

At batch 1 a GPU decode step is a few hundred small kernels (3B: ~15 a layer x 36 layers, then the head);
launched one by one from Python they cost more host time than the GPU needs to run them (each launch
~5-10 us against a ~2-ms step whose weight reads are the real work). A graph replays them all in one
launch. That needs every shape and every pointer fixed, so the step reads what changes (the token, the
cache slot, the rope rows) from buffers that `load` fills before each replay; the slot is a device tensor
the captured kernels read (index_copy_ writes, a mask of the visible slots), never a Python int.

`StaticStep` is the graph's body run eagerly: the form the CPU tests check against `TextModel.decode`
(tests/test_graph_step.py), and what serves when a capture fails. `GraphStep` adds the capture (CUDA only).
"""

from __future__ import annotations

from typing import Callable

import torch

from qwenvl_cli.model.text import KVCache


class StaticStep:
    """One model's decode step bound to one cache, with fixed input buffers. `step(token, index, cos,
    sin_signed)` -> (1, V) float32 logits, as Generator.decode_step answers."""

    def __init__(self, model, cache: KVCache, first_slot: int) -> None:
        """first_slot: the first slot decode will write (the prompt's length); every slot from there on is
        zeroed, so that the masked-out slots of the attention hold finite values."""
        if cache.k.shape[1] != 1:
            raise ValueError(f"a static step takes batch 1, not {cache.k.shape[1]}")
        cfg, device = model.config.text, model.device
        self.model, self.cache = model, cache
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.cos = torch.zeros(1, 1, cfg.head_dim, dtype=model.dtype, device=device)
        self.sin = torch.zeros_like(self.cos)
        self.begin(first_slot)

    def begin(self, first_slot: int) -> None:
        """A new answer on this cache decodes from `first_slot`: zero the slots from there on (what an
        earlier answer or torch.empty left there is masked, but must be finite)."""
        self.cache.k[:, :, :, first_slot:].zero_()
        self.cache.v[:, :, :, first_slot:].zero_()

    def load(self, token: torch.Tensor, index: int, cos: torch.Tensor, sin_signed: torch.Tensor) -> None:
        """token # (1, 1) long on the device at cache slot `index`; cos, sin_signed # (1, 1, hd). Device-side
        copies only: nothing here waits for the GPU."""
        if not 0 <= index < self.cache.max_len:
            raise IndexError(f"cache slot {index} outside a cache of {self.cache.max_len}")
        self.token.copy_(token)
        self.slot.fill_(index)
        self.cos.copy_(cos)
        self.sin.copy_(sin_signed)

    def run(self) -> torch.Tensor:
        """The step on the loaded buffers -> (1, V) float32."""
        m = self.model
        hidden = m.model.decode_static(m.model.embed_tokens(self.token), self.cos, self.sin, self.cache, self.slot)
        return m.logits(hidden[:, -1])

    @torch.inference_mode()
    def step(self, token: torch.Tensor, index: int, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        self.load(token, index, cos, sin_signed)
        return self.run()


class GraphStep:
    """A StaticStep captured in a CUDA graph when the Generator binds it to a cache (`capture`), replayed at
    every step of every answer on that cache."""

    def __init__(self, static: StaticStep, replay: Callable[[], None], logits: torch.Tensor) -> None:
        """replay: runs the captured step again, into `logits` # (1, V) float32 (the graph's output)."""
        self.static, self.replay, self.logits = static, replay, logits

    @classmethod
    @torch.inference_mode()
    def capture(cls, static: StaticStep, first_slot: int) -> GraphStep:
        """Capture the step, loaded with placeholder inputs (token 0, zero rope rows) at `first_slot`. The
        warm-up runs (on a side stream, as capture requires: they let cuBLAS and the attention choose and
        allocate their kernels) write placeholder keys and values to that slot only, and begin() zeroes
        it again. Raises what the capture raises (no CUDA device, a kernel that syncs or allocates on the
        host); the caller falls back to the eager modules."""
        static.load(torch.zeros_like(static.token), first_slot, torch.zeros_like(static.cos), torch.zeros_like(static.sin))
        replay, logits = _record(static.run, static.token.device)
        static.begin(first_slot)
        return cls(static, replay, logits)

    def begin(self, first_slot: int) -> None:
        self.static.begin(first_slot)

    @torch.inference_mode()
    def step(self, token: torch.Tensor, index: int, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        self.static.load(token, index, cos, sin_signed)
        self.replay()
        return self.logits.clone()  # the next replay overwrites the graph's own output


def _record(run: Callable[[], torch.Tensor], device: torch.device) -> tuple[Callable[[], None], torch.Tensor]:
    """`run` captured in a CUDA graph: (the graph's replay, the output tensor every replay rewrites). Two
    warm-up runs first, on a side stream, as capture requires. (The tests put an eager stand-in here, to
    run GraphStep's and the Generator's bookkeeping on the CPU.)"""
    if device.type != "cuda":
        raise RuntimeError(f"CUDA graphs need a CUDA device, not {device}")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = run()
    return graph.replay, logits
