import pytest

from parallel.config import ConfigError, merge_config
from tests.conftest import ROOT

REQUIRED = ["data.input=in.jsonl", "data.output=out.jsonl"]


@pytest.mark.parametrize("name", ["tiny", "gpt-oss-20b", "gpt-oss-120b"])
def test_shipped_configs_load(name):
    job = merge_config(ROOT / "configs" / f"{name}.yaml", REQUIRED)
    assert job.data.input == "in.jsonl"


def test_overrides_reach_typed_fields():
    job = merge_config(ROOT / "configs" / "tiny.yaml", [*REQUIRED, "parallel.tp=2", "generation.temperature=0.7", "output.raw=true"])
    assert (job.parallel.tp, job.generation.temperature, job.output.raw) == (2, 0.7, True)


@pytest.mark.parametrize(
    "override, named",
    [
        ("parallel.tpp=2", "parallel.tpp"),
        ("parallel.tp=two", "parallel.tp"),
        ("generation.max_new_tokens=1.5", "generation.max_new_tokens"),
        ("model.dtype=fp8", "model.dtype"),
        ("generation.top_p=0", "generation.top_p"),
        ("server.max_body_bytes=0", "server.max_body_bytes"),
        ("server.request_timeout_s=-1", "server.request_timeout_s"),
    ],
)
def test_bad_values_fail_naming_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        merge_config(ROOT / "configs" / "tiny.yaml", [*REQUIRED, override])


def test_missing_output_is_named():
    with pytest.raises(ConfigError, match=r"data\.output"):
        merge_config(ROOT / "configs" / "tiny.yaml", ["data.input=in.jsonl"], required=("data.input", "data.output"))
