"""pyflakes' rules (ruff's F: undefined names, unused imports and variables, ...) and E9 (syntax errors) over the
Python code, so that a NameError in a test body that only runs on a GPU shows here first. Only real problems:
no style rules. ruff comes from requirements-dev.txt."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PATHS = ["lora_ext", "tests", "bench"]  # bench/ too, for any Python added there


def test_ruff_pyflakes_rules():
    if importlib.util.find_spec("ruff") is None:
        if os.environ.get("CI"):
            pytest.fail("ruff is not installed (it is in requirements-dev.txt): CI must lint")
        pytest.skip("ruff is not installed; pip install -r requirements-dev.txt")
    cmd = [sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "F,E9",
           "--output-format", "concise", *PATHS]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"{' '.join(cmd[2:])} found problems:\n{run.stdout}{run.stderr}"
