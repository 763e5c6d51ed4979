"""The README example runs as printed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.timeout(60)


def test_readme_example_prints_what_the_comments_say():
    result = subprocess.run([sys.executable, "examples/two_clients.py"], capture_output=True, text=True,
                            timeout=30, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["True b'hello bob'", "b'hi alice'"]


def test_readme_snippet_matches_the_example_file():
    readme = (REPO / "README.md").read_text()
    example = (REPO / "examples" / "two_clients.py").read_text()
    body = example.split('"""', 2)[2].strip()
    assert body in readme
