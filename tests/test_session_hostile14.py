"""A hostile pass of 2026-12-02 (twelfth session): each test failed before its fix, except where it says it guards
a claim of the README that held.

- `lora-ext merge --out afile/merged` (a parent that is a file) said "writing ...: File exists"; it names the file
  now, before anything is read.
- (Held, guarded) a peft adapter of a dilated convolution serves as peft's merge_and_unload serves it.

Tests that write paths run in tmp_path with the working directory moved there (as in test_session_hostile13).
"""
import copy
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model

import lora_ext as lora
from helpers import save_random_peft
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


class _Dilated(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c = torch.nn.Conv2d(4, 6, 3, padding=2, dilation=2, dtype=torch.float64)

    def forward(self, x):
        return self.c(x)


def test_a_dilated_conv_adapter_serves_as_peft_merges_it(tmp_path):
    # (README: peft's unmerged forward of such a conv raises; its merge_and_unload is the reference)
    torch.manual_seed(0)
    base = _Dilated()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["c"]))
    save_random_peft(peft_model, tmp_path / "adapter", seed=1, std=0.3)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="size of tensor"):
        peft_model(x)  # the premise: peft serves it merged only
    ref = peft_model.merge_and_unload()(x).detach()
    ours = copy.deepcopy(base)
    lora.load_peft_adapter(ours, tmp_path / "adapter")
    for merged in (False, True):
        ours.train(not merged)
        with torch.no_grad():
            got = ours(x)
        assert got.shape == ref.shape and torch.allclose(got, ref, rtol=1e-12, atol=1e-12), merged
        assert (got - base(x)).abs().max() > 0.1  # the adapter is in it
