"""launch/serve.py end to end: real torchrun ranks (tp=2 on gloo), a taught tiny model, the official openai client."""

import json
import os
import signal
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from parallel.protocol.harmony import render_prompt
from parallel.protocol.requests import parse_request
from tests.serving import KEY, health, post, start_server, stop_server, wait_until
from tests.taught import (
    ANSWER,
    ARGUMENTS,
    ASK,
    CALLED,
    GREET_REASONING,
    GREETING,
    HELLO,
    LESSONS,
    THINK,
    TOOLS,
    WEATHER,
)


@pytest.fixture(scope="module")
def server(taught_model):
    """tp=2 through the engine (what a GPU gets by default), the API key from the environment."""
    proc, url = start_server(
        taught_model,
        "parallel.tp=2",
        "engine.mode=always",
        "generation.batch_size=16",
        "engine.slots=16",
        env={"GPT_OSS_API_KEY": KEY},
    )
    yield url
    assert "generation: the engine" in stop_server(proc)  # the engine served, not the plain fallback


@pytest.fixture(scope="module")
def client(server, taught_model):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0), str(taught_model)


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
    chunks = list(
        api.chat.completions.create(model=model, messages=HELLO, stream=True, stream_options={"include_usage": True})
    )
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
    follow_up = [
        *ASK,
        *(i.model_dump(exclude_none=True) for i in first.output),
        {"type": "function_call_output", "call_id": call.call_id, "output": CALLED[1]["content"]},
    ]
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
        replies = list(
            pool.map(lambda i: api.chat.completions.create(model=model, messages=HELLO, max_tokens=20), range(32))
        )
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
        (
            json.dumps({"model": "{model}", "messages": HELLO, "max_tokens": 10**6}).encode(),
            400,
            "exceed the model's context",
        ),
        (
            json.dumps({"model": "{model}", "messages": [{"role": "wizard", "content": "x"}]}).encode(),
            400,
            "unknown role",
        ),
        # Fields that would change the reply are refused, never ignored.
        (json.dumps({"model": "{model}", "messages": HELLO, "stop": ["\n"]}).encode(), 400, "stop"),
        (json.dumps({"model": "{model}", "messages": HELLO, "logit_bias": {"9": 100}}).encode(), 400, "logit_bias"),
        (
            json.dumps({"model": "{model}", "messages": HELLO, "functions": [WEATHER]}).encode(),
            400,
            "send them as tools",
        ),
    ],
)
def test_bad_request_gets_its_error_and_the_server_keeps_serving(client, server, body, status, says):
    api, model = client
    code, reply = post(server, "/v1/chat/completions", body.replace(b"{model}", model.encode()))
    assert code == status and says in reply["error"]["message"], reply
    assert api.chat.completions.create(model=model, messages=HELLO).choices[0].message.content == GREETING


@pytest.mark.parametrize("field, value", [("reasoning", "high"), ("instructions", 5), ("tools", {})])
def test_responses_fields_of_the_wrong_type_are_refused_by_name(client, server, field, value):
    """Not ignored: a client that sent them would get a reply that silently lacks what it asked for."""
    _, model = client
    code, reply = post(server, "/v1/responses", json.dumps({"model": model, "input": "Hi", field: value}).encode())
    assert code == 400 and reply["error"]["param"] == field, reply


def test_wrong_api_key_is_refused(client, server):
    api, model = client
    code, reply = post(
        server, "/v1/chat/completions", json.dumps({"model": model, "messages": HELLO}).encode(), key="wrong"
    )
    assert code == 401 and reply["error"]["code"] == "invalid_api_key"


def test_a_request_joins_while_a_long_one_is_generating(client):
    """Continuous batching across requests: the short request does not wait for the long one to end."""
    api, model = client
    long = api.chat.completions.create(
        model=model, messages=HELLO, max_tokens=3000, stream=True, extra_body={"ignore_eos": True}
    )
    with ThreadPoolExecutor(1) as pool:
        streamed = pool.submit(lambda: sum(1 for _ in long))
        short = api.chat.completions.create(model=model, messages=HELLO, max_tokens=20, extra_body={"ignore_eos": True})
        assert short.usage.completion_tokens == 20 and not streamed.done()
        long.close()


