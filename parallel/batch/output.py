"""The input file in, the output file out: checking both paths, reading requests line by line, appending records
safely, resume."""

from __future__ import annotations

import codecs
import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from parallel.batch.lock import LOCK_SUFFIX, OutputError, lock_output
from parallel.batch.records import error_record, record_key
from parallel.log import warn
from parallel.protocol.requests import (
    Request,
    RequestError,
    is_id,
    load_json,
    parse_request,
)

# What the job writes beside its output (`<output>.config.yaml`, ...): written to as surely as the output.
SIDECARS = (".config.yaml", ".metrics.json", LOCK_SUFFIX)
# Errors of a file system with no room for what the job writes: the message says to free space.
NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
# Files made here get the mode open() would give them (umask read once, while the process has one thread).
_UMASK = os.umask(0o022)
os.umask(_UMASK)
# Bytes read at a time, from the end, looking for where a torn last line starts.
TAIL_BLOCK = 1 << 16


def check_paths(input: str, output: str) -> None:
    """Refuse, naming data.input or data.output, a job that cannot read its input, would write into it (the same
    file under any name: a symlink, a hard link), or cannot create or append to its output and the files beside
    it. Writes nothing, so an entry script can run it before any process group or model exists."""
    source = Path(input)
    try:
        if not source.is_file():
            raise ValueError(
                f"data.input: no such file {input}" if not source.exists() else f"data.input: {input} is not a file"
            )
        open(source, "rb").close()
    except OSError as e:
        raise ValueError(f"data.input: cannot read {input}: {e.strerror or e}") from None
    for path in [Path(output), *(Path(output + suffix) for suffix in SIDECARS)]:
        try:
            _check_output(path, source)
        except OSError as e:
            raise ValueError(f"data.output: cannot write {path}: {e.strerror or e}") from None


def _check_output(path: Path, source: Path) -> None:
    """Tried, not read off permission bits, which root, ACLs and read-only mounts make wrong: an existing file
    opens for appending; a new one can be made in its nearest existing folder (the job makes those between)."""
    if not path.exists():
        tempfile.TemporaryFile(dir=next(p for p in path.parents if p.exists())).close()
    elif os.path.samefile(path, source):
        raise ValueError(
            f"data.output: the job would write {path}, which is data.input ({source}): choose another data.output"
        )
    elif not path.is_file():
        raise ValueError(f"data.output: {path} is not a file")
    else:
        open(path, "ab").close()


