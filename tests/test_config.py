import pytest
import torch

from parallel.config import ConfigError, merge_config, to_yaml
from tests.conftest import ROOT

REQUIRED = ["data.input=in.jsonl", "data.output=out.jsonl"]


@pytest.mark.parametrize("name", ["tiny", "gpt-oss-20b", "gpt-oss-120b"])
def test_shipped_configs_load(name):
    job = merge_config(ROOT / "configs" / f"{name}.yaml", REQUIRED)
    assert job.data.input == "in.jsonl"


def test_overrides_reach_typed_fields():
    job = merge_config(
        ROOT / "configs" / "tiny.yaml", [*REQUIRED, "parallel.tp=2", "generation.temperature=0.7", "output.raw=true"]
    )
    assert (job.parallel.tp, job.generation.temperature, job.output.raw) == (2, 0.7, True)


@pytest.mark.parametrize(
    "override, named",
    [
        ("parallel.tpp=2", "parallel.tpp"),
        ("parallel.tp=two", "parallel.tp"),
        ("generation.max_new_tokens=1.5", "generation.max_new_tokens"),
        ("generation.top_p=0", "generation.top_p"),
        ("generation.max_new_tokens=0", "generation.max_new_tokens"),
        ("generation.seed=18446744073709551616", "generation.seed"),
        ("runtime.heartbeat_timeout_s=0", "runtime.heartbeat_timeout_s"),
        ("runtime.collective_timeout_s=-5", "runtime.collective_timeout_s"),
        ("runtime.collective_timeout_s=inf", "runtime.collective_timeout_s"),
        ("runtime.heartbeat_timeout_s=nan", "runtime.heartbeat_timeout_s"),
        ("server.drain_timeout_s=-1", "server.drain_timeout_s"),
        ("engine.cache_gib=0", "engine.cache_gib"),
        ("server.max_body_bytes=0", "server.max_body_bytes"),
        ("server.request_timeout_s=-1", "server.request_timeout_s"),
        ("generation.conversation_date=2025-13-01", "generation.conversation_date"),
        ("generation.conversation_date=2025-W26-6", "generation.conversation_date"),
    ],
)
def test_bad_values_fail_naming_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        merge_config(ROOT / "configs" / "tiny.yaml", [*REQUIRED, override])


def test_a_bad_key_is_blamed_on_the_override_or_the_file_that_holds_it(tmp_path):
    with pytest.raises(ConfigError, match=r"^overrides: Key 'tpp'"):
        merge_config(ROOT / "configs" / "tiny.yaml", [*REQUIRED, "parallel.tpp=2"])
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  path: builtin:tiny\n  dtyp: float32\n")
    with pytest.raises(ConfigError, match=rf"^config {config}: Key 'dtyp'"):
        merge_config(config, REQUIRED)


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=rf"^config {tmp_path}/tiny.yml: no such file"):
        merge_config(tmp_path / "tiny.yml", REQUIRED)


def test_missing_output_is_named():
    with pytest.raises(ConfigError, match=r"data\.output"):
        merge_config(ROOT / "configs" / "tiny.yaml", ["data.input=in.jsonl"], required=("data.input", "data.output"))


@pytest.mark.parametrize(
    "override, allowed",
    [
        ("model.dtype=fp8", "auto, bfloat16, float32"),
        ("model.load_format=safetensors", "auto, dummy"),
        ("model.mxfp4=native", "auto, require, dequantize"),
        ("generation.reasoning_effort=max", "low, medium, high"),
        ("engine.mode=sometimes", "auto, always, never"),
        ("engine.attention=flash", "auto, triton, torch"),
    ],
)
def test_a_value_outside_its_choices_fails_naming_the_key_and_the_choices(override, allowed):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"expected one of \[{allowed}\] full_key: {key}"):
        merge_config(ROOT / "configs" / "tiny.yaml", [*REQUIRED, override])


def test_choices_read_and_write_as_plain_strings(tmp_path):
    job = merge_config(ROOT / "configs" / "tiny.yaml", [*REQUIRED, "model.dtype=bfloat16", "engine.mode=never"])
    assert job.engine.mode == "never" and f"engine.mode={job.engine.mode}" == "engine.mode=never"
    assert getattr(torch, job.model.dtype) is torch.bfloat16
    (tmp_path / "written.yaml").write_text(to_yaml(job))
    assert "  dtype: bfloat16\n" in to_yaml(job) and merge_config(tmp_path / "written.yaml") == job
