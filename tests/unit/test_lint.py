"""The code passes ruff's pyflakes and import-order rules (configured in pyproject.toml, [tool.ruff])."""

import subprocess
import sys

from tests.helpers import REPO


def test_ruff_finds_nothing():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "zbus", "tests", "benchmarks",
                           "examples"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
