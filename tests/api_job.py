"""The Python API as a torchrun job uses it, for tests/test_api.py: every rank constructs the LLM and makes the same
calls; each rank writes what it got to <out>.<rank>.json (rank 0 the outputs, the others None).

    torchrun --nproc_per_node=2 tests/api_job.py CALLS.json OUT model.path=... parallel.tp=2
"""

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from parallel.api import LLM

ROOT = Path(__file__).resolve().parents[1]


def main(calls_path: str, out: str, *overrides: str) -> None:
    calls = json.loads(Path(calls_path).read_text())
    with LLM(str(ROOT / "configs" / "tiny.yaml"), overrides) as llm:
        results = [getattr(llm, method)(**kwargs) for method, kwargs in calls]
    got = [None if outputs is None else [asdict(o) for o in outputs] for outputs in results]
    Path(f"{out}.{os.environ['RANK']}.json").write_text(json.dumps(got))


if __name__ == "__main__":
    main(*sys.argv[1:])
