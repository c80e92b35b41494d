"""Merge the outputs of a sharded job (a Slurm job array) into one file, in input order.

    python launch/merge.py out/answers.jsonl out/answers.shard-*-of-8.jsonl [--input prompts.jsonl]

Fails, writing nothing, if two shards hold the same line or the same id, or (with --input) if a line of
the input has no record yet: re-run that shard's task to finish it, then merge again.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

from parallel.batch.output import encode_record, input_lines, read_records


def merge(shards: list[str], input_path: str | None = None) -> list[dict]:
    records = []
    for path in shards:
        # A shard whose task was killed mid-write may end in half a line, and one may hold lines that are not
        # records (each said in a warning): those requests have no record here.
        records += read_records(path)
    problems = []
    for what, key in (("line", "index"), ("id", "id")):
        repeated = [k for k, n in Counter(r[key] for r in records if r[key] is not None).items() if n > 1]
        if repeated:
            problems.append(f"{what}s written twice: {sorted(repeated, key=str)[:10]}")
    if input_path:
        expected = {i for i, _ in input_lines(input_path)}
        missing = sorted(expected - {r["index"] for r in records})
        if missing:
            problems.append(f"{len(missing)} input lines have no record yet, e.g. {missing[:10]}")
    if problems:
        raise ValueError("; ".join(problems))
    return sorted(records, key=lambda r: r["index"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("shards", nargs="+")
    parser.add_argument("--input", help="the job's input, to check that every line has its record")
    args = parser.parse_args(argv)
    try:
        records = merge(args.shards, args.input)
    except (OSError, ValueError) as e:
        print(f"merge: {e}", file=sys.stderr)
        return 1
    tmp = f"{args.output}.tmp"
    with open(tmp, "wb") as f:
        f.writelines(map(encode_record, records))
    os.replace(tmp, args.output)
    print(f"merge: {len(records)} records from {len(args.shards)} shards into {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
