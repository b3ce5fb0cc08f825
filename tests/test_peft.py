"""peft adapter directories both ways, against the real peft: the same adapter gives the same outputs."""
import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

import lora_ext
from helpers import edit_adapter_config, rel_err
from tiny_models import gpt2, llama, randomize_lora, snapshot, tokens, unchanged

CASES = {
    "gpt2-rslora-patterns": (gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                        rank_pattern={"h.1.attn.c_attn": 2}, alpha_pattern={"c_proj": 3},
                                        use_rslora=True, fan_in_fan_out=True)),
    "llama-embedding-regex": (llama, dict(r=3, lora_alpha=5, target_modules=r".*\.(q_proj|v_proj|down_proj|embed_tokens)",
                                          rank_pattern={"down_proj": 6})),
    # peft's layer filter: the index after the first name part (transformer.h.1...), or after layers_pattern
    "gpt2-layers": (gpt2, dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], layers_to_transform=[1],
                               fan_in_fan_out=True)),
    "llama-layers-pattern": (llama, dict(r=2, lora_alpha=3, target_modules=["q_proj", "down_proj", "embed_tokens"],
                                         layers_to_transform=0, layers_pattern="layers")),
}


def _peft_adapted(peft_model):
    """The names of the modules peft adapted, as the plain model names them."""
    return sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                  if isinstance(m, LoraLayer))


def _peft_adapter(tmp_path, case):
    build, kwargs = CASES[case]
    peft_model = randomize_lora(get_peft_model(build(), LoraConfig(**kwargs)), names=("lora_",))
    peft_model.eval()
    path = str(tmp_path / "peft_adapter")
    peft_model.save_pretrained(path)
    return build, peft_model, path


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_into_lora_ext(tmp_path, case):
    build, peft_model, path = _peft_adapter(tmp_path, case)
    x = tokens()
    ref = peft_model(x).logits
    model = build()
    names = lora_ext.load_peft_adapter(model, path)
    assert names and all(isinstance(model.get_submodule(n), lora_ext.LoRALayer) for n in names)
    assert sorted(names) == _peft_adapted(peft_model)
    assert rel_err(model(x).logits, ref) < 1e-5
    model.eval()  # merged in place
    assert all(model.get_submodule(n).merged for n in names)
    assert rel_err(model(x).logits, ref) < 1e-5


@pytest.mark.parametrize("build,targets,fused", [
    (llama, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "embed_tokens"], None),
    (gpt2, ["c_proj", "c_fc"], {"c_attn": [True, False, True]}),
])
def test_lora_ext_adapter_loads_in_peft(tmp_path, build, targets, fused):
    model, x = build(), tokens()
    lora_ext.inject(model, targets, r=4, lora_alpha=6, fused=fused, rank_pattern={"o_proj": 2})
    randomize_lora(model)
    expected = model(x).logits
    path = str(tmp_path / "ours")
    lora_ext.save_peft_adapter(model, path)
    peft_model = PeftModel.from_pretrained(build(), path).eval()
    assert rel_err(peft_model(x).logits, expected) < 1e-5
    # and back into lora_ext (a fused layer comes back as a plain Linear of rank 2*r, the same update)
    again = build()
    lora_ext.load_peft_adapter(again, path)
    assert rel_err(again(x).logits, expected) < 1e-5


@pytest.mark.parametrize("enable", [[True, True, True], [True, False, True]], ids=["qkv", "q_v"])
def test_peft_adapter_loads_into_a_fused_layer(tmp_path, enable):
    peft_model = randomize_lora(get_peft_model(gpt2(), LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn"],
                                                                  fan_in_fan_out=True)), names=("lora_",))
    blocks = [m.lora_B["default"].weight for n, m in peft_model.named_modules() if n.endswith("c_attn")]
    with torch.no_grad():
        for w in blocks:  # peft's B spans q, k and v; the adapter must leave the disabled blocks alone
            for e, on in enumerate(enable):
                if not on:
                    w[e * 64:(e + 1) * 64].zero_()
    path = str(tmp_path / "peft_adapter")
    peft_model.eval().save_pretrained(path)
    x = tokens()
    model = gpt2()
    lora_ext.inject(model, [], fused={"c_attn": enable})
    lora_ext.load_peft_adapter(model, path)
    assert all(isinstance(m, lora_ext.MergedLinear) for n, m in model.named_modules() if n.endswith("c_attn"))
    assert rel_err(model(x).logits, peft_model(x).logits) < 1e-5
    model.eval()
    assert rel_err(model(x).logits, peft_model(x).logits) < 1e-5


