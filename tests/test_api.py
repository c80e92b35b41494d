"""The Python API (parallel/api.py) on the taught tiny model: in this test's process, as real torchrun jobs (dp=2,
tp=2) that must give the same outputs, and the README's direct-sampling example run as written."""

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict

import pytest
from transformers import GptOssForCausalLM

from parallel.api import LLM
from parallel.engine.interface import Sampling, Work, complete
from parallel.engine.plain import Plain
from parallel.protocol.harmony import render_prompt, stop_tokens
from parallel.protocol.prompts import PromptError
from parallel.protocol.requests import parse_request
from tests.conftest import ROOT
from tests.taught import ANSWER, ARGUMENTS, ASK, CALLED, GREET_REASONING, GREETING, HELLO, LESSONS, THINK, TOOLS

MAX_NEW = 32  # the taught answers' longest is 28 tokens


@pytest.fixture(scope="module")
def llm(taught_model):
    before = set(os.environ)
    with LLM(
        str(ROOT / "configs" / "tiny.yaml"), [f"model.path={taught_model}", f"generation.max_new_tokens={MAX_NEW}"]
    ) as llm:
        yield llm
    assert set(os.environ) <= before, "close() left this process's world of one in its environment"


def outside(llm: LLM) -> dict:
    """The environment for a process of its own: without the world of one that this process's LLM keeps open."""
    return {k: v for k, v in os.environ.items() if k not in llm.added_environment}


@pytest.fixture(scope="module")
def prompts(enc):
    """The taught lessons' prompts, one the model was never taught, and a prompt cut short."""
    lessons = [render_prompt(enc, parse_request(obj, 0), "medium") for obj, _ in LESSONS]
    other = render_prompt(enc, parse_request({"prompt": "Tell me a story."}, 0), "medium")
    return [*lessons, other, lessons[0][:30]]


def test_generate_from_token_ids_gives_the_plain_paths_greedy_tokens(llm, prompts, enc, taught_model):
    model = GptOssForCausalLM.from_pretrained(taught_model).eval()
    reference = complete(
        Plain(model, 1, stop_tokens(enc), 199999), [Work(i, p, MAX_NEW, Sampling()) for i, p in enumerate(prompts)]
    )
    outputs = llm.generate(prompt_token_ids=prompts, max_new_tokens=MAX_NEW)
    assert [o.token_ids for o in outputs] == [reference[i][0] for i in range(len(prompts))]
    assert [o.finish_reason for o in outputs[:3]] == ["stop", "tool_call", "stop"]
    assert (outputs[0].analysis, outputs[0].final, outputs[2].final) == (GREET_REASONING, GREETING, ANSWER)


def test_chat_returns_reasoning_answers_and_tool_calls(llm):
    (hello,) = llm.chat(HELLO)
    assert (hello.analysis, hello.final, hello.finish_reason, hello.error) == (GREET_REASONING, GREETING, "stop", None)
    called, answered = llm.chat([ASK, ASK + CALLED], tools=TOOLS)
    assert (called.analysis, called.tool_calls, called.finish_reason) == (
        THINK,
        [{"name": "get_weather", "arguments": ARGUMENTS}],
        "tool_call",
    )
    assert answered.final == ANSWER


def test_sampled_outputs_depend_on_the_seed_only(llm, prompts):
    """Prompt i samples with seed + i, whatever else the call holds."""
    both = llm.generate(prompts[3:5], max_new_tokens=8, temperature=1.0, seed=7)
    alone = llm.generate(prompts[4:5], max_new_tokens=8, temperature=1.0, seed=8)
    other_seed = llm.generate(prompts[3:4], max_new_tokens=8, temperature=1.0, seed=9)
    assert both[1].token_ids == alone[0].token_ids and both[0].token_ids != other_seed[0].token_ids


def test_bad_arguments_fail_before_anything_runs(llm):
    for kwargs, error in [
        ({"prompt_token_ids": [[]]}, ValueError),
        ({"prompt_token_ids": [[10**7]]}, ValueError),
        ({"prompt_token_ids": [[1, 2]], "max_new_tokens": 10**9}, PromptError),
        ({"prompt_token_ids": [[1, 2]], "temperature": -1}, ValueError),
    ]:
        with pytest.raises(error):
            llm.generate(**kwargs)
    assert llm.chat(HELLO)[0].final == GREETING  # nothing ran, nothing is out of step


@pytest.mark.parametrize(
    "layout", [["parallel.dp=2"], ["parallel.tp=2", "engine.mode=always"]], ids=["dp=2", "tp=2 engine"]
)
def test_a_torchrun_job_gets_the_single_process_outputs(llm, prompts, taught_model, tmp_path, layout):
    calls = [
        ("generate", {"prompt_token_ids": prompts, "max_new_tokens": MAX_NEW}),
        ("chat", {"messages": [ASK, ASK + CALLED], "tools": TOOLS}),
    ]
    (tmp_path / "calls.json").write_text(json.dumps(calls))
    out = tmp_path / "out"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            str(ROOT / "tests" / "api_job.py"),
            str(tmp_path / "calls.json"),
            str(out),
            f"model.path={taught_model}",
            f"generation.max_new_tokens={MAX_NEW}",
            *layout,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=outside(llm),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    expected = [[asdict(o) for o in getattr(llm, method)(**kwargs)] for method, kwargs in calls]
    assert json.loads((tmp_path / "out.0.json").read_text()) == expected
    assert json.loads((tmp_path / "out.1.json").read_text()) == [None, None]  # what the other ranks get


def test_the_docs_direct_sampling_example_runs_as_written(llm, taught_model):
    """docs/python-api.md's code block, with its model swapped for the taught one: harmony renders, the LLM generates
    from token ids, harmony parses; the reasoning and the call go back with the tool's result, and the model answers."""
    page = (ROOT / "docs" / "python-api.md").read_text()
    example = re.search(r"<!-- direct-sampling -->\n```python\n(.*?)```", page, re.S).group(1)
    assert 'LLM("configs/gpt-oss-20b.yaml")' in example
    example = example.replace(
        'LLM("configs/gpt-oss-20b.yaml")', f'LLM("configs/tiny.yaml", ["model.path={taught_model}"])'
    )
    run = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, timeout=300, cwd=ROOT, env=outside(llm)
    )
    assert run.returncode == 0, run.stdout + run.stderr
    printed = [json.loads(line) for line in run.stdout.splitlines()]
    assert [(m.get("channel"), m.get("recipient"), m["content"][0]["text"]) for m in printed] == [
        ("analysis", None, THINK),
        ("commentary", "functions.get_weather", ARGUMENTS),
        ("final", None, ANSWER),
    ]
