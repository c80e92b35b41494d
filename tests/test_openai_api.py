"""The API edge without a model: request bodies to harmony conversations, harmony tokens to replies."""

import json

import pytest

from parallel.protocol.harmony import HarmonyStream, render_prompt
from parallel.protocol.requests import message_text
from parallel.serve.openai_api import ApiError, chat_call, responses_call
from parallel.serve.replies import ChatReply, ResponsesReply
from tests.taught import ARGUMENTS, ASK, CALLED, THINK, TOOLS, WEATHER


def reply_to(enc, reply, text: str, reason: str):
    stream = HarmonyStream(enc)
    tokens = enc.encode(text, allowed_special="all")
    chunks = [*reply.start()]
    for token in tokens:
        for event in stream.feed(token):
            chunks += reply.on(event)
    chunks += reply.finish(reason, stream.finish(reason != "length"), len(tokens))
    return chunks, reply.result()


def test_responses_input_renders_like_the_same_chat(enc):
    chat = chat_call({"model": "m", "messages": [*ASK, *CALLED], "tools": TOOLS}, "m")
    items = [
        *ASK,
        {"type": "reasoning", "content": [{"type": "reasoning_text", "text": THINK}]},
        {"type": "function_call", "call_id": "c9", "name": "get_weather", "arguments": ARGUMENTS},
        {"type": "function_call_output", "call_id": "c9", "output": CALLED[1]["content"]},
    ]
    responses = responses_call({"model": "m", "input": items, "tools": [{"type": "function", **WEATHER}]}, "m")
    assert render_prompt(enc, responses.request, "low") == render_prompt(enc, chat.request, "low")


