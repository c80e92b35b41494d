"""One batch through `model.generate`: left padding, greedy or sampled, stopping on harmony's action tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig as HFGenerationConfig

from parallel.config import GenerationConfig


@dataclass
class Completion:
    tokens: list[int]
    finish_reason: str  # stop, tool_call or length


def generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: list[int],
    gen: GenerationConfig,
    *,
    stop: dict[int, str],
    pad_id: int,
    seed: int,
) -> list[Completion]:
    """`stop` maps each stop token to the finish reason it means. Every rank of a replica calls this with the
    same arguments; the same seed on each keeps their sampled tokens identical."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    # A fresh config: the checkpoint's generation_config.json must not change what the job config says.
    config = HFGenerationConfig(
        max_new_tokens=max(max_new_tokens),
        eos_token_id=list(stop),
        pad_token_id=pad_id,
        do_sample=gen.temperature > 0,
        **({"temperature": gen.temperature, "top_p": gen.top_p} if gen.temperature > 0 else {}),
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return [_cut(row[width:].tolist(), limit, stop) for row, limit in zip(out, max_new_tokens)]


def _cut(tokens: list[int], limit: int, stop: dict[int, str]) -> Completion:
    """The batch ran to its longest limit: end each row at its first stop token or at its own limit."""
    for i, token in enumerate(tokens[:limit]):
        if token in stop:
            return Completion(tokens[: i + 1], stop[token])
    return Completion(tokens[:limit], "length")
