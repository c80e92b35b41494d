"""Decode attention in torch, the reference the Triton kernel is held to (on CPU in tests, on GPU in tests/gpu)."""

import torch

from parallel.engine.forward import attend


def torch_attention(q, k_cache, v_cache, lengths, sinks, scaling, window):
    """The engine's torch attention for one query a sequence (q: B x heads x D) at position lengths[b] - 1,
    over cache rows 0..B-1 (slots x KV heads x positions x D), within `window` keys if given."""
    batch, heads, dim = q.shape
    keys, positions = torch.arange(k_cache.shape[2], device=q.device), (lengths - 1)[:, None, None]
    allowed = (keys <= positions) & (keys > positions - (window or k_cache.shape[2]))
    mask = torch.zeros(allowed.shape, device=q.device).masked_fill(~allowed, float("-inf"))
    identity = torch.eye(heads * dim, dtype=q.dtype, device=q.device)  # attend ends in o_proj: none here
    return attend(q[:, :, None], k_cache[:batch], v_cache[:batch], mask, sinks, scaling, identity).view(batch, heads, dim)