def test_client_that_disconnects_frees_its_row(client, server):
    api, model = client
    stream = api.chat.completions.create(
        model=model, messages=HELLO, max_tokens=3000, stream=True, extra_body={"ignore_eos": True}
    )
    for _, _ in zip(stream, range(5)):
        pass
    stream.close()
    deadline = time.monotonic() + 20
    while (h := health(server))["running_batches"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert h["running_batches"] == 0 and h["requests_in_flight"] == 0, h


def test_a_request_that_leaves_while_waiting_for_a_plain_batch_never_runs(taught_model):
    """The plain path runs one batch at a time: a request waiting behind it whose client leaves must not run later."""
    proc, url = start_server(taught_model, "engine.mode=never", "generation.batch_size=1", nproc=1)
    api, model = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0), str(taught_model)
    try:
        streams = [
            api.chat.completions.create(
                model=model, messages=HELLO, max_tokens=3000, stream=True, extra_body={"ignore_eos": True}
            )
            for _ in range(2)
        ]
        next(iter(streams[0]))  # the first is generating, the second waits behind it on the replica
        wait_until(lambda: health(url)["running"] == 2, "both requests on the replica")
        streams[1].close()
        # Its abort reaches the replica mid-batch. Nothing outside the replica shows it there before the batch ends
        # (the plain path reports between batches), so this waits a while rather than for an event.
        time.sleep(1)
        streams[0].close()
        deadline = time.monotonic() + 20
        while (h := health(url))["running_batches"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert h["running_batches"] == 0 and h["requests_in_flight"] == 0, h
    finally:
        stop_server(proc)


def test_sigterm_drains_requests_in_flight(taught_model):
    """Two replicas (dp=2) on the plain path: a request in flight when SIGTERM arrives is answered in full; then
    every rank exits."""
    proc, url = start_server(taught_model, "parallel.dp=2", "engine.mode=never")
    api = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            api.chat.completions.create,
            model=str(taught_model),
            messages=HELLO,
            max_tokens=300,
            extra_body={"ignore_eos": True},
        )
        wait_until(lambda: health(url)["running_batches"], "the request to start generating")
        os.killpg(proc.pid, signal.SIGTERM)
        reply = pending.result(timeout=60)
    assert reply.usage.completion_tokens == 300 and reply.choices[0].finish_reason == "length"
    out, _ = proc.communicate(timeout=60)
    assert "draining" in out and "served 1 requests" in out and "generation: plain" in out, out
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/health", timeout=2)


def parent_of(pid: int) -> int:
    """The parent process of `pid` (-1 once it has ended), from /proc."""
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def running(pid: int) -> bool:
    """`pid` exists and is not a zombie waiting to be reaped."""
    try:
        return "zombie" not in open(f"/proc/{pid}/status").read()
    except OSError:
        return False


def api_process_of(job: int) -> int:
    """The server's API process among a job's processes: the one rank 0 spawned (multiprocessing's spawn_main)."""

    def cmdline(pid):
        try:
            return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            return ""

    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    family = {job}
    for _ in range(3):  # torchrun -> ranks -> their children
        family |= {p for p in pids if parent_of(p) in family}
    spawned = [p for p in family if "spawn_main" in cmdline(p) and "serve.py" in cmdline(parent_of(p))]
    assert len(spawned) == 1, [cmdline(p) for p in family]
    return spawned[0]


