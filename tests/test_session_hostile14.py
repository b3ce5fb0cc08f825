"""A hostile pass of 2026-12-02 (twelfth session): each test failed before its fix, except where it says it guards
a claim of the README that held.

- `lora-ext merge --out afile/merged` (a parent that is a file) said "writing ...: File exists"; it names the file
  now, before anything is read.
- The nn.Module protocol (a hostile pass):
  - eval() of a layer built on the meta device raised torch's "Cannot copy out of meta tensor" from the value check;
    it warns and leaves the layer unmerged now (merge() refuses), so to_empty() and a load serve it.
  - torch.nn.utils.prune or the hook-based weight_norm on lora_A/lora_B (the factor then a plain attribute a hook
    computes): a serving switch wrote adapter b's lora_B into prune's computed tensor and served b's A with the old
    B (0.56 off); pruned lora_A raised a raw KeyError after writing b's B into the live one (0.98 off, still named
    'default'); under weight_norm every forward after the switch failed. Switches are refused first now, naming it.
  - .half() of a merged float32 layer merged again past float16's range (inf in the weight, merged=True), where
    eval() of the float16 layer refuses; .double() of a merged lossless=True model refused part way through the
    model's walk, leaving it half float64. A merge the new dtype refuses now leaves that layer unmerged, warning.
- (Held, guarded) a peft adapter of a dilated convolution serves as peft's merge_and_unload serves it.

Tests that write paths run in tmp_path with the working directory moved there (as in test_session_hostile13).
"""
import copy
import os
import warnings

import pytest
import torch
import torch.nn.utils.prune as prune
from peft import LoraConfig, get_peft_model

import lora_ext as lora
from helpers import hf_model, save_random_peft
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


def _rel(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm()).item()


_MAKE = {
    "Linear": (lambda: lora.Linear(16, 24, r=4, lora_alpha=8), lambda: torch.randn(3, 16)),
    "MergedLinear": (lambda: lora.MergedLinear(16, 24, r=2, lora_alpha=8, enable_lora=[True, False, True]),
                     lambda: torch.randn(3, 16)),
    "Embedding": (lambda: lora.Embedding(20, 8, r=4, lora_alpha=8), lambda: torch.randint(0, 20, (3, 5))),
    "Conv2d": (lambda: lora.Conv2d(4, 6, 3, r=2, lora_alpha=4), lambda: torch.randn(2, 4, 6, 6)),
}


@pytest.mark.parametrize("kind", sorted(_MAKE))
def test_eval_of_a_layer_built_on_meta_leaves_it_unmerged_then_serves_after_loading(kind):
    make, inputs = _MAKE[kind]
    torch.manual_seed(0)
    src = make()
    with torch.no_grad():
        for p in src.parameters():
            p.normal_(0, 0.4)
    x = inputs()
    # the reference: W + s B A in float64, through a float64 copy of the layer left unmerged (train mode)
    src64 = make().double()
    src64.load_state_dict(src.state_dict())
    want = src64(x.double() if x.is_floating_point() else x)
    with torch.device("meta"):
        layer = make()
    with pytest.warns(UserWarning, match="meta device"):
        layer.eval()
    assert not layer.merged
    with pytest.raises(ValueError, match="meta device"):
        layer.merge()
    layer.to_empty(device="cpu")
    layer.load_state_dict({k: v.clone() for k, v in src.state_dict().items()}, assign=True)
    assert _rel(layer(x), want) < 1e-5
    layer.train()
    layer.eval()  # merges now
    assert layer.merged and _rel(layer(x), want) < 1e-5


def _two_adapters():
    torch.manual_seed(0)
    layer = lora.Linear(16, 24, r=4, lora_alpha=8)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.4)
    default = (layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), layer.scaling)
    layer.add_adapter("b", torch.randn(4, 16) * 0.3, torch.randn(24, 4) * 0.3, 0.5)
    return layer, layer.weight.detach().clone(), layer.bias.detach().clone(), default


def _linear64(W, bias, A, B, s, x):
    return x.double() @ (W.double() + s * B.double() @ A.double()).T + bias.double()


@pytest.mark.parametrize("how", ["prune lora_A", "prune lora_B", "weight_norm lora_B"])
@pytest.mark.parametrize("merged", [False, True])
def test_a_switch_over_a_pruned_or_weight_normed_factor_is_refused_before_writing(how, merged):
    layer, W, bias, default = _two_adapters()
    tool, factor = how.split()
    if tool == "prune":
        layer.requires_grad_(False)  # serving: a switch copies into the live factors
        prune.identity(layer, factor)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (torch's deprecation of the hook-based weight_norm)
            torch.nn.utils.weight_norm(layer, factor, dim=None)
    layer.train(not merged)
    x = torch.randn(3, 16)
    with pytest.raises(ValueError, match=f"{factor} is not a Parameter.*{tool}"):
        layer.set_adapter("b")
    assert layer.active_adapter == "default"
    assert _rel(layer(x), _linear64(W, bias, *default, x)) < 1e-5
    layer.train()
    assert _rel(layer(x), _linear64(W, bias, *default, x)) < 1e-5


def test_half_of_a_merged_layer_past_float16_range_leaves_it_unmerged():
    layer = lora.Linear(8, 8, r=2, lora_alpha=2, bias=False)
    with torch.no_grad():
        layer.weight.normal_(0, 1)
        layer.weight[0, 0] = 60000.0  # fits float16
        layer.lora_A.zero_()
        layer.lora_B.zero_()
        layer.lora_A[0, 0] = 100.0
        layer.lora_B[0, 0] = 100.0  # scaling 1: the update is +10000 at [0, 0]; W + update = 70000 > 65504
    W, A, B = (t.detach().clone() for t in (layer.weight, layer.lora_A, layer.lora_B))
    layer.eval()  # float32: merges fine
    with pytest.warns(UserWarning, match="float16's range"):
        layer.half()
    assert not layer.merged and torch.equal(layer.weight, W.half())
    x = torch.zeros(1, 8, dtype=torch.float16)
    x[0, 0] = 1e-3
    ref = x.double() @ (W.half().double() + B.half().double() @ A.half().double()).T  # 70.0 at [0, 0]
    out = layer(x)
    assert torch.isfinite(out).all() and _rel(out, ref) < 1e-2


def test_double_of_a_merged_lossless_model_converts_it_whole():
    model = hf_model("gpt2")  # lossless=True layers
    model.eval()
    x = torch.randint(0, 40, (2, 8))
    before = model(x).logits.detach().double()
    with pytest.warns(UserWarning, match="lossless=True"):
        model.double()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert _rel(model(x).logits, before) < 1e-5
    model.float().eval()  # and back: eval() merges again (losslessly)
    assert all(m.merged for m in model.modules() if isinstance(m, lora.LoRALayer) and m.r > 0)
    assert _rel(model(x).logits, before) < 1e-5
