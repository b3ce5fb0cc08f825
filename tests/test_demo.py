"""`lora-ext demo` end to end (fewer steps than the default run)."""
import re

from lora_ext.cli import main


def test_demo_runs_and_its_checks_pass(tmp_path, capsys):
    assert main(["demo", "--steps", "25", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "demo: all checks passed" in out
    for first, last in re.findall(r"loss ([\d.]+) -> ([\d.]+)", out):
        assert float(last) < float(first)
    assert "swap plus1 -> plus3 (merged, one pass)" in out
    assert (tmp_path / "plus1" / "adapter_model.safetensors").exists()
    assert (tmp_path / "plus3" / "adapter_config.json").exists()
