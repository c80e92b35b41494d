import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

# CI has no GPU: Triton kernels run in Triton's interpreter, which must be chosen before triton is first imported.
if not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from safetensors.torch import load_file, save_file

from tests.mxfp4_files import write_mxfp4_checkpoint

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
    from parallel.protocol.harmony import encoding

    return encoding()


def launch(
    out: Path, *overrides: str, nproc: int | None = None, prompts: Path, wait: bool = True, timeout: float = 300
):
    """The launcher as users start it: torchrun with nproc ranks, or plain python when nproc is None."""
    runner = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc else [sys.executable]
    )
    cmd = [
        *runner,
        str(ROOT / "launch" / "generate.py"),
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        f"data.input={prompts}",
        f"data.output={out}",
        "runtime.progress=false",
        *overrides,
    ]
    if not wait:
        return subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def read_records(path: Path) -> list[dict]:
    # Split on "\n" only: a model's text may hold U+2028 and friends, which splitlines() also breaks on.
    return [json.loads(line) for line in path.read_text().split("\n") if line]


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture(scope="session")
def mxfp4_checkpoints(tmp_path_factory):
    """The tiny model as an MXFP4 checkpoint, and as a float checkpoint of the weights that one dequantizes to."""
    from parallel.loading.checkpoint import TINY, resolve_checkpoint

    paths = {kind: tmp_path_factory.mktemp(kind) for kind in ("mxfp4", "reference")}
    write_mxfp4_checkpoint(resolve_checkpoint(TINY), paths["mxfp4"], reference=paths["reference"])
    return paths


@pytest.fixture(scope="session")
def taught_model(model_cache):
    from tests.taught import teach

    return teach(model_cache / "taught")


def nan_for(folder: Path, enc, line: dict, others: list[dict]) -> Path:
    """The tiny checkpoint, copied to `folder`, with NaN embeddings for the tokens of `line`'s prompt that no other
    line's prompt holds: that request's logits turn NaN, the others' stay finite."""
    from parallel.loading.checkpoint import TINY, resolve_checkpoint
    from parallel.protocol.harmony import render_prompt
    from parallel.protocol.requests import parse_request

    tokens = [set(render_prompt(enc, parse_request(x, 0), "medium")) for x in (line, *others)]
    checkpoint = shutil.copytree(resolve_checkpoint(TINY), folder)
    weights = load_file(checkpoint / "model.safetensors")
    weights["model.embed_tokens.weight"][sorted(tokens[0] - set.union(*tokens[1:]))] = float("nan")
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    return checkpoint
