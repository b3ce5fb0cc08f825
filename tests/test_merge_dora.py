"""`lora-ext merge` of peft DoRA adapters (use_dora): W' = m / ||W + s B A|| (W + s B A), one norm per output feature,
against the real peft's merge_and_unload and its unmerged DoRA forward, and against a float64 reference for 16-bit
checkpoints; malformed DoRA files refused with nothing written. lora_ext's layers do not serve DoRA: load_peft_adapter
refuses it, pointing at the merge."""
import json
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import lora_ext
from lora_ext.cli import main
from lora_ext.serving import merge_cli
from helpers import edit_adapter_config, rel_err
from tiny_models import gpt2, llama, randomize_lora, tokens, unchanged, snapshot

MAG = "lora_magnitude_vector"


def _randomize_dora(peft_model):
    """Random factors, and magnitudes moved off the base's norms (peft starts them at ||W + s B A||, where a merge
    that forgot the scale would still pass)."""
    randomize_lora(peft_model, names=("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if MAG in n:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    return peft_model


def _adapter(tmp_path, build, targets, name="adapter", **config):
    """(base dir, adapter dir, inputs, peft's unmerged DoRA logits, peft's merged state dict and logits)."""
    model = build()
    base = str(tmp_path / "base")
    if not os.path.exists(base):
        model.save_pretrained(base, max_shard_size="60KB")
    peft_model = _randomize_dora(get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                  use_dora=True, **config)))
    adapter = str(tmp_path / name)
    peft_model.save_pretrained(adapter)
    x = tokens()
    unmerged = peft_model(x).logits
    merged_model = peft_model.merge_and_unload()
    return base, adapter, x, unmerged, merged_model.state_dict(), merged_model(x).logits


def _out_tensors(out):
    tensors = {}
    for f in sorted(os.listdir(out)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(out, f)))
    return tensors


@pytest.mark.parametrize("build,targets,config", [
    (llama, ["q_proj", "v_proj", "down_proj", "embed_tokens"], {}),  # an embedding: one norm per dimension
    (gpt2, ["c_attn", "c_proj", "c_fc", "wpe"], {}),  # Conv1D (fan_in_fan_out): one norm per column
    (llama, "all-linear", dict(use_rslora=True, rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 3})),
], ids=["llama", "gpt2", "llama-all-linear-patterns"])
def test_dora_merge_matches_peft(tmp_path, capsys, build, targets, config):
    base, adapter, x, unmerged, peft_sd, peft_logits = _adapter(tmp_path, build, targets, **config)
    out = str(tmp_path / "merged")
    assert main(["merge", "--base", base, "--adapter", adapter, "--out", out]) == 0
    merged = _out_tensors(out)
    base_sd = _out_tensors(base)
    changed = [k for k in merged if not torch.equal(merged[k], base_sd[k])]
    assert changed and set(changed) <= set(peft_sd)
    for k, t in merged.items():  # every tensor as peft's merge made it (float32: to rounding)
        ref = peft_sd[k]
        assert (t - ref).abs().max() <= 1e-6 * ref.abs().max() + 1e-12, k
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    logits = model(x).logits
    assert rel_err(logits, peft_logits) < 1e-6
    assert rel_err(logits, unmerged) < 1e-5  # peft's DoRA forward, which does not merge
    assert rel_err(AutoModelForCausalLM.from_pretrained(base).eval()(x).logits, unmerged) > 1e-2


def test_dora_scale_is_what_changes_the_merge(tmp_path):
    """The same factors merged as plain LoRA (use_dora off, magnitudes removed) give other weights: the magnitudes
    are read, not dropped."""
    base, adapter, x, unmerged, _, _ = _adapter(tmp_path, llama, ["q_proj"])
    out = str(tmp_path / "merged")
    assert main(["merge", "--base", base, "--adapter", adapter, "--out", out]) == 0
    file = os.path.join(adapter, "adapter_model.safetensors")
    save_file({k: v for k, v in load_file(file).items() if MAG not in k}, file)
    edit_adapter_config(adapter, use_dora=False)
    plain = str(tmp_path / "plain")
    assert main(["merge", "--base", base, "--adapter", adapter, "--out", plain]) == 0
    a = AutoModelForCausalLM.from_pretrained(out).eval()(x).logits
    b = AutoModelForCausalLM.from_pretrained(plain).eval()(x).logits
    assert rel_err(a, unmerged) < 1e-5 and rel_err(b, unmerged) > 1e-3


class _Convs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 6)
        self.lin = torch.nn.Linear(6, 5)
        self.c1 = torch.nn.Conv1d(3, 4, 3)
        self.c2 = torch.nn.Conv2d(3, 4, (3, 2))
        self.c3 = torch.nn.Conv3d(2, 3, 2)


