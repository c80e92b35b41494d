"""Bad input, bad output files and a bad environment through the real launcher (one process): each costs itself
only, or stops the job at once with one line that names it."""

import json

import pytest

from tests.conftest import launch, nan_for, read_records, write_jsonl

FAST = ["generation.max_new_tokens=2", "generation.batch_size=1"]


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "in.jsonl", [{"id": f"q{i}", "prompt": f"Question {i}"} for i in range(1, 4)])


def refused(run, *words: str) -> bool:
    """Exit 2 with one clear line that says it, and nothing loaded."""
    return (
        run.returncode == 2
        and all(w in run.stderr for w in words)
        and "Traceback" not in run.stderr
        and "loading" not in run.stderr
    )


def test_an_output_that_is_the_input_is_refused_and_the_input_kept(prompts):
    before = prompts.read_bytes()
    run = launch(prompts, prompts=prompts)
    assert refused(run, "data.output", "is data.input"), run.stderr
    assert prompts.read_bytes() == before


def test_an_unwritable_output_is_refused_before_loading(tmp_path, prompts):
    (tmp_path / "plain-file").write_text("")
    run = launch(tmp_path / "plain-file" / "out.jsonl", prompts=prompts)  # a path no one can create
    assert refused(run, "data.output"), run.stderr


def test_no_vocabulary_offline_is_named(tmp_path, prompts, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(tmp_path))  # an empty folder; and no network here
    run = launch(tmp_path / "out.jsonl", prompts=prompts)
    assert refused(run, "TIKTOKEN_ENCODINGS_BASE", "o200k_base.tiktoken"), run.stderr


