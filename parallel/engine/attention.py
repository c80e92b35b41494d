"""Attention over the paged KV cache, with gpt-oss's sinks, sliding windows and grouped KV heads.

Two calls a step can make, both over keys already written to the cache (k_cache, v_cache: (blocks,
block_size, kv heads, head dim); sequence b's token at position p lives in block block_tables[b, p //
block_size], row p % block_size; seq_lens[b] counts its keys, this step's included):
  decode(q (B, heads, D), k_cache, v_cache, block_tables, seq_lens, sinks, scaling, window) -> (B, heads, D)
      one query per sequence, its last position: the CUDA-graph step;
  varlen(q (T, heads, D), k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, sinks, scaling, window)
      sequence b's queries are q[cu[b]:cu[b+1]], its last positions (a prompt chunk, or a decode row).
`triton`: our kernels (parallel/engine/kernels/paged_attention.py); `torch`: this module's reference, one
sequence at a time (CPU, and the check the kernels are tested against).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from parallel.log import warn


@dataclass(frozen=True)
class Attention:
    name: str
    decode: Callable
    varlen: Callable


def choose_attention(choice: str, device: torch.device) -> Attention:
    """`auto`: the Triton kernels on GPU where triton is installed, else torch; `triton` also under Triton's CPU
    interpreter (TRITON_INTERPRET=1), which is how CI runs them."""
    runs = importlib.util.find_spec("triton") is not None and (
        device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    )
    if choice == "triton" and not runs:
        raise ValueError("engine.attention=triton needs triton and a GPU (or TRITON_INTERPRET=1 on CPU)")
    if choice == "auto" and device.type == "cuda" and not runs:
        warn("engine: triton is not installed; attention runs in torch, one sequence at a time")
    if runs and (choice == "triton" or (choice == "auto" and device.type == "cuda")):
        from parallel.engine.kernels.paged_attention import (
            paged_decode_attention,
            paged_prefill_attention,
        )

        return Attention("Triton kernels", paged_decode_attention, paged_prefill_attention)
    return Attention("torch", decode_torch, varlen_torch)


def decode_torch(q, k_cache, v_cache, block_tables, seq_lens, sinks, scaling: float, window: int | None):
    cu_seqlens_q = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return varlen_torch(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, sinks, scaling, window)


def varlen_torch(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, sinks, scaling: float, window: int | None):
    """In float32, a sequence at a time, reading only the keys some query may see: a query at position p sees
    keys (p - window, p], and the sink's logit joins each softmax's denominator."""
    block_size, kv_heads, dim = k_cache.shape[1:]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for b, seq_len in enumerate(seq_lens.tolist()):
        start, end = cu_seqlens_q[b].item(), cu_seqlens_q[b + 1].item()
        queries_at = torch.arange(seq_len - (end - start), seq_len, device=q.device)[:, None]
        keys_at = torch.arange(max(0, seq_len - (end - start) - (window or seq_len) + 1), seq_len, device=q.device)
        slots = slot_mapping(block_tables, torch.full_like(keys_at, b), keys_at, block_size)
        keys, values = (c.reshape(-1, kv_heads, dim)[slots].float() for c in (k_cache, v_cache))
        queries = q[start:end].float().view(end - start, kv_heads, -1, dim)
        scores = torch.einsum("tkgd,skd->kgts", queries, keys) * scaling
        seen = (keys_at <= queries_at) & (keys_at > queries_at - (window or seq_len))
        scores = scores.masked_fill(~seen, float("-inf"))
        sink = sinks.float().view(kv_heads, -1, 1, 1).expand(*scores.shape[:3], 1)
        probs = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
        out[start:end] = torch.einsum("kgts,skd->tkgd", probs, values).reshape(end - start, -1, dim).to(q.dtype)
    return out


def slot_mapping(
    block_tables: torch.Tensor, seq_ids: torch.Tensor, positions: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Flat cache rows (int64) of the tokens at `positions` of sequences `seq_ids` (block-table rows)."""
    return block_tables[seq_ids, positions // block_size].long() * block_size + positions % block_size
