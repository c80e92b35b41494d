import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_VOCAB = ROOT.parent / "shared" / "tokenizer"

# Offline: harmony reads o200k_base from here instead of downloading it.
if "TIKTOKEN_ENCODINGS_BASE" not in os.environ and SHARED_VOCAB.is_dir():
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(SHARED_VOCAB)
# Two cores: one thread per rank keeps 4-rank jobs from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """One tiny checkpoint for the whole session, built by the launcher's own code on first use."""
    os.environ["GPT_OSS_LAUNCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return Path(os.environ["GPT_OSS_LAUNCH_CACHE"])


@pytest.fixture(scope="session")
def enc():
    from parallel.harmony import encoding

    return encoding()


def launch(out: Path, *overrides: str, nproc: int | None = None, prompts: Path, wait: bool = True, timeout: float = 300):
    """The launcher as users start it: torchrun with nproc ranks, or plain python when nproc is None."""
    runner = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc else [sys.executable]
    cmd = [*runner, str(ROOT / "launch" / "generate.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
           f"data.input={prompts}", f"data.output={out}", "runtime.progress=false", *overrides]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def read_records(path: Path) -> list[dict]:
    # Split on "\n" only: a model's text may hold U+2028 and friends, which splitlines() also breaks on.
    return [json.loads(line) for line in path.read_text().split("\n") if line]


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path
