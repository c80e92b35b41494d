"""launch/serve.py end to end: real torchrun ranks (tp=2 on gloo), a taught tiny model, the official openai client."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.conftest import ROOT
from tests.taught import (
    ANSWER,
    ARGUMENTS,
    ASK,
    CALLED,
    GREET_REASONING,
    GREETING,
    HELLO,
    THINK,
    TOOLS,
    WEATHER,
)

KEY = "sesame"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, *overrides, nproc=2, env=None):
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), str(ROOT / "launch" / "serve.py"),
           "--config", str(ROOT / "configs" / "tiny.yaml"), f"model.path={model}", f"server.port={port}",
           "generation.max_new_tokens=64", *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail(f"server did not come up:\n{proc.stdout.read()}")


def stop_server(proc) -> str:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return out


@pytest.fixture(scope="module")
def server(taught_model):
    """tp=2 through the engine (what a GPU gets by default), the API key from the environment."""
    proc, url = start_server(taught_model, "parallel.tp=2", "engine.mode=always", "generation.batch_size=16", env={"GPT_OSS_API_KEY": KEY})
    yield url
    assert "generation: the engine" in stop_server(proc)  # the engine served, not the plain fallback


@pytest.fixture(scope="module")
def client(server, taught_model):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0), str(taught_model)


def health(url) -> dict:
    return json.load(urllib.request.urlopen(f"{url}/health"))


def post(url, path, body: bytes, key=KEY) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}{path}", data=body, headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_models_lists_the_served_model(client):
    api, model = client
    assert [m.id for m in api.models.list().data] == [model]


def test_chat_completion_returns_reasoning_and_answer(client):
    api, model = client
    r = api.chat.completions.create(model=model, messages=HELLO)
    message = r.choices[0].message
    assert (message.content, message.reasoning, r.choices[0].finish_reason) == (GREETING, GREET_REASONING, "stop")
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0


def test_streamed_chat_completion_builds_the_same_answer(client):
    api, model = client
    chunks = list(api.chat.completions.create(model=model, messages=HELLO, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == GREETING
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == GREET_REASONING
    assert len([d for d in deltas if d.content]) > 1, "the answer came in one piece, not streamed"
    assert chunks[-1].usage.completion_tokens > 0


def test_responses_returns_reasoning_answer_and_usage(client):
    api, model = client
    r = api.responses.create(model=model, input="Say hello.")
    assert r.output_text == GREETING
    assert [i.type for i in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == GREET_REASONING
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0 and r.usage.output_tokens_details.reasoning_tokens > 0


def test_chat_tool_call_round_trip(client):
    api, model = client
    first = api.chat.completions.create(model=model, messages=ASK, tools=TOOLS)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert (call.function.name, call.function.arguments) == ("get_weather", ARGUMENTS)
    assert choice.message.reasoning == THINK

    assistant = {"role": "assistant", "content": None, "reasoning": THINK, "tool_calls": [call.model_dump()]}
    tool = {"role": "tool", "tool_call_id": call.id, "content": CALLED[1]["content"]}
    second = api.chat.completions.create(model=model, messages=[*ASK, assistant, tool], tools=TOOLS)
    assert (second.choices[0].message.content, second.choices[0].finish_reason) == (ANSWER, "stop")


def test_chat_tool_call_streams(client):
    api, model = client
    deltas = [c.choices[0] for c in api.chat.completions.create(model=model, messages=ASK, tools=TOOLS, stream=True)]
    calls = [tc for d in deltas for tc in d.delta.tool_calls or []]
    assert calls[0].function.name == "get_weather" and calls[0].id
    assert "".join(tc.function.arguments or "" for tc in calls) == ARGUMENTS and len(calls) > 2
    assert deltas[-1].finish_reason == "tool_calls"
    assert not any(d.delta.content for d in deltas)


def test_responses_tool_call_round_trip(client):
    api, model = client
    tools = [{"type": "function", **WEATHER}]
    first = api.responses.create(model=model, input=ASK, tools=tools)
    call = next(i for i in first.output if i.type == "function_call")
    assert (call.name, call.arguments) == ("get_weather", ARGUMENTS)
    follow_up = [*ASK, *(i.model_dump(exclude_none=True) for i in first.output),
                 {"type": "function_call_output", "call_id": call.call_id, "output": CALLED[1]["content"]}]
    second = api.responses.create(model=model, input=follow_up, tools=tools)
    assert second.output_text == ANSWER


def test_responses_function_call_streams(client):
    api, model = client
    events = list(api.responses.create(model=model, input=ASK, tools=[{"type": "function", **WEATHER}], stream=True))
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert "".join(deltas) == ARGUMENTS and len(deltas) > 2
    assert events[-1].type == "response.completed" and events[-1].response.usage.output_tokens > 0


def test_concurrent_requests_are_batched(client, server):
    api, model = client
    before = health(server)["largest_batch"]
    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(lambda i: api.chat.completions.create(model=model, messages=HELLO, max_tokens=20), range(32)))
    assert [r.choices[0].message.content for r in replies] == [GREETING] * 32
    assert max(before, 1) < health(server)["largest_batch"] <= 16


@pytest.mark.parametrize(
    "body, status, says",
    [
        (b'{"model": ', 400, "not valid JSON"),
        (json.dumps({"model": "gpt-5", "messages": HELLO}).encode(), 404, "does not exist"),
        (json.dumps({"model": "{model}"}).encode(), 400, "messages is required"),
        (json.dumps({"model": "{model}", "messages": "hi"}).encode(), 400, "messages"),
        (json.dumps({"model": "{model}", "messages": HELLO, "temperature": "hot"}).encode(), 400, "temperature"),
        (json.dumps({"model": "{model}", "messages": HELLO, "max_tokens": 10**6}).encode(), 400, "exceed the model's context"),
        (json.dumps({"model": "{model}", "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "unknown role"),
    ],
)
def test_bad_request_gets_its_error_and_the_server_keeps_serving(client, server, body, status, says):
    api, model = client
    code, reply = post(server, "/v1/chat/completions", body.replace(b"{model}", model.encode()))
    assert code == status and says in reply["error"]["message"], reply
    assert api.chat.completions.create(model=model, messages=HELLO).choices[0].message.content == GREETING


def test_wrong_api_key_is_refused(client, server):
    api, model = client
    code, reply = post(server, "/v1/chat/completions", json.dumps({"model": model, "messages": HELLO}).encode(), key="wrong")
    assert code == 401 and reply["error"]["code"] == "invalid_api_key"


def test_a_request_joins_while_a_long_one_is_generating(client):
    """Continuous batching across requests: the short request does not wait for the long one to end."""
    api, model = client
    long = api.chat.completions.create(model=model, messages=HELLO, max_tokens=3000, stream=True, extra_body={"ignore_eos": True})
    with ThreadPoolExecutor(1) as pool:
        streamed = pool.submit(lambda: sum(1 for _ in long))
        short = api.chat.completions.create(model=model, messages=HELLO, max_tokens=20, extra_body={"ignore_eos": True})
        assert short.usage.completion_tokens == 20 and not streamed.done()
        long.close()


def test_client_that_disconnects_frees_its_row(client, server):
    api, model = client
    stream = api.chat.completions.create(model=model, messages=HELLO, max_tokens=3000, stream=True, extra_body={"ignore_eos": True})
    for _, _ in zip(stream, range(5)):
        pass
    stream.close()
    deadline = time.monotonic() + 20
    while (h := health(server))["running_batches"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert h["running_batches"] == 0 and h["requests_in_flight"] == 0, h


def test_sigterm_drains_requests_in_flight(taught_model):
    """Two replicas (dp=2) on the plain path: a request in flight when SIGTERM arrives is answered in full; then
    every rank exits."""
    proc, url = start_server(taught_model, "parallel.dp=2", "engine.mode=never")
    api = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(api.chat.completions.create, model=str(taught_model), messages=HELLO, max_tokens=300,
                              extra_body={"ignore_eos": True})
        while not health(url)["running_batches"]:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        reply = pending.result(timeout=60)
    assert reply.usage.completion_tokens == 300 and reply.choices[0].finish_reason == "length"
    out, _ = proc.communicate(timeout=60)
    assert "draining" in out and "served 1 requests" in out and "generation: plain" in out, out
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/health", timeout=2)