def test_an_api_process_that_dies_ends_the_job(taught_model):
    """The API process (HTTP, replies, dispatcher) killed: every rank exits, saying why (rank 0, or the other
    replica's leader, whichever notices first), rather than serve no one."""
    proc, _ = start_server(taught_model, "parallel.dp=2", "engine.mode=never")
    os.kill(api_process_of(proc.pid), signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    said = "the server's API process died" in out or "the link to the dispatcher is gone" in out
    assert proc.returncode != 0 and said and "]: Traceback" not in out, out  # no rank died in a traceback


def test_rank_0_killed_takes_its_api_process_and_port_with_it(taught_model):
    """Rank 0 dies without a word (SIGKILL, the OOM killer): its API process, which ignores SIGTERM, does not live on
    holding the port; a new server can listen on it."""
    proc, url = start_server(taught_model, "engine.mode=always", nproc=1)
    api = api_process_of(proc.pid)
    os.kill(parent_of(api), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while running(api) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(api)
    stop_server(proc)
    with socket.socket() as again:  # as the server binds: SO_REUSEADDR, so only a listener still there is in the way
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        again.listen()


def hello_tokens(enc) -> list[int]:
    """The hello lesson's prompt as the server renders it, for the raw Completions API."""
    return render_prompt(enc, parse_request({"messages": HELLO}, 0), "medium")


def test_completion_continues_a_raw_prompt(client, enc):
    """Token ids or the same prompt as text (special tokens written out): the taught harmony answer, as text."""
    api, model = client
    ids = hello_tokens(enc)
    by_ids = api.completions.create(model=model, prompt=ids, max_tokens=64)
    by_text = api.completions.create(model=model, prompt=enc.decode(ids), max_tokens=64)
    assert by_ids.choices[0].text == by_text.choices[0].text == LESSONS[0][1]
    assert by_ids.choices[0].finish_reason == "stop" and by_ids.usage.prompt_tokens == len(ids)


def test_streamed_completion_builds_the_same_text(client, enc):
    api, model = client
    chunks = list(
        api.completions.create(
            model=model, prompt=hello_tokens(enc), max_tokens=64, stream=True, stream_options={"include_usage": True}
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == LESSONS[0][1] and len([t for t in texts if t]) > 1
    assert chunks[-1].usage.completion_tokens == len(enc.encode(LESSONS[0][1], allowed_special="all"))


def test_completion_runs_to_max_tokens_with_ignore_eos(client, enc):
    """What benchmarks on random weights send: a fixed number of tokens, whatever they are."""
    api, model = client
    r = api.completions.create(model=model, prompt=hello_tokens(enc), max_tokens=40, extra_body={"ignore_eos": True})
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (40, "length")


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": [0, 10**7]}, "prompt"),
        ({"prompt": "hi", "max_tokens": 10**6}, "max_tokens"),
        ({"prompt": "hi", "stop": "."}, "stop"),
        ({"prompt": "hi", "frequency_penalty": 1.0}, "frequency_penalty"),
        ({"prompt": "hi", "logit_bias": {"9": 100}}, "logit_bias"),
    ],
)
def test_bad_completion_is_refused_naming_the_field(client, server, body, param):
    api, model = client
    code, reply = post(server, "/v1/completions", json.dumps({"model": model, **body}).encode())
    assert code == 400 and reply["error"]["param"] == param, reply


def test_seed_makes_sampling_repeatable(client):
    api, model = client

    def sample(seed):
        return (
            api.completions.create(
                model=model,
                prompt="Once upon a time",
                max_tokens=12,
                temperature=2,
                seed=seed,
                extra_body={"ignore_eos": True},
            )
            .choices[0]
            .text
        )

    assert sample(1) == sample(1)
    assert len({sample(seed) for seed in range(2, 6)}) > 1
    chat = [
        api.chat.completions.create(model=model, messages=HELLO, temperature=2, seed=9, max_tokens=12)
        .choices[0]
        .message
        for _ in range(2)
    ]
    # Tool-call ids are fresh per reply by design; what the model said must repeat.
    said = [(m.content, m.reasoning, [c.function for c in m.tool_calls or []]) for m in chat]
    assert said[0] == said[1]


def test_streamed_replies_say_where_harmony_broke_as_whole_ones_do(client):
    """Sampled hot from a prompt it was not taught, the model writes noise, which is not harmony: the whole reply
    carries `harmony_error`, and the stream of the same tokens (same seed) says the same on its last event, rather
    than end as if nothing broke. (Completions decode tokens as text and parse no harmony: nothing to say there.)"""
    api, model = client
    hot = {"model": model, "temperature": 2, "extra_body": {"seed": 7}}
    chat = dict(hot, messages=[{"role": "user", "content": "Once upon a time"}], max_tokens=24)
    whole = api.chat.completions.create(**chat).choices[0]
    error = whole.model_extra.get("harmony_error")
    assert error and "not valid harmony" in error, whole
    chunks = list(api.chat.completions.create(**chat, stream=True, stream_options={"include_usage": True}))
    last = [c.choices[0] for c in chunks if c.choices][-1]
    assert (last.finish_reason, last.model_extra.get("harmony_error")) == (whole.finish_reason, error)
    assert not any(
        c.choices[0].model_extra.get("harmony_error") for c in chunks if c.choices and c.choices[0] is not last
    )

    response = dict(hot, input="Once upon a time", max_output_tokens=24)
    whole = api.responses.create(**response)
    error = whole.model_extra.get("harmony_error")
    assert error and "not valid harmony" in error, whole
    events = list(api.responses.create(**response, stream=True))
    assert events[-1].type == f"response.{whole.status}"
    assert events[-1].response.model_extra.get("harmony_error") == error


def test_requests_cut_by_the_drain_deadline_say_so(taught_model):
    """server.drain_timeout_s passes with requests still generating: the streamed one ends with an error event and
    the other is a 503, never a 200 that looks complete; meanwhile /health says draining and new requests get 503."""
    proc, url = start_server(taught_model, "engine.mode=always", "server.drain_timeout_s=3", nproc=1)
    api, model = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0), str(taught_model)
    long = dict(model=model, max_tokens=4000, extra_body={"ignore_eos": True})
    with ThreadPoolExecutor(1) as pool:
        whole = pool.submit(api.completions.create, prompt="Hi", **long)
        stream = api.chat.completions.create(messages=HELLO, stream=True, **long)
        wait_until(lambda: (h := health(url))["running_batches"] and h["requests_in_flight"] == 2, "both generating")
        os.killpg(proc.pid, signal.SIGTERM)
        wait_until(lambda: health(url)["status"] == "draining", "the drain to start")
        assert post(url, "/v1/chat/completions", json.dumps({"model": model, "messages": HELLO}).encode())[0] == 503
        with pytest.raises(openai.APIError, match="drain_timeout_s"):
            list(stream)
        with pytest.raises(openai.APIStatusError, match="drain_timeout_s") as cut:
            whole.result(timeout=60)
    assert cut.value.status_code == 503
    out, _ = proc.communicate(timeout=60)
    assert "2 unfinished requests cut" in out, out


def test_a_request_that_turns_the_model_nan_fails_alone_over_http(tmp_path, enc):
    """The server on a checkpoint whose embeddings are NaN for one word's tokens: the request with that word is a
    500 that names the NaN, not a reply of one token repeated; the server answers the next request."""
    from tests.conftest import nan_for

    broken, clean = {"prompt": "xylophone"}, {"prompt": "Question 1"}
    checkpoint = nan_for(tmp_path / "checkpoint", enc, broken, [clean])
    proc, url = start_server(checkpoint, "engine.mode=always", "generation.max_new_tokens=4", nproc=1)
    try:

        def chat(text):
            return post(
                url,
                "/v1/chat/completions",
                json.dumps({"model": str(checkpoint), "messages": [{"role": "user", "content": text}]}).encode(),
            )

        code, reply = chat(broken["prompt"])
        assert (
            code == 500 and "the model's logits were NaN (not a number) at new token 1" in reply["error"]["message"]
        ), reply
        code, reply = chat(clean["prompt"])
        assert code == 200 and reply["usage"]["completion_tokens"] > 0, reply
    finally:
        stop_server(proc)