def test_peft_adapter_touching_a_disabled_block_is_refused(tmp_path):
    peft_model = randomize_lora(get_peft_model(gpt2(), LoraConfig(r=3, target_modules=["c_attn"],
                                                                  fan_in_fan_out=True)), names=("lora_",))
    path = str(tmp_path / "peft_adapter")
    peft_model.save_pretrained(path)
    model = gpt2()
    lora_ext.inject(model, [], fused={"c_attn": [True, False, True]})
    randomize_lora(model)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"also changes block\(s\) \[1\]"):
        lora_ext.load_peft_adapter(model, path)
    assert unchanged(model, snap)


class _Convs(torch.nn.Module):
    """Convolutions of every rank peft adapts, with kernels taller than 1 (loralib's layout differs there)."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv1d(3, 6, 3, padding=1)
        self.c2 = torch.nn.Conv2d(6, 8, (3, 2), padding=1)
        self.c3 = torch.nn.Conv3d(8, 4, (2, 1, 3))

    def forward(self, x):
        y = self.c2(self.c1(x)[:, :, None, :].expand(-1, -1, 5, -1))
        return self.c3(y[:, :, None].expand(-1, -1, 3, -1, -1))


def _convs():
    torch.manual_seed(0)
    return _Convs().eval()


CONV_TARGETS = ["c1", "c2", "c3"]


def test_peft_conv_adapters_of_any_kernel_load_into_lora_ext_and_back(tmp_path):
    peft_model = randomize_lora(get_peft_model(_convs(), LoraConfig(r=2, lora_alpha=3, target_modules=CONV_TARGETS)))
    path = str(tmp_path / "peft_adapter")
    peft_model.eval().save_pretrained(path)
    x = torch.randn(2, 3, 7)
    ref = peft_model(x)
    model = _convs()
    lora_ext.load_peft_adapter(model, path)
    assert all(isinstance(model.get_submodule(n), lora_ext.ConvLoRA) for n in CONV_TARGETS)
    assert rel_err(model(x), ref) < 1e-5
    model.eval()
    assert rel_err(model(x), ref) < 1e-5
    # saved again, the loaded adapter keeps peft's rank (B is X (x) I_k0) and loads in peft as it was
    again = str(tmp_path / "again")
    lora_ext.save_peft_adapter(model, again)
    with open(os.path.join(again, "adapter_config.json")) as f:
        cfg = json.load(f)
    assert cfg["r"] == 2 and not cfg["rank_pattern"]
    assert rel_err(PeftModel.from_pretrained(_convs(), again).eval()(x), ref) < 1e-5


def test_lora_ext_conv_adapters_of_any_kernel_load_in_peft(tmp_path):
    model = _convs()
    lora_ext.inject(model, CONV_TARGETS, r=2, lora_alpha=3)
    randomize_lora(model)  # a general B: saved as the exact rank-r*k0*k0 pair
    x = torch.randn(2, 3, 7)
    expected = model(x)
    path = str(tmp_path / "ours")
    lora_ext.save_peft_adapter(model, path)
    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    assert (cfg["r"], cfg["rank_pattern"]) == (2 * 3 * 3, {"c3": 2 * 2 * 2})  # r * k0 * k0 per layer
    assert rel_err(PeftModel.from_pretrained(_convs(), path).eval()(x), expected) < 1e-5


@pytest.mark.parametrize("changes,match", [
    (dict(use_dora=True), "use_dora"),
    (dict(some_new_option=3), "some_new_option"),
    (dict(init_lora_weights="pissa"), "init_lora_weights"),
    (dict(bias="all"), "bias"),
    (dict(lora_bias=True), "lora_bias"),
    (dict(layers_to_transform=[0]), "do not select"),  # honoured: the file's layer-1 factors are then extra
    (dict(layers_to_transform=["0"]), "layers_to_transform must be"),
    (dict(layers_to_transform=[0], layers_pattern="(h"), "layers_pattern"),
    (dict(peft_type="IA3"), "peft_type"),
    (dict(r=5), "r=5"),
])
def test_configs_lora_ext_cannot_honour_or_that_do_not_fit_are_refused(tmp_path, changes, match):
    _, _, path = _peft_adapter(tmp_path, "gpt2-rslora-patterns")
    edit_adapter_config(path, **changes)
    model = gpt2()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        lora_ext.load_peft_adapter(model, path)
    assert unchanged(model, snap) and not any(isinstance(m, lora_ext.LoRALayer) for m in model.modules())


@pytest.mark.parametrize("damage,match", [("shape", "do not fit"), ("nan", "non-finite"), ("key", "unexpected key")])
def test_bad_weights_are_refused_before_any_weight_changes(tmp_path, damage, match):
    _, _, path = _peft_adapter(tmp_path, "gpt2-rslora-patterns")
    file = os.path.join(path, "adapter_model.safetensors")
    tensors = load_file(file)
    key = "base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight"
    if damage == "shape":
        tensors[key] = torch.randn(tensors[key].shape[0] + 1, tensors[key].shape[1])
    elif damage == "nan":
        tensors[key][3, 1] = float("nan")
    else:
        tensors["base_model.model.transformer.h.1.mlp.c_fc.bias"] = torch.zeros(3)
    save_file(tensors, file)
    # into a model that already holds a merged adapter: it must stay exactly as it was
    model, x = gpt2(), tokens()
    lora_ext.inject(model, ["c_attn", "c_proj", "c_fc"], r=4)
    randomize_lora(model)
    model.eval()
    before, snap = model(x).logits, {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        lora_ext.load_peft_adapter(model, path)
    assert all(torch.equal(p, snap[n]) for n, p in model.named_parameters())
    assert torch.equal(model(x).logits, before)


def test_legacy_bin_is_read_with_weights_only(tmp_path):
    _, peft_model, path = _peft_adapter(tmp_path, "gpt2-rslora-patterns")
    file = os.path.join(path, "adapter_model.safetensors")
    torch.save(load_file(file), os.path.join(path, "adapter_model.bin"))
    os.remove(file)
    x = tokens()
    model = gpt2()
    lora_ext.load_peft_adapter(model, path)
    assert rel_err(model(x).logits, peft_model(x).logits) < 1e-5
    # a pickle that is not plain tensors is refused by weights_only
    torch.save({"k": _NotATensor()}, os.path.join(path, "adapter_model.bin"))
    with pytest.raises(Exception, match="[Ww]eights only"):
        lora_ext.load_peft_adapter(gpt2(), path)


class _NotATensor:
    pass


def test_base_weights_peft_saves_for_another_adapters_embedding_load_and_merge(tmp_path):
    # peft saves the whole base weight of every embedding or head some adapter of the model targets into each
    # adapter's file (save_embedding_layers="auto"): b's file holds lm_head's base weight, which only a targets.
    # peft loads b (the tensor is the model's own); it was refused here as "a base tensor without factors"
    from helpers import peft_with_adapters
    cfg = {"a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]),
           "b": dict(r=4, lora_alpha=3, target_modules=["q_proj", "embed_tokens"])}
    pm = randomize_lora(peft_with_adapters(llama(), cfg))
    pm.save_pretrained(str(tmp_path / "both"))
    path = str(tmp_path / "both" / "b")
    assert "base_model.model.lm_head.base_layer.weight" in load_file(os.path.join(path, "adapter_model.safetensors"))
    x = tokens()
    ref = PeftModel.from_pretrained(llama(), path).eval()(x).logits
    model = llama()
    lora_ext.load_peft_adapter(model, path, "b")
    assert rel_err(model(x).logits, ref) < 1e-5
    base = str(tmp_path / "base")
    llama().save_pretrained(base)
    from lora_ext.cli import main
    assert main(["merge", "--base", base, "--adapter", path, "--out", str(tmp_path / "merged"), "--quiet"]) == 0
    # another model's head: refused, by load and by merge
    file = os.path.join(path, "adapter_model.safetensors")
    tensors = load_file(file)
    tensors["base_model.model.lm_head.base_layer.weight"] = tensors["base_model.model.lm_head.base_layer.weight"] + 1
    save_file(tensors, file)
    model = llama()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="module 'lm_head' carries a base weight .* that differs"):
        lora_ext.load_peft_adapter(model, path, "b")
    assert unchanged(model, snap)
    assert main(["merge", "--base", base, "--adapter", path, "--out", str(tmp_path / "merged2"), "--quiet"]) != 0


@pytest.mark.parametrize("trainable", [False, True])
def test_is_trainable_as_peft_and_serving_switches_keep_the_storage(tmp_path, trainable):
    # peft's from_pretrained loads an adapter frozen unless is_trainable=True; lora_ext's factors came up trainable,
    # so a switch gave them new storage and a CUDA graph captured before it kept serving the old adapter
    paths = {}
    for i, n in enumerate("ab"):
        pm = randomize_lora(get_peft_model(llama(i), LoraConfig(r=2, target_modules=["q_proj"],
                                                               modules_to_save=["lm_head"])))
        pm.save_pretrained(str(tmp_path / n))
        paths[n] = str(tmp_path / n)
    ref = PeftModel.from_pretrained(llama(), paths["a"], is_trainable=trainable)
    want = {n.rsplit(".", 2)[0] for n, p in ref.named_parameters() if p.requires_grad}
    model = llama()
    lora_ext.load_peft_adapter(model, paths["a"], "a", is_trainable=trainable)
    lora_ext.load_peft_adapter(model, paths["b"], "b", activate=False)
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A.requires_grad == trainable and q.lora_B.requires_grad == trainable
    head = model.lm_head.modules_to_save["a"]
    assert all(p.requires_grad == trainable for p in head.parameters())
    assert bool(want) == trainable  # (peft's side of the same rule)
    model.train()
    ptr = q.lora_A.data_ptr()
    x = tokens()
    lora_ext.set_adapter(model, "b")
    assert (q.lora_A.data_ptr() == ptr) == (not trainable)  # frozen: the same storage, the new values
    with torch.no_grad():
        out = model(x).logits
    pb = PeftModel.from_pretrained(llama(), paths["b"]).train()
    with torch.no_grad():
        assert rel_err(out, pb(x).logits) < 1e-5
    with pytest.raises(ValueError, match="is_trainable"):
        lora_ext.load_peft_adapter(llama(), paths["a"], "a", is_trainable=None)


def _trainable_adapters(tmp_path):
    """Adapters on llama: a (q, v, a saved lm_head), p (q, v), c (q, v, down_proj, a saved lm_head)."""
    paths = {}
    for i, (n, targets, saved) in enumerate((("a", ["q_proj", "v_proj"], ["lm_head"]), ("p", ["q_proj", "v_proj"], None),
                                              ("c", ["q_proj", "v_proj", "down_proj"], ["lm_head"]))):
        pm = randomize_lora(get_peft_model(llama(), LoraConfig(r=2, target_modules=targets, modules_to_save=saved)))
        pm.save_pretrained(str(tmp_path / n))
        paths[n] = str(tmp_path / n)
    return paths


def _grads(model):
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}


def test_training_after_frozen_loads_reaches_every_part_of_the_adapter(tmp_path):
    # found by the pass over is_trainable: (1) marked while p was active, a's saved lm_head stayed frozen after the
    # switch (the wrapper remembered the frozen copy: 0.925 off peft after 3 steps); (2) c loaded after the mark
    # brought frozen down_proj layers (no gradient, no error); (3) b loaded with is_trainable=True into frozen layers
    # trained in none of them
    paths = _trainable_adapters(tmp_path)
    model = llama()
    lora_ext.load_peft_adapter(model, paths["a"], "a")
    lora_ext.load_peft_adapter(model, paths["p"], "p")
    lora_ext.mark_only_lora_as_trainable(model)
    lora_ext.set_adapter(model, "a")
    assert all(p.requires_grad for p in model.lm_head.modules_to_save["a"].parameters())
    lora_ext.load_peft_adapter(model, paths["c"], "c")  # into a model in training
    lora_ext.set_adapter(model, "c")
    model.train()
    model(tokens()).logits.square().sum().backward()
    got = _grads(model)
    assert any("down_proj.lora_A" in n for n in got) and any("lm_head.modules_to_save.c" in n for n in got)
    assert not any("original_module" in n or n.endswith("q_proj.weight") for n in got)

    fresh = llama()
    lora_ext.load_peft_adapter(fresh, paths["p"], "p")  # frozen
    lora_ext.load_peft_adapter(fresh, paths["c"], "c", is_trainable=True, activate=False)
    lora_ext.set_adapter(fresh, "c")
    fresh.train()
    fresh(tokens()).logits.square().sum().backward()
    got = _grads(fresh)
    assert sum("lora_A" in n for n in got) == 6 and any("lm_head.modules_to_save.c" in n for n in got)


def test_the_first_load_freezes_the_base_model_as_peft(tmp_path):
    # a default load and a loop over the parameters that require grad trained the base alone (loss down, lora_A
    # unchanged, no error); peft's from_pretrained freezes the base: its optimizer gets an empty list
    paths = _trainable_adapters(tmp_path)
    model = llama()
    lora_ext.load_peft_adapter(model, paths["a"], "a")
    ref = PeftModel.from_pretrained(llama(), paths["a"])
    assert not [n for n, p in model.named_parameters() if p.requires_grad]
    assert not [n for n, p in ref.named_parameters() if p.requires_grad]
    trained = llama()
    lora_ext.load_peft_adapter(trained, paths["a"], "a", is_trainable=True)
    ref = PeftModel.from_pretrained(llama(), paths["a"], is_trainable=True)
    ours = sorted(n for n, p in trained.named_parameters() if p.requires_grad)
    theirs = sorted(n for n, p in ref.named_parameters() if p.requires_grad)
    assert len(ours) == len(theirs) == 9 and all(".lora_" in n or "modules_to_save" in n for n in ours)
