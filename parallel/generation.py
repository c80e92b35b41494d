"""One batch through `model.generate`: left padding, greedy or sampled, stopping on harmony's action tokens."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers.generation.streamers import BaseStreamer

from parallel.config import GenerationConfig


@dataclass
class Completion:
    tokens: list[int]
    finish_reason: str  # stop, tool_call or length


@dataclass
class Timing:
    first_token_s: float  # the batch's prefill: time to its first generated token
    batch_s: float


class _FirstTokenClock(BaseStreamer):
    """generate() hands the streamer the prompt, then each new token: the second call is the first token."""

    def __init__(self):
        self.start, self.calls, self.first = time.perf_counter(), 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter() - self.start

    def end(self) -> None:
        pass


def generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: list[int],
    gen: GenerationConfig,
    *,
    stop: dict[int, str],
    pad_id: int,
    seed: int,
) -> tuple[list[Completion], Timing]:
    """`stop` maps each stop token to the finish reason it means. Every rank of a replica calls this with the
    same arguments; the same seed on each keeps their sampled tokens identical."""
    ids, mask = left_pad(prompts, pad_id, model.device)
    width = ids.shape[1]
    # A fresh config: the checkpoint's generation_config.json must not change what the job config says.
    config = HFGenerationConfig(
        max_new_tokens=max(max_new_tokens),
        eos_token_id=list(stop),
        pad_token_id=pad_id,
        do_sample=gen.temperature > 0,
        **({"temperature": gen.temperature, "top_p": gen.top_p} if gen.temperature > 0 else {}),
    )
    torch.manual_seed(seed)
    clock = _FirstTokenClock()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, streamer=clock)
    completions = [_cut(row[width:].tolist(), limit, stop) for row, limit in zip(out, max_new_tokens)]
    return completions, Timing(first_token_s=clock.first or 0.0, batch_s=time.perf_counter() - clock.start)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded on the left to one width, and the attention mask that hides the padding."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def _cut(tokens: list[int], limit: int, stop: dict[int, str]) -> Completion:
    """The batch ran to its longest limit: end each row at its first stop token or at its own limit."""
    for i, token in enumerate(tokens[:limit]):
        if token in stop:
            return Completion(tokens[: i + 1], stop[token])
    return Completion(tokens[:limit], "length")
