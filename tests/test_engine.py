"""The engine on CPU against the plain path: token-budget steps, chunked prefill, a paged cache small enough to
preempt, prefix-cache hits, stops, aborts, per-request sampling, and the choice of backend."""

import copy

import pytest
import torch
from transformers import GptOssForCausalLM

from parallel.config import EngineConfig, merge_config
from parallel.distributed.layout import LayoutError
from parallel.engine.choice import choose_backend
from parallel.engine.engine import Engine
from parallel.engine.interface import Sampling, Work, complete
from parallel.engine.kernels.gumbel import BLOCK, PROGRAMS
from parallel.engine.kernels.gumbel import gumbel_argmax as sampling_kernel
from parallel.engine.plain import Plain
from parallel.engine.runner import write_cache
from parallel.engine.sampling import ROWS, gumbel_argmax, sample, scale
from parallel.loading.checkpoint import TINY, resolve_checkpoint
from parallel.loading.model import plan_model
from parallel.protocol.harmony import render_prompt, stop_tokens
from parallel.protocol.requests import parse_request
from tests.conftest import ROOT
from tests.taught import LESSONS

TEXTS = ["Say hello.", "What is 2+2?", "Hi", "Tell me a story about a cat that learned to fly over the sea."] * 2
LIMITS = [24, 5, 30, 12, 7, 24, 3, 18]
PAD = 199999


@pytest.fixture(scope="module")
def tiny():
    return GptOssForCausalLM.from_pretrained(resolve_checkpoint(TINY)).eval()


@pytest.fixture(scope="module")
def prompts(enc):
    return [render_prompt(enc, parse_request({"prompt": t}, 0), "medium") for t in TEXTS]


def work(prompts, limits, sampling=None):
    return [Work(i, p, n, sampling or Sampling()) for i, (p, n) in enumerate(zip(prompts, limits))]


@pytest.fixture(scope="module")
def plain_tokens(tiny, prompts, enc):
    """The plain path, one request at a time (no padding): the reference."""
    plain = Plain(tiny, 1, stop_tokens(enc), PAD)
    return {rid: tokens for rid, (tokens, _) in complete(plain, work(prompts, LIMITS)).items()}


def engine(model, enc, **overrides) -> Engine:
    cfg = EngineConfig(mode="always", **{"slots": 3, "max_batched_tokens": 64, "block_size": 4, **overrides})
    return Engine(model, cfg, stop_tokens(enc))


def test_chunked_token_budget_steps_give_the_plain_paths_greedy_tokens(tiny, enc, prompts, plain_tokens):
    fast = engine(tiny, enc)
    out = complete(fast, work(prompts, LIMITS))
    assert {rid: tokens for rid, (tokens, _) in out.items()} == plain_tokens
    assert max(map(len, prompts)) > 64  # the longest prompt spans several steps
    assert all(event.queued_s >= 0 and event.first_token_s > 0 for _, event in out.values())


def test_q_k_v_run_as_one_gemm_over_the_models_own_memory(tiny, enc, prompts):
    """The engine stacks q_proj, k_proj and v_proj into one weight and the model's modules become views of it: no
    second copy of them (a second engine on the model takes the same), and the model's own forward computes what
    it did."""
    ids = torch.tensor([prompts[0]])
    before = tiny(ids).logits
    stacked = engine(tiny, enc).runner.weights[0][0][1]
    attn = tiny.model.layers[0].self_attn
    assert {
        p.untyped_storage().data_ptr() for p in (stacked, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)
    } == {stacked.data_ptr()}
    assert engine(tiny, enc).runner.weights[0][0][1].data_ptr() == stacked.data_ptr()
    assert torch.equal(tiny(ids).logits, before)


