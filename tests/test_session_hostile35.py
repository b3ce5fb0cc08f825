"""Forty-second session: what the hostile rounds of this session found, each with a test that fails on the commit
before its fix."""
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model

import lora_ext as lora
from tiny_models import llama, randomize_lora


def _peft_dir(tmp_path, seed=1):
    pm = get_peft_model(llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(seed)
    randomize_lora(pm)
    out = str(tmp_path / f"adapter{seed}")
    pm.save_pretrained(out)
    return out


def test_a_config_that_is_not_a_regular_file_is_named_as_such(tmp_path):
    """h9: an adapter_config.json that is a FIFO (or a directory) was reported as missing."""
    d = _peft_dir(tmp_path)
    cfg = os.path.join(d, "adapter_config.json")
    os.remove(cfg)
    os.mkfifo(cfg)
    model = llama()
    with pytest.raises(ValueError, match=r"adapter_config.json: not a regular file"):
        lora.load_peft_adapter(model, d, "x")
    assert not any(isinstance(m, lora.LoRALayer) for m in model.modules())


def test_a_hub_snapshot_without_its_weights_is_named_as_such(tmp_path, monkeypatch):
    """h9: a cached snapshot holding the config but no weights file was reported as 'neither in the Hub cache'."""
    from huggingface_hub import constants
    root = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    d = _peft_dir(tmp_path)
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = root / "models--owner--cut" / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "adapter_config.json").write_bytes(open(os.path.join(d, "adapter_config.json"), "rb").read())
    (root / "models--owner--cut" / "refs").mkdir()
    (root / "models--owner--cut" / "refs" / "main").write_text(commit)
    with pytest.raises(FileNotFoundError, match=r"'owner/cut' is not a local path, and its adapter_config.json is in "
                                                r"the Hub cache but neither adapter_model.safetensors nor "
                                                r"adapter_model.bin is"):
        lora.load_peft_adapter(llama(), "owner/cut", "x")


def test_merge_never_walks_into_a_link_back_up_the_base(tmp_path):
    """h9: a link inside --base back up the tree (loop -> ., or a -> b with b/back -> a) was walked into
    loop/loop/... until the system refused the path: the merge was refused with a 1.4 KB message of loop/loop/...,
    and a loop beside no weights would have copied a side file at every depth. Now such links are not walked into;
    two links to one directory elsewhere are both followed."""
    from lora_ext.cli import main
    from transformers import AutoModelForCausalLM
    model = llama()
    base = tmp_path / "base"
    model.save_pretrained(str(base), max_shard_size="60KB")
    os.symlink(".", base / "loop")
    (base / "a").mkdir()
    (base / "b").mkdir()
    (base / "a" / "note.txt").write_text("a")
    os.symlink("../a", base / "b" / "back")  # b/back -> a
    os.symlink("../b", base / "a" / "down")  # a/down -> b: b/back/down/back/... would loop
    shared = tmp_path / "shared_tok"
    shared.mkdir()
    (shared / "tokenizer.json").write_text("{}")
    os.symlink(shared, base / "tok1")
    os.symlink(shared, base / "tok2")
    pm = get_peft_model(llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    torch.manual_seed(3)
    randomize_lora(pm)
    adapter = str(tmp_path / "adapter")
    pm.save_pretrained(adapter)
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(base), "--adapter", adapter, "--out", str(out), "--quiet"]) == 0
    found = sorted(os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(out) for f in fs)
    side = [f for f in found if not f.startswith(("model", "config.json", "generation_config.json"))]
    assert side == ["a/note.txt", "b/back/note.txt", "tok1/tokenizer.json",
                    "tok2/tokenizer.json"], side
    x = torch.randint(0, 32, (2, 5))
    with torch.no_grad():
        ref = pm.merge_and_unload()(x).logits
        got = AutoModelForCausalLM.from_pretrained(str(out)).eval()(x).logits
    assert (got - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_lora_state_dict_keys_a_layer_under_each_of_its_names(bias):
    """P1: a LoRA layer registered twice (self.b = self.a) was saved under its first name only; a load with
    strict=False (loralib's recipe) then reported b's factors missing. loralib and state_dict() key both."""
    import loralib
    import torch.nn as nn

    def net(lib):
        m = nn.Module()
        m.a = lib.Linear(4, 4, r=2, lora_alpha=4)
        m.b = m.a
        m.c = lib.Linear(4, 4, r=2)
        return m
    ours, theirs = net(lora), net(loralib)
    want = sorted(loralib.lora_state_dict(theirs, bias))
    assert "b.lora_A" in want
    sd = lora.lora_state_dict(ours, bias)
    assert sorted(sd) == want
    assert sd["b.lora_A"].data_ptr() != ours.a.lora_A.data_ptr() and torch.equal(sd["b.lora_A"], ours.a.lora_A)
    res = net(lora).load_state_dict(sd, strict=False)
    assert not [k for k in res.missing_keys if "lora_" in k]


@pytest.mark.parametrize("build", [lambda: lora.Conv2d(3, 4, 3, r=2), lambda: lora.Linear(3, 4, r=2),
                                   lambda: torch.nn.Sequential(torch.nn.ReLU(), lora.Embedding(5, 3, r=2))],
                         ids=["conv2d", "linear", "inside-a-model"])
def test_torch_jit_script_is_refused_naming_the_layer(build):
    """P1: torch.jit.script of a Conv2d (which loralib's scripts) failed with "Expected a single top-level function",
    naming nothing."""
    with pytest.raises(RuntimeError, match=r"(Conv2d\(3, 4, kernel_size=\(3, 3\)\)|Linear\(3, 4\)|Embedding\(5, 3\)): "
                                           r"a lora_ext layer cannot be compiled by torch.jit.script"):
        torch.jit.script(build())
