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
from dataclasses import dataclass
from typing import Callable

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
    runs = importlib.util.find_spec("triton") is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
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
    cu = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return varlen_torch(q, k_cache, v_cache, cu, seq_lens, block_tables, sinks, scaling, window)


def varlen_torch(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, sinks, scaling: float, window: int | None):
    out = torch.empty_like(q)
    block_size, kv_heads, dim = k_cache.shape[1:]
    group = q.shape[1] // kv_heads
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    for b, length in enumerate(lens):
        queries = q[cu[b] : cu[b + 1]].float()  # (n, heads, D)
        blocks = block_tables[b, : -(-length // block_size)]
        keys, values = (c[blocks].reshape(-1, kv_heads, dim)[:length].float().repeat_interleave(group, 1) for c in (k_cache, v_cache))
        query_pos = torch.arange(length - len(queries), length, device=q.device)[:, None]
        key_pos = torch.arange(length, device=q.device)[None, :]
        allowed = (key_pos <= query_pos) & (key_pos > query_pos - (window or length))
        scores = torch.einsum("nhd,khd->hnk", queries, keys) * scaling
        scores = scores.masked_fill(~allowed, float("-inf"))
        sink = sinks.float()[:, None, None].expand(-1, len(queries), 1)
        probs = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
        out[cu[b] : cu[b + 1]] = torch.einsum("hnk,khd->nhd", probs, values).to(q.dtype)
    return out
