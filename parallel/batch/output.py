"""The input file in, the output file out: reading requests line by line, appending records safely, resume."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from parallel.batch.records import error_record, record_key
from parallel.log import warn
from parallel.protocol.requests import Request, RequestError, parse_line


def check_paths(input: str, output: str) -> None:
    """Before anything runs: the input is a file, and the output is not the input."""
    if not Path(input).is_file():
        raise FileNotFoundError(f"data.input: no such file {input}")
    if Path(output).exists() and Path(output).samefile(input):
        raise ValueError(f"data.output {output} is data.input: the output would be appended to the input")


def read_requests(path: str, shard: int = 0, num_shards: int = 1) -> Iterator[Request | dict]:
    """Each non-blank line of this shard as a Request, or as the error record that says what is wrong with it.
    Duplicate ids are found within the shard; merging the shards (launch/merge.py) finds the rest."""
    seen: dict[object, int] = {}
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f, start=1):
            if (index - 1) % num_shards != shard or not line.strip():
                continue
            try:
                req = parse_line(line, index)
            except RequestError as e:
                yield error_record(_claimed_id(line, index, seen), index, f"line {index}: {e}")
                continue
            if req.id in seen:
                # The record cannot carry the id: the first line owns it, and no id is written twice.
                yield error_record(None, index, f"line {index}: duplicate id {req.id!r} (first on line {seen[req.id]})")
                continue
            seen[req.id] = index
            yield req


def _claimed_id(line: str, index: int, seen: dict):
    """The id a rejected line names, when it names a usable one, so its error record is findable by id."""
    try:
        rid = json.loads(line).get("id")
    except (ValueError, AttributeError):
        return None
    if isinstance(rid, (str, int)) and not isinstance(rid, bool) and rid not in seen:
        seen[rid] = index
        return rid
    return None


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
