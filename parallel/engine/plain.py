"""One batch through `model.generate`: left padding, greedy or sampled, stopping on harmony's action tokens."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers.generation import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from parallel.config import GenerationConfig
from parallel.engine.interface import Completion, Timing, cut


class _Steps(BaseStreamer):
    """generate() hands the streamer the prompt, then each step's new tokens: the clock for the first token, and
    the hook that streams them."""

    def __init__(self, on_step: Callable[[list[tuple[int, int]]], None] | None):
        self.on_step = on_step
        self.start, self.calls, self.first = time.perf_counter(), 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter() - self.start
        if self.calls > 1 and self.on_step:
            self.on_step(list(enumerate(value.reshape(-1).tolist())))

    def end(self) -> None:
        pass


class _RowLimits(StoppingCriteria):
    """Ends each row at its own max_new_tokens, and the rows `cancelled()` names (its clients went away)."""

    def __init__(self, width: int, limits: list[int], cancelled: Callable[[], list[bool]] | None):
        self.width, self.limits, self.cancelled = width, torch.tensor(limits), cancelled

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = self.limits <= input_ids.shape[1] - self.width
        if self.cancelled:
            done |= torch.tensor(self.cancelled())
        return done.to(input_ids.device)


def generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: list[int],
    gen: GenerationConfig,
    *,
    stop: dict[int, str],
    pad_id: int,
    seed: int,
    on_step: Callable[[list[tuple[int, int]]], None] | None = None,
    cancelled: Callable[[], list[bool]] | None = None,
) -> tuple[list[Completion], Timing]:
    """`stop` maps each stop token to the finish reason it means (empty: run every row to its limit). Every rank
    of a replica calls this with the same arguments; the same seed on each keeps their sampled tokens identical.
    `on_step` gets each step's (row, token) pairs as they are made (finished rows get padding); `cancelled`
    names the rows to end now and must answer the same on every rank of the replica."""
    ids, mask = left_pad(prompts, pad_id, model.device)
    width = ids.shape[1]
    # A fresh config: the checkpoint's generation_config.json must not change what the job config says.
    config = HFGenerationConfig(
        max_new_tokens=max(max_new_tokens),
        eos_token_id=list(stop),  # empty: no stop token (None would bring back the checkpoint's)
        pad_token_id=pad_id,
        do_sample=gen.temperature > 0,
        **({"temperature": gen.temperature, "top_p": gen.top_p} if gen.temperature > 0 else {}),
    )
    torch.manual_seed(seed)
    steps = _Steps(on_step)
    limits = StoppingCriteriaList([_RowLimits(width, max_new_tokens, cancelled)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, streamer=steps, stopping_criteria=limits)
    completions = [cut(row[width:].tolist(), limit, stop) for row, limit in zip(out, max_new_tokens)]
    return completions, Timing(first_token_s=steps.first or 0.0, batch_s=time.perf_counter() - steps.start)


class Plain:
    """The plain path behind the same interface as the engine: `model.generate` on left-padded batches. It
    cannot take rows while it runs (`joins`)."""

    joins = False

    def __init__(self, model, pad_id: int):
        self.model, self.pad_id, self.device = model, pad_id, model.device

    def generate(self, prompts, max_new_tokens, gen: GenerationConfig, **hooks) -> tuple[list[Completion], Timing]:
        return generate(self.model, prompts, max_new_tokens, gen, pad_id=self.pad_id, **hooks)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded on the left to one width, and the attention mask that hides the padding."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask
