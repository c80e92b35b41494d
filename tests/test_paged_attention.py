"""The paged attention kernels (parallel/engine/kernels/paged_attention.py, run by Triton's interpreter on CPU)
against the float32
torch reference of parallel/engine/attention.py: scattered block tables, grouped heads, sinks, sliding windows, decode
rows mixed with prompt chunks. Every cache starts as NaN and only live keys are written, so a read of anything
past a sequence would show in the output."""

import os

import pytest
import torch

from parallel.engine.attention import decode_torch, slot_mapping, varlen_torch
from parallel.engine.kernels import paged_attention
from parallel.engine.kernels.paged_attention import (
    DECODE,
    decode_splits,
    paged_decode_attention,
    paged_prefill_attention,
)

DIM, SCALING = 16, 0.25
HEADS = [(2, 2), (16, 2), (4, 1)]  # (query heads, KV heads): groups of 1 and 8, and 4/1 as under tp
# (queries, sequence length): a one-token prompt, decode rows, a chunk mid-prompt, a prompt after a prefix-cache
# hit, a whole prompt
MIXED = [(1, 1), (1, 200), (37, 250), (60, 140), (300, 300), (1, 33)]


@pytest.fixture(autouse=True)
def interpreted():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a GPU machine: tests/gpu/paged_attention_check.py runs the kernels there")


def paged_cache(seq_lens, block_size, kv_heads, gen, poison_before=None):
    """K and V caches full of NaN with each sequence's keys and values written through its own random,
    non-contiguous blocks; table entries past a sequence point at a NaN block. poison_before[b]: positions of
    sequence b below it hold NaN too."""
    blocks = [-(-n // block_size) for n in seq_lens]
    order = torch.randperm(sum(blocks) + 3, generator=gen).int()  # 3 blocks never written
    k_cache = torch.full((len(order), block_size, kv_heads, DIM), float("nan"))
    v_cache = k_cache.clone()
    tables = torch.full((len(seq_lens), max(blocks)), order[-1].item(), dtype=torch.int32)
    for b, (n, used) in enumerate(zip(seq_lens, blocks)):
        tables[b, :used] = order[sum(blocks[:b]) : sum(blocks[:b]) + used]
        keep = torch.arange(n) >= (poison_before[b] if poison_before else 0)
        kv = torch.randn(2, n, kv_heads, DIM, generator=gen).where(keep[:, None, None], float("nan"))
        slots = slot_mapping(tables, torch.full((n,), b), torch.arange(n), block_size)
        k_cache.view(-1, *k_cache.shape[2:])[slots], v_cache.view(-1, *v_cache.shape[2:])[slots] = kv
    return k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32)


def varlen(rows):
    """cu_seqlens_q and seq_lens of (queries, sequence length) rows."""
    cu = torch.tensor([0] + [q for q, _ in rows], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return cu, [n for _, n in rows]


def check_decode(seq_lens, block_size, heads, kv_heads, window, gen, config=None, poison_before=None):
    k_cache, v_cache, tables, lens = paged_cache(seq_lens, block_size, kv_heads, gen, poison_before)
    q, sinks = torch.randn(len(seq_lens), heads, DIM, generator=gen), torch.randn(heads, generator=gen)
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, sinks, SCALING, window, config)
    truth = decode_torch(q, k_cache, v_cache, tables, lens, sinks, SCALING, window)
    torch.testing.assert_close(out, truth)


def check_prefill(rows, block_size, heads, kv_heads, window, gen, config=None, poison_before=None):
    cu, seq_lens = varlen(rows)
    k_cache, v_cache, tables, lens = paged_cache(seq_lens, block_size, kv_heads, gen, poison_before)
    q, sinks = torch.randn(cu[-1].item(), heads, DIM, generator=gen), torch.randn(heads, generator=gen)
    out = paged_prefill_attention(q, k_cache, v_cache, cu, lens, tables, sinks, SCALING, window, config)
    truth = varlen_torch(q, k_cache, v_cache, cu, lens, tables, sinks, SCALING, window)
    torch.testing.assert_close(out, truth)


@pytest.mark.parametrize("window", [None, 16])
@pytest.mark.parametrize("heads, kv_heads", HEADS)
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_matches_the_reference_through_scattered_blocks(block_size, heads, kv_heads, window):
    check_decode([1, 17, 150, 300], block_size, heads, kv_heads, window, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("window", [None, 16])
def test_decode_of_a_long_sequence_splits_its_keys_over_programs(window):
    config = {"BLOCK_N": 16}  # narrower tiles: more splits at a length the interpreter runs quickly
    assert decode_splits(1, 2, 320, DECODE | config) == 16
    check_decode([300], 16, 16, 2, window, torch.Generator().manual_seed(1), config)


@pytest.mark.parametrize("window", [None, 16])
@pytest.mark.parametrize("heads, kv_heads", HEADS)
@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_mixes_decode_rows_prompt_chunks_and_whole_prompts(block_size, heads, kv_heads, window):
    check_prefill(MIXED, block_size, heads, kv_heads, window, torch.Generator().manual_seed(2))


@pytest.mark.parametrize("config", [{"BLOCK_M": 32, "BLOCK_N": 16}, {"BLOCK_M": 64, "BLOCK_N": 128}])
@pytest.mark.parametrize("window", [None, 40])
def test_prefill_is_exact_for_other_tile_shapes(config, window):
    # 16 keys a tile: inside a block, and a window of 40 wide enough for unmasked tiles between masked edges;
    # 128 keys a tile: across four blocks
    check_prefill([(1, 200), (37, 150), (120, 120)], 32, 4, 1, window, torch.Generator().manual_seed(3), config)


def test_sliding_layers_read_nothing_before_the_window_nor_past_a_sequence():
    """Keys older than the first query's window hold NaN, and so does everything past each sequence."""
    window, gen = 16, torch.Generator().manual_seed(4)
    check_decode([5, 100, 300], 16, 16, 2, window, gen, poison_before=[0, 100 - window, 300 - window])
    rows = [(1, 100), (37, 250), (300, 300)]
    check_prefill(rows, 16, 16, 2, window, gen, poison_before=[n - q - window + 1 for q, n in rows])


def test_the_prefill_grid_maps_each_program_to_a_query_tile_longest_first():
    cu = torch.tensor([0, 1, 33, 33, 40], dtype=torch.int32)  # 1 query, 32, none, 7
    seq, first = paged_attention._tile_map(cu, 16, 40 // 16 + 4)
    assert seq.tolist() == [0, 1, 1, 3, -1, -1]
    assert first[:4].tolist() == [0, 16, 0, 0]


def test_slot_mapping_finds_a_position_in_its_sequences_block():
    tables = torch.tensor([[7, 2, 5], [0, 3, 1]], dtype=torch.int32)
    slots = slot_mapping(tables, torch.tensor([0, 0, 1]), torch.tensor([0, 33, 17]), 16)
    assert slots.tolist() == [7 * 16, 5 * 16 + 1, 3 * 16 + 1]