def input_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """The input's non-blank lines with their 1-based numbers, undecoded: each line is decoded on its own. A line
    of nothing but a byte order mark (an editor's, on a file that starts with a blank line) is blank too."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if line.removeprefix(codecs.BOM_UTF8).strip():
                yield number, line


def read_requests(path: str, shard: int = 0, num_shards: int = 1) -> Iterator[Request | dict]:
    """Each non-blank line of this shard as a Request, or as the error record that says what is wrong with it.

    A line's id is its "id", or its line number when it has none. The first line to claim an id keeps it; a later
    duplicate gets an error record with id null. A line without an id owns its number: an explicit id that is
    the number of a line without one (before or after it, in any shard) is refused on the line that chose it,
    so that no line is refused for another line's choice. Duplicate explicit ids in different shards are found
    when the shards are merged (launch/merge.py)."""
    ids = _Ids(path)
    for index, line in input_lines(path):
        if (index - 1) % num_shards == shard:
            yield _request_or_error(line, index, ids)


class _Ids:
    """Which line owns which id (see read_requests)."""

    def __init__(self, path: str):
        self.owner: dict[str | int, int] = {}
        # Byte n - 1 is 1 where line n has no id: a byte a line keeps this small for inputs of millions of lines.
        with open(path, "rb") as f:
            self.unnamed = bytearray(_has_no_id(line) for line in f)

    def claim(self, rid, index: int) -> str | None:
        """Give line `index` the id `rid`, or say why it cannot have it."""
        if not is_id(rid):
            return f"id must be a string or an integer, got {rid!r:.60}"
        if isinstance(rid, int) and rid != index and 0 < rid <= len(self.unnamed) and self.unnamed[rid - 1]:
            return f"id {rid} is taken: line {rid} has no id, so its line number is its id"
        if rid in self.owner:
            return f"duplicate id {rid!r:.60} (first on line {self.owner[rid]})"
        self.owner[rid] = index
        return None


def _has_no_id(line: bytes) -> bool:
    try:
        obj = load_json(line)
    except RequestError:
        return False
    return isinstance(obj, dict) and "id" not in obj


def _request_or_error(line: bytes, index: int, ids: _Ids) -> Request | dict:
    """Whatever goes wrong with a line, of whatever type, costs that line only and is said in its record."""
    obj = None
    try:
        obj = load_json(line)
        req = parse_request(obj, index)
    except Exception as e:  # noqa: BLE001 - RequestError, or anything the checks did not foresee
        message = str(e) if isinstance(e, RequestError) else f"{type(e).__name__}: {e}"
        # The record keeps the id the line names where that id is free, so that it can be found by its id.
        rid = obj.get("id") if isinstance(obj, dict) else None
        return error_record(rid if ids.claim(rid, index) is None else None, index, f"line {index}: {message}")
    problem = ids.claim(req.id, index)
    return req if problem is None else error_record(None, index, f"line {index}: {problem}")


def read_records(path: str | Path) -> Iterator[dict]:
    """The records of an output file, in file order. A line that is not a record (blank, corrupt, JSON of another
    shape) is skipped, and said in one warning with its line number; a torn last line is not read."""
    bad = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                break
            try:
                record = _load_record(line)
            except ValueError as e:
                bad.append(f"line {number}: {e}")
                continue
            yield record
    if bad:
        more = f"; and {len(bad) - 10} more" if len(bad) > 10 else ""
        warn(f"{path}: skipping {len(bad)} lines that are not records ({'; '.join(bad[:10])}{more})")


def _load_record(line: bytes) -> dict:
    if not line.strip():
        raise ValueError("blank")
    record = load_json(line)  # or a RequestError (a ValueError) saying why it is not JSON
    if not _is_record(record):
        raise ValueError(f"not a record (an object with an id and a line index): {line[:60]!r}")
    return record


def _is_record(obj) -> bool:
    """What resume and merging read of a record: its id (null for lines that could not claim one), its line."""
    if not isinstance(obj, dict) or "id" not in obj:
        return False
    index = obj.get("index")
    return (
        (obj["id"] is None or is_id(obj["id"])) and isinstance(index, int) and not isinstance(index, bool) and index > 0
    )


class OutputFile:
    """Append-only JSONL, written by one job at a time. Opening it takes `<output>.lock` (parallel/batch/lock.py)
    before reading anything, and holds it until the process ends: a job started on an output another job is
    writing is refused here. Opening an existing file resumes it: the records there are kept and their keys skipped.

    Resume reads the file line by line. A torn last line (a job killed mid-write) is cut off and its request runs
    again. Any other line that is not a record is reported with its line number and skipped: its request runs
    again and its record is appended at the end. That line stays where it is, like every record after it: the
    file is only ever appended to (or its torn tail cut), never rewritten, so nothing in it is lost; and a request
    whose key is in `done` does not run again, so no record is written twice. launch/merge.py skips those lines.

    Whatever fails here (another job, a full disk) is an OutputError that says what to do."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.done: set[tuple] = set()
        self._failed: OutputError | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = lock_output(str(self.path))
        except OSError as e:
            raise cannot_write(e.filename or self.path, e) from None
        try:
            if self.path.exists():
                _cut_torn_tail(self.path)
                self.done.update(record_key(r) for r in read_records(self.path))
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as e:
            os.close(self._lock)
            raise cannot_write(self.path, e) from None

    def write(self, records: list[dict]) -> None:
        """Append and fsync: what returns from here survives a killed job. A write that fails (a full disk) is cut
        back off the file where the file system lets it (else resume cuts its torn line), and is the last: this
        and every later write raise OutputError, so that a rerun resumes from whole records."""
        if self._failed:
            raise self._failed
        data = memoryview(b"".join(map(encode_record, records)))
        start = os.fstat(self._fd).st_size
        try:
            while data:
                written = os.write(self._fd, data)
                if written == 0:
                    raise OSError(errno.EIO, "the file system took none of a write")
                data = data[written:]
            os.fsync(self._fd)
        except OSError as e:
            self._failed = cannot_write(self.path, e)
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)
            raise self._failed from None
        self.done.update(record_key(r) for r in records)

    def close(self) -> None:
        """Close the output, then let go of its lock."""
        os.close(self._fd)
        os.close(self._lock)


def cannot_write(path: str | Path, e: OSError, advice: str | None = None) -> OutputError:
    """The one line a failed write of the output or a file beside it ends the job with."""
    if advice is None:
        advice = (
            "free space on its file system and run again to resume"
            if e.errno in NO_SPACE
            else "fix that and run again to resume"
        )
    return OutputError(f"cannot write {path}: {e.strerror or e}; {advice}")


def write_atomically(path: str | Path, text: str, advice: str | None = None) -> None:
    """`path` holds `text` whole, or what it held before: written to a temporary file beside it, fsynced and
    renamed over it; the temporary file is removed if anything fails (a full disk: OutputError, with `advice`)."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, 0o666 & ~_UMASK)
            f.write(text.encode())
            f.flush()
            os.fsync(fd)
        os.replace(tmp, path)
    except OSError as e:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise cannot_write(path, e, advice) from None


def encode_record(record: dict) -> bytes:
    """One record as a line of UTF-8 JSON. A record with text UTF-8 cannot hold (a lone surrogate such as
    "\\udc00", which a JSON escape in the input can make) is written with \\u escapes instead, which read back to
    the same record: no record can stop the writer."""
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode()
    except UnicodeEncodeError:
        return (json.dumps(record) + "\n").encode()


def _cut_torn_tail(path: Path) -> None:
    """Cut a partial last line, so that the next record starts a line of its own."""
    with open(path, "rb+") as f:
        size = end = f.seek(0, os.SEEK_END)
        while end > 0:  # back from the end, a block at a time, to the last newline
            start = max(0, end - TAIL_BLOCK)
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        if end < size:
            warn(f"{path}: dropping {size - end} bytes of an unfinished record at the end")
            f.truncate(end)
