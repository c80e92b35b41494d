"""One writer per output, and a full disk at any point, through the real launcher: a second job on an output that
another job is writing stops before loading, naming that job; a job that died blocks nothing; a full disk ends the
job in one line, with nothing half-written, and a resume after freeing space writes every line exactly once."""

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from parallel.batch.output import OutputError, OutputFile
from tests.conftest import launch, read_records, write_jsonl

FAST = ["generation.max_new_tokens=4", "generation.batch_size=1", "output.echo=false"]
# Slow enough to be stopped mid-job: 16 single-record batches of 48 tokens (about 650 bytes a record).
SLOW = ["generation.max_new_tokens=48", "generation.batch_size=1", "output.echo=false"]
PAGE = 4096


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "in.jsonl", [{"id": f"q{i}", "prompt": f"Question {i}"} for i in range(16)])


def wait_until(done, job: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if job.poll() is not None:
            raise AssertionError(f"the job ended (exit {job.returncode}) before {what}: {job.communicate()[0][-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.05)


def lines_in(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@contextlib.contextmanager
def ended(job: subprocess.Popen):
    """The job, killed with its whole session (SIGCONT first, should it be stopped) if a test leaves it running."""
    try:
        yield job
    finally:
        if job.poll() is None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(job.pid, sig)
            job.communicate(timeout=60)


def assert_each_line_once(out: Path, n: int) -> None:
    assert sorted(r["index"] for r in read_records(out)) == list(range(1, n + 1))


@pytest.mark.parametrize("nproc", [None, 2], ids=["one process", "torchrun, 2 ranks"])
def test_a_second_job_on_an_output_being_written_stops_before_loading_naming_the_first(tmp_path, prompts, nproc):
    out = tmp_path / "out.jsonl"
    with ended(launch(out, *FAST, prompts=prompts, wait=False)) as first:
        wait_until(
            lambda: (
                f"pid {first.pid} ".encode() in Path(f"{out}.lock").read_bytes()
                if Path(f"{out}.lock").exists()
                else False
            ),
            first,
            "lock taken",
        )
        os.killpg(first.pid, signal.SIGSTOP)  # still writing this output, for as long as the second job takes
        try:
            second = launch(out, *FAST, nproc=nproc, prompts=prompts, timeout=240)
        finally:
            os.killpg(first.pid, signal.SIGCONT)
        log = first.communicate(timeout=240)[0]
    said = second.stderr
    assert f"another job is writing {out} (pid {first.pid} on host {socket.gethostname()}, since " in said, said
    assert "loading" not in said and "model.generate" not in said, said
    if nproc:  # every rank ends, with exit 2
        assert said.count("exitcode  : 2") == 2, said
    else:
        assert second.returncode == 2 and "Traceback" not in said, said
    assert first.returncode == 0, log[-3000:]
    assert_each_line_once(out, 16)


def test_a_holder_killed_mid_job_does_not_block_its_resume(tmp_path, prompts):
    out = tmp_path / "out.jsonl"
    with ended(launch(out, *SLOW, prompts=prompts, wait=False)) as job:
        wait_until(lambda: lines_in(out) >= 2, job, "2 records written")
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate(timeout=60)
    kept = read_records(out)
    assert 0 < len(kept) < 16
    assert f"pid {job.pid} " in Path(f"{out}.lock").read_text()  # the lock file stays, naming the dead job

    rerun = launch(out, *SLOW, prompts=prompts)
    assert rerun.returncode == 0, rerun.stderr
    assert_each_line_once(out, 16)
    assert read_records(out)[: len(kept)] == kept


@pytest.fixture
def small_disk(tmp_path):
    """A 128 KiB tmpfs (root only: skipped where mount is not permitted), unmounted after the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(disk)], check=False, capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (it takes root): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int = 0) -> Path:
    """A file taking all the free space of `disk` but `leave` bytes."""
    st = os.statvfs(disk)
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - leave))
    assert os.statvfs(disk).f_bavail * st.f_frsize == leave
    return filler


def no_space(run_log: str) -> bool:
    return "No space left on device" in run_log and "free space on its file system and run again to resume" in run_log


def temporary_files(disk: Path) -> list[str]:
    return [name for name in os.listdir(disk) if name.endswith(".tmp")]


@pytest.mark.parametrize("output", ["new", "resumed"])
def test_a_disk_full_at_the_start_stops_the_job_before_loading_and_writes_nothing_half(small_disk, prompts, output):
    out = small_disk / "out.jsonl"
    config = Path(f"{out}.config.yaml")
    if output == "resumed":
        few = write_jsonl(prompts.parent / "few.jsonl", [{"id": f"q{i}", "prompt": f"Question {i}"} for i in range(4)])
        assert launch(out, *FAST, prompts=few).returncode == 0
        before = out.read_bytes(), config.read_bytes()
    filler = fill(small_disk)

    run = launch(out, *FAST, prompts=prompts)
    assert run.returncode == 2 and no_space(run.stderr), run.stderr
    assert "Traceback" not in run.stderr and "loading" not in run.stderr, run.stderr
    named = f"{out}.lock" if output == "new" else str(config)  # the first file the job cannot write
    assert f"cannot write {named}: No space left on device" in run.stderr, run.stderr
    assert not temporary_files(small_disk)
    if output == "new":
        assert not out.exists() and not config.exists()
    else:
        assert (out.read_bytes(), config.read_bytes()) == before  # the old config whole, not a cut new one

    filler.unlink()
    rerun = launch(out, *FAST, prompts=prompts)
    assert rerun.returncode == 0, rerun.stderr
    assert_each_line_once(out, 16)


def test_a_disk_that_fills_mid_job_ends_it_and_a_resume_after_freeing_space_finishes(small_disk, prompts):
    out = small_disk / "out.jsonl"
    # Room for the lock and the config (a page each) and two pages of records: about 12 of the 16.
    filler = fill(small_disk, leave=4 * PAGE)
    run = launch(out, *SLOW, prompts=prompts)
    assert run.returncode != 0 and no_space(run.stderr), run.stderr
    assert f"cannot write {out}: No space left on device" in run.stderr and "Traceback" not in run.stderr, run.stderr
    kept = read_records(out)
    assert out.read_bytes().endswith(b"\n") and 0 < len(kept) < 16  # whole records only: the failed one cut back off
    assert not temporary_files(small_disk) and not Path(f"{out}.metrics.json").exists()

    filler.unlink()
    rerun = launch(out, *SLOW, prompts=prompts)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{16 - len(kept)} requests to run" in rerun.stderr
    assert_each_line_once(out, 16)
    assert read_records(out)[: len(kept)] == kept


def test_a_write_that_does_not_fit_is_cut_back_off_and_is_the_last(small_disk):
    """In-process, the same OutputFile: the failed write leaves the file as it was, and no write follows it."""
    out = OutputFile(str(small_disk / "out.jsonl"))
    record = {"id": "a", "index": 1, "text": "x" * 1000}
    out.write([record])
    before = out.path.read_bytes()
    fill(small_disk, leave=PAGE)  # room for a few more of these
    with pytest.raises(OutputError, match="No space left on device; free space on its file system"):
        out.write([{**record, "id": f"b{i}", "index": i} for i in range(2, 12)])
    assert out.path.read_bytes() == before and out.done == {("id", "a")}
    (small_disk / "filler").unlink()
    with pytest.raises(OutputError, match="No space left on device"):  # a failed output takes no other write
        out.write([{**record, "id": "c", "index": 2}])
    assert out.path.read_bytes() == before
    out.close()
