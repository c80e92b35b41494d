"""The Triton decode-attention kernel (run by Triton's interpreter on CPU) against attention in torch, and the
engine around it: decoding through the kernel, and a KV cache bounded by memory."""

import os

import pytest
import torch
from transformers import GptOssForCausalLM

from parallel.engine.kernels import decode_attention
from parallel.config import GenerationConfig
from parallel.distributed.checkpoint import TINY, resolve_checkpoint
from parallel.engine.engine import Engine
from parallel.engine.plain import generate
from parallel.protocol.harmony import pad_token_id, render_prompt, stop_tokens
from parallel.protocol.requests import parse_request
from tests.attention_reference import torch_attention

TEXTS = ["Say hello.", "What is 2+2?", "Hi", "Tell me a story about a cat that learned to fly over the sea."]


@pytest.fixture
def interpreted():
    """parallel.decode_attention, its kernels run by Triton's CPU interpreter (tests/conftest.py chose it)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a GPU machine: tests/gpu/engine_check.py runs the kernel there")
    return decode_attention


@pytest.fixture(scope="module")
def tiny():
    return GptOssForCausalLM.from_pretrained(resolve_checkpoint(TINY)).eval()


@pytest.mark.parametrize("window", [None, 16])
def test_kernel_matches_torch_attention_with_sinks_windows_and_grouped_heads(interpreted, window):
    torch.manual_seed(0)
    k_cache, v_cache = torch.randn(2, 5, 4, 512, 16).unbind(0)  # 5 slots, 4 KV heads, 512 positions
    q, sinks = torch.randn(3, 8, 16), torch.randn(8)  # 8 query heads: two a KV head
    lengths = torch.tensor([1, 70, 512])  # one key; a few splits; every split full
    assert interpreted.splits_for(3, 4, 512) > 1
    out = interpreted.decode_attention(q, k_cache, v_cache, lengths, sinks, 0.25, window)
    torch.testing.assert_close(out, torch_attention(q, k_cache, v_cache, lengths, sinks, 0.25, window))


def prompts_of(enc, texts):
    return [render_prompt(enc, parse_request({"prompt": t}, 0), "medium") for t in texts]


def plain_tokens(enc, model, prompts, limits):
    stop = stop_tokens(enc)
    return [generate(model, [p], [n], GenerationConfig(), stop=stop, pad_id=pad_token_id(enc), seed=0)[0][0].tokens
            for p, n in zip(prompts, limits)]


def test_engine_decoding_through_the_kernel_gives_the_plain_paths_greedy_tokens(interpreted, enc, tiny):
    prompts, limits = prompts_of(enc, TEXTS), [24, 5, 30, 12]
    engine = Engine(tiny, slots=2, attention="triton")
    fast, _ = engine.generate(prompts, limits, GenerationConfig(), stop=stop_tokens(enc), seed=0)
    assert "Triton kernel" in engine.describe()
    assert [c.tokens for c in fast] == plain_tokens(enc, tiny, prompts, limits)


def test_a_cache_too_small_for_every_slot_decodes_fewer_rows_at_a_time(enc, tiny):
    prompts, limits = prompts_of(enc, TEXTS), [20, 20, 20, 20]
    two_rows = 2 * 2 * 2 * 4 * 256 * 16 * 4 / 2**30  # 2 rows x (k, v) x 2 layers x 4 KV heads x 256 positions x 16 x fp32
    engine = Engine(tiny, slots=8, cache_gib=two_rows)
    fast, _ = engine.generate(prompts, limits, GenerationConfig(), stop=stop_tokens(enc), seed=0)
    assert (engine.rows, engine.max_len) == (2, 256)
    assert [c.tokens for c in fast] == plain_tokens(enc, tiny, prompts, limits)


def test_a_sequence_longer_than_the_cache_budget_is_refused_naming_the_setting(enc, tiny):
    engine = Engine(tiny, slots=4, cache_gib=1e-4)
    with pytest.raises(MemoryError, match="engine.cache_gib"):
        engine.generate(prompts_of(enc, TEXTS[:1]), [4000], GenerationConfig(), stop={}, seed=0)


def test_the_kernel_asked_for_where_it_cannot_run_is_an_error(tiny, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="engine.attention=triton needs"):
        Engine(tiny, slots=1, attention="triton")  # CPU, not interpreted
