"""bench/crash_safe.sh (sourced by bench/gpu_check.sh): a test that kills pytest with a segfault is named (from
the node id conftest.py records as each test starts), the tests collected after it still run (conftest.py's
--resume-after), and the crash stays a failure. Run for real:
a throwaway project whose conftest is this suite's, a test that segfaults (faulthandler._sigsegv) between
tests that pass, and the function sourced into bash."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import crash_project, run_crash_safe

ROOT = Path(__file__).resolve().parents[1]


def _project(tmp_path, body):
    return crash_project(tmp_path, body)


def _run(project, *pytest_args, budget=600):
    out, log, rc = run_crash_safe(project, *pytest_args, budget=budget)
    return out + f"rc={rc}\n", log


CRASHING = """
    import faulthandler
    import pytest

    def test_before():
        pass

    @pytest.mark.parametrize("i", [0, 1])
    def test_crash(i):
        if i == 1:
            faulthandler._sigsegv()

    def test_crash_not():  # its name extends the crashing test's: it must still run
        pass

    @pytest.mark.parametrize("i", range(3))
    def test_after(i):
        assert i != 2, "a failure after the crash is still reported"
"""


def test_a_crash_is_named_and_the_tests_after_it_run(tmp_path):
    project = _project(tmp_path, CRASHING)
    out, log = _run(project)
    assert "CRASHED (exit 139) in tests/test_a.py::test_crash[1]\n" in out  # the case, from conftest's record
    assert "== the tests after tests/test_a.py::test_crash[1]\n" in out
    # the rerun started after every case of the crashing test: only the four after it ran (test_crash_not too)
    assert log.rstrip().splitlines()[-1].startswith("1 failed, 3 passed, 3 deselected")
    assert "a failure after the crash is still reported" in log
    assert "rc=1" in out


def test_a_crash_alone_is_still_a_failure(tmp_path):
    project = _project(tmp_path, CRASHING.replace('assert i != 2, "a failure after the crash is still reported"',
                                                  "pass"))
    out, log = _run(project)
    assert log.rstrip().splitlines()[-1].startswith("4 passed, 3 deselected")
    assert "rc=1" in out


def test_no_crash_passes_through(tmp_path):
    project = _project(tmp_path, "def test_ok():\n    pass\n")
    out, log = _run(project)
    assert "CRASHED" not in out and "rc=0" in out and "1 passed" in log


def test_no_time_left_stops_after_the_crash(tmp_path):
    project = _project(tmp_path, CRASHING)
    out, log = _run(project, budget=10)
    assert "not rerun" in out and "the tests after tests/test_a.py::test_crash[1] did not run" in out
    assert "rc=139" in out


def test_resume_after_names_a_collected_test(tmp_path):
    project = _project(tmp_path, "def test_ok():\n    pass\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "--resume-after", "tests/test_a.py::test_nope",
                           "tests"], cwd=project, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == pytest.ExitCode.USAGE_ERROR
    assert "--resume-after tests/test_a.py::test_nope: no such test was collected" in done.stderr
