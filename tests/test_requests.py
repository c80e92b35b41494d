import copy
import functools

import pytest

from parallel.batch.output import OutputFile, read_requests
from parallel.protocol.harmony import render_prompt
from parallel.protocol.requests import RequestError, parse_line, parse_request
from tests.conftest import write_jsonl


def test_prompt_shorthand_and_default_id():
    req = parse_line('{"prompt": "Hi"}', 7)
    assert (req.id, req.index, req.messages) == (7, 7, [{"role": "user", "content": "Hi"}])


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "must be a JSON object"),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "wizard", "content": "x"}]}', "unknown role 'wizard'"),
        ('{"messages": [{"role": "user", "content": 3}]}', "content must be a string"),
        ('{"prompt": "x", "messages": [{"role": "user", "content": "y"}]}', "exactly one of"),
        ('{"prompt": "x", "reasoning_effort": "max"}', "reasoning_effort must be one of"),
        ('{"prompt": "x", "max_new_tokens": 0}', "max_new_tokens must be a positive integer"),
        ('{"prompt": "x", "tools": [{"type": "function"}]}', "tools[0]"),
        ('{"messages": [{"role": "tool", "content": "42"}]}', "needs the tool's name"),
    ],
)
def test_bad_lines_say_what_is_wrong(line, message):
    with pytest.raises(RequestError, match=None) as e:
        parse_line(line, 1)
    assert message in str(e.value)


def test_duplicate_ids_are_rejected_on_the_later_line(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}, "", {"id": "a", "prompt": "y"}])
    first, second = read_requests(str(path))
    assert first.id == "a"
    assert (second["id"], second["index"]) == (None, 3)
    assert second["error"] == "line 3: duplicate id 'a' (first on line 1)"


def test_a_rejected_line_keeps_the_id_it_names(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "w", "messages": [{"role": "wizard", "content": "x"}]}, "{oops"])
    wizard, broken = read_requests(str(path))
    assert (wizard["id"], wizard["finish_reason"]) == ("w", "error")
    assert (broken["id"], broken["index"]) == (None, 2)


def test_resume_drops_a_half_written_record(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "a", "index": 1}\n{"id": "b", "ind')
    out = OutputFile(str(path))
    assert out.done == {("id", "a")}
    out.write([{"id": "b", "index": 2}])
    out.close()
    assert path.read_text() == '{"id": "a", "index": 1}\n{"id": "b", "index": 2}\n'


@pytest.mark.parametrize(
    "line, message",
    [
        (b'{"prompt": "caf\xe9"}', "not UTF-8: byte 0xe9 at column 16"),
        (b"[" * 100_000, "JSON nested too deeply"),
        (b'{"prompt": "x", "max_new_tokens": ' + b"9" * 5000 + b"}", "not valid JSON"),
        ('{"id": true, "prompt": "x"}', "id must be a string or an integer"),
        ('{"prompt": "x", "tools": {}}', '"tools" must be a list'),
        ('{"prompt": "x", "tools": [{"type": "function", "function": {"name": "f", "description": null}}]}',
         "tools[0].function.description must be a string"),
        ('{"prompt": "x", "tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}',
         "tools[0].function.parameters must be a JSON schema object"),
        ('{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', "messages[0].content[0] must be a text part"),
        ('{"messages": [{"role": "assistant", "content": null, "tool_calls": 5}]}', "messages[0].tool_calls must be a list"),
        ('{"messages": [{"role": "assistant", "content": null, "tool_calls": [5]}]}', "messages[0].tool_calls[0] must be"),
        ('{"messages": [{"role": "assistant", "content": null, "tool_calls": [{"id": [1], "function": {"name": "f", "arguments": "{}"}}]}]}',
         "messages[0].tool_calls[0].id must be a string"),
        ('{"messages": [{"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}]}',
         "messages[0].tool_calls[0].function.arguments must be a string"),
        ('{"messages": [{"role": "assistant", "content": "a", "reasoning_content": {}}]}', "messages[0].reasoning_content must be a string"),
        ('{"messages": [{"role": "tool", "name": 5, "content": "42"}]}', "messages[0].name must be a string"),
    ],
)
def test_odd_shapes_say_which_field(line, message):
    with pytest.raises(RequestError) as e:
        parse_line(line, 1)
    assert message in str(e.value)


FULL = {
    "id": "x",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
        {"role": "assistant", "content": "Let me look.", "reasoning_content": "Use the tool.",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "weather", "content": "sunny"},
    ],
    "tools": [{"type": "function", "function": {"name": "weather", "description": "Today's.", "parameters": {"type": "object", "properties": {}}}}],
    "reasoning_effort": "low",
    "max_new_tokens": 5,
}
DELETED = object()
ODD = [DELETED, None, True, 0, -1, 2.5, "", "x", [], [5], {}, {"a": 1}]


def paths(value, path=()):
    yield path
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from paths(child, (*path, key))


@pytest.mark.parametrize("path", list(paths(FULL))[1:], ids=lambda p: ".".join(map(str, p)))
def test_every_field_of_any_shape_is_refused_or_renders(path, enc):
    """Each field parse_request reads, left out or replaced by values of every JSON shape: a RequestError, or a
    prompt."""
    for odd in ODD:
        request = copy.deepcopy(FULL)
        parent = functools.reduce(lambda node, key: node[key], path[:-1], request)
        if odd is DELETED:
            del parent[path[-1]]
        else:
            parent[path[-1]] = odd
        try:
            req = parse_request(request, 1)
        except RequestError:
            continue
        assert render_prompt(enc, req, "medium"), (path, odd)