def test_a_cache_too_small_for_all_preempts_and_still_gives_the_same_tokens(tiny, enc, prompts):
    """Two requests admitted together outgrow 60 blocks of 4 tokens (1 KiB a token): the newer is preempted,
    recomputed later, and ends as if it had run alone."""
    both = work(prompts[:2], [60, 60])
    expected = {rid: tokens for rid, (tokens, _) in complete(Plain(tiny, 1, stop_tokens(enc), PAD), both).items()}
    fast = engine(tiny, enc, slots=2, cache_gib=60 * 4 * 1024 / 2**30, prefix_caching=False)
    out = complete(fast, both)
    assert fast.scheduler.preemptions > 0
    assert {rid: tokens for rid, (tokens, _) in out.items()} == expected


def test_prompts_sharing_a_prefix_reuse_its_blocks(tiny, enc, prompts, plain_tokens):
    fast = engine(tiny, enc, prefix_caching=True)
    first = complete(fast, work(prompts[:1], LIMITS[:1]))
    again = complete(fast, [Work(9, prompts[4], LIMITS[4], Sampling())])  # the same text as prompt 0
    assert fast.pool.hits >= len(prompts[4]) - 4 and first[0][0] == plain_tokens[0]
    assert again[9][0] == plain_tokens[4]


def test_a_request_that_cannot_fit_the_cache_is_refused_alone(tiny, enc, prompts):
    fast = engine(tiny, enc, cache_gib=40 * 4 * 1024 / 2**30)  # 160 tokens
    out = complete(fast, work(prompts[:3], [5, 5, 500]))
    assert out[2][1].reason.startswith("error:") and "KV cache" in out[2][1].reason
    assert [len(out[i][0]) for i in (0, 1)] == [5, 5]


def test_sampled_requests_do_not_depend_on_who_shares_their_steps(tiny, enc, prompts):
    sampled = Sampling(temperature=1.0, top_p=0.9, seed=7)
    alone = complete(engine(tiny, enc), [Work(0, prompts[0], 16, sampled)])[0][0]
    crowded = complete(
        engine(tiny, enc), [Work(1, prompts[1], 16, Sampling(1.0, 0.9, 8)), Work(0, prompts[0], 16, sampled)]
    )
    other_seed = complete(engine(tiny, enc), [Work(0, prompts[0], 16, Sampling(1.0, 0.9, 8))])[0][0]
    assert crowded[0][0] == alone != other_seed


def cut_rows(top_p: torch.Tensor) -> torch.Tensor | None:
    """What the engine tells `sample`: the rows whose top_p is below 1."""
    rows = (top_p < 1).nonzero()[:, 0]
    return rows if len(rows) else None


@pytest.mark.parametrize("cut", [False, True])
def test_many_rows_are_sampled_a_few_at_a_time_each_as_if_alone(cut):
    rows = 2 * ROWS + 3
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, 500, generator=gen)
    temperature = torch.rand(rows, generator=gen) * (torch.arange(rows) % 3 > 0)  # every third row greedy
    top_p = (
        torch.rand(rows, generator=gen).where(torch.arange(rows) % 2 > 0, 1.0) if cut else torch.ones(rows)
    )  # half cut
    seeds, positions = torch.randint(0, 2**40, (2, rows), generator=gen)
    alone = [
        sample(*(c[i : i + 1] for c in (logits, temperature, top_p, seeds, positions)), cut_rows(top_p[i : i + 1]))
        for i in range(rows)
    ]
    assert sample(logits, temperature, top_p, seeds, positions, cut_rows(top_p)).tolist() == torch.cat(alone).tolist()


def test_only_the_rows_cut_by_top_p_keep_to_their_top_tokens():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(64, 500, generator=gen)
    hot = torch.full((64,), 5.0)  # nearly flat: uncut rows draw far from their argmax
    top_p = torch.ones(64).where(torch.arange(64) % 2 > 0, 1e-6)  # even rows: the top token alone
    seeds, positions = torch.randint(0, 2**40, (2, 64), generator=gen)
    top = sample(logits, hot, top_p, seeds, positions, cut_rows(top_p)) == logits.argmax(-1)
    assert top[0::2].all() and top[1::2].sum() < 4


