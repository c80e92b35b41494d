import csv
import subprocess
import sys

from tests.conftest import ROOT


def test_scaling_study_writes_figures_for_every_point(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "scaling.py"), "--config", str(ROOT / "configs" / "tiny.yaml"), "--gpus", "2",
         "--layouts", "1", "dp=2", "tp=4", "--batch-sizes", "2", "--new-tokens", "4", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {r["layout"]: r for r in csv.DictReader(open(tmp_path / "results.csv"))}
    assert set(rows) == {"plain transformers", "1", "dp=2"}  # tp=4 needs 4 GPUs: skipped
    assert rows["1"]["efficiency"] == "1.0" and rows["dp=2"]["gpus"] == "2"
    assert int(rows["dp=2"]["generated_tokens"]) == 2 * 2 * 2 * 4  # batch x dp x batches per replica x tokens
    assert float(rows["dp=2"]["tokens_per_s"]) > 0 and float(rows["plain transformers"]["tokens_per_s"]) > 0
    assert (tmp_path / "throughput.png").stat().st_size > 0 and (tmp_path / "efficiency.png").stat().st_size > 0
