"""Packaging and the lora-ext command."""
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_build_without_torch_explains_what_to_run():
    hide_torch = ("import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; "
                  "exec(compile(open('setup.py').read(), 'setup.py', 'exec'))")
    out = subprocess.run([sys.executable, "-c", hide_torch], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0
    assert "pip install --no-build-isolation ." in out.stderr
    assert "Traceback" not in out.stderr


def test_console_script_is_registered():
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("lora-ext") == "lora_ext.cli:main"


def test_bench_runs_and_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    out = subprocess.run([sys.executable, "-m", "lora_ext.cli", "bench", "--quick", "--dim", "96",
                          "--json", str(path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(path.read_text())
    impls = {(row["case"].split()[0], row["impl"]) for row in result["rows"]}
    assert {("merge+unmerge", "lora_ext"), ("merge+unmerge", "loralib"), ("merge+unmerge", "addmm_"),
            ("forward", "plain"), ("forward", "lora_ext"), ("forward", "loralib")} <= impls
    peaks = [row for row in result["rows"] if row["case"].startswith("peak")]
    assert peaks and all(row["MiB"] >= 0 for row in peaks)
    assert "| merge+unmerge linear 96 r=16 | lora_ext |" in out.stdout
