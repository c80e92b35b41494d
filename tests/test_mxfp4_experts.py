"""Experts kept in MXFP4 (parallel/engine/mxfp4.py) on CPU, through the reference path: the format as transformers reads
it, the math as the engine's, and loading, dummy building and sharding through the launcher's own code.
(triton_kernels' path is checked on a GPU: tests/gpu/mxfp4_check.py.)"""

import pytest
import torch
from safetensors.torch import load_file
from transformers import GptOssForCausalLM
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from parallel.config import EngineConfig, merge_config
from parallel.distributed.mesh import Placement
from parallel.engine.engine import Engine
from parallel.engine.forward import experts as engine_experts
from parallel.engine.interface import Sampling, Work, complete
from parallel.engine.mxfp4 import (
    EXPERTS_A_STEP,
    Mxfp4Experts,
    _convert_layout,
    combine_routes,
    dequantize,
    local_routes,
)
from parallel.engine.plain import Plain
from parallel.loading.checkpoint import TINY
from parallel.loading.model import load_model, plan_model
from parallel.protocol.harmony import pad_token_id, render_prompt, stop_tokens
from parallel.protocol.requests import parse_request
from tests.conftest import ROOT, launch, read_records

MATH = {"top_k": 2, "limit": 7.0, "alpha": 1.702}
HIDDEN, INNER = 64, 96
REQUIRE = ["model.mxfp4=require", "engine.mode=always"]


def random_experts(experts: int, first_expert: int = 0) -> Mxfp4Experts:
    return Mxfp4Experts.random_packed(
        experts, HIDDEN, INNER, device="cpu", dtype=torch.float32, first_expert=first_expert, **MATH
    )


def share(experts: Mxfp4Experts, first: int, local: int) -> Mxfp4Experts:
    """The experts [first, first + local) of `experts`, as one rank holds them."""
    part = Mxfp4Experts(local, HIDDEN, INNER, first_expert=first, **MATH)
    part.load_state_dict({name: t[first : first + local] for name, t in experts.state_dict().items()})
    return part


def routed(seed: int = 0):
    """16 tokens and a router over 8 experts."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, HIDDEN, generator=gen), torch.randn(8, HIDDEN, generator=gen), torch.randn(8, generator=gen)


def test_dequantize_gives_transformers_values():
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(100, 140, (3, 40, 4), dtype=torch.uint8, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(dequantize(blocks, scales, dtype), convert_moe_packed_tensors(blocks, scales, dtype=dtype))


@pytest.mark.parametrize("first_expert, local", [(0, 8), (4, 4)], ids=["all experts", "the second half (an ep share)"])
def test_reference_forward_is_the_engines_math_on_the_dequantized_weights(first_expert, local):
    torch.manual_seed(0)
    experts = random_experts(local, first_expert)
    h, router_w, router_b = routed()
    gate_up = dequantize(experts.gate_up_proj_blocks, experts.gate_up_proj_scales, torch.float32)
    down = dequantize(experts.down_proj_blocks, experts.down_proj_scales, torch.float32)
    expected = engine_experts(
        h,
        router_w,
        router_b,
        gate_up,
        experts.gate_up_proj_bias,
        down,
        experts.down_proj_bias,
        first_expert,
        MATH["top_k"],
        MATH["limit"],
        MATH["alpha"],
        True,
    )
    torch.testing.assert_close(experts(h, router_w, router_b), expected, rtol=1e-5, atol=1e-6)


def test_ranks_shares_add_up_to_all_experts():
    torch.manual_seed(0)
    experts = random_experts(8)
    h, router_w, router_b = routed(1)
    parts = [share(experts, first, 4)(h, router_w, router_b) for first in (0, 4)]
    assert all(p.abs().sum() > 0 for p in parts)  # each rank runs some of the routes
    torch.testing.assert_close(parts[0] + parts[1], experts(h, router_w, router_b), rtol=1e-5, atol=1e-6)


def load(path, *overrides: str):
    """The launcher's plan and load, in this process."""
    cfg = merge_config(ROOT / "configs" / "tiny.yaml", [f"model.path={path}", *overrides])
    path, shape, layout = plan_model(cfg)
    place = Placement(
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        replica=0,
        replica_ranks=[0],
        replica_group=None,
        control_group=None,
        model_mesh=None,
    )
    return load_model(path, shape, cfg.model, layout, place)