def test_tool_call_becomes_tool_calls_not_content(enc):
    text = f"<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{ARGUMENTS}<|call|>"
    chunks, result = reply_to(enc, ChatReply(enc, "m", 10, False), text, "tool_call")
    message = result["choices"][0]["message"]
    assert message["content"] is None and message["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": ARGUMENTS,
    }
    assert result["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[1]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_broken_harmony_is_a_reply_with_what_parsed(enc):
    text = "<|channel|>final<|message|>Partly<|end|><|start|><|start|><|message|>x<|return|>"
    _, result = reply_to(enc, ResponsesReply(enc, "m", 10, 100), text, "stop")
    assert result["output"][0]["content"][0]["text"] == "Partly"
    assert "not valid harmony" in result["harmony_error"] and "<|" not in str(result["output"])
    assert result["usage"]["output_tokens"] > 0


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": ASK}, "model"),
        ({"model": "m", "messages": ASK, "n": 2}, "n"),
        ({"model": "m", "messages": ASK, "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "messages": ASK, "stream": "yes"}, "stream"),
        ({"model": "m", "messages": ASK, "tool_choice": "required", "tools": TOOLS}, "tool_choice"),
    ],
)
def test_bad_chat_bodies_name_the_parameter(body, param):
    with pytest.raises(ApiError) as e:
        chat_call(body, "m")
    assert e.value.status == 400 and e.value.param == param


def test_chat_reply_carries_the_chain_of_thought_as_reasoning(enc):
    """`reasoning`, not `reasoning_content`: the field OpenAI's gpt-oss guides ask for, and the only one the Agents SDK
    passes back (it keeps a `reasoning_content` as a summary and sends it nowhere)."""
    text = f"<|channel|>analysis<|message|>{THINK}<|end|><|start|>assistant<|channel|>final<|message|>Hi<|return|>"
    chunks, result = reply_to(enc, ChatReply(enc, "m", 10, False), text, "stop")
    assert (
        result["choices"][0]["message"]["reasoning"] == THINK
        and "reasoning_content" not in result["choices"][0]["message"]
    )
    assert "".join(c["choices"][0]["delta"].get("reasoning", "") for c in chunks) == THINK


RESPONSES_BODY = {"model": "m", "input": ASK}


@pytest.mark.parametrize(
    "field, value",
    [
        ("previous_response_id", "resp_1"),
        ("conversation", "conv_1"),
        ("background", True),
        ("truncation", "auto"),
        ("text", {"format": {"type": "json_schema", "name": "x", "schema": {}}}),
        ("include", ["message.output_text.logprobs"]),
        ("top_logprobs", 2),
    ],
)
def test_responses_fields_the_server_cannot_honour_are_refused_by_name(field, value):
    with pytest.raises(ApiError) as e:
        responses_call({**RESPONSES_BODY, field: value}, "m")
    assert e.value.status == 400 and e.value.param == field and field in str(e.value)


@pytest.mark.parametrize(
    "field, value", [("response_format", {"type": "json_object"}), ("logprobs", True), ("presence_penalty", 0.5)]
)
def test_chat_fields_the_server_cannot_honour_are_refused_by_name(field, value):
    with pytest.raises(ApiError) as e:
        chat_call({"model": "m", "messages": ASK, field: value}, "m")
    assert e.value.status == 400 and e.value.param == field


def test_what_the_agents_sdk_may_send_is_accepted():
    """The fields the Agents SDK sends from its ModelSettings that change nothing here, and tool outputs as parts."""
    body = {
        **RESPONSES_BODY,
        "include": ["reasoning.encrypted_content"],
        "store": False,
        "parallel_tool_calls": True,
        "metadata": {"run": "1"},
        "text": {"format": {"type": "text"}, "verbosity": "low"},
        "truncation": "disabled",
        "reasoning": {"effort": "high", "summary": "auto"},
        "tool_choice": "auto",
        "instructions": "Be brief.",
    }
    call = responses_call(body, "m")
    assert call.request.reasoning_effort == "high" and call.request.messages[0] == {
        "role": "system",
        "content": "Be brief.",
    }
    parts = [
        {"type": "function_call", "call_id": "c", "name": "get_weather", "arguments": ARGUMENTS},
        {
            "type": "function_call_output",
            "call_id": "c",
            "output": [{"type": "input_text", "text": CALLED[1]["content"]}],
        },
    ]
    tool = responses_call({**RESPONSES_BODY, "input": ASK + parts}, "m").request.messages[-1]
    assert tool["role"] == "tool" and message_text(tool["content"]) == CALLED[1]["content"]


def test_completion_text_is_decoded_across_tokens(enc):
    """A character whose bytes span tokens arrives whole, once, whichever token boundaries the arrivals cut."""
    from parallel.serve.replies import CompletionReply

    text = "a🦜b𓀀<|return|>"
    tokens = enc.encode(text, allowed_special="all")
    reply = CompletionReply(enc, "m", 3, include_usage=True)
    pieces = [c["choices"][0]["text"] for t in tokens for c in reply.tokens([t])]
    *last, usage = reply.end("stop")
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert reply.result()["choices"][0] == {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}
    assert usage["usage"] == {"prompt_tokens": 3, "completion_tokens": len(tokens), "total_tokens": 3 + len(tokens)}


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "m"}, "prompt"),
        ({"model": "m", "prompt": ""}, "prompt"),
        ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "m", "prompt": [1, True]}, "prompt"),
        ({"model": "m", "prompt": "x", "stop": ["\n"]}, "stop"),
        ({"model": "m", "prompt": "x", "echo": True}, "echo"),
        ({"model": "m", "prompt": "x", "seed": 2**64}, "seed"),
        ({"model": "m", "prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"model": "m", "prompt": "x", "stream_options": "yes"}, "stream_options"),
    ],
)
def test_bad_completion_bodies_name_the_parameter(body, param):
    from parallel.serve.openai_api import completion_call

    with pytest.raises(ApiError) as e:
        completion_call(body, "m")
    assert e.value.status == 400 and e.value.param == param


def test_seed_and_a_null_n_are_taken():
    call = chat_call(
        {"model": "m", "messages": ASK, "n": None, "seed": -5, "max_completion_tokens": None, "max_tokens": 7}, "m"
    )
    assert (call.options.seed, call.options.max_tokens) == (-5, 7)


def test_api_error_survives_a_worker_process():
    import pickle

    e = pickle.loads(pickle.dumps(ApiError(400, "bad", "prompt", "code")))
    assert (e.status, str(e), e.param, e.code) == (400, "bad", "prompt", "code")


@pytest.mark.parametrize(
    "api, body, key",
    [
        ("chat", {"messages": ASK, "max_tokens": 10**6}, "max_tokens"),
        ("chat", {"messages": ASK, "max_completion_tokens": 10**6}, "max_completion_tokens"),
        ("responses", {"input": "Hi", "max_output_tokens": 10**6}, "max_output_tokens"),
        ("completions", {"prompt": "Hi", "max_tokens": 10**6}, "max_tokens"),
    ],
)
def test_a_budget_beyond_the_context_is_named_as_the_request_names_it(api, body, key):
    from parallel.config import GenerationConfig
    from parallel.serve.prepare import Settings, prepare

    settings = Settings("m", GenerationConfig(), context=4096, vocab=201088)
    with pytest.raises(ApiError) as e:
        prepare(api, json.dumps({"model": "m", **body}).encode(), settings)
    assert (
        e.value.status == 400 and e.value.param == key and f"{key} 1000000 exceed the model's context" in str(e.value)
    )
