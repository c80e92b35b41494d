"""The engine on CPU: the same greedy tokens as the plain path, continuous batching, stops, cancellation, choice."""

import pytest
from transformers import GptOssForCausalLM

import parallel.engine.engine as engine_module
from parallel.config import EngineConfig, GenerationConfig, merge_config
from parallel.distributed.checkpoint import TINY, resolve_checkpoint
from parallel.distributed.layout import Layout, LayoutError
from parallel.distributed.loading import plan_model
from parallel.engine.choice import choose_generator
from parallel.engine.engine import Engine
from parallel.engine.plain import Plain, generate
from parallel.protocol.harmony import pad_token_id, render_prompt, stop_tokens
from parallel.protocol.requests import parse_request
from tests.conftest import ROOT
from tests.taught import LESSONS

TEXTS = ["Say hello.", "What is 2+2?", "Hi", "Tell me a story about a cat that learned to fly over the sea."] * 2
LIMITS = [24, 5, 30, 12, 7, 24, 3, 18]
PAD = 199999


@pytest.fixture(scope="module")
def tiny():
    return GptOssForCausalLM.from_pretrained(resolve_checkpoint(TINY)).eval()


def prompts_of(enc, objs):
    return [render_prompt(enc, parse_request(o, 0), "medium") for o in objs]


def test_engine_gives_the_plain_paths_greedy_tokens_with_fewer_slots_than_prompts(enc, tiny):
    prompts, stop = prompts_of(enc, [{"prompt": t} for t in TEXTS]), stop_tokens(enc)
    plain = [generate(tiny, [p], [n], GenerationConfig(), stop=stop, pad_id=pad_token_id(enc), seed=0)[0][0] for p, n in zip(prompts, LIMITS)]
    fast, timing = Engine(tiny, slots=3).generate(prompts, LIMITS, GenerationConfig(), stop=stop, seed=0)
    assert [c.tokens for c in fast] == [c.tokens for c in plain]
    assert [c.finish_reason for c in fast] == [c.finish_reason for c in plain]
    assert timing.first_token_s > 0


def test_prompts_prefilled_in_chunks_give_the_same_tokens(enc, tiny, monkeypatch):
    monkeypatch.setattr(engine_module, "PREFILL_SCORES_BYTES", 1)  # chunks of 16 positions, the smallest
    prompts, stop = prompts_of(enc, [{"prompt": t} for t in TEXTS[:4]]), stop_tokens(enc)
    plain = [generate(tiny, [p], [12], GenerationConfig(), stop=stop, pad_id=pad_token_id(enc), seed=0)[0][0].tokens for p in prompts]
    fast, _ = Engine(tiny, slots=4).generate(prompts, [12] * 4, GenerationConfig(), stop=stop, seed=0)
    assert max(map(len, prompts)) > 4 * 16 and [c.tokens for c in fast] == plain


def test_sampling_is_reproducible_for_a_seed(enc, tiny):
    prompts, gen = prompts_of(enc, [{"prompt": t} for t in TEXTS[:3]]), GenerationConfig(temperature=1.0, top_p=0.9)
    engine = Engine(tiny, slots=2)
    runs = [[c.tokens for c in engine.generate(prompts, [16] * 3, gen, stop={}, seed=seed)[0]] for seed in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]


def test_rows_handed_over_while_running_are_generated_and_grow_the_cache(enc, tiny):
    prompts, stop = prompts_of(enc, [{"prompt": t} for t in TEXTS[:3]]), stop_tokens(enc)
    limits = [5, 8, 300]  # the last needs a longer cache than the first two: it waits for them, then it grows
    late = [[(prompts[1], limits[1]), (prompts[2], limits[2])]]
    calls = iter([[], [], *late])
    engine = Engine(tiny, slots=2)
    fast, _ = engine.generate(prompts[:1], limits[:1], GenerationConfig(), stop=stop, seed=0, incoming=lambda: next(calls, []))
    plain = [generate(tiny, [p], [n], GenerationConfig(), stop=stop, pad_id=pad_token_id(enc), seed=0)[0][0].tokens for p, n in zip(prompts, limits)]
    assert [c.tokens for c in fast] == plain and engine.max_len > 256


def test_engine_ends_rows_at_harmony_stop_tokens(enc, taught_model):
    model = GptOssForCausalLM.from_pretrained(taught_model).eval()
    lessons = [(obj, enc.encode(text, allowed_special="all")) for obj, text in LESSONS]
    fast, _ = Engine(model, slots=2).generate(prompts_of(enc, [o for o, _ in lessons]), [64] * 3, GenerationConfig(), stop=stop_tokens(enc), seed=0)
    assert [c.tokens for c in fast] == [answer for _, answer in lessons]
    assert [c.finish_reason for c in fast] == ["stop", "tool_call", "stop"]


def test_cancelled_rows_end_and_waiting_ones_never_start(enc, tiny):
    prompts = prompts_of(enc, [{"prompt": t} for t in TEXTS[:3]])
    steps = []
    gone = lambda: [len(steps) >= 3, True, False]  # noqa: E731 - row 0 leaves after 3 steps, row 1 before it starts
    fast, _ = Engine(tiny, slots=1).generate(prompts, [20] * 3, GenerationConfig(), stop={}, seed=0, on_step=steps.append, cancelled=gone)
    assert [len(c.tokens) for c in fast] == [3, 0, 20]
    assert {row for step in steps for row, _ in step} == {0, 2}


def test_engine_is_chosen_on_gpu_only_unless_asked(tiny):
    one = Layout(dp=1, pp=1, tp=1, ep=1)
    assert isinstance(choose_generator(tiny, EngineConfig(mode="auto"), one, PAD), Plain)  # CPU
    assert isinstance(choose_generator(tiny, EngineConfig(mode="always", slots=4), one, PAD), Engine)
    assert isinstance(choose_generator(tiny, EngineConfig(mode="always"), Layout(dp=1, pp=2, tp=1, ep=1), PAD), Plain)


def test_engine_always_with_pipeline_stages_is_refused_before_loading(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = merge_config(ROOT / "configs" / "tiny.yaml", ["parallel.pp=2", "engine.mode=always"])
    with pytest.raises(LayoutError, match="engine.mode=always"):
        plan_model(cfg)


def test_experts_without_float_weights_fall_back_to_the_plain_path():
    """transformers' native MXFP4 experts hold gate_up_proj_blocks/_scales, not gate_up_proj: the engine steps aside."""
    model = GptOssForCausalLM.from_pretrained(resolve_checkpoint(TINY)).eval()
    experts = model.model.layers[0].mlp.experts
    experts.gate_up_proj_blocks = experts.gate_up_proj
    del experts.gate_up_proj
    assert isinstance(choose_generator(model, EngineConfig(mode="always"), Layout(dp=1, pp=1, tp=1, ep=1), PAD), Plain)
