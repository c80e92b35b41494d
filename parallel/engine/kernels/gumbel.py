"""The sampler's Gumbel-max draw (parallel/engine/sampling.py) as one Triton kernel: programs stream a row's logits
once, hash each token's noise in registers (the same splitmix64 of seed, position and token id as `uniform`), and
keep the running argmax of logit / temperature + noise. torch's ops wrote and read a dozen int64 (rows, vocab)
copies of the noise instead: at gpt-oss's 201,088-token vocabulary, about 3 ms of a 128-row decode step on an H100,
a third of the step. A few rows split their vocabulary over several programs, each leaving its best value and
token, so that a decode step of one row still spreads over the GPU; the first of equal maxima wins, as in torch.

A NaN logit wins the row, as in torch's argmax, so that the engine's NaN guard still sees it.
Runs under TRITON_INTERPRET=1 on CPU (how CI tests it against the torch draw).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from parallel.engine.noise import GOLDEN, MIX1, MIX2

BLOCK = 4096  # tokens a loop step
PROGRAMS = 264  # a draw of few rows splits its vocabulary into up to this many programs (two waves of an H100's 132
# SMs), a block each at least: 50 for one row of gpt-oss's vocabulary


@triton.jit
def _gumbel_argmax(
    logits,
    stride,
    temperature,
    seeds,
    positions,
    best_value,
    best_token,
    vocab,
    span,
    GOLDEN: tl.constexpr,
    MIX1: tl.constexpr,
    MIX2: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (row, split): tokens [split * span, (split + 1) * span) of the row."""
    row, split = tl.program_id(0), tl.program_id(1)
    splits = tl.num_programs(1)
    t = tl.maximum(tl.load(temperature + row), 1e-6)
    # uint64: wrapping products and logical shifts, the bits of the torch version's int64 arithmetic
    base = tl.load(seeds + row).to(tl.uint64) * GOLDEN + tl.load(positions + row).to(tl.uint64) * MIX1
    best = tl.full((), float("-inf"), tl.float32)
    arg = tl.full((), 0, tl.int32)
    for start in range(split * span, tl.minimum((split + 1) * span, vocab), BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < vocab
        x = tl.load(logits + row * stride + cols, mask=inside, other=float("-inf")).to(tl.float32)
        h = base + cols.to(tl.uint64) * MIX2
        h = (h ^ (h >> 30)) * MIX1
        h = (h ^ (h >> 27)) * MIX2
        h = h ^ (h >> 31)
        u = ((h >> 41).to(tl.float32) + 0.5) / 8388608.0  # below 1, as `uniform` says why
        v = tl.where(x != x, float("inf"), x / t - tl.log(-tl.log(u)))
        v = tl.where(inside, v, float("-inf"))
        top = tl.max(v, 0)
        at = start + tl.argmax(v, 0)
        arg = tl.where(top > best, at, arg)  # strictly greater: the first of equal maxima
        best = tl.maximum(best, top)
    tl.store(best_value + row * splits + split, best)
    tl.store(best_token + row * splits + split, arg.to(tl.int64))


def gumbel_argmax(
    logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Each row's argmax of logits / temperature + its noise (rows of temperature 0 are the caller's)."""
    rows, vocab = logits.shape
    blocks = triton.cdiv(vocab, BLOCK)
    span = triton.cdiv(blocks, min(triton.cdiv(PROGRAMS, max(rows, 1)), blocks)) * BLOCK
    splits = triton.cdiv(vocab, span)
    value = torch.empty(rows, splits, dtype=torch.float32, device=logits.device)
    token = torch.empty(rows, splits, dtype=torch.int64, device=logits.device)
    if rows:
        _gumbel_argmax[(rows, splits)](
            logits,
            logits.stride(0),
            temperature,
            seeds,
            positions,
            value,
            token,
            vocab,
            span,
            GOLDEN=GOLDEN % 2**64,
            MIX1=MIX1 % 2**64,
            MIX2=MIX2 % 2**64,
            BLOCK=BLOCK,
        )
    return token.gather(1, value.argmax(1, keepdim=True))[:, 0]
