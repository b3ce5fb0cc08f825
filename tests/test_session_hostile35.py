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