def test_dora_merge_of_convolutions_embedding_and_linear_in_a_file(tmp_path):
    """A bare safetensors file as --base: Conv1d/2d/3d (magnitude (1, out, 1, ...)), an Embedding and a Linear."""
    torch.manual_seed(0)
    model = _Convs()
    base = str(tmp_path / "base.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, base)
    peft_model = _randomize_dora(get_peft_model(model, LoraConfig(r=2, lora_alpha=3, use_dora=True,
                                                                  target_modules=["emb", "lin", "c1", "c2", "c3"])))
    adapter = str(tmp_path / "adapter")
    peft_model.save_pretrained(adapter)
    ref = {k: v.detach() for k, v in peft_model.merge_and_unload().state_dict().items()}
    out = str(tmp_path / "merged.safetensors")
    assert main(["merge", "--base", base, "--adapter", adapter, "--out", out]) == 0
    merged, before = load_file(out), load_file(base)
    assert set(merged) == set(ref)
    for k, t in merged.items():
        assert (t - ref[k]).abs().max() <= 1e-6 * ref[k].abs().max(), k
        if k.endswith("weight"):
            assert not torch.equal(t, before[k]), k
        else:
            assert torch.equal(t, before[k]), k  # biases: DoRA scales the weight only


def _reference(base_sd, adapter, cfg_r=4, alpha=8):
    """{weight key: (float64 DoRA merge, float32's error bound)} from the files alone (Linear modules of a Llama, no
    fan_in_fan_out). The bound: a few float32 units of the terms' magnitudes (|W| + s |B| |A|, scaled), where
    W + s B A cancels."""
    tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    ref = {}
    for key, A in tensors.items():
        if not key.endswith("lora_A.weight"):
            continue
        name = key[len("base_model.model."):-len(".lora_A.weight")]
        B = tensors[key.replace("lora_A", "lora_B")].double()
        m = tensors[f"base_model.model.{name}.{MAG}"].double()
        w = base_sd[name + ".weight"].double()
        v = w + (alpha / cfg_r) * B @ A.double()
        factor = m.view(-1, 1) / v.norm(dim=1, keepdim=True)
        terms = w.abs() + (alpha / cfg_r) * B.abs() @ A.double().abs()
        ref[name + ".weight"] = (factor * v, factor.abs() * terms * 2.0 ** -21)
    return ref


@pytest.mark.parametrize("dtype,bits", [(torch.bfloat16, 8), (torch.float16, 11)])
def test_dora_merge_into_16_bit_is_rounded_once(tmp_path, dtype, bits):
    """A 16-bit checkpoint: computed in float32 and rounded once, so every element is within half a unit of the
    float64 merge (and float32's error where W + s B A cancels); peft, which works in the weight's dtype, is
    looser (not asserted)."""
    model = llama().to(dtype)
    base = str(tmp_path / "base")
    model.save_pretrained(base)
    peft_model = _randomize_dora(get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                                    target_modules=["q_proj", "up_proj"])))
    adapter = str(tmp_path / "adapter")
    peft_model.save_pretrained(adapter)
    out = str(tmp_path / "merged")
    assert main(["merge", "--base", base, "--adapter", adapter, "--out", out]) == 0
    merged, base_sd = _out_tensors(out), _out_tensors(base)
    ref = _reference(base_sd, adapter)
    assert len(ref) == 4
    for k, t in merged.items():
        assert t.dtype == dtype, k
        if k not in ref:
            assert torch.equal(t, base_sd[k]), k
            continue
        want, f32 = ref[k]
        half_ulp = (want.abs() + torch.finfo(dtype).smallest_normal) * 2.0 ** -bits  # |x| 2^-(p+1); subnormals
        assert ((t.double() - want).abs() <= half_ulp + f32).all(), k


def test_dora_merge_with_dtype_conversion(tmp_path):
    """--dtype bfloat16 from a float32 checkpoint: the merge in float32, rounded once to bfloat16."""
    base, adapter, *_ = _adapter(tmp_path, llama, ["q_proj", "up_proj"])
    out = str(tmp_path / "merged")
    assert main(["merge", "--base", base, "--adapter", adapter, "--out", out, "--dtype", "bfloat16"]) == 0
    merged, base_sd = _out_tensors(out), _out_tensors(base)
    ref = _reference(base_sd, adapter)
    for k, t in merged.items():
        assert t.dtype == torch.bfloat16, k
        want, f32 = ref[k] if k in ref else (base_sd[k].double(), 0)
        assert ((t.double() - want).abs() <= want.abs() * 2.0 ** -8 + f32).all(), k


@pytest.mark.gpu
def test_dora_merge_on_the_kernels(tmp_path, cuda):
    """The merge step on the device's kernels (the simulator in a rehearsal) gives peft's weights."""
    base, adapter, x, unmerged, peft_sd, _ = _adapter(tmp_path, llama, ["q_proj", "down_proj"])
    out = str(tmp_path / "merged")
    n = merge_cli.merge_checkpoint(base, adapter, out, device=cuda.device.type, progress=False)
    assert n == 4
    for k, t in _out_tensors(out).items():
        assert (t - peft_sd[k]).abs().max() <= 1e-6 * peft_sd[k].abs().max() + 1e-12, k


