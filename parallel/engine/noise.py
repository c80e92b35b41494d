"""The sampler's noise: a counter-based hash (splitmix64) of a request's seed, a token's position and a token id, so
that a sampled row's tokens depend on nothing else in its step. Shared by torch's draw (parallel/engine/sampling.py)
and the Triton kernel's (parallel/engine/kernels/gumbel.py), which must hash alike."""

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
    """(rows, vocab) uniforms in (0, 1), a counter-based hash (splitmix64) of (seed, position, token id). 23 bits of
    it: k + 0.5 is exact in float32 for every k below 2**23, so u stays below 1 (with 24, the largest k rounded up
    to u = 1, whose noise -log(-log(u)) is infinite: that token won its row whatever the logits, in 1.2% of rows
    at gpt-oss's vocabulary)."""
    x = (seeds[:, None] * GOLDEN + positions[:, None] * MIX1) + torch.arange(vocab, device=seeds.device) * MIX2
    x = (x ^ _shift(x, 30)) * MIX1
    x = (x ^ _shift(x, 27)) * MIX2
    x = x ^ _shift(x, 31)
    return (_shift(x, 41).float() + 0.5) / 2**23
