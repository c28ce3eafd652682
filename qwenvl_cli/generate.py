"""Text generation: logits processing as transformers applies it, prefill and decode steps over a
preallocated KV cache, stop rules. Yields steps; never prints.

`reference_generate` recomputes the whole sequence every step without a cache: the oracle the cached
generator is tested against. Both take an optional constraint (constrain.JsonConstraint) that masks the
logits before any processing and whose EOS ends the answer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Iterator

import torch

from qwenvl_cli.config import GenerationConfig, check_sampling
from qwenvl_cli.errors import PromptError
from qwenvl_cli.model.qwen2_5_vl import Prompt, Qwen2_5_VL
from qwenvl_cli.model.rope import signed_sin
from qwenvl_cli.model.graph_step import GraphStep, StaticStep
from qwenvl_cli.model.native_step import NativeStep
from qwenvl_cli.model.text import KVCache

if TYPE_CHECKING:
    from qwenvl_cli.constrain import JsonConstraint

DecodeStep = NativeStep | StaticStep | GraphStep  # begin(first_slot), then step(token, index, cos, sin_signed)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. Greedy when `do_sample` is off or temperature is 0 (top_k 0 disables top-k);
    no eos_token_ids means stop only at max_new_tokens."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_p, self.top_k, self.repetition_penalty, self.max_new_tokens)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @classmethod
    def from_config(cls, gen: GenerationConfig, **overrides) -> SamplingParams:
        """The checkpoint's generation_config.json, then explicit overrides (None = keep the default).
        Giving a temperature > 0 turns sampling on; temperature 0 means greedy."""
        base = cls(
            max_new_tokens=gen.max_new_tokens,
            do_sample=gen.do_sample,
            temperature=gen.temperature,
            top_p=gen.top_p,
            top_k=gen.top_k,
            repetition_penalty=gen.repetition_penalty,
            eos_token_ids=gen.eos_token_ids,
        )
        given = {k: v for k, v in overrides.items() if v is not None}
        if "temperature" in given and "do_sample" not in given:
            given["do_sample"] = given["temperature"] > 0
        return replace(base, **given)


@dataclass(frozen=True)
class Step:
    token_id: int
    finish_reason: str | None = None  # "stop" (an EOS id) or "length" on the last step


# ---------------------------------------------------------------------------------------- logits


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' rule over every id in the sequence so far, prompt included: positive logits are
    divided by the penalty, negative ones multiplied. logits # (B, V) float32, seen # (B, V) bool."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def penalize_seen(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """apply_repetition_penalty touching only the ids seen so far, in place: seen_ids # (n,) long, unique.
    The mask form reads and writes the whole vocabulary twice a step (~0.6 ms of a 16-ms CPU step)."""
    if penalty == 1.0 or seen_ids.numel() == 0:
        return logits
    values = logits[:, seen_ids]  # (B, n)
    logits[:, seen_ids] = torch.where(values < 0, values * penalty, values / penalty)
    return logits


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p, in transformers' order. # (B, V)"""
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k > 0:
        k = min(params.top_k, logits.shape[-1])
        kth = torch.topk(logits, k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - params.top_p
        remove[..., -1:] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


@lru_cache(maxsize=8)
def _argmax_row(vocab: int) -> int:
    """The largest divisor of `vocab` up to 2048 (1187 for Qwen's 151936), or 0 if it is below 64."""
    row = next(d for d in range(min(vocab, 2048), 0, -1) if vocab % d == 0)
    return row if row >= 64 else 0


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1) # (B, V) -> (B,), the same index (the first maximum; NaN counts as the maximum) in
    two levels: the maximum of each row of a (B, V / r, r) view, the first row holding the overall maximum,
    the first maximum inside it. On CPU torch's argmax is scalar code, 225 us over 151936 logits; amax is
    vectorised, and this takes 50 us (2-3% of a quantized decode step)."""
    row = _argmax_row(logits.shape[-1])
    if not row or logits.device.type != "cpu":
        return logits.argmax(-1)
    blocks = logits.view(logits.shape[0], -1, row)  # (B, V / r, r)
    first = blocks.amax(-1).argmax(-1)  # (B,)
    inside = blocks[torch.arange(logits.shape[0], device=logits.device), first].argmax(-1)  # (B,)
    return first * row + inside


def choose(logits: torch.Tensor, params: SamplingParams, rng: torch.Generator | None) -> torch.Tensor:
    """Next token ids # (B,) on the logits' device (repetition penalty already applied), without a host sync."""
    if params.greedy:
        return greedy_argmax(logits)
    probs = warp(logits, params).softmax(-1)
    return torch.multinomial(probs, 1, generator=rng).squeeze(-1)


