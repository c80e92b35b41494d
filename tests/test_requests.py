import pytest

from parallel.batch.output import OutputFile, read_requests
from parallel.protocol.requests import RequestError, parse_line
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
