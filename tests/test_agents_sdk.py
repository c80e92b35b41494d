"""The OpenAI Agents SDK against launch/serve.py (one process under torchrun, through the engine): an agent with a
@function_tool, run and streamed, through both of the SDK's OpenAI models. The tiny model was taught the very requests
the SDK sends (tests/taught.py), so the run must go: a reasoned call to the tool, the tool, the taught answer."""

import asyncio
import json
import re
import subprocess
import sys

import pytest
from agents import Agent, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
from openai import AsyncOpenAI, DefaultAsyncHttpxClient

from parallel.protocol.harmony import render_prompt
from parallel.protocol.requests import parse_request
from parallel.serve.openai_api import chat_call, responses_call
from tests.conftest import ROOT
from tests.taught import ANSWER, ASK, LESSONS, TEMPERATURE, WEATHER
from tests.test_server import start_server, stop_server

set_tracing_disabled(True)  # the SDK would export its traces to OpenAI: no network here, and none wanted


@pytest.fixture(scope="module")
def server(taught_model):
    proc, url = start_server(taught_model, "engine.mode=always", nproc=1)
    yield url
    assert "generation: the engine" in stop_server(proc)


async def run(agent: Agent, streamed: bool):
    if not streamed:
        return await Runner.run(agent, ASK[0]["content"])
    result = Runner.run_streamed(agent, ASK[0]["content"])
    kinds = {event.data.type async for event in result.stream_events() if event.type == "raw_response_event"}
    assert {
        "response.function_call_arguments.delta",
        "response.output_text.delta",
    } <= kinds  # streamed, not in one piece
    return result


def rendered(enc, path: str, body: dict, model: str) -> list[int]:
    """A request as the server renders it for the model."""
    call = (responses_call if path.endswith("/responses") else chat_call)(body, model)
    return render_prompt(enc, call.request, "medium")


@pytest.mark.parametrize("streamed", [False, True], ids=["run", "run_streamed"])
@pytest.mark.parametrize(
    "kind", [OpenAIResponsesModel, OpenAIChatCompletionsModel], ids=["responses", "chat_completions"]
)
def test_agent_calls_its_tool_and_answers(server, taught_model, enc, kind, streamed):
    sent, calls = [], []

    async def record(request):
        sent.append((request.url.path, json.loads(request.content)))

    @function_tool
    def get_weather(city: str) -> str:
        """The weather now"""
        calls.append(city)
        return TEMPERATURE

    assert get_weather.params_json_schema == WEATHER["parameters"], "the SDK describes the tool otherwise than taught"
    client = AsyncOpenAI(
        base_url=f"{server}/v1",
        api_key="unused",
        max_retries=0,
        http_client=DefaultAsyncHttpxClient(event_hooks={"request": [record]}),
    )
    agent = Agent(name="Assistant", model=kind(model=str(taught_model), openai_client=client), tools=[get_weather])
    result = asyncio.run(run(agent, streamed))
    assert calls == ["Paris"] and result.final_output == ANSWER
    # The SDK's two requests render as the two lessons: the question; then the question, the reasoning the SDK was
    # given and passed back, the call and the tool's output. A request rendered otherwise would have got noise.
    taught = [render_prompt(enc, parse_request(obj, 0), "medium") for obj, _ in LESSONS[1:]]
    assert [rendered(enc, path, body, str(taught_model)) for path, body in sent] == taught


def test_the_docs_agent_example_runs_as_written(server, taught_model):
    """docs/serving.md's block, pointed at this server and its model instead of the demo's."""
    page = (ROOT / "docs" / "serving.md").read_text()
    example = re.search(r"<!-- agents-sdk -->\n```python\n(.*?)```", page, re.S).group(1)
    assert example.count("http://127.0.0.1:8000/v1") == 1 and example.count('model="builtin:tiny"') == 1
    example = example.replace("http://127.0.0.1:8000/v1", f"{server}/v1").replace(
        'model="builtin:tiny"', f'model="{taught_model}"'
    )
    run = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout == ANSWER + "\n", run.stdout + run.stderr