def expert_params(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if ".experts." in name}


def test_an_ep_shares_routes_sort_by_local_expert_and_others_drop_out():
    indx = torch.tensor([[5, 1, 6, 0], [7, 4, 2, 3], [0, 1, 2, 3]])  # 3 tokens, top-4 of 8 experts
    counts, combine, dispatch = local_routes(indx, first_expert=4, local=4)  # this rank: experts 4-7
    assert counts.tolist() == [1, 1, 1, 1]
    assert combine.tolist()[:4] == [5, 0, 2, 4] and set(combine.tolist()[4:]) == {-1}  # routes of experts 4, 5, 6, 7
    assert [dispatch[r].item() for r in (5, 0, 2, 4)] == [0, 1, 2, 3]
    assert (dispatch == -1).sum().item() == 8


def test_each_token_sums_the_rows_of_its_own_routes_and_no_other_ranks():
    """The experts' rows in expert order, as the down projection leaves them, back to tokens: each token gets the
    sum of its routes' rows on this rank; another rank's route counts zero though its row holds NaN."""
    indx = torch.tensor([[5, 1, 6, 0], [7, 4, 2, 3], [4, 5, 6, 7]])  # 3 tokens, top-4 of 8 experts
    counts, combine, dispatch = local_routes(indx, first_expert=4, local=4)
    route_values = torch.arange(12.0)[:, None] * torch.tensor([1.0, -2.0])  # route r's row: r * (1, -2)
    rows = torch.full((12, 2), float("nan"))
    rows[: int(counts.sum())] = route_values[combine[: int(counts.sum())].long()]
    here = ((indx >= 4) & (indx < 8)).flatten()
    expected = torch.where(here[:, None], route_values, 0).view(3, 4, 2).sum(1)
    assert torch.equal(combine_routes(rows, dispatch, top_k=4), expected)
    assert torch.equal(torch.compile(combine_routes, dynamic=True)(rows, dispatch, top_k=4), expected)


def test_hopper_layouts_converted_a_few_experts_at_a_time_are_triton_kernels_own_and_end_in_zeros():
    """The weights' conversion for matmul_ogs on Hopper, EXPERTS_A_STEP experts at a time (an uneven last step here),
    gives what triton_kernels' convert_layout gives for the whole tensor. And zero bytes follow the scales: the
    kernel loads a K tile's scales unmasked, so gpt-oss's K of 2880 (22.5 tiles of 128) reads 64 bytes past the
    last expert's, which were whatever the memory held (E8M0's NaN, 0xFF, made NaN of that expert's tokens)."""
    pytest.importorskip("triton_kernels", reason="the mxfp4 extra (CI installs its staged wheel)")
    from triton_kernels.tensor import FP4, convert_layout, wrap_torch_tensor
    from triton_kernels.tensor_details.layout import HopperMXScaleLayout, HopperMXValueLayout

    experts, out, groups = EXPERTS_A_STEP + 2, 2880, 90
    blocks = torch.randint(0, 256, (experts, out, groups * 16), dtype=torch.uint8)
    scales = torch.randint(118, 122, (experts, out, groups), dtype=torch.uint8)
    for layout, tensor, options in (
        (HopperMXValueLayout, lambda: wrap_torch_tensor(blocks.transpose(-2, -1), dtype=FP4), {}),
        (HopperMXScaleLayout, lambda: wrap_torch_tensor(scales.transpose(-2, -1)), {"num_warps": 4}),
    ):
        ours = _convert_layout(tensor(), layout, mx_axis=1, **options).storage.data
        assert torch.equal(ours, convert_layout(tensor(), layout, mx_axis=1, **options).storage.data)
    end = ours.numel()  # a dense tensor from the storage's start
    memory = torch.empty(0, dtype=torch.uint8).set_(ours.untyped_storage())
    over_read = -(groups * 32) % 128
    assert over_read == 64 and len(memory) >= end + over_read and not memory[end : end + over_read].any()