@pytest.mark.parametrize("rows", [9, PROGRAMS])  # a row's vocabulary split over 3 programs, and over one
def test_the_sampling_kernel_draws_the_tokens_torch_draws_and_a_nan_wins_its_row(rows):
    gen = torch.Generator().manual_seed(1)
    vocab = 2 * BLOCK + 5  # a last block mostly past the vocabulary
    logits = (torch.randn(rows, vocab, generator=gen) * 4).bfloat16()
    logits[3, vocab - 2] = float("nan")
    temperature = torch.rand(rows, generator=gen) * 2 + 0.1
    seeds, positions = torch.randint(0, 2**40, (2, rows), generator=gen)
    drawn = sampling_kernel(logits, temperature, seeds, positions)
    assert drawn.tolist() == gumbel_argmax(scale(logits, temperature), seeds, positions).tolist()
    assert drawn[3] == vocab - 2


def test_no_token_far_below_the_top_is_ever_drawn():
    # At (seed 33, position 7) a 24-bit hash gave some token u = 1, infinite noise, and the draw regardless of logits.
    logits = torch.zeros(4, 201088)
    logits[:, 0] = 30  # every other token e**-30 as likely
    ones = torch.ones(4)
    seeds, positions = torch.tensor([33, 33, 1, 2]), torch.tensor([7, 8, 7, 7])
    for top_p in (ones, ones * 0.5):
        assert sample(logits, ones, top_p, seeds, positions, cut_rows(top_p)).tolist() == [0] * 4
    assert sampling_kernel(logits, ones, seeds, positions).tolist() == [0] * 4


@pytest.mark.parametrize("cache", ["auto", "fp8"])
def test_engine_ends_requests_at_harmony_stop_tokens(enc, taught_model, cache):
    """The taught answers, token for token, with the model's cache type and with an fp8 cache."""
    model = GptOssForCausalLM.from_pretrained(taught_model).eval()
    lessons = [
        (render_prompt(enc, parse_request(obj, 0), "medium"), enc.encode(text, allowed_special="all"))
        for obj, text in LESSONS
    ]
    out = complete(engine(model, enc, kv_cache_dtype=cache), work([p for p, _ in lessons], [64] * 3))
    assert [out[i][0] for i in range(3)] == [answer for _, answer in lessons]
    assert [out[i][1].reason for i in range(3)] == ["stop", "tool_call", "stop"]


def test_aborted_requests_end_at_once_and_waiting_ones_never_start(tiny, enc, prompts):
    fast = engine(tiny, enc, slots=1)
    seen: list = []
    fast.add(work(prompts[:3], [20] * 3))
    for _ in range(100):  # steps enough for 3 tokens and for the aborts, bounded so that a bug fails, not hangs
        if len([e for e in seen if e.rid == 0]) >= 3:
            break
        fast.step(seen.extend)
    fast.abort([0, 1])
    for _ in range(100):
        if not fast.busy():
            break
        fast.step(seen.extend)
    ends = {e.rid: e.reason for e in seen if e.reason}
    assert ends == {0: "cancelled", 1: "cancelled", 2: "length"}
    assert sum(len(e.tokens) for e in seen if e.rid == 1) == 0 and sum(len(e.tokens) for e in seen if e.rid == 2) == 20


def test_a_request_ends_at_the_models_context(tiny, enc, prompts):
    fast = engine(tiny, enc)
    fast.context = len(prompts[0]) + 5  # as if the model's context ended 5 tokens past this prompt
    out = complete(fast, [Work(0, prompts[0], 50, Sampling()), Work(1, prompts[1] * 40, 5, Sampling())])
    assert (len(out[0][0]), out[0][1].reason) == (5, "length")
    assert out[1][1].reason.startswith("error:") and "context" in out[1][1].reason


def test_engine_is_chosen_on_gpu_only_unless_asked(tiny, enc):
    stop = stop_tokens(enc)
    assert isinstance(choose_backend(tiny, EngineConfig(mode="auto"), 1, 4, stop, PAD), Plain)  # CPU
    assert isinstance(choose_backend(tiny, EngineConfig(mode="always", slots=4), 1, 4, stop, PAD), Engine)
    assert isinstance(choose_backend(tiny, EngineConfig(mode="always"), 2, 4, stop, PAD), Plain)