def apply_constraint(logits: torch.Tensor, constraint: JsonConstraint) -> torch.Tensor:
    """Disallowed ids to -inf, before repetition penalty and warping see the logits. # (1, V)"""
    allowed = constraint.allowed(logits.shape[-1], logits.device)  # (V,) bool
    return torch.where(allowed, logits, float("-inf"))


def _stop_ids(params: SamplingParams, constraint: JsonConstraint | None) -> set[int]:
    """The answer ends at params' EOS ids and, under a constraint, at the constraint's EOS (the only one
    it allows), even when params name none."""
    stop = set(params.eos_token_ids)
    if constraint is not None:
        stop.add(constraint.eos_id)
    return stop


def _complete(constraint: JsonConstraint | None) -> bool:
    """The constrained answer is whole: only its EOS could follow, so the answer ends here without
    spending a step (and a token of the budget) on it."""
    return constraint is not None and constraint.finished


def _seen_mask(prompt: Prompt, vocab: int, device: torch.device) -> torch.Tensor:
    seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
    seen[0, prompt.input_ids[0].to(device)] = True
    return seen


def _rng(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    rng = torch.Generator(device=device)
    if params.seed is None:
        rng.seed()
    else:
        rng.manual_seed(params.seed)
    return rng


def _check_length(model: Qwen2_5_VL, prompt: Prompt) -> None:
    limit = model.config.text.max_position_embeddings
    if prompt.length >= limit:
        raise PromptError(f"the prompt has {prompt.length} tokens; the model's context is {limit}")

# ---------------------------------------------------------------------------------------- engine


STEPS = ("auto", "native", "graph", "static", "modules")


class Generator:
    """Cached generation for one model: prefill once, then one decode step per token."""

    def __init__(self, model: Qwen2_5_VL, step: str = "auto", overlap: bool | None = None) -> None:
        """step: what runs the decode steps. "native" the bound native kernels (model/native_step.py, CPU),
        "graph" the static step captured in one CUDA graph (model/graph_step.py, CUDA), "static" that step
        run eagerly (the graph's body, testable on CPU), "modules" TextModel.decode (the oracle of them
        all); "auto" is native on CPU and graph on CUDA. Where the chosen one does not apply (a batch,
        kernels missing, a capture that fails) the modules serve, and `decode_path` says so.
        overlap (default: on CUDA, where steps run asynchronously): queue each decode step before the
        caller gets the token it follows from, so that the device computes while the caller streams;
        on a CPU, where a step runs on the calling thread, that would only hold every token back."""
        if step not in STEPS:
            raise ValueError(f"decode step {step!r}: choose one of {', '.join(STEPS)}")
        self.model = model
        self.step_kind = step
        self.overlap = overlap
        self.decode_path = ""  # what ran the last bound cache's decode steps, and why (for --verbose)
        self._no_graph = ""  # why a capture failed: the modules serve from then on
        # The step bound to the current cache. On CUDA both outlive the answer: the next answer that fits
        # reuses the cache and replays the same graph instead of capturing again.
        self._bound: tuple[KVCache, DecodeStep | None] | None = None

    @torch.inference_mode()
    def prefill(self, prompt: Prompt, cache: KVCache) -> torch.Tensor:
        """Run the prompt, fill cache[0:L), return the last position's logits # (1, V) float32."""
        m = self.model
        embeds = m.embed(prompt)
        cos, sin = m.rope_tables(prompt.positions)
        hidden = m.model(embeds, cos, sin, cache, 0)
        return m.logits(hidden[:, -1])

    @torch.inference_mode()
    def decode_step(
        self, token: torch.Tensor, index: int, cos: torch.Tensor, sin_signed: torch.Tensor, cache: KVCache
    ) -> torch.Tensor:
        """token # (1, 1) long on device at sequence index `index`; cos # (1, 1, hd) and sin_signed
        (rope.signed_sin of the sin table) # (1, 1, hd). -> (1, V)."""
        bound = self._bind(cache, index)
        if bound is not None:
            return bound.step(token, index, cos, sin_signed)
        m = self.model
        hidden = m.model.decode(m.model.embed_tokens(token), cos, sin_signed, cache, index)
        return m.logits(hidden[:, -1])

    def _bind(self, cache: KVCache, first_slot: int) -> DecodeStep | None:
        """The step bound to `cache`, made when the cache is new (its decode starting at `first_slot`); None
        where the modules serve."""
        if self._bound is None or self._bound[0] is not cache:
            self._bound = None  # an old graph and cache go before the new ones are made
            self._bound = (cache, self._make_step(cache, first_slot))
        return self._bound[1]

    def _kind(self) -> str:
        """The step kind asked for, "auto" resolved for the model's device."""
        kind = self.step_kind
        if kind == "auto":
            kind = {"cpu": "native", "cuda": "graph"}.get(self.model.device.type, "modules")
        return "modules" if kind == "graph" and self._no_graph else kind

    def _make_step(self, cache: KVCache, first_slot: int) -> DecodeStep | None:
        kind = self._kind()
        step: DecodeStep | None = None
        why = ""
        if kind == "native":
            step = NativeStep.build(self.model, cache)
            why = "native kernels" if step is not None else "modules (the native kernels do not take this model)"
        elif kind in ("graph", "static"):
            try:
                static = StaticStep(self.model, cache, first_slot)
                if kind == "static":
                    step, why = static, "a static step, eager"
                else:
                    step, why = GraphStep.capture(static, first_slot), "one CUDA graph"
            except ValueError as exc:  # a batch: the static step takes one answer
                why = f"modules ({exc})"
            except RuntimeError as exc:  # no CUDA, or a kernel that syncs or allocates on the host in capture
                why = f"modules (CUDA graph capture failed: {str(exc).splitlines()[0][:200]})"
                self._no_graph = why  # not tried again for this model
        else:
            why = self._no_graph or "modules"
        self.decode_path = why
        return step

    def _cache(self, length: int) -> KVCache:
        """A cache of at least `length` slots. For CUDA graphs one is rounded up to a multiple of 256 slots,
        and kept while it fits and is not much larger (the step attends over every slot of it), so that
        answers of similar length share it and replay its graph instead of capturing another."""
        m = self.model
        if self._kind() != "graph":
            return KVCache.allocate(m.config.text, 1, length, m.device, m.dtype)
        if self._graph_bound and length <= self._bound[0].max_len <= 2 * length + 256:
            return self._bound[0]
        return KVCache.allocate(m.config.text, 1, -(-length // 256) * 256, m.device, m.dtype)

    @property
    def _graph_bound(self) -> bool:
        return self._bound is not None and isinstance(self._bound[1], GraphStep)

    @torch.inference_mode()
    def stream(
        self, prompt: Prompt, params: SamplingParams, constraint: JsonConstraint | None = None
    ) -> Iterator[Step]:
        """Steps until a stop id or max_new_tokens. Under a constraint (reset here, so one can serve many
        answers) every token is one it allows, and the answer ends ("stop") as soon as the grammar is
        complete; a cut-off answer ends with "length" mid-JSON."""
        m = self.model
        device = m.device
        _check_length(m, prompt)
        n_new = min(params.max_new_tokens, m.config.text.max_position_embeddings - prompt.length)
        cache = self._cache(prompt.length + n_new)
        overlap = self.overlap if self.overlap is not None else device.type == "cuda"
        # Every decode position is known up front: text after the prompt, index + rope_delta on all axes.
        decode_pos = torch.arange(prompt.length, prompt.length + n_new, device=device) + prompt.rope_delta
        cos_all, sin_all = m.decode_tables(decode_pos)  # (1, n_new, hd)
        sin_all = signed_sin(sin_all)  # the form TextModel.decode rotates with
        # The ids seen so far (prompt included), for the repetition penalty: a set on the host, a tensor of
        # the same ids on the device (the oracle below uses the vocabulary-wide mask instead).
        seen = set(prompt.input_ids[0].tolist())
        seen_ids = torch.tensor(sorted(seen), dtype=torch.long, device=device)
        rng = _rng(params, device)
        eos = _stop_ids(params, constraint)
        if constraint is not None:
            constraint.reset()

        try:
            logits = self.prefill(prompt, cache)
            for i in range(n_new):
                if constraint is not None:
                    # The mask is computed on the host while the decode step queued last iteration runs.
                    logits = apply_constraint(logits, constraint)
                logits = penalize_seen(logits, seen_ids, params.repetition_penalty)
                token = choose(logits, params, rng)  # (1,)
                token_id = int(token.item())  # the one host sync per token: the caller streams it
                if constraint is not None:
                    constraint.advance(token_id)
                if token_id in eos or _complete(constraint):
                    yield Step(token_id, "stop")
                    return
                if i == n_new - 1:
                    yield Step(token_id, "length")
                    return
                # Overlapped (on a GPU), the next step is queued before the caller gets this token, so the
                # GPU computes while the caller prints it; the first token goes out first all the same.
                ahead = overlap and i > 0
                if not ahead:
                    yield Step(token_id)
                if token_id not in seen:
                    seen.add(token_id)
                    seen_ids = torch.cat([seen_ids, token])
                index = prompt.length + i
                if i == 0:  # bound (a CUDA graph captured) after the first token is out, not before it
                    bound = self._bind(cache, index)
                    if bound is not None:
                        bound.begin(index)
                logits = self.decode_step(token[:, None], index, cos_all[:, i : i + 1], sin_all[:, i : i + 1], cache)
                if ahead:
                    yield Step(token_id)
        finally:  # a bound step holds its cache: on the CPU both go with the answer
            if not self._graph_bound:
                self._bound = None


@torch.inference_mode()
def reference_generate(
    model: Qwen2_5_VL, prompt: Prompt, params: SamplingParams, constraint: JsonConstraint | None = None
) -> list[Step]:
    """The obvious, slow generator: the full sequence through the model at every step, no cache."""
    device = model.device
    ids = prompt.input_ids
    positions = prompt.positions
    seen = _seen_mask(prompt, model.config.text.vocab_size, device)
    rng = _rng(params, device)
    eos = _stop_ids(params, constraint)
    if constraint is not None:
        constraint.reset()
    steps: list[Step] = []
    for i in range(params.max_new_tokens):
        current = Prompt(ids, positions, prompt.rope_delta, prompt.images, prompt.videos)
        logits = model(current)[:, -1]
        if constraint is not None:
            logits = apply_constraint(logits, constraint)
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
        token = choose(logits, params, rng)
        token_id = int(token.item())
        if constraint is not None:
            constraint.advance(token_id)
        done = token_id in eos or _complete(constraint)
        last = done or i == params.max_new_tokens - 1
        reason = "stop" if done else "length" if last else None
        steps.append(Step(token_id, reason))
        if last:
            return steps
        seen[0, token] = True
        next_pos = torch.full((3, 1, 1), ids.shape[1] + prompt.rope_delta, dtype=torch.long)
        ids = torch.cat([ids, torch.tensor([[token_id]])], dim=1)
        positions = torch.cat([positions, next_pos], dim=2)
    return steps
