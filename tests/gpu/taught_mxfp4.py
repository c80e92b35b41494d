"""The taught tiny model (tests/taught.py) as an MXFP4 checkpoint, and its lessons, for tests/gpu/layouts.sh. Taught
with its experts at MXFP4's values and in bf16 (teach's `mxfp4`), it answers its lessons in bf16 with margins that
the layouts' different rounding does not cross.

    python -m tests.gpu.taught_mxfp4 DIR [--device cpu]      # from the repository root

DIR/checkpoint: the MXFP4 checkpoint, quantized from the float one that teach() writes to DIR/taught;
DIR/prompts.jsonl: the lessons' requests, as the launcher's input lines; DIR/answers.jsonl: the answers taught, as
the launcher's records hold them with output.raw=true.
"""

import argparse
from pathlib import Path

from tests.conftest import write_jsonl
from tests.mxfp4_files import write_mxfp4_checkpoint
from tests.taught import LESSONS, teach


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--device", default="cuda", help="where to teach: seconds on a GPU, minutes on two CPU cores")
    args = parser.parse_args()
    write_mxfp4_checkpoint(teach(args.dir / "taught", device=args.device, mxfp4=True), args.dir / "checkpoint")
    write_jsonl(args.dir / "prompts.jsonl", [{"id": i, **request} for i, (request, _) in enumerate(LESSONS)])
    write_jsonl(args.dir / "answers.jsonl", [{"id": i, "raw": answer} for i, (_, answer) in enumerate(LESSONS)])


if __name__ == "__main__":
    main()
