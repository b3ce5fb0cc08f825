"""The thirty-eighth session's fixes, each test failing on the commit before its fix."""
import json
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

import lora_ext as lora
from lora_ext.serving import files
from test_session_hostile19 import _alpha_and_factor, _save_in_child


def _dead_pid():
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


# ---- the file layer ----

def test_names_without_a_pid_are_never_taken_for_stale_temporaries(tmp_path):
    # any `.<name>.tmp-` + 8 characters of [a-z0-9_] was an older temporary, always stale: a user's dated backup
    # folder `.merged.tmp-20261205/` (rmtree'd) and `.adapter_model.safetensors.tmp-backup_1` went without a word
    # before a save or a merge
    dead = _dead_pid()
    mine = [".merged.tmp-20261205", ".merged.tmp-previous", ".merged.tmp-backup_1"]
    stale = [f".merged.tmp-{dead}-a1b2_c3d", f".merged.tmp-{dead}-old-zz9_8y7x"]
    for name in mine + stale:
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("mine")
    assert files.remove_stale_temporaries(tmp_path / "merged") == sorted(str(tmp_path / n) for n in stale)
    assert sorted(os.listdir(tmp_path)) == sorted(mine)
    model = nn.Sequential(nn.Linear(8, 8))
    lora.inject(model, ["0"], r=2)
    out = tmp_path / "ad"
    out.mkdir()
    (out / ".adapter_model.safetensors.tmp-backup_1").write_text("mine")
    lora.save_peft_adapter(model, str(out))
    assert (out / ".adapter_model.safetensors.tmp-backup_1").read_text() == "mine"


def _torn(tmp_path):
    """`out` as a save killed between its renames left it (the new weights, the old config), and `new`: the
    adapter that save was writing, saved whole elsewhere."""
    out, new, other = tmp_path / "adapter", tmp_path / "new", tmp_path / "other"
    _save_in_child(out, 8, 1)
    _save_in_child(new, 64, 2)
    _save_in_child(other, 16, 3)
    _save_in_child(out, 64, 2, kill_at=2)
    time.sleep(0.2)  # (what is written there next comes later than within the rename's own call)
    return out, new, other


def _model():
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


@pytest.mark.parametrize("how", ["copied over", "renamed over"])
def test_a_set_written_whole_over_a_torn_save_loads(tmp_path, how):
    # once another adapter was written whole over a torn save (peft's save_pretrained, a copy from a backup), the dead
    # save's leftovers still refused it; following the message's advice to finish that save then paired the new
    # weights with the dead save's config: loaded silently, 3.3 off (lora_alpha 64 for 16)
    out, _, other = _torn(tmp_path)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        if how == "copied over":  # (written into the same inodes: the config's is the file the save kept aside)
            shutil.copyfile(other / name, out / name)
        else:
            shutil.copyfile(other / name, out / (name + ".part"))
            os.replace(out / (name + ".part"), out / name)
    model = _model()
    lora.load_peft_adapter(model, str(out))
    want_alpha, want_a = _alpha_and_factor(other)
    assert model[0].scaling == want_alpha / 2 == 8.0
    assert torch.equal(model[0].lora_A.detach(), want_a)


def test_a_torn_save_whose_new_file_changed_since_advises_only_the_undo(tmp_path):
    # the weights the killed save renamed into place were written again since: renaming its config temporary in
    # place (the advice) would pair that config with weights it was not saved with
    out, new, other = _torn(tmp_path)
    shutil.copyfile(other / "adapter_model.safetensors", out / "adapter_model.safetensors")
    message = str(pytest.raises(ValueError, lora.load_peft_adapter, _model(), str(out)).value)
    assert "was killed between renaming" in message and "To finish the save" not in message
    assert "cannot be finished by hand" in message
    undo = message.split("To undo it rename ")[1].split(" to ")[0]
    os.replace(undo, out / "adapter_model.safetensors")  # the old set whole again
    model = _model()
    lora.load_peft_adapter(model, str(out))
    assert model[0].scaling == 4.0  # (the first save's alpha 8 at r=2)


def test_the_torn_save_advice_still_finishes_a_save_left_as_the_kill_left_it(tmp_path):
    out, new, _ = _torn(tmp_path)
    message = str(pytest.raises(ValueError, lora.load_peft_adapter, _model(), str(out)).value)
    finish = message.split("To finish the save rename ")[1].split(" to ")[0]
    os.replace(finish, out / "adapter_config.json")
    assert _alpha_and_factor(out)[0] == 64
    assert torch.equal(_alpha_and_factor(out)[1], _alpha_and_factor(new)[1])


@pytest.mark.parametrize("mask", [0o077, 0o022])
def test_atomic_writes_follow_the_umask(tmp_path, mask):
    # every output was chmod'ed 0o644 (0o755 a directory): under umask 077 an adapter (or a merge --out) came out
    # world-readable, and a 0600 file saved over became 0644
    old = os.umask(mask)
    try:
        model = nn.Sequential(nn.Linear(8, 8))
        lora.inject(model, ["0"], r=2)
        lora.save_peft_adapter(model, str(tmp_path / "ad"))
        with files.atomic_path(str(tmp_path / "dir"), directory=True) as tmp:
            open(os.path.join(tmp, "x"), "w").close()
        with files.atomic_path(str(tmp_path / "f.json")) as tmp:
            open(tmp, "w").close()
    finally:
        os.umask(old)
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert stat.S_IMODE(os.stat(tmp_path / "ad" / f).st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(os.stat(tmp_path / "f.json").st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(os.stat(tmp_path / "dir").st_mode) == 0o777 & ~mask


def test_a_directory_output_syncs_its_subdirectories(tmp_path, monkeypatch):
    # the files and the top directory were synced, not the subdirectories holding a merge's shards: after a power cut
    # the renamed directory could miss their entries
    synced = []
    real = files._fsync
    monkeypatch.setattr(files, "_fsync", lambda p: (synced.append(os.path.basename(p)), real(p)))
    with files.atomic_path(str(tmp_path / "out"), directory=True) as tmp:
        os.makedirs(os.path.join(tmp, "sub", "deeper"))
        open(os.path.join(tmp, "sub", "deeper", "shard.safetensors"), "w").close()
        open(os.path.join(tmp, "config.json"), "w").close()
    assert {"shard.safetensors", "config.json", "sub", "deeper"} <= set(synced)
    assert synced.index("deeper") < synced.index("sub")  # (a directory after what it holds)


# ---- the CLI ----

def test_demo_refuses_an_adapter_path_taken_by_a_file_before_training(tmp_path, monkeypatch):
    # `lora-ext demo --out DIR` with DIR/plus1 a file trained both adapters, then died with a FileExistsError traceback
    from lora_ext.serving import demo
    (tmp_path / "plus3").write_text("mine")
    monkeypatch.setattr(demo, "_run", lambda *a: pytest.fail("trained before the check"))
    with pytest.raises(SystemExit, match="plus3.* is there and is not a directory"):
        demo.run(out=str(tmp_path))
    assert (tmp_path / "plus3").read_text() == "mine"


def test_bench_json_over_a_symlink_writes_where_it_points(tmp_path):
    # the link was replaced by a regular file, and the file it named kept its old content
    from lora_ext.cli import _write_json
    target = tmp_path / "results.json"
    target.write_text('{"old": 1}')
    link = tmp_path / "latest.json"
    link.symlink_to(target)
    _write_json(str(link), {"rows": [1]})
    assert link.is_symlink() and json.loads(target.read_text()) == {"rows": [1]}