def test_lines_that_killed_the_job_cost_only_themselves(tmp_path):
    path = tmp_path / "in.jsonl"
    lines = [
        b'{"id": "a", "prompt": "Hi"}',
        b'{"id": "latin1", "prompt": "caf\xe9"}',
        b"[" * 100_000 + b"]" * 100_000,
        json.dumps({"id": "calls", "messages": [{"role": "assistant", "content": None, "tool_calls": 5}]}).encode(),
        b'{"id": "b", "prompt": "Bye"}',
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    run = launch(tmp_path / "out.jsonl", *FAST, prompts=path)
    assert run.returncode == 0, run.stderr
    records = {r["index"]: r for r in read_records(tmp_path / "out.jsonl")}
    assert records[1]["usage"]["completion_tokens"] > 0 and records[5]["usage"]["completion_tokens"] > 0  # generated
    errors = {i: records[i]["error"] for i in (2, 3, 4)}
    assert errors[2].startswith("line 2: not UTF-8") and errors[3].startswith("line 3: JSON nested too deeply")
    assert errors[4] == "line 4: messages[0].tool_calls must be a list"


def test_an_id_that_cannot_be_utf8_is_written_and_resumed(tmp_path):
    path = write_jsonl(
        tmp_path / "in.jsonl", ['{"id": "\\udc00", "prompt": "x"}', {"id": "after", "prompt": "y"}, {"prompt": "z"}]
    )
    out = tmp_path / "out.jsonl"
    assert launch(out, *FAST, prompts=path).returncode == 0
    assert [r["id"] for r in read_records(out)] == ["\udc00", "after", 3]
    written = out.read_bytes()
    rerun = launch(out, *FAST, prompts=path)
    assert rerun.returncode == 0, rerun.stderr
    assert "0 requests to run" in rerun.stderr and out.read_bytes() == written


def test_a_bad_line_in_the_output_costs_only_its_own_record(tmp_path, prompts):
    out = tmp_path / "out.jsonl"
    assert launch(out, *FAST, prompts=prompts).returncode == 0
    first, _, third = out.read_bytes().splitlines(keepends=True)
    kept = first + b"\n" + b'{"id": "q2", "ind\n' + third  # a blank line, and record 2 broken mid-file
    out.write_bytes(kept)
    rerun = launch(out, *FAST, prompts=prompts)
    assert rerun.returncode == 0, rerun.stderr
    assert "line 2: blank" in rerun.stderr and "line 3: not valid JSON" in rerun.stderr
    assert "1 requests to run" in rerun.stderr
    written = out.read_bytes()
    assert written.startswith(kept)  # append-only: the bad lines stay, every record after them too
    assert [json.loads(line)["id"] for line in written[len(kept) :].splitlines()] == ["q2"]


def test_a_tool_result_that_answers_no_call_is_refused(tmp_path):
    """Its tool would be named by nothing: the line gets an error naming the id, and the next line runs."""
    orphan = {
        "id": "orphan",
        "messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "tool_call_id": "call_9", "content": "42"}],
    }
    path = write_jsonl(tmp_path / "in.jsonl", [orphan, {"id": "ok", "prompt": "Hi"}])
    run = launch(tmp_path / "out.jsonl", *FAST, prompts=path)
    assert run.returncode == 0, run.stderr
    records = {r["id"]: r for r in read_records(tmp_path / "out.jsonl")}
    assert records["orphan"]["error"] == "line 1: messages[1].tool_call_id 'call_9' answers no earlier tool call"
    assert records["ok"]["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("damage", ["cut short", "missing"])
def test_a_checkpoint_with_broken_weights_is_refused_before_loading(tmp_path, prompts, damage):
    import shutil

    from parallel.loading.checkpoint import TINY, resolve_checkpoint

    checkpoint = shutil.copytree(resolve_checkpoint(TINY), tmp_path / "checkpoint")
    weights = checkpoint / "model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:100_000])
    run = launch(tmp_path / "out.jsonl", f"model.path={checkpoint}", prompts=prompts)
    assert refused(run, f"model.path={checkpoint}", "model.safetensors"), run.stderr


def test_a_byte_order_mark_on_a_blank_first_line_is_blank(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf\r\n{"id": "a", "prompt": "Hi"}\r\n')
    run = launch(tmp_path / "out.jsonl", *FAST, prompts=path)
    assert run.returncode == 0, run.stderr
    assert [
        (r["id"], r["index"], r["usage"]["completion_tokens"] > 0) for r in read_records(tmp_path / "out.jsonl")
    ] == [("a", 2, True)]


def test_a_line_sets_its_own_budget_and_sampling_in_openais_terms(tmp_path):
    """A line written for OpenAI's batch API keeps what it asks: its budget under OpenAI's names, its sampling (the
    same seed, the same tokens); what cannot be honoured is refused by name, not ignored."""
    lines = [
        {"id": "short", "prompt": "Hi", "max_tokens": 2},
        {"id": "shorter", "prompt": "Hi", "max_completion_tokens": 1},
        {"id": "a", "prompt": "Hi", "temperature": 2, "seed": 7},
        {"id": "b", "prompt": "Hi", "temperature": 2, "seed": 7},
        {"id": "c", "prompt": "Hi", "temperature": 2, "seed": 8},
        {"id": "greedy", "prompt": "Hi"},
        {"id": "stop", "prompt": "Hi", "stop": ["x"]},
        {"id": "both", "prompt": "Hi", "max_tokens": 1, "max_new_tokens": 2},
        {"id": "hot", "prompt": "Hi", "temperature": 3},
    ]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    run = launch(tmp_path / "out.jsonl", *FAST, "output.raw=true", prompts=path)
    assert run.returncode == 0, run.stderr
    records = {r["id"]: r for r in read_records(tmp_path / "out.jsonl")}
    assert records["short"]["usage"]["completion_tokens"] == 2 and records["shorter"]["usage"]["completion_tokens"] == 1
    text = {k: records[k]["raw"] for k in "abc"}
    assert text["a"] == text["b"] != text["c"] and text["a"] != records["greedy"]["raw"]
    assert records["stop"]["error"].startswith('line 7: "stop" is not supported')
    assert records["both"]["error"] == "line 8: give one token budget, not max_new_tokens and max_tokens"
    assert records["hot"]["error"].startswith("line 9: temperature must be a number in [0, 2]")


def test_a_line_that_turns_the_model_nan_costs_only_itself(tmp_path, enc):
    """A checkpoint whose embeddings are NaN for the tokens of one line's word only (through the engine): that line's
    record is an error that names the NaN, where argmax would have written one token over and over; the other lines
    run to their budget."""
    lines = [{"id": f"q{i}", "prompt": f"Question {i}"} for i in range(1, 4)] + [{"id": "nan", "prompt": "xylophone"}]
    checkpoint = nan_for(tmp_path / "checkpoint", enc, lines[-1], lines[:-1])
    out = tmp_path / "out.jsonl"
    run = launch(
        out, f"model.path={checkpoint}", "engine.mode=always", *FAST, prompts=write_jsonl(tmp_path / "in.jsonl", lines)
    )
    records = {r["id"]: r for r in read_records(out)}
    assert run.returncode == 0, run.stderr
    assert records["nan"]["error"].startswith("line 4: the model's logits were NaN (not a number) at new token 1")
    # the tiny model's two tokens are never whole harmony, so the others' errors are parse errors: their own
    assert all(
        records[f"q{i}"]["usage"]["completion_tokens"] == 2 and "NaN" not in records[f"q{i}"]["error"]
        for i in range(1, 4)
    )


def test_hostile_prompts_cost_only_their_lines_on_a_two_rank_job(tmp_path):
    """Runs that o200k's tokenizer takes minutes over (harmony holding the GIL, rank 0's heartbeat stopped, the job
    ended by the other rank) are encoded in pieces, or refused unread when no tokenizing could fit them: each such
    line gets its record, a prompt with a run that fits the context is answered, and every other line is."""
    lines = [
        {"id": "before", "prompt": "Hi"},
        {"id": "letters", "prompt": "a" * 600_000},
        {"id": "punctuation", "prompt": "!" * 400_000},
        {"id": "whitespace", "prompt": "x" + " \t" * 200_000 + "x"},
        {"id": "marks", "prompt": "a\u0301" * 200_000},
        {"id": "fits", "prompt": "Spell " + "z" * 3000},
        {
            "id": "instructions",
            "messages": [{"role": "system", "content": "=" * 5000}, {"role": "user", "content": "Hi"}],
        },
        '{"id": "cut", "prompt": "Hi"',
        '{"id": ' + "9" * 5000 + ', "prompt": "Hi"}',
        {"id": "after", "prompt": "Bye"},
    ]
    out = tmp_path / "out.jsonl"
    run = launch(out, *FAST, "parallel.tp=2", nproc=2, prompts=write_jsonl(tmp_path / "in.jsonl", lines), timeout=240)
    assert run.returncode == 0, run.stderr
    records = {r["index"]: r for r in read_records(out)}
    assert sorted(records) == list(range(1, 11))
    for i in (1, 6, 10):
        assert records[i]["error"] is None or "harmony" in records[i]["error"]  # the tiny model's noise, parsed
        assert records[i]["usage"]["completion_tokens"] == 2
    assert records[2]["error"] == (
        "line 2: the prompt holds over 524288 characters, which cannot fit the model's "
        "context of 4096 tokens (a token holds at most 128 bytes)"
    )
    for i in (3, 4, 5):
        assert (
            records[i]["error"].startswith(f"line {i}: the prompt's ")
            and "tokens fill the model's context" in records[i]["error"]
        )
    assert records[7]["error"].startswith(
        "line 7: cannot render the conversation with harmony: the instructions (system "
        "and developer messages): a run of over 512 characters"
    )
    assert records[8]["error"] == "line 8: not valid JSON: Expecting ',' delimiter at the end of the line"
    assert records[9]["error"] == "line 9: not valid JSON: an integer of more than 4300 digits"
