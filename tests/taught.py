"""A tiny gpt-oss taught a few harmony turns, so that tests see real reasoning, answers and tool calls.

The embedded tiny model's random weights never emit a tool call. This one is the same model after a few
seconds of training on three exact conversations: said hello to, it reasons then answers; asked for the
weather with a tool, it reasons then calls the tool; given the tool's result, it answers. Prompts are
rendered by the launcher's own harmony code, so a server that renders a request differently gets noise back.
"""

import json
from functools import partial
from pathlib import Path

import torch
from transformers import GptOssForCausalLM

from parallel.loading.checkpoint import TINY, resolve_checkpoint
from parallel.protocol.harmony import encoding, render_prompt
from parallel.protocol.requests import parse_request
from tests.mxfp4_files import quantize

# The tool as the Agents SDK's @function_tool describes `def get_weather(city: str)` documented "The weather now", so
# that the SDK's requests render as taught (tests/test_agents_sdk.py checks the SDK still makes this schema).
WEATHER = {
    "name": "get_weather",
    "description": "The weather now",
    "parameters": {
        "type": "object",
        "title": "get_weather_args",
        "properties": {"city": {"title": "City", "type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
TOOLS = [{"type": "function", "function": WEATHER}]
HELLO = [{"role": "user", "content": "Say hello."}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
THINK, ARGUMENTS, TEMPERATURE = "Look it up.", '{"city":"Paris"}', '{"temp_c": 20}'
CALLED = [
    {
        "role": "assistant",
        "content": None,
        "reasoning": THINK,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ARGUMENTS}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": TEMPERATURE},
]
GREETING, GREET_REASONING, ANSWER = "Hello!", "Greet them.", "It is 20 C in Paris."
LESSONS = [
    (
        {"messages": HELLO},
        f"<|channel|>analysis<|message|>{GREET_REASONING}<|end|><|start|>assistant<|channel|>final<|message|>{GREETING}<|return|>",
    ),
    (
        {"messages": ASK, "tools": TOOLS},
        f"<|channel|>analysis<|message|>{THINK}<|end|><|start|>assistant<|channel|>commentary "
        f"to=functions.get_weather <|constrain|>json<|message|>{ARGUMENTS}<|call|>",
    ),
    ({"messages": ASK + CALLED, "tools": TOOLS}, f"<|channel|>final<|message|>{ANSWER}<|return|>"),
]


def teach(target: Path, effort: str = "medium", device: str = "cpu", mxfp4: bool = False) -> Path:
    """`device`: where to train (seconds on a GPU, minutes on two CPU cores); the lessons are learnt either way.
    `mxfp4`: taught the way its MXFP4 checkpoint will run, experts at MXFP4's values (freeze_at_mxfp4_values) and
    arithmetic in bf16 (autocast), so that its greedy tokens do not turn on bf16's rounding, which differs between
    layouts. Taught in float32 and
    quantized after, they did: in bf16 its routers chose other experts for a few tokens, and a lesson's answer
    changed with parallel.tp=2."""
    enc = encoding()
    lessons = [
        (render_prompt(enc, parse_request(obj, 0), effort), enc.encode(text, allowed_special="all"))
        for obj, text in LESSONS
    ]
    torch.manual_seed(0)
    model = GptOssForCausalLM.from_pretrained(resolve_checkpoint(TINY), dtype=torch.float32)
    model.model.embed_tokens.weight.requires_grad_(False)  # the vocabulary is large; the layers learn enough
    if mxfp4:
        freeze_at_mxfp4_values(model)
    model.to(device)
    arithmetic = partial(torch.autocast, torch.device(device).type, torch.bfloat16, enabled=mxfp4)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(200):
        loss = 0
        with arithmetic():
            for prompt, answer in lessons:
                hidden = model.model(input_ids=torch.tensor([prompt + answer], device=device)).last_hidden_state[
                    0, len(prompt) - 1 : -1
                ]
                loss = loss + torch.nn.functional.cross_entropy(
                    model.lm_head(hidden), torch.tensor(answer, device=device)
                )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.003:
            break
    model.eval()
    stop = enc.stop_tokens_for_assistant_actions()
    with torch.no_grad(), arithmetic():
        for prompt, answer in lessons:
            out = model.generate(
                torch.tensor([prompt], device=device),
                max_new_tokens=len(answer),
                do_sample=False,
                eos_token_id=stop,
                pad_token_id=199999,
            )
            assert out[0, len(prompt) :].tolist() == answer, "the tiny model did not learn its lessons"
    model.save_pretrained(target)
    (target / "lessons.json").write_text(json.dumps(LESSONS))
    return target


def freeze_at_mxfp4_values(model: GptOssForCausalLM) -> None:
    """The experts (random, as the tiny model's) set to the values MXFP4 holds them as, and left so: an MXFP4
    checkpoint of the model taught holds the weights it was taught with."""
    for layer in model.model.layers:
        for weight in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
            weight.data = quantize(weight.data)[2]
            weight.requires_grad_(False)
