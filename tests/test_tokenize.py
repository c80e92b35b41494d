"""Encoding whose cost is bounded whatever the text: ordinary text keeps harmony's own tokens, runs that would make
o200k's tokenizer take minutes are found and encoded in pieces, and every text decodes back to itself."""

import json
import re
import time

import pytest
from openai_harmony import Conversation, RenderConversationConfig, Role

from parallel.config import GenerationConfig
from parallel.protocol.harmony import conversation, render_bounded, render_prompt
from parallel.protocol.prompts import PromptError, prepare
from parallel.protocol.requests import parse_request
from parallel.protocol.tokenize import LONGEST_RUN, encode_text, long_runs
from tests.conftest import ROOT

# Ordinary text of many kinds: prose, code, JSON, whitespace-heavy layout, scripts without spaces, combining
# marks, emoji, numbers, special tokens written as text.
CORPUS = [
    (ROOT / "README.md").read_text()[:20_000],
    (ROOT / "parallel" / "protocol" / "harmony.py").read_text(),
    *(json.loads(line).get("prompt", "") for line in (ROOT / "examples" / "prompts.jsonl").read_text().splitlines()),
    json.dumps({"rows": [{"id": i, "name": f"item {i}", "tags": ["a", "b"]} for i in range(200)]}, indent=2),
    "def f(x):\n" + "\n".join("    " * (i % 8) + f"y{i} = x ** {i}  # 說明 {i}" for i in range(300)),
    "机器学习是人工智能的一个分支。它使计算机能够从数据中学习，而无需明确编程。" * 40,
    "日本語のテキストはスペースを使いません。カタカナとひらがなと漢字が混ざっています。" * 40,
    "ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ แต่เว้นวรรคระหว่างประโยค " * 40,
    "नमस्ते, यह हिंदी में एक वाक्य है जिसमें मात्राएँ हैं। " * 40,
    "Ça a été très agréable: naïve café, Zürich, São Paulo, Ελληνικά, русский текст. " * 40,
    "Emoji 😀🎉👍🏽 and flags 🇫🇷🇯🇵 in a sentence. " * 40,
    "3.14159265358979 1,000,000 2026-12-07 0xDEADBEEF " * 40,
    "Harmony's tokens as text: <|start|>user<|message|>hi<|end|> and <|endoftext|>.",
    "=" * 80 + "\n" + "-" * 120 + "\n\n\n\n" + " " * 64 + "indented\n" + "\t" * 10 + "tabs",
]
RENDERING = RenderConversationConfig(auto_drop_analysis=False)


def harmony_render(enc, req):
    return enc.render_conversation_for_completion(conversation(req, "medium"), Role.ASSISTANT, RENDERING)


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_ordinary_text_keeps_harmonys_tokens(enc, text):
    assert not long_runs(text)
    assert encode_text(enc, text) == enc.encode(text, disallowed_special=())


def test_rendering_message_by_message_equals_harmonys_rendering(enc):
    """render_bounded's splicing (header, text, end) against harmony's whole rendering, on every kind of message."""
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "lookup", "arguments": json.dumps({"q": CORPUS[4][:300]})},
    }
    for text in CORPUS:
        req = parse_request(
            {
                "messages": [
                    {"role": "system", "content": text[:2000]},
                    {"role": "user", "content": text},
                    {"role": "assistant", "reasoning": text[:500], "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "c1", "content": text[::-1]},
                    {"role": "assistant", "content": text[:700]},
                    {"role": "user", "content": "And then?"},
                ],
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "lookup",
                            "description": text[:100],
                            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
                        },
                    }
                ],
            },
            1,
        )
        assert render_bounded(enc, conversation(req, "medium")) == harmony_render(enc, req)
    assert render_bounded(enc, Conversation.from_messages([])) == enc.render_conversation_for_completion(
        Conversation.from_messages([]), Role.ASSISTANT, RENDERING
    )


@pytest.mark.parametrize(
    "unit",
    ["a", "A", "!", " ", "\n", "a\u0301", "!\u0301", "\u4e2d", "\U0001f600", "\u0301"],
    ids=[
        "letters",
        "capitals",
        "punctuation",
        "spaces",
        "newlines",
        "marks",
        "punct-marks",
        "cjk",
        "emoji",
        "bare-marks",
    ],
)
def test_a_run_is_found_just_past_the_limit_of_any_kind(unit):
    at_limit = unit * (LONGEST_RUN // len(unit))
    assert not long_runs("x1" + at_limit + "1x")
    past = at_limit + unit
    assert long_runs("x1" + past + "1x") == [(2, 2 + len(past))]
    other = not unit[0].isalpha()  # a run of non-letters takes the spaces around it in
    assert long_runs("ab " * 200 + past + " cd" * 200) == [(600 - other, 600 + len(past) + other)]


@pytest.mark.parametrize(
    "unit",
    ["a", "!", " ", "a\u0301", "\U0001f600", "ab1"],
    ids=["letters", "punctuation", "spaces", "marks", "emoji", "ordinary"],
)
def test_six_hundred_thousand_characters_encode_in_seconds_and_decode_to_themselves(enc, unit):
    text = "Before. " + unit * (600_000 // len(unit)) + " after."
    start = time.monotonic()
    tokens = encode_text(enc, text)
    assert time.monotonic() - start < 10  # harmony alone takes minutes for the first five
    assert enc.decode_utf8(tokens) == text


def test_runs_are_encoded_in_pieces_and_decode_as_harmonys_tokens_do(enc):
    text = "Intro " + "a" * 3000 + " middle " + "!" * 2000 + "\n" * 1500 + "end <|end|>"
    tokens = encode_text(enc, text)
    assert tokens != enc.encode(text, disallowed_special=()) and enc.decode_utf8(tokens) == text
    special = encode_text(enc, "<|start|>user<|message|>" + "b" * 2000 + "<|end|>", special=True)
    assert (
        special[:3] == enc.encode("<|start|>user<|message|>", allowed_special="all")
        and special[-1] == enc.encode("<|end|>", allowed_special="all")[0]
    )


def test_a_prompt_with_a_long_run_renders_its_text_exactly(enc):
    req = parse_request(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Count: " + "z" * 5000 + " done"},
            ]
        },
        1,
    )
    assert enc.decode_utf8(render_prompt(enc, req, "medium")) == enc.decode_utf8(harmony_render(enc, req))


@pytest.mark.parametrize(
    "obj, says",
    [
        (
            {"messages": [{"role": "system", "content": "x" * 600}, {"role": "user", "content": "hi"}]},
            "the instructions (system and developer messages)",
        ),
        (
            {
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "function", "function": {"name": "f", "description": "!" * 600}}],
            },
            "the tools",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "name": "y" * 600, "content": "r"}]},
            "a tool message's name",
        ),
    ],
    ids=["instructions", "tools", "tool-name"],
)
def test_a_long_run_outside_message_text_is_refused_naming_where(enc, obj, says):
    with pytest.raises(PromptError, match=re.escape(f"{says}: a run of over {LONGEST_RUN} characters")):
        prepare(enc, parse_request(obj, 1), GenerationConfig(), 4096)


def test_a_prompt_that_cannot_fit_is_refused_before_it_is_tokenized(enc):
    req = parse_request({"prompt": "a" * 2_000_000}, 1)
    start = time.monotonic()
    with pytest.raises(
        PromptError, match="over 524288 characters, which cannot fit the model's context of 4096 tokens"
    ):
        prepare(enc, req, GenerationConfig(), 4096)
    assert time.monotonic() - start < 1
