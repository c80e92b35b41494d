"""MXFP4 checkpoints in the published layout: experts as E2M1 blocks with E8M0 scales of 32 values."""

import pytest
import torch
from transformers import GptOssForCausalLM

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
    run = launch(out, f"model.path={checkpoints['reference']}", "output.raw=true", prompts=ROOT / "examples" / "prompts.jsonl")
    assert run.returncode == 0, run.stderr
    return {r["id"]: r["raw"] for r in read_records(out)}


# dp=2: replicas under torchrun must not turn on distributed expert routing (transformers issue 40031).
@pytest.mark.parametrize("nproc, layout", [(None, []), (2, ["parallel.tp=2"]), (2, ["parallel.ep=2"]), (2, ["parallel.dp=2"])],
                         ids=["1 process", "tp=2", "ep=2", "dp=2"])
def test_mxfp4_checkpoint_answers_like_its_dequantized_weights(mxfp4_checkpoints, reference_answers, tmp_path, nproc, layout):
    checkpoints = mxfp4_checkpoints
    out = tmp_path / "answers.jsonl"
    run = launch(out, f"model.path={checkpoints['mxfp4']}", "output.raw=true", "generation.batch_size=1", *layout,
                 nproc=nproc, prompts=ROOT / "examples" / "prompts.jsonl")
    assert run.returncode == 0, run.stderr
    assert "MXFP4 experts were dequantized to torch.float32" in run.stderr
    assert {r["id"]: r["raw"] for r in read_records(out)} == reference_answers


def test_requiring_native_mxfp4_fails_where_it_cannot_run(mxfp4_checkpoints, tmp_path):
    checkpoints = mxfp4_checkpoints
    run = launch(tmp_path / "a.jsonl", f"model.path={checkpoints['mxfp4']}", "model.mxfp4=require",
                 prompts=ROOT / "examples" / "prompts.jsonl")
    assert run.returncode == 2
    assert "model.mxfp4=require, but MXFP4 experts were dequantized" in run.stderr
