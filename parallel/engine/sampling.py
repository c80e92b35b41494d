"""The next token of each row: greedy, or sampled with temperature and top-p from noise that depends only on the
request's seed and the token's position, so a sampled request gives the same tokens whatever else shares its
steps (a batch job's replicas claim work in whatever order they finish; a server's rows come and go)."""

from __future__ import annotations

import torch


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


# splitmix64's constants, as int64 (torch multiplies int64 with wrap-around)
GOLDEN, MIX1, MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shift(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def uniform(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """(rows, vocab) uniforms in (0, 1), a counter-based hash (splitmix64) of (seed, position, token id)."""
    x = (seeds[:, None] * GOLDEN + positions[:, None] * MIX1) + torch.arange(vocab, device=seeds.device) * MIX2
    x = (x ^ _shift(x, 30)) * MIX1
    x = (x ^ _shift(x, 27)) * MIX2
    x = x ^ _shift(x, 31)
    return (_shift(x, 40).float() + 0.5) / 2**24


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, seeds: torch.Tensor,
           positions: torch.Tensor, cut: bool) -> torch.Tensor:
    """Row r's token: argmax where temperature[r] == 0, else a draw from softmax(logits / temperature) cut to the
    smallest set of tokens whose probability reaches top_p[r] (Gumbel-max over the hash's noise). `cut`: whether
    any top_p is below 1, told by the caller, which knows without asking the device (a sync)."""
    greedy = logits.argmax(-1)
    scaled = logits.float() / temperature.clamp_min(1e-6)[:, None]
    if cut:
        probs, order = torch.softmax(scaled, -1).sort(-1, descending=True)
        outside = probs.cumsum(-1) - probs >= top_p[:, None]
        scaled = scaled.scatter(-1, order, torch.where(outside, float("-inf"), scaled.gather(-1, order)))
    gumbel = -torch.log(-torch.log(uniform(seeds, positions, logits.shape[-1])))
    return torch.where(temperature > 0, (scaled + gumbel).argmax(-1), greedy)
