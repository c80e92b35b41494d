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
        (
            '{"prompt": "x", "tools": [{"type": "function", "function": {"name": "f", "description": null}}]}',
            "tools[0].function.description must be a string",
        ),
        (
            '{"prompt": "x", "tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}',
            "tools[0].function.parameters must be a JSON schema object",
        ),
        (
            '{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
            "messages[0].content[0] must be a text part",
        ),
        (
            '{"messages": [{"role": "assistant", "content": null, "tool_calls": 5}]}',
            "messages[0].tool_calls must be a list",
        ),
        (
            '{"messages": [{"role": "assistant", "content": null, "tool_calls": [5]}]}',
            "messages[0].tool_calls[0] must be",
        ),
        (
            '{"messages": [{"role": "assistant", "content": null, "tool_calls": '
            '[{"id": [1], "function": {"name": "f", "arguments": "{}"}}]}]}',
            "messages[0].tool_calls[0].id must be a string",
        ),
        (
            '{"messages": [{"role": "assistant", "content": null, "tool_calls": '
            '[{"function": {"name": "f", "arguments": {}}}]}]}',
            "messages[0].tool_calls[0].function.arguments must be a string",
        ),
        (
            '{"messages": [{"role": "assistant", "content": "a", "reasoning_content": {}}]}',
            "messages[0].reasoning_content must be a string",
        ),
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
        {
            "role": "assistant",
            "content": "Let me look.",
            "reasoning_content": "Use the tool.",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "name": "weather", "content": "sunny"},
    ],
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "Today's.",
                "parameters": {"type": "object", "properties": {}},
            },
        }
    ],
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


def write_bytes(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def test_a_line_with_a_bad_byte_costs_that_line_only(tmp_path):
    path = write_bytes(
        tmp_path / "in.jsonl", [b'{"prompt": "a"}', b'{"prompt": "\xff"}', b'\xef\xbb\xbf{"prompt": "bom"}']
    )
    first, bad, bom = read_requests(path)
    assert (first.id, bad["index"], bom.id) == (1, 2, 3)
    assert bad["error"] == "line 2: not UTF-8: byte 0xff at column 13"


def test_an_unforeseen_error_costs_its_line_only(tmp_path, monkeypatch):
    def parse(obj, index):
        if index == 1:
            raise TypeError("a case no check foresaw")
        return parse_request(obj, index)

    monkeypatch.setattr("parallel.batch.output.parse_request", parse)
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}])
    bad, good = read_requests(str(path))
    assert (bad["id"], bad["error"]) == ("a", "line 1: TypeError: a case no check foresaw")
    assert good.id == "b"


def test_an_explicit_id_cannot_take_the_number_of_a_line_without_one(tmp_path):
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [{"id": 2, "prompt": "x"}, {"prompt": "y"}, {"id": 3, "prompt": "z"}, {"id": 1, "prompt": "w"}],
    )
    takes_2, default_2, own_3, takes_1 = read_requests(str(path))
    assert (
        takes_2["id"] is None
        and takes_2["error"] == "line 1: id 2 is taken: line 2 has no id, so its line number is its id"
    )
    assert (default_2.id, own_3.id, takes_1.id) == (2, 3, 1)  # line 1 has an id: its number is free


def test_the_id_rule_holds_across_shards(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": 2, "prompt": "x"}, {"prompt": "y"}])
    (refused,) = read_requests(str(path), shard=0, num_shards=2)
    (kept,) = read_requests(str(path), shard=1, num_shards=2)
    assert "id 2 is taken" in refused["error"] and kept.id == 2
