"""The job's files: paths checked before anything runs, a resume that loses no record, a writer that no record
can stop, and merging shards that hold lines that are not records."""

import os

import pytest

from launch.merge import main as merge
from parallel.batch.output import TAIL_BLOCK, OutputFile, check_paths, read_records
from tests.conftest import write_jsonl

LINE = '{"prompt": "x"}\n'


@pytest.mark.parametrize("how", ["the same path", "a symlink", "a hard link", "the config beside the output"])
def test_an_output_that_is_the_input_under_any_name_is_refused(tmp_path, how):
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    if how == "the config beside the output":
        source = tmp_path / "out.jsonl.config.yaml"
    source.write_text(LINE)
    if how == "the same path":
        output = source
    elif how == "a symlink":
        output.symlink_to(source)
    elif how == "a hard link":
        os.link(source, output)
    with pytest.raises(ValueError, match="^data.output: .* which is data.input"):
        check_paths(str(source), str(output))
    assert source.read_text() == LINE


@pytest.mark.parametrize(
    "input, output, message",
    [
        ("missing.jsonl", "out.jsonl", "data.input: no such file"),
        (".", "out.jsonl", "data.input: . is not a file"),
        ("in.jsonl", ".", "data.output: . is not a file"),
        ("in.jsonl", "in.jsonl/out.jsonl", "data.output: cannot write in.jsonl/out.jsonl: Not a directory"),
        ("in.jsonl", "taken.jsonl", "data.output: taken.jsonl.metrics.json is not a file"),
    ],
)
def test_paths_the_job_cannot_use_are_named(tmp_path, monkeypatch, input, output, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.jsonl").write_text(LINE)
    (tmp_path / "taken.jsonl.metrics.json").mkdir()
    with pytest.raises(ValueError, match=f"^{message}"):
        check_paths(input, output)


def test_checking_the_paths_writes_nothing(tmp_path):
    (tmp_path / "in.jsonl").write_text(LINE)
    check_paths(str(tmp_path / "in.jsonl"), str(tmp_path / "new" / "folder" / "out.jsonl"))
    assert os.listdir(tmp_path) == ["in.jsonl"]


NOT_RECORDS = [
    b"\n",
    b"  \n",
    b"{oops\n",
    b"[1,2]\n",
    b"5\n",
    b'{"a": 1}\n',
    b'{"id": [1], "index": 2}\n',
    b'{"id": "b", "index": true}\n',
    b'{"id": "b"}\n',
    b"\xff\n",
    b"[" * 100_000 + b"\n",
]


@pytest.mark.parametrize("bad", NOT_RECORDS, ids=lambda b: repr(b[:20]))
def test_a_line_that_is_not_a_record_is_reported_and_what_follows_kept(tmp_path, capsys, bad):
    path = tmp_path / "out.jsonl"
    content = b'{"id": "a", "index": 1}\n' + bad + b'{"id": null, "index": 3}\n'
    path.write_bytes(content)
    out = OutputFile(str(path))
    out.write([{"id": "b", "index": 2}])
    out.close()
    assert out.done == {("id", "a"), ("index", 3), ("id", "b")}
    assert path.read_bytes() == content + b'{"id": "b", "index": 2}\n'  # appended, nothing cut
    assert "skipping 1 lines that are not records (line 2: " in capsys.readouterr().err


@pytest.mark.parametrize("torn", [b"", b'{"id": "b", "ind', b"x" * (2 * TAIL_BLOCK + 7)], ids=["none", "short", "long"])
@pytest.mark.parametrize("before", [b"", b'{"id": "a", "index": 1}\n\n'], ids=["alone", "after lines"])
def test_a_torn_last_line_is_cut(tmp_path, before, torn):
    path = tmp_path / "out.jsonl"
    path.write_bytes(before + torn)
    OutputFile(str(path)).close()
    assert path.read_bytes() == before


def test_a_record_utf8_cannot_hold_is_written_escaped_and_later_ones_too(tmp_path):
    path = tmp_path / "out.jsonl"
    out = OutputFile(str(path))
    out.write([{"id": "\udc00", "index": 1}, {"id": "é", "index": 2}])
    out.close()
    assert path.read_bytes().decode() == '{"id": "\\udc00", "index": 1}\n{"id": "é", "index": 2}\n'
    assert OutputFile(str(path)).done == {("id", "\udc00"), ("id", "é")}


def test_merge_skips_lines_that_are_not_records(tmp_path):
    prompts = write_jsonl(tmp_path / "in.jsonl", [LINE.strip(), LINE.strip()])
    first, second, merged = tmp_path / "0.jsonl", tmp_path / "1.jsonl", tmp_path / "all.jsonl"
    first.write_bytes(b'{"id": "\\udc00", "index": 1}\n[1, 2]\n')
    second.write_bytes(b'{"id": 2, "index": 2}\n')
    assert merge([str(merged), str(first), str(second), "--input", str(prompts)]) == 0
    assert [r["id"] for r in read_records(merged)] == ["\udc00", 2]