def test_engine_always_with_pipeline_stages_is_refused_before_loading(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = merge_config(ROOT / "configs" / "tiny.yaml", ["parallel.pp=2", "engine.mode=always"])
    with pytest.raises(LayoutError, match="engine.mode=always"):
        plan_model(cfg)


def test_experts_without_float_weights_fall_back_to_the_plain_path(enc):
    """transformers' native MXFP4 experts hold gate_up_proj_blocks/_scales, not gate_up_proj: the engine steps aside."""
    model = GptOssForCausalLM.from_pretrained(resolve_checkpoint(TINY)).eval()
    experts = model.model.layers[0].mlp.experts
    experts.gate_up_proj_blocks = experts.gate_up_proj
    del experts.gate_up_proj
    assert isinstance(choose_backend(model, EngineConfig(mode="always"), 1, 4, stop_tokens(enc), PAD), Plain)


@pytest.mark.parametrize("backend", ["engine", "plain"])
def test_a_prompt_with_token_ids_outside_the_vocabulary_is_refused_alone(tiny, enc, prompts, backend):
    runner = engine(tiny, enc) if backend == "engine" else Plain(tiny, 4, stop_tokens(enc), PAD)
    out = complete(
        runner, [Work(0, [10**9], 5, Sampling()), Work(1, [-1], 5, Sampling()), Work(2, prompts[0], 3, Sampling())]
    )
    assert [out[i][1].reason.startswith("error: prompt token ids") for i in range(3)] == [True, True, False]
    assert len(out[2][0]) == 3


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=1.0, seed=3)], ids=["greedy", "sampled"])
def test_a_request_whose_logits_turn_nan_ends_with_an_error_and_leaves_no_nan_behind(
    tiny, enc, prompts, plain_tokens, sampling
):
    """NaN in the model (here the embedding of a token only request 0's prompt ends with) ends that request with an
    error that says so, where argmax would have picked the NaN's index every step; the cached blocks it wrote (NaN
    even before that token) are not found again, so the requests after it, sharing its harmony prefix, run clean."""
    broken = copy.deepcopy(tiny)
    with torch.no_grad():
        broken.model.embed_tokens.weight[12345] = float("nan")
    fast = engine(broken, enc)
    out = complete(fast, [Work(0, prompts[0] + [12345], LIMITS[0], sampling)])
    assert out[0][0] == [] and out[0][1].reason.startswith(
        "error: the model's logits were NaN (not a number) at new token 1"
    )
    after = complete(fast, work(prompts, LIMITS)[1:])
    assert {rid: tokens for rid, (tokens, _) in after.items()} == {rid: t for rid, t in plain_tokens.items() if rid}


def test_an_fp8_cache_holds_more_tokens_each_rounded_to_fp8(tiny, enc):
    """engine.kv_cache_dtype=fp8: a byte a value (the tiny model is float32: 4 times the blocks in the same memory);
    each key and value written is the nearest fp8 (3 mantissa bits: within 1/16 of itself), beyond fp8's range
    the largest fp8, never NaN."""
    gib = 40 * 4 * 1024 / 2**30
    exact, fp8 = engine(tiny, enc, cache_gib=gib), engine(tiny, enc, cache_gib=gib, kv_cache_dtype="fp8")
    assert fp8.runner.k_cache.dtype == torch.float8_e4m3fn
    assert fp8.runner.k_cache.shape[1] == 4 * exact.runner.k_cache.shape[1]  # blocks
    cache = fp8.runner.k_cache[0]
    rows = torch.randn(5, *cache.shape[2:]) * torch.logspace(-2, 3, 5)[:, None, None]
    slots = torch.tensor([3, 0, 17, 9, 30])
    write_cache(cache, slots, rows)
    written = cache.reshape(-1, *cache.shape[2:])[slots].float()
    inside = rows.abs() <= 448
    assert ((written - rows).abs() <= rows.abs() / 16 + 2**-9)[inside].all()
    assert torch.equal(written[~inside], 448 * rows[~inside].sign()) and (~inside).any()
