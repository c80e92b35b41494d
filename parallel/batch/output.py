"""The input file in, the output file out: reading requests line by line, appending records safely, resume."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from parallel.batch.records import error_record, record_key
from parallel.log import warn
from parallel.protocol.requests import Request, RequestError, is_id, load_json, parse_request


def input_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """The input's non-blank lines with their 1-based numbers, undecoded: each line is decoded on its own."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
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


class OutputFile:
    """Append-only JSONL. Opening an existing file resumes it: the records there are kept and their keys skipped."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[tuple] = set()
        if self.path.exists():
            self._scan()
        self._f = open(self.path, "a", encoding="utf-8")

    def _scan(self) -> None:
        good = 0  # bytes up to the end of the last whole record
        with open(self.path, "rb") as f:
            for line in f:
                try:
                    key = record_key(json.loads(line))
                except (ValueError, KeyError):
                    break
                if not line.endswith(b"\n"):
                    break
                self.done.add(key)
                good += len(line)
        if good < self.path.stat().st_size:
            # A job killed mid-write leaves a partial last line; its request is simply run again.
            warn(f"{self.path}: dropping {self.path.stat().st_size - good} bytes of an unfinished record at the end")
            os.truncate(self.path, good)

    def write(self, records: list[dict]) -> None:
        """Append, flush and fsync: what returns from here survives a killed job."""
        self._f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._f.flush()
        os.fsync(self._f.fileno())
        self.done.update(record_key(r) for r in records)

    def close(self) -> None:
        self._f.close()
