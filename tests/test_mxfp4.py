"""MXFP4 checkpoints in the published layout: experts as E2M1 blocks with E8M0 scales of 32 values."""

import pytest
import torch
from transformers import GptOssForCausalLM

from parallel.config import EngineConfig, ModelConfig, merge_config
from parallel.distributed.layout import Layout, LayoutError
from parallel.loading.checkpoint import read_model_config
from parallel.loading.model import plan_model
from parallel.loading.quantization import settle_mxfp4
from tests.conftest import ROOT, launch, read_records


def test_loading_dequantizes_to_the_published_values(mxfp4_checkpoints):
    checkpoints = mxfp4_checkpoints
    mx = GptOssForCausalLM.from_pretrained(checkpoints["mxfp4"], dtype=torch.float32)
    ref = GptOssForCausalLM.from_pretrained(checkpoints["reference"], dtype=torch.float32)
    for a, b in zip(mx.model.layers, ref.model.layers, strict=True):
        assert torch.equal(a.mlp.experts.gate_up_proj, b.mlp.experts.gate_up_proj)
        assert torch.equal(a.mlp.experts.down_proj, b.mlp.experts.down_proj)


@pytest.fixture(scope="module")
def reference_answers(mxfp4_checkpoints, tmp_path_factory):
    checkpoints = mxfp4_checkpoints
    out = tmp_path_factory.mktemp("ref") / "answers.jsonl"
    run = launch(
        out, f"model.path={checkpoints['reference']}", "output.raw=true", prompts=ROOT / "examples" / "prompts.jsonl"
    )
    assert run.returncode == 0, run.stderr
    return {r["id"]: r["raw"] for r in read_records(out)}


# dp=2: replicas under torchrun must not turn on distributed expert routing (transformers issue 40031).
@pytest.mark.parametrize(
    "nproc, layout",
    [(None, []), (2, ["parallel.tp=2"]), (2, ["parallel.ep=2"]), (2, ["parallel.dp=2"])],
    ids=["1 process", "tp=2", "ep=2", "dp=2"],
)
def test_mxfp4_checkpoint_answers_like_its_dequantized_weights(
    mxfp4_checkpoints, reference_answers, tmp_path, nproc, layout
):
    checkpoints = mxfp4_checkpoints
    out = tmp_path / "answers.jsonl"
    run = launch(
        out,
        f"model.path={checkpoints['mxfp4']}",
        "output.raw=true",
        "generation.batch_size=1",
        *layout,
        nproc=nproc,
        prompts=ROOT / "examples" / "prompts.jsonl",
    )
    assert run.returncode == 0, run.stderr
    assert "MXFP4 experts were dequantized to torch.float32" in run.stderr
    assert {r["id"]: r["raw"] for r in read_records(out)} == reference_answers


def test_requiring_mxfp4_is_refused_where_the_engine_does_not_run(mxfp4_checkpoints, tmp_path):
    """Experts kept in MXFP4 run in the engine only; on CPU engine.mode=auto would generate on the plain path."""
    run = launch(
        tmp_path / "a.jsonl",
        f"model.path={mxfp4_checkpoints['mxfp4']}",
        "model.mxfp4=require",
        prompts=ROOT / "examples" / "prompts.jsonl",
    )
    assert run.returncode == 2
    assert "model.mxfp4=require keeps the experts in MXFP4, which only the engine runs" in run.stderr
    assert "loading" not in run.stderr


def dummy(model: str) -> ModelConfig:
    return ModelConfig(path=model, load_format="dummy")


@pytest.mark.parametrize(
    ("model", "layout", "gpu_gb"),
    [
        ("builtin:gpt-oss-20b", {"tp": 1, "ep": 1}, 80),  # 39 GiB in bf16: the engine, on one H100
        ("builtin:gpt-oss-120b", {"tp": 1, "ep": 4}, 80),  # experts split four ways: 56 GiB a rank
    ],
)
def test_mxfp4_experts_that_cannot_run_natively_are_dequantized_where_bf16_fits_a_gpu(model, layout, gpu_gb):
    shape = read_model_config(model)
    assert (
        settle_mxfp4(dummy(model), EngineConfig(), shape, Layout(dp=1, pp=1, **layout), gpu_gb * 10**9) == "dequantize"
    )


def test_mxfp4_experts_that_cannot_run_natively_nor_fit_in_bf16_are_refused_naming_the_install():
    shape = read_model_config("builtin:gpt-oss-120b")  # every rank of tp=2 holds all experts: 216 GiB in bf16
    with pytest.raises(LayoutError, match="cannot run natively here.*pip install"):
        settle_mxfp4(dummy("builtin:gpt-oss-120b"), EngineConfig(), shape, Layout(dp=1, pp=1, tp=2, ep=1), 141 * 10**9)


def test_mxfp4_experts_are_left_to_transformers_where_the_engine_does_not_run():
    shape, one, model = (
        read_model_config("builtin:gpt-oss-20b"),
        Layout(dp=1, pp=1, tp=1, ep=1),
        dummy("builtin:gpt-oss-20b"),
    )
    assert settle_mxfp4(model, EngineConfig(mode="auto"), shape, one, None) == "auto"  # no GPU: the plain path
    assert settle_mxfp4(model, EngineConfig(mode="never"), shape, one, 80 * 10**9) == "auto"
    assert settle_mxfp4(model, EngineConfig(mode="auto"), shape, Layout(dp=1, pp=2, tp=1, ep=1), 80 * 10**9) == "auto"


def test_planning_an_mxfp4_checkpoint_for_the_engine_without_triton_kernels_settles_on_dequantizing(mxfp4_checkpoints):
    cfg = merge_config(
        ROOT / "configs" / "tiny.yaml", [f"model.path={mxfp4_checkpoints['mxfp4']}", "engine.mode=always"]
    )
    plan_model(cfg)
    assert cfg.model.mxfp4 == "dequantize"
