"""gpt-oss decode attention as a Triton kernel of ours: one new query a sequence against its cached keys, with
attention sinks, sliding windows and grouped KV heads (flash-decoding: the keys split across programs, then one
reduction that folds in the sink).

It reads only what a query may see, each sequence's own length and, on sliding layers, the last `window` keys,
where attention in torch reads every position of the static cache: the decode step's attention then costs what
the live sequences hold, not what the longest one might reach. CUDA-graph safe (no host syncs, no allocations
but the partials'). Runs under TRITON_INTERPRET=1 on CPU, which is how CI tests it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 64  # keys a program reads at a time
TARGET_PROGRAMS = 264  # ~2 waves on an H100's 132 SMs: enough splits that one long sequence fills the GPU


@triton.jit
def _partials(Q, K, V, Lengths, Acc, Max, Sum,
              stride_qb, stride_qh, stride_ks, stride_kh, stride_kt, stride_vs, stride_vh, stride_vt,
              scaling, window, keys_per_split,
              HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
              SPLITS: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    """Program (b, kv head, split): the unnormalised softmax-weighted values of the split's keys for the GROUP
    query heads sharing this KV head, with their running max and sum."""
    b, kv, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.load(Lengths + b)
    lo = tl.maximum(s * keys_per_split, length - window)
    hi = tl.minimum((s + 1) * keys_per_split, length)
    g, d = tl.arange(0, GROUP_PAD), tl.arange(0, D)
    heads = kv * GROUP + g
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g[:, None] < GROUP, other=0.0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    for start in range(lo, hi, BLOCK):
        t = start + tl.arange(0, BLOCK)
        valid = t < hi
        k = tl.load(K + b * stride_ks + kv * stride_kh + t[:, None] * stride_kt + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(V + b * stride_vs + kv * stride_vh + t[:, None] * stride_vt + d[None, :], mask=valid[:, None], other=0.0)
        scores = tl.where(valid[None, :], tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scaling, float("-inf"))
        # every tile holds a valid key, so the new max is finite and exp(m - m_new) never sees -inf - -inf
        m_new = tl.maximum(m, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        rescale = tl.exp(m - m_new)
        total = total * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
        m = m_new
    row = (b * HEADS + heads) * SPLITS + s
    keep = g < GROUP
    tl.store(Acc + row[:, None] * D + d[None, :], acc, mask=keep[:, None])
    tl.store(Max + row, m, mask=keep)
    tl.store(Sum + row, total, mask=keep)


@triton.jit
def _reduce(Acc, Max, Sum, Sinks, Out, HEADS: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr):
    """Program (b, head): the splits' partials merged, the sink's logit in the softmax's denominator."""
    b, h = tl.program_id(0), tl.program_id(1)
    s, d = tl.arange(0, SPLITS), tl.arange(0, D)
    row = (b * HEADS + h) * SPLITS + s
    m = tl.load(Max + row)
    sink = tl.load(Sinks + h).to(tl.float32)
    top = tl.maximum(tl.max(m, 0), sink)
    w = tl.exp(m - top)  # empty splits hold -inf: weight 0
    denominator = tl.sum(tl.load(Sum + row) * w, 0) + tl.exp(sink - top)
    out = tl.sum(tl.load(Acc + row[:, None] * D + d[None, :]) * w[:, None], 0) / denominator
    tl.store(Out + (b * HEADS + h) * D + d, out.to(Out.dtype.element_ty))


def splits_for(batch: int, kv_heads: int, max_len: int) -> int:
    """Key splits a sequence gets: a power of two, enough programs to fill the GPU at small batches, at least
    BLOCK keys a split."""
    splits = 1
    while batch * kv_heads * splits * 2 <= TARGET_PROGRAMS and (splits * 2) * BLOCK <= max_len:
        splits *= 2
    return splits


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     sinks: torch.Tensor, scaling: float, window: int | None) -> torch.Tensor:
    """Attention output (B, heads, D) of q (B, heads, D), one query a sequence, over cache rows 0..B-1 of
    k_cache/v_cache (slots, kv heads, positions, D), of which sequence b sees positions [0, lengths[b]) (the
    last `window` of them on a sliding layer)."""
    batch, heads, dim = q.shape
    kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    splits = splits_for(batch, kv_heads, max_len)
    per_split = -(-max_len // splits)
    acc = torch.empty(batch, heads, splits, dim, dtype=torch.float32, device=q.device)
    top = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    total = torch.empty_like(top)
    assert q.stride(2) == k_cache.stride(3) == v_cache.stride(3) == 1, "head dimension must be contiguous"
    _partials[(batch, kv_heads, splits)](
        q, k_cache, v_cache, lengths, acc, top, total,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        scaling, window or max_len, per_split,
        HEADS=heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=dim, SPLITS=splits, BLOCK=BLOCK,
        # float32 stays float32 (tf32 would move greedy tokens against the plain path); bf16 ignores it
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    out = torch.empty(batch, heads, dim, dtype=q.dtype, device=q.device)
    _reduce[(batch, heads)](acc, top, total, sinks, out, HEADS=heads, D=dim, SPLITS=splits)
    return out
