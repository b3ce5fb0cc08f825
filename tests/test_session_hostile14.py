"""A hostile pass of 2026-12-02 (twelfth session): each test failed before its fix.

- `lora-ext merge --out afile/merged` (a parent that is a file) said "writing ...: File exists"; it names the file
  now, before anything is read.

Tests that write paths run in tmp_path with the working directory moved there (as in test_session_hostile13).
"""
import os

import pytest

from test_session_hostile13 import _merge, merge_dirs  # noqa: F401 (a fixture)


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("under", ["afile/merged", "afile/deeper/merged"])
def test_an_out_under_a_file_is_refused_naming_the_file(merge_dirs, capsys, under):
    (merge_dirs / "afile").write_text("keep")
    assert _merge(merge_dirs / "base", merge_dirs / "adapter", merge_dirs / under, "--force") == 2
    err = capsys.readouterr().err
    assert "--out" in err and f"{merge_dirs / 'afile'}" in err and "is a file, not a directory" in err, err
    assert (merge_dirs / "afile").read_text() == "keep"
    assert sorted(os.listdir(merge_dirs)) == ["adapter", "afile", "base"]
