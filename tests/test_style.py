"""The style checks of the MONAI Model Zoo (flake8 and isort, configured in setup.cfg; both are in its `test` extra)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import REPO_ROOT

PATHS = ["bundle", "tests", "tools"]


@pytest.mark.parametrize(
    "command",
    [["flake8", *PATHS], ["isort", "--check-only", "--diff", *PATHS]],
    ids=["flake8", "isort"],
)
def test_style(command):
    result = subprocess.run([sys.executable, "-m", *command], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"python -m {' '.join(command)}\n{result.stdout[-8000:]}\n{result.stderr[-2000:]}"
