import json

import pytest

from parallel.protocol.harmony import conversation, parse_completion, render_prompt
from parallel.protocol.requests import parse_line

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def request(**fields):
    return parse_line(json.dumps({"id": "r", **fields}), 1)


def completion(enc, text):
    return enc.encode(text, allowed_special="all")


def test_prompt_carries_effort_instructions_and_no_date(enc):
    req = request(
        messages=[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
        reasoning_effort="high",
    )
    text = enc.decode(render_prompt(enc, req, default_effort="medium"))
    assert "Reasoning: high" in text
    assert "<|start|>developer<|message|># Instructions\n\nBe terse." in text
    assert "Current date" not in text
    assert text.endswith("<|start|>user<|message|>Hi<|end|><|start|>assistant")


def test_effort_defaults_and_date_only_when_configured(enc):
    text = enc.decode(render_prompt(enc, request(prompt="Hi"), default_effort="low", date="2026-11-23"))
    assert "Reasoning: low" in text and "Current date: 2026-11-23" in text


def test_function_tools_render_in_the_functions_namespace(enc):
    text = enc.decode(render_prompt(enc, request(prompt="Weather in Paris?", tools=[WEATHER_TOOL]), "medium"))
    assert "namespace functions {" in text and "type get_weather = (_: {" in text
    assert "Calls to these tools must go to the commentary channel: 'functions'." in text


def test_reasoning_and_final_are_parsed(enc):
    tokens = completion(
        enc,
        "<|channel|>analysis<|message|>Two plus two.<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>",
    )
    parsed = parse_completion(enc, tokens, finished=True)
    assert (parsed.analysis, parsed.final, parsed.tool_calls, parsed.error) == ("Two plus two.", "4", [], None)


def test_tool_call_round_trip(enc):
    call = completion(
        enc, '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
    )
    parsed = parse_completion(enc, call, finished=True)
    assert parsed.tool_calls == [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]

    # The caller sends the call and its result back; the next prompt must hold both, addressed as harmony expects.
    follow_up = request(
        tools=[WEATHER_TOOL],
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": parsed.tool_calls[0]}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": '{"sky": "clear"}'},
        ],
    )
    text = enc.decode(render_prompt(enc, follow_up, "medium"))
    assert (
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
        '{"city": "Paris"}<|call|>' in text
    )
    assert '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"sky": "clear"}<|end|>' in text
    assert text.endswith("<|start|>assistant")


def test_malformed_output_is_an_error_not_a_crash(enc):
    parsed = parse_completion(enc, completion(enc, "just some words without any header"), finished=False)
    assert parsed.error.startswith("model output is not valid harmony")
    bad_role = completion(enc, "<|channel|>final<|message|>ok<|end|><|start|><|start|><|message|>x<|return|>")
    parsed = parse_completion(enc, bad_role, finished=True)
    assert parsed.error and parsed.final == "ok"


def test_length_cut_keeps_the_partial_message(enc):
    tokens = completion(enc, "<|channel|>analysis<|message|>Thinking about it")
    parsed = parse_completion(enc, tokens, finished=False)
    assert (parsed.analysis, parsed.error) == ("Thinking about it", None)


def test_prior_reasoning_is_dropped_once_a_final_answer_follows(enc):
    req = request(
        messages=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "reasoning_content": "secret thoughts", "content": "Hello"},
            {"role": "user", "content": "Bye"},
        ]
    )
    assert len(conversation(req, "medium").messages) == 4  # system, user, final, user
    text = enc.decode(render_prompt(enc, req, "medium"))
    assert "secret thoughts" not in text and "<|channel|>final<|message|>Hello<|end|>" in text


def called(reasoning_key, thought, arguments, content=None):
    call = {"id": f"c{thought}", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    return [
        {"role": "assistant", "content": content, reasoning_key: thought, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": f"c{thought}", "content": '{"sky": "clear"}'},
    ]


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning"])
def test_reasoning_passed_back_is_the_analysis_before_its_tool_call(enc, key):
    """OpenAI's gpt-oss guide: the chain of thought a tool call came from goes back in until the final answer."""
    req = request(
        tools=[WEATHER_TOOL], messages=[{"role": "user", "content": "Weather?"}, *called(key, "Need the tool.", "{}")]
    )
    text = enc.decode(render_prompt(enc, req, "medium"))
    assert (
        "<|start|>assistant<|channel|>analysis<|message|>Need the tool.<|end|>"
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{}<|call|>"
    ) in text


def test_only_the_reasoning_since_the_last_final_answer_is_kept(enc):
    """harmony 0.0.8 on its own would keep the first turn's analysis here (the last assistant message is a call), and
    after the third turn's answer the second's and third's (it drops only what precedes the first final answer)."""
    first = [{"role": "user", "content": "Hi"}, {"role": "assistant", "reasoning": "R1", "content": "Hello"}]
    calling = [
        {"role": "user", "content": "Weather?"},
        *called("reasoning", "R2", '{"city":"Paris"}'),
        *called("reasoning", "R3", '{"city":"Rome"}', content="Checking Rome too."),
    ]
    text = enc.decode(render_prompt(enc, request(tools=[WEATHER_TOOL], messages=first + calling), "medium"))
    assert "R1" not in text and "R2<|end|>" in text and "R3<|end|>" in text
    assert "<|channel|>commentary<|message|>Checking Rome too.<|end|>" in text  # a preamble beside calls is not final
    answered = (
        first
        + calling
        + [{"role": "assistant", "reasoning": "R4", "content": "Sunny."}, {"role": "user", "content": "Thanks"}]
    )
    text = enc.decode(render_prompt(enc, request(tools=[WEATHER_TOOL], messages=answered), "medium"))
    assert not any(r in text for r in ("R1", "R2", "R3", "R4")) and text.count("<|call|>") == 2