def test_mxfp4_checkpoint_loads_packed_as_stored(mxfp4_checkpoints):
    path = str(mxfp4_checkpoints["mxfp4"])
    stored = {name: t for name, t in load_file(f"{path}/model.safetensors").items() if ".experts." in name}
    params = expert_params(load(path, *REQUIRE))
    assert params.keys() == stored.keys()  # the blocks, scales and biases only: no float expert weight
    for name, t in stored.items():
        assert params[name].dtype == (torch.float32 if name.endswith("_bias") else torch.uint8)
        assert torch.equal(params[name], t.to(params[name].dtype)), name


def test_engine_on_packed_experts_answers_like_the_dequantized_checkpoint_on_the_plain_path(mxfp4_checkpoints, enc):
    texts = ["Say hello.", "What is 2+2?", "Tell me a story about a cat that learned to fly over the sea."]
    prompts = [render_prompt(enc, parse_request({"prompt": t}, 0), "medium") for t in texts]
    work = [Work(i, p, n, Sampling()) for i, (p, n) in enumerate(zip(prompts, [16, 5, 12]))]
    reference = GptOssForCausalLM.from_pretrained(mxfp4_checkpoints["reference"]).eval()
    plain = complete(Plain(reference, 1, stop_tokens(enc), pad_token_id(enc)), work)
    engine = Engine(load(mxfp4_checkpoints["mxfp4"], *REQUIRE), EngineConfig(slots=2), stop_tokens(enc))
    fast = complete(engine, work)
    assert "reference" in engine.describe() and [fast[w.rid][0] for w in work] == [plain[w.rid][0] for w in work]


def test_dummy_load_builds_random_packed_experts():
    params = expert_params(load(TINY, "model.load_format=dummy", *REQUIRE))
    blocks = params["model.layers.0.mlp.experts.gate_up_proj_blocks"]
    scales = params["model.layers.0.mlp.experts.down_proj_scales"]
    assert blocks.dtype == torch.uint8 and blocks.shape == (4, 128, 2, 16) and blocks.float().std() > 50
    assert scales.dtype == torch.uint8 and 118 <= scales.min() <= scales.max() < 122
    assert not any(name.endswith(("experts.gate_up_proj", "experts.down_proj")) for name in params)


@pytest.fixture(scope="module")
def one_process_answers(mxfp4_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "answers.jsonl"
    run = launch(
        out,
        f"model.path={mxfp4_checkpoints['mxfp4']}",
        "output.raw=true",
        *REQUIRE,
        prompts=ROOT / "examples" / "prompts.jsonl",
    )
    assert run.returncode == 0, run.stderr
    return {r["id"]: r["raw"] for r in read_records(out)}


@pytest.mark.parametrize("layout", ["parallel.ep=2", "parallel.tp=2"])
def test_two_ranks_hold_half_the_packed_experts_each_and_answer_like_one_process(
    mxfp4_checkpoints, one_process_answers, tmp_path, layout
):
    out = tmp_path / "answers.jsonl"
    run = launch(
        out,
        f"model.path={mxfp4_checkpoints['mxfp4']}",
        "output.raw=true",
        *REQUIRE,
        layout,
        nproc=2,
        prompts=ROOT / "examples" / "prompts.jsonl",
    )
    assert run.returncode == 0, run.stderr
    for rank, held in ((0, "[0, 2) of 4"), (1, "[2, 4) of 4")):
        assert (
            f"rank {rank}] MXFP4 experts kept packed, run by the engine through the reference "
            f"(dequantized on the fly): experts {held}" in run.stderr
        )
    assert "generation: the engine" in run.stderr
    assert {r["id"]: r["raw"] for r in read_records(out)} == one_process_answers
