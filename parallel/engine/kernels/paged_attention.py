"""gpt-oss attention over a paged KV cache, as Triton kernels of ours: attention sinks, sliding windows and grouped
KV heads, for the engine's token-budget steps (decode rows, prompt chunks, prompts after a prefix-cache hit).

The cache, per layer: `k_cache` and `v_cache` of shape (num_blocks, block_size, kv_heads, head_dim), contiguous.
Position p of sequence b lives in block `block_tables[b, p // block_size]`, row `p % block_size`. Both entry
points expect every key and value up to and including their queries' own positions written before they are
called (parallel/engine/runner.py writes them; parallel/engine/attention.py has the reference these are held to).

One kernel serves both. A program takes a tile of query rows, BLOCK_Q tokens x all the query heads of one KV
head (so each K/V tile loaded serves the whole group), and walks the key tiles its rows may see, through the
block table, with an online softmax (exp2, scores never leave registers). The sink starts each row's softmax:
the running max begins at the sink's logit, which keeps every max finite (no -inf - -inf on fully masked rows)
and folds the sink into the denominator. Key tiles inside every row's causal window skip the mask; tiles
outside all rows' windows are never visited, nor their block-table entries read.

- decode: one query a sequence; the live keys split over several programs (flash-decoding) so that a few long
  sequences still fill the GPU, merged by a second kernel. Grid and split count follow shapes and the window,
  never values: safe inside CUDA graphs, no host syncs.
- prefill: varlen queries (T, heads, D) with cumulative offsets; programs map to (sequence, query tile) through a
  small table built by torch ops on the device (`_tile_map`), on a grid bounded by T / BLOCK_Q + B.

Runs under TRITON_INTERPRET=1 on CPU (how CI tests it); float32 inputs use full-precision dots there and on GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tile shapes and launch settings, the fastest by geometric mean of those tests/gpu/paged_attention_check.py
# timed on an H100 (triton 3.6) at gpt-oss shapes.
# decode: BLOCK_N keys a step; PROGRAMS is the program count key splits aim for (~2 waves on 132 SMs). Within 1%
# of the best tried at batch 1 and 64; at batch 256, 2 warps or 32/128-key tiles were ~6% faster.
DECODE = {"BLOCK_N": 64, "PROGRAMS": 264, "num_warps": 4, "num_stages": 2}
# prefill: BLOCK_M query rows (tokens x grouped heads) a program, BLOCK_N keys a step. 8 warps: 5-10% faster
# than 4; 128-key tiles, 256 rows or 32-key tiles slower.
PREFILL = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}

LOG2E = 1.4426950408889634
NO_WINDOW = 1 << 30  # a window no position reaches: full causal attention


@triton.jit
def _key_tiles(
    m,
    total,
    acc,
    q,
    pos,
    K,
    V,
    table,
    kv,
    start,
    stop,
    lo,
    seq_len,
    qk_scale,
    window,
    KV_HEADS: tl.constexpr,
    D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The online softmax over key tiles [start, stop) (start a multiple of BLOCK_N); MASKED tiles hold keys
    that some row may not see. Keys are read through the sequence's block-table row `table`, and only within
    [lo, seq_len): positions the tile's rows may see."""
    d = tl.arange(0, D)
    for first in range(start, stop, BLOCK_N):
        t = first + tl.arange(0, BLOCK_N)
        live = (t >= lo) & (t < seq_len)
        block = tl.load(table + t // BLOCK_SIZE, mask=live, other=0).to(tl.int64)  # int64: big caches
        at = ((block * BLOCK_SIZE + t % BLOCK_SIZE) * KV_HEADS + kv) * D
        # An fp8 cache is widened to the queries' type in registers: its keys and values cost half the bytes to read.
        k = tl.load(K + at[:, None] + d[None, :], mask=live[:, None], other=0.0).to(q.dtype)
        v = tl.load(V + at[:, None] + d[None, :], mask=live[:, None], other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:  # causal within the window: a row at position p sees keys (p - window, p]
            seen = (t[None, :] <= pos[:, None]) & (t[None, :] > pos[:, None] - window)
            s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: m starts at the sink's logit
        p = tl.exp2(s - m_new[:, None])
        rescale = tl.exp2(m - m_new)
        total = total * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    return m, total, acc


@triton.jit
def _key_range(seq_len, q_len, first, split, splits, window, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keys a query tile (queries first .. first + BLOCK_Q - 1 of a sequence's last q_len) visits in this
    split: lo, the first key any of its rows sees; then BLOCK_N-aligned bounds of [start, mid_lo) masked,
    [mid_lo, mid_hi) unmasked (every row sees every key: empty when the window is narrow), [mid_hi, stop) masked."""
    first_pos = seq_len - q_len + first
    last_pos = seq_len - q_len + tl.minimum(first + BLOCK_Q, q_len) - 1
    lo, hi = tl.maximum(first_pos - window + 1, 0), last_pos + 1
    full_lo, full_hi = tl.maximum(last_pos - window + 1, lo), first_pos + 1
    per_split = tl.cdiv(tl.cdiv(hi, BLOCK_N) - lo // BLOCK_N, splits)  # key tiles a split
    start = (lo // BLOCK_N + split * per_split) * BLOCK_N
    stop = tl.minimum(start + per_split * BLOCK_N, hi)
    mid_lo = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_N) * BLOCK_N, start), stop)
    mid_hi = tl.minimum(tl.maximum(full_hi // BLOCK_N * BLOCK_N, mid_lo), stop)
    return lo, start, mid_lo, mid_hi, stop


# Runtime integers that vary with the batch: one compiled kernel for every split count, window and table width.
@triton.jit(do_not_specialize=["stride_table", "window", "splits"])
def _attention(
    Q,
    K,
    V,
    Tables,
    SeqLens,
    CuSeqlensQ,
    TileSeq,
    TileFirst,
    Sinks,
    Out,
    Acc,
    Max,
    Sum,
    stride_qt,
    stride_qh,
    stride_table,
    qk_scale,
    window,
    splits,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    ROWS: tl.constexpr,
    D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Program (query tile, KV head, key split). Rows are BLOCK_Q = ROWS // GROUP_PAD tokens x GROUP_PAD heads.
    VARLEN: the tile's sequence and first query come from TileSeq/TileFirst (-1: no tile, return); else the
    tile is sequence `program_id(0)`'s single query (decode). One split writes Out; more write partials."""
    tile, kv, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if VARLEN:
        seq = tl.load(TileSeq + tile)
        if seq < 0:
            return
        q_start = tl.load(CuSeqlensQ + seq)
        q_len = tl.load(CuSeqlensQ + seq + 1) - q_start
        first = tl.load(TileFirst + tile)
    else:
        seq, q_start, q_len, first = tile, tile, 1, 0
    seq_len = tl.load(SeqLens + seq)
    r, d = tl.arange(0, ROWS), tl.arange(0, D)
    token, g = first + r // GROUP_PAD, r % GROUP_PAD  # token: index among the sequence's queries
    head = kv * GROUP + g
    valid = (token < q_len) & (g < GROUP)
    pos = seq_len - q_len + tl.minimum(token, q_len - 1)  # padding rows repeat the last query: finite, unstored
    q = tl.load(
        Q + (q_start + token)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=valid[:, None],
        other=0.0,
    )
    m = tl.load(Sinks + head, mask=g < GROUP, other=0.0).to(tl.float32) * 1.4426950408889634  # log2(e): exp2
    total = tl.zeros([ROWS], tl.float32) + (split == 0).to(tl.float32)  # the sink's weight, counted once
    acc = tl.zeros([ROWS, D], tl.float32)
    lo, start, mid_lo, mid_hi, stop = _key_range(
        seq_len, q_len, first, split, splits, window, ROWS // GROUP_PAD, BLOCK_N
    )
    # The key range in three parts: masked tiles at either end (the window's start, the causal edge), unmasked
    # between them. The arguments all three share, around each part's bounds:
    head_args = (q, pos, K, V, Tables + seq * stride_table, kv)
    tail = (lo, seq_len, qk_scale, window)
    m, total, acc = _key_tiles(
        m, total, acc, *head_args, start, mid_lo, *tail, KV_HEADS, D, BLOCK_SIZE, BLOCK_N, True, PRECISION
    )
    m, total, acc = _key_tiles(
        m, total, acc, *head_args, mid_lo, mid_hi, *tail, KV_HEADS, D, BLOCK_SIZE, BLOCK_N, False, PRECISION
    )
    m, total, acc = _key_tiles(
        m, total, acc, *head_args, mid_hi, stop, *tail, KV_HEADS, D, BLOCK_SIZE, BLOCK_N, True, PRECISION
    )

    row = (q_start + token) * HEADS + head
    if splits == 1:
        tl.store(
            Out + row[:, None] * D + d[None, :], (acc / total[:, None]).to(Out.dtype.element_ty), mask=valid[:, None]
        )
    else:
        part = row * splits + split
        tl.store(Acc + part[:, None] * D + d[None, :], acc, mask=valid[:, None])
        tl.store(Max + part, m, mask=valid)
        tl.store(Sum + part, total, mask=valid)


@triton.jit
def _merge(Acc, Max, Sum, Out, D: tl.constexpr, SPLITS: tl.constexpr):
    """Program (query row x head): the key splits' partials merged (the sink is already in split 0's sum)."""
    row = tl.program_id(0)
    s, d = tl.arange(0, SPLITS), tl.arange(0, D)
    part = row * SPLITS + s
    m = tl.load(Max + part)
    w = tl.exp2(m - tl.max(m, 0))
    denominator = tl.sum(tl.load(Sum + part) * w, 0)
    out = tl.sum(tl.load(Acc + part[:, None] * D + d[None, :]) * w[:, None], 0) / denominator
    tl.store(Out + row * D + d, out.to(Out.dtype.element_ty))


def decode_splits(batch: int, kv_heads: int, keys: int, config: dict) -> int:
    """Key splits a sequence gets in decode: a power of two, enough programs to reach config["PROGRAMS"] at
    small batches, at least BLOCK_N keys a split of the `keys` a query may see at most."""
    splits = 1
    while batch * kv_heads * splits * 2 <= config["PROGRAMS"] and splits * 2 * config["BLOCK_N"] <= keys:
        splits *= 2
    return splits


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    sinks: torch.Tensor,
    scaling: float,
    window: int | None,
    config: dict | None = None,
) -> torch.Tensor:
    """Attention output (B, heads, D) of q (B, heads, D): sequence b's one query, at position seq_lens[b] - 1,
    against its keys [0, seq_lens[b]) (the last `window` on a sliding layer) read through block_tables
    (B, max_blocks) int32; seq_lens (B,) int32 >= 1; sinks (heads,). CUDA-graph safe: the grid follows B,
    max_blocks and the window only. `config` overrides DECODE (tuning)."""
    config = DECODE | (config or {})
    batch, heads, dim = q.shape
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    keys = min(block_tables.shape[1] * block_size, window or NO_WINDOW)
    splits = decode_splits(batch, kv_heads, keys, config)
    out = torch.empty(batch, heads, dim, dtype=q.dtype, device=q.device)
    partials = None
    if splits > 1:
        parts = batch * heads * splits
        partials = (
            torch.empty(parts, dim, dtype=torch.float32, device=q.device),
            torch.empty(parts, dtype=torch.float32, device=q.device),
            torch.empty(parts, dtype=torch.float32, device=q.device),
        )
    # rows: the group's heads, padded to the 16 rows a tensor-core dot needs
    rows = max(16, triton.next_power_of_2(heads // kv_heads))
    _launch(
        (batch, kv_heads, splits),
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        sinks,
        scaling,
        window,
        out,
        varlen=None,
        partials=partials,
        rows=rows,
        splits=splits,
        config=config,
    )
    if splits > 1:
        _merge[(batch * heads,)](*partials, out, D=dim, SPLITS=splits)
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    sinks: torch.Tensor,
    scaling: float,
    window: int | None,
    config: dict | None = None,
) -> torch.Tensor:
    """Attention output (T, heads, D) of varlen queries q (T, heads, D): sequence b's are rows
    cu_seqlens_q[b]:cu_seqlens_q[b+1] ((B+1,) int32), its last q_len tokens, at positions seq_lens[b] - q_len ..
    seq_lens[b] - 1, each seeing the keys up to its own (within `window`), read through block_tables
    (B, max_blocks) int32. Decode rows (q_len 1), prompt chunks and whole prompts mix freely. No host sync;
    the grid is T // BLOCK_Q + B programs a KV head. `config` overrides PREFILL (tuning)."""
    config = PREFILL | (config or {})
    tokens, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    group_pad = triton.next_power_of_2(heads // kv_heads)
    rows = max(config["BLOCK_M"], group_pad, 16)
    tile_seq, tile_first = _tile_map(cu_seqlens_q, rows // group_pad, tokens // (rows // group_pad) + len(seq_lens))
    out = torch.empty(tokens, heads, dim, dtype=q.dtype, device=q.device)
    _launch(
        (len(tile_seq), kv_heads, 1),
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        sinks,
        scaling,
        window,
        out,
        varlen=(cu_seqlens_q, tile_seq, tile_first),
        partials=None,
        rows=rows,
        splits=1,
        config=config,
    )
    return out


def _tile_map(cu_seqlens_q: torch.Tensor, block_q: int, programs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Program i -> (sequence, index of its tile's first query among the sequence's), int32, by torch ops on
    the device. Sequence b has ceil(q_len_b / block_q) tiles, which is at most programs = T // block_q + B in
    all; programs past the last tile get sequence -1. Each sequence's last tile (the most keys) comes first,
    so the longest programs start early."""
    tiles = (cu_seqlens_q[1:] - cu_seqlens_q[:-1] + block_q - 1) // block_q
    ends = torch.cumsum(tiles, 0)
    ids = torch.arange(programs, device=cu_seqlens_q.device)
    seq = torch.searchsorted(ends, ids, right=True)
    inside = seq < len(tiles)
    seq = seq.clamp(max=len(tiles) - 1)
    first = (ends[seq] - 1 - ids) * block_q
    return torch.where(inside, seq, -1).int(), first.int()


def _launch(
    grid,
    q,
    k_cache,
    v_cache,
    block_tables,
    seq_lens,
    sinks,
    scaling,
    window,
    out,
    *,
    varlen,
    partials,
    rows,
    splits,
    config,
):
    """The one launch of `_attention` both entry points share: varlen = (cu_seqlens_q, tile_seq, tile_first) or
    None (decode); partials = (acc, max, sum) where splits > 1. Unused pointers get a stand-in."""
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and q.stride(2) == 1, "contiguous caches, rows of q"
    assert heads % kv_heads == 0 and block_tables.dtype == seq_lens.dtype == torch.int32
    _attention[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        *(varlen or (seq_lens,) * 3),
        sinks,
        out,
        *(partials or (out,) * 3),
        q.stride(0),
        q.stride(1),
        block_tables.stride(0),
        scaling * LOG2E,
        window or NO_WINDOW,
        splits,
        HEADS=heads,
        KV_HEADS=kv_heads,
        GROUP=heads // kv_heads,
        GROUP_PAD=triton.next_power_of_2(heads // kv_heads),
        ROWS=rows,
        D=q.shape[2],
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_N=config["BLOCK_N"],
        VARLEN=varlen is not None,
        # float32 stays float32 (tf32 would move greedy tokens against the plain path); bf16 ignores it
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
