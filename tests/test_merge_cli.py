"""`lora-ext merge`: streamed, sharded like the input, loads in transformers with peft's merge_and_unload
logits, never leaves a half-written output under the final name."""
import json
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lora_ext.cli import main
from lora_ext.serving import merge_cli
from helpers import edit_adapter_config, rel_err
from tiny_models import gpt2, llama, randomize_lora, tokens


def _setup(tmp_path, build, targets, shard="60KB", **config):
    model = build()
    base = str(tmp_path / "base")
    model.save_pretrained(base, max_shard_size=shard)
    peft_model = randomize_lora(get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                 **config)))
    adapter = str(tmp_path / "adapter")
    peft_model.save_pretrained(adapter)
    x = tokens()
    ref = peft_model.merge_and_unload()(x).logits
    return base, adapter, x, ref


@pytest.mark.parametrize("build,targets,config", [
    (gpt2, ["c_attn", "c_proj", "c_fc", "wpe"], {}),  # wte: tied, refused
    (llama, ["q_proj", "v_proj", "down_proj", "embed_tokens"], {}),
    (llama, ["q_proj", "down_proj"], dict(layers_to_transform=[1], layers_pattern="layers")),  # peft's layer filter
], ids=["gpt2", "llama", "llama-layer-1"])
def test_sharded_merge_matches_peft_merge_and_unload(tmp_path, capsys, build, targets, config):
    base, adapter, x, ref = _setup(tmp_path, build, targets, **config)
    out = str(tmp_path / "merged")
    assert main(["merge", "--base", base, "--adapter", adapter, "--out", out]) == 0
    shards = sorted(f for f in os.listdir(base) if f.endswith(".safetensors"))
    assert len(shards) > 1 and sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == shards
    with open(os.path.join(out, merge_cli.INDEX_NAME)) as f, open(os.path.join(base, merge_cli.INDEX_NAME)) as g:
        assert json.load(f)["weight_map"] == json.load(g)["weight_map"]
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert rel_err(merged(x).logits, ref) < 1e-5
    assert "merge [" in capsys.readouterr().err  # the progress bar
    base_logits = AutoModelForCausalLM.from_pretrained(base).eval()(x).logits
    assert rel_err(base_logits, ref) > 1e-2  # the adapter did change the model


def test_factors_outside_layers_to_transform_are_refused(tmp_path, capsys):
    base, adapter, _, _ = _setup(tmp_path, llama, ["q_proj"])  # factors in layers 0 and 1
    edit_adapter_config(adapter, layers_to_transform=[0])  # peft would leave layer 1's alone
    out = str(tmp_path / "merged")
    assert main(["merge", "--base", base, "--adapter", adapter, "--out", out]) != 0
    assert "layers.1.self_attn.q_proj" in capsys.readouterr().err and not os.path.exists(out)


def test_single_file_and_dtype(tmp_path):
    base, adapter, x, ref = _setup(tmp_path, llama, ["q_proj", "o_proj"], shard="50MB")
    src = os.path.join(base, "model.safetensors")
    out = str(tmp_path / "merged.safetensors")
    assert main(["merge", "--base", src, "--adapter", adapter, "--out", out, "--dtype", "bfloat16", "--quiet"]) == 0
    key = "model.layers.0.self_attn.q_proj.weight"
    with safe_open(out, "pt") as f, safe_open(src, "pt") as g:
        assert set(f.keys()) == set(g.keys())
        w, w0 = f.get_tensor(key), g.get_tensor(key)
    assert w.dtype == torch.bfloat16
    t = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    module = "base_model.model." + key[:-len(".weight")]
    w_ref = w0.double() + 2.0 * t[module + ".lora_B.weight"].double() @ t[module + ".lora_A.weight"].double()
    assert rel_err(w, w_ref) < 1e-2


def test_a_failed_write_leaves_no_output(tmp_path, monkeypatch):
    base, adapter, _, _ = _setup(tmp_path, gpt2, ["c_attn"])
    out = str(tmp_path / "merged")
    real, calls = merge_cli._write_shard, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args)

    monkeypatch.setattr(merge_cli, "_write_shard", failing)
    with pytest.raises(merge_cli.MergeError, match="disk full"):
        merge_cli.merge_checkpoint(base, adapter, out, progress=False)
    assert not os.path.exists(out)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".merged")]  # no temporary left either


def test_bad_arguments_are_refused_with_the_option_named(tmp_path, capsys):
    base, adapter, _, _ = _setup(tmp_path, gpt2, ["c_attn"])
    cfg_file = os.path.join(adapter, "adapter_config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    out = str(tmp_path / "merged")
    with open(cfg_file, "w") as f:
        json.dump(dict(cfg, use_dora=True), f)
    assert main(["merge", "--base", base, "--adapter", adapter, "--out", out]) == 2
    assert "use_dora" in capsys.readouterr().err and not os.path.exists(out)
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)
    assert main(["merge", "--base", str(tmp_path / "nowhere"), "--adapter", adapter, "--out", out]) == 2
    assert "--base" in capsys.readouterr().err
    os.makedirs(out)
    open(os.path.join(out, "keep"), "w").close()
    assert main(["merge", "--base", base, "--adapter", adapter, "--out", out]) == 2
    assert "--out" in capsys.readouterr().err and os.listdir(out) == ["keep"]