def _refused(tmp_path, capsys, adapter, base, *words):
    out = str(tmp_path / "refused")
    assert main(["merge", "--base", base, "--adapter", adapter, "--out", out]) == 2
    err = capsys.readouterr().err
    assert not os.path.exists(out)
    for w in words:
        assert w in err, (w, err)


def _edit_tensors(adapter, edit):
    file = os.path.join(adapter, "adapter_model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def test_malformed_dora_adapters_are_refused(tmp_path, capsys):
    base, adapter, *_ = _adapter(tmp_path, llama, ["q_proj"])
    q0 = f"base_model.model.model.layers.0.self_attn.q_proj.{MAG}"
    good = load_file(os.path.join(adapter, "adapter_model.safetensors"))

    def restore():
        save_file(good, os.path.join(adapter, "adapter_model.safetensors"))
        edit_adapter_config(adapter, use_dora=True)

    _edit_tensors(adapter, lambda t: t.pop(q0))
    _refused(tmp_path, capsys, adapter, base, "use_dora is on", "no DoRA magnitude", "layers.0.self_attn.q_proj")
    restore()
    _edit_tensors(adapter, lambda t: t.update({q0: t[q0][:-1].clone()}))
    _refused(tmp_path, capsys, adapter, base, q0, "shape")
    restore()
    _edit_tensors(adapter, lambda t: t.update({q0: t[q0].view(1, -1).clone()}))
    _refused(tmp_path, capsys, adapter, base, q0, "shape")
    restore()
    _edit_tensors(adapter, lambda t: t[q0].__setitem__(3, float("nan")))
    _refused(tmp_path, capsys, adapter, base, q0, "finite")
    restore()
    _edit_tensors(adapter, lambda t: t.update({q0.replace("q_proj", "k_proj"): t[q0].clone()}))
    _refused(tmp_path, capsys, adapter, base, "k_proj", "without factors")
    restore()
    edit_adapter_config(adapter, use_dora=False)  # magnitudes peft would ignore
    _refused(tmp_path, capsys, adapter, base, "use_dora is off", "magnitude")
    edit_adapter_config(adapter, use_dora="yes")
    _refused(tmp_path, capsys, adapter, base, "use_dora must be true or false")
    restore()
    assert main(["merge", "--base", base, "--adapter", adapter, "--out", str(tmp_path / "ok")]) == 0


def test_zero_norm_row_is_refused_unless_allow_inf(tmp_path, capsys):
    """A row of W + s B A with norm 0 makes m / 0: peft writes inf/NaN; the merge refuses, naming the tensor."""
    model = llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[5].zero_()
    base = str(tmp_path / "base")
    model.save_pretrained(base)
    peft_model = _randomize_dora(get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)))
    with torch.no_grad():
        peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight[5].zero_()
    adapter = str(tmp_path / "adapter")
    peft_model.save_pretrained(adapter)
    _refused(tmp_path, capsys, adapter, base, "layers.0.self_attn.q_proj.weight", "DoRA", "inf/NaN")
    out = str(tmp_path / "forced")
    assert main(["merge", "--base", base, "--adapter", adapter, "--out", out, "--allow-inf"]) == 0
    w = _out_tensors(out)["model.layers.0.self_attn.q_proj.weight"]
    assert torch.isnan(w[5]).all() and torch.isfinite(w[:5]).all() and torch.isfinite(w[6:]).all()


def test_float16_overflow_of_the_dora_scale_is_refused(tmp_path, capsys):
    model = llama().half()
    base = str(tmp_path / "base")
    model.save_pretrained(base)
    peft_model = _randomize_dora(get_peft_model(llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)))
    with torch.no_grad():
        peft_model.base_model.model.model.layers[1].self_attn.q_proj.lora_magnitude_vector["default"].weight[0] = 1e9
    adapter = str(tmp_path / "adapter")
    peft_model.save_pretrained(adapter)
    _refused(tmp_path, capsys, adapter, base, "layers.1.self_attn.q_proj.weight", "DoRA merge", "overflowed")


def test_load_peft_adapter_refuses_dora_pointing_at_the_merge(tmp_path):
    _, adapter, *_ = _adapter(tmp_path, llama, ["q_proj"])
    model = llama()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="use_dora.*lora-ext merge"):
        lora_ext.load_peft_adapter(model, adapter)
    assert unchanged(model, snap) and not any(isinstance(m, lora_ext.LoRALayer) for m in model.modules())
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        assert json.load(f)["use_dora"] is True
    edit_adapter_config(adapter, use_dora=False)  # the magnitudes stay in the file: still refused, by key
    with pytest.raises(ValueError, match=MAG):
        lora_ext.load_peft_adapter(model, adapter)
    assert unchanged(model, snap)
