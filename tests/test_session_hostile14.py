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
- peft adapter configurations (a hostile pass):
  - A dilated convolution (kernel > 1): peft's lora_A leaves the dilation out, lora_ext merged the update under it:
    a peft adapter served other outputs (1.23 off peft's with padding="same"), and a saved one loaded into peft as
    another model (1.28 off). Refused now at load and save, naming the dilation, as padding_mode is.
  - init_lora_weights "mica", "eva" (and its eva_config) and peft's any-case "Gaussian" were refused as changing the
    base weights; they leave it alone and serve as plain LoRA (MiCA trains lora_A only: is_trainable=True refused).
  - A grouped convolution's adapter was refused blaming the file's factor shapes; the refusal names groups now.
- Compiled and functional use (a hostile pass):
  - An eager functional_call(layer, layer.state_dict(), x) pointed the layer's scale tensor at one hung on the state
    dict's detached lora_A: a torch.export made after it served adapter b's factors at the old adapter's scaling
    after a switch (0.58 off), and torch.func's grad / jacrev raised functorch's "mutate a captured Tensor" (the
    re-sync's fill_). A forward with stand-ins for the Parameters takes the float and leaves the tensor alone now.
  - torch.export (non-strict, torch's default) of an unmerged MergedLinear raised an IndexError inside torch: the
    None merge-snapshot buffers came before lora_ind (torch numbers buffers past None entries wrongly).
  - torch.jit.script(layer) failed with the tensor-parallel refusal (it reads every property of the class).
  - Embedding's second-order gradients (create_graph=True) ignored padding_idx and scale_grad_by_freq (1.02 and
    0.46 off loralib's formula).
- Training flows (a hostile pass): a second peft adapter loaded into existing layers trained with the first one's
  lora_dropout (the layer's one module: 22.0 off peft's step), and saved it into its config. Each adapter keeps its
  own dropout probability now (set_adapter_dropout; a switch sets the module to it), as peft's per-adapter modules.
- transformers (a hostile pass): resize_token_embeddings of an injected embedding left factors short of the new rows,
  and the forward's refusal named neither the cause nor the fix; it says so now (README: resize first). (A
  replaced output head and save_pretrained of modules saved whole are documented, not changed.)
- A second pass over the dropout and resize fixes: a save read an Embedding's identity dropout as the adapter's
  (0.0 written for a 0.5 adapter); add_weighted_adapter's adapter took the active adapter's dropout (peft: the
  first combined); a user's Dropout subclass or a hooked module was replaced at a switch; a hotswap changed the
  dropout (peft refuses that); layers of one adapter with different dropouts saved the last one without a word;
  reserve_rank padded pruned factors (every later forward failed, naming neither); the resize hint blamed a resize
  for any factor of the wrong width. (The Embedding-save and hotswap tests guard what the first form of the dropout
  fix broke: they passed before it.)
- A third pass over the dropout: add_weighted_adapter read the first adapter's dropout where it was a stand-in (or
  absent), so layers it does not target trained the combined adapter without peft's copied dropout, and the save
  wrote 0.0 for 0.5; a stand-in of zeros kept another adapter's dropout and drew masks peft does not draw (0.92 off
  a seeded step). Stand-ins use no dropout now; the combined adapter takes the first one's own everywhere.
- A stateful fuzzer against a float64 oracle (about 4,500 operations): a convolution's forward inside
  lora.disable_adapter raised an AttributeError (ConvLoRA had no _weight_forward).
- A hostile pass over the fixes above: functional_call with Parameter stand-ins (an EMA copy's named_parameters)
  still re-pointed the scale tensor (0.61 off after a switch; functional_call is told from the stack now); an
  unmerged Embedding with a tensor embed_scale, and a MergedLinear pickled before, still exported with the
  IndexError (every layer keeps the snapshot's buffers last now, unpickled ones too); a model-level set_adapter
  refused at a pruned layer had written the layers before it (4.8e-7 off on float32: now checked before the first
  write); spectral_norm on a factor was named as pruning.

Tests that write paths run in tmp_path with the working directory moved there (as in test_session_hostile13).
"""
import io
import json
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch.func import functional_call, grad, jacrev
from peft import LoraConfig, PeftModel, get_peft_model

import lora_ext as lora
from helpers import hf_model, rel_err, save_random_peft
from test_session_hostile13 import _cli_llama, _merge, _q_proj_adapter
from tiny_models import llama, tokens


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def merge_dirs(tmp_path):
    _cli_llama().save_pretrained(tmp_path / "base")
    _q_proj_adapter().save_pretrained(tmp_path / "adapter")
    return tmp_path


@pytest.mark.parametrize("under", ["afile/merged", "afile/deeper/merged"])
def test_an_out_under_a_file_is_refused_naming_the_file(merge_dirs, capsys, under):
    (merge_dirs / "afile").write_text("keep")
    assert _merge(merge_dirs / "base", merge_dirs / "adapter", merge_dirs / under, "--force") == 2
    err = capsys.readouterr().err
    assert "--out" in err and f"{merge_dirs / 'afile'}" in err and "is a file, not a directory" in err, err
    assert (merge_dirs / "afile").read_text() == "keep"
    assert sorted(os.listdir(merge_dirs)) == ["adapter", "afile", "base"]


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


class _Conv(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, **kwargs)

    def forward(self, x):
        return self.conv(x)


def _conv(**kwargs):
    torch.manual_seed(0)
    return _Conv(**kwargs).eval()


@pytest.mark.parametrize("padding", ["same", 2])
def test_a_dilated_convolution_is_refused_at_load_and_save(tmp_path, padding):
    make = lambda: _conv(padding=padding, dilation=2)  # noqa: E731
    peft_model = get_peft_model(make(), LoraConfig(r=3, lora_alpha=5, target_modules=["conv"]))
    save_random_peft(peft_model, tmp_path / "adapter", seed=1, std=0.3)
    x = torch.randn(2, 6, 9, 9)
    if padding == "same":  # the premise: peft's unmerged forward differs from its merge (no dilation in lora_A)
        with torch.no_grad():
            assert rel_err(peft_model(x), peft_model.merge_and_unload()(x)) > 0.1
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"module 'conv' is a convolution with dilation=\(2, 2\)"):
        lora.load_peft_adapter(model, tmp_path / "adapter")
    assert type(model.conv) is nn.Conv2d and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    lora.inject(model, ["conv"], r=2, lora_alpha=3)
    with pytest.raises(ValueError, match=r"save: layer 'conv' is a convolution with dilation=\(2, 2\)"):
        lora.save_peft_adapter(model, tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


def test_a_dilation_under_a_kernel_of_one_is_served_as_peft_serves_it(tmp_path):
    # (guards what held before: a 1x1 kernel's dilation changes nothing, so the dilation refusal passes it)
    class One(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(6, 6, (1, 3), dilation=(3, 1), padding=(0, 1))

        def forward(self, x):
            return self.conv(x)

    peft_model = get_peft_model(One(), LoraConfig(r=3, lora_alpha=5, target_modules=["conv"]))
    save_random_peft(peft_model, tmp_path / "adapter", seed=1, std=0.3)
    x = torch.randn(2, 6, 7, 7)
    model = One()
    lora.load_peft_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        assert rel_err(model(x), peft_model(x)) < 1e-5 and rel_err(One()(x), peft_model(x)) > 1e-3


@pytest.mark.parametrize("init", ["mica", "eva", "Gaussian"])
def test_inits_that_leave_the_base_alone_load_as_peft_serves_them(tmp_path, init):
    kwargs = {}
    if init == "eva":
        from peft.tuners.lora.config import EvaConfig
        kwargs["eva_config"] = EvaConfig()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init, **kwargs)
    save_random_peft(get_peft_model(llama(), cfg), tmp_path / "adapter", seed=1, std=0.3)
    x = tokens()
    with torch.no_grad():
        ref = PeftModel.from_pretrained(llama(), tmp_path / "adapter").eval()(x).logits
        plain = llama()(x).logits
    model = llama()
    lora.load_peft_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        got = model(x).logits
    assert rel_err(got, ref) < 1e-5 and rel_err(plain, ref) > 1e-3
    if init == "mica":  # peft trains MiCA's lora_A only
        with pytest.raises(ValueError, match="MiCA"):
            lora.load_peft_adapter(llama(), tmp_path / "adapter", is_trainable=True)


def test_a_grouped_convolution_is_refused_naming_groups(tmp_path):
    make = lambda: _conv(padding=1, groups=3)  # noqa: E731
    peft_model = get_peft_model(make(), LoraConfig(r=3, lora_alpha=3, target_modules=["conv"]))
    save_random_peft(peft_model, tmp_path / "adapter", seed=1, std=0.3)
    with torch.no_grad():
        peft_model(torch.randn(2, 6, 5, 5))  # peft serves it
    with pytest.raises(ValueError, match="module 'conv' is a convolution with groups=3"):
        lora.load_peft_adapter(make(), tmp_path / "adapter")


def _linear():
    g = torch.Generator().manual_seed(0)
    layer = lora.Linear(6, 5, r=2, lora_alpha=3)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return layer, torch.randn(4, 6, generator=g)


def _forward64(layer, x):
    w = layer.weight.double() + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    return F.linear(x, w, layer.bias.double())


@pytest.mark.parametrize("transform", ["jacrev", "grad"])
def test_torch_func_transform_of_a_layer_after_a_functional_call_with_its_state_dict(transform):
    """README: `torch.func.functional_call(model, model.state_dict(), x)` is supported, and so are torch.func's
    grad / jacrev of a layer. After the first (an eager call with the state_dict's tensors, which are new objects),
    a grad transform over the input of the layer itself raises functorch's raw 'attempted to call in-place operation
    (aten::fill_.Scalar) that would mutate a captured Tensor': the layer re-syncs its scale tensor (fill_) for the
    lora_A it finds, inside the transform."""
    layer, x = _linear()
    functional_call(layer, layer.state_dict(), (x,))  # fine on its own
    x64 = x.double()
    if transform == "jacrev":
        got = jacrev(layer)(x)
        want = jacrev(lambda xx: _forward64(layer, xx))(x64)
    else:
        got = grad(lambda xx: (layer(xx) ** 2).sum())(x)
        want = grad(lambda xx: (_forward64(layer, xx) ** 2).sum())(x64)
    assert _rel(got, want) < 1e-5


def test_torch_export_with_defaults_of_an_unmerged_merged_linear():
    """torch.export.export(layer, (x,)) with torch's defaults (non-strict) of an unmerged MergedLinear raises a raw
    IndexError from inside torch/export/_trace.py ('list index out of range'): the layer's _buffers hold the None
    merge snapshot (_merged_A, _merged_B) ahead of lora_ind, and torch's non-strict export counts the None entries
    when it maps buffers to graph inputs. The same export of a Linear, or of the MergedLinear inside a Sequential,
    or merged, works; README promises exported programs of the layers."""
    g = torch.Generator().manual_seed(0)
    layer = lora.MergedLinear(6, 9, r=2, lora_alpha=3, enable_lora=[True, False, True])
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x = torch.randn(4, 6, generator=g)
    ep = torch.export.export(layer, (x,))
    assert _rel(ep.module()(x), _merged_linear64(layer, x)) < 1e-5


def _merged_linear64(layer, x):
    """float64 forward of a MergedLinear(6, 9, enable_lora=[True, False, True])."""
    A, B, s = layer.lora_A.double(), layer.lora_B.double(), layer.scaling
    delta = torch.zeros(9, 6, dtype=torch.float64)
    delta[0:3] = B[0:3] @ A[0:2]
    delta[6:9] = B[3:6] @ A[2:4]
    return F.linear(x.double(), layer.weight.double() + s * delta, layer.bias.double())


def test_torch_jit_script_of_a_layer_does_not_blame_tensor_parallelism():
    """torch.jit.script(layer) fails with ValueError "torch's ColwiseParallel / RowwiseParallel (distribute_module)
    shard the weight without the LoRA factors ...": jit.script lists dir(type(layer)) and reads every name, and meets
    lora_ext.parallel's refusal property `_distribute_module_applied` (the dir() fix made for jit.trace does not cover
    script). Nobody asked for tensor parallelism: the message should say that scripting is not supported (or the
    script should work)."""
    layer = lora.Linear(6, 5, r=2, lora_alpha=3)
    x = torch.randn(4, 6)
    try:
        scripted = torch.jit.script(layer)
    except Exception as e:  # an error is acceptable, one about tensor parallelism is not
        assert "ColwiseParallel" not in str(e) and "distribute_module" not in str(e), str(e)
    else:
        want = F.linear(x.double(), layer.weight.double() + layer.scaling * layer.lora_B.double()
                        @ layer.lora_A.double(), layer.bias.double())
        assert _rel(scripted(x), want) < 1e-5


def test_an_exported_program_made_after_a_functional_call_follows_a_switch_whole():
    """README: an exported program holds the layer's Parameters and scale tensor and, after an in-place
    serving switch, serves the new adapter whole, "never one adapter's factors at another's scaling". An eager
    `functional_call(layer, layer.state_dict(), x)` (the README's own recipe) leaves the layer's `_scaling_t`
    pointing at a scale tensor hung on the state_dict's detached lora_A; an export made then captures that tensor,
    which later switches never write. After set_adapter('b') the program serves b's factors at the old adapter's
    scaling: relative error 0.56 here (scalings 1.5 and 4.0)."""
    layer, x = _linear()
    g = torch.Generator().manual_seed(1)
    A2, B2 = torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g)
    layer.add_adapter("b", A2, B2, 4.0)
    layer.requires_grad_(False)
    functional_call(layer, layer.state_dict(), (x,))
    program = torch.export.export(layer, (x,)).module()
    layer.set_adapter("b")  # in place: same shapes, frozen factors
    want = F.linear(x.double(), layer.weight.double() + 4.0 * B2.double() @ A2.double(), layer.bias.double())
    assert _rel(layer(x), want) < 1e-5  # eager serves b
    assert _rel(program(x), want) < 1e-5


@pytest.mark.parametrize("kw", [dict(padding_idx=1), dict(scale_grad_by_freq=True)])
def test_embedding_double_backward_respects_padding_idx_and_scale_grad_by_freq(kw):
    """loralib's Embedding looks lora_A up with F.embedding(ids, A^T, padding_idx,
    scale_grad_by_freq), so at every order of differentiation the padding column of lora_A gets no gradient and
    frequencies scale it. lora_ext's backward computes lora_B's gradient from a plain F.embedding(flat, lora_A.t())
    (reference.embedding_backward), so a gradient of that gradient (create_graph=True: a gradient penalty, MAML) is
    nonzero in lora_A's padding column and unscaled by frequency: relative error 0.2-0.35 against loralib's formula,
    computed here by float64 autograd."""
    g = torch.Generator().manual_seed(0)
    layer = lora.Embedding(10, 5, r=2, lora_alpha=3, **kw).double()
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g, dtype=torch.float64))
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=torch.float64))
    ids = torch.tensor([[1, 2, 3], [4, 1, 9], [2, 2, 2]])
    go = torch.randn(3, 3, 5, generator=g, dtype=torch.float64)

    def second_order(forward, A, B):
        dB, = torch.autograd.grad((forward(A, B) * go).sum(), B, create_graph=True)
        return torch.autograd.grad((dB ** 2).sum(), A)[0]

    A0, B0 = layer.lora_A.detach(), layer.lora_B.detach()
    W = layer.weight.detach()
    loralib = second_order(lambda A, B: F.embedding(ids, W, **kw) + F.embedding(ids, A.t(), **kw) @ B.t()
                           * layer.scaling, A0.clone().requires_grad_(), B0.clone().requires_grad_())
    got = second_order(lambda A, B: functional_call(layer, {"weight": W, "lora_A": A, "lora_B": B}, (ids,)),
                       A0.clone().requires_grad_(), B0.clone().requires_grad_())
    assert _rel(got, loralib) < 1e-10


def _filled(layer, seed=0, std=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return layer


# -- (a second pass over the fixes above) _scales: stand-ins that ARE nn.Parameters ---------------------------------------------------------------------

def test_export_after_functional_call_with_parameter_stand_ins_follows_a_switch():
    """The fix returns the float for stand-ins that are not nn.Parameters only. functional_call with Parameters
    from another model (an EMA copy, `dict(other.named_parameters())`) still re-points the layer's scale tensor at
    a tensor hung on the stand-in: a torch.export made next holds that tensor, which later switches never write,
    and serves adapter b's factors at the old scaling (0.58 off)."""
    layer = _filled(lora.Linear(6, 5, r=2, lora_alpha=3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, generator=g)
    A2, B2 = torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g)
    layer.add_adapter("b", A2, B2, 4.0)
    layer.requires_grad_(False)
    other = {k: nn.Parameter(v.detach().clone(), requires_grad=False) for k, v in layer.state_dict().items()}
    functional_call(layer, other, (x,))
    program = torch.export.export(layer, (x,)).module()
    layer.set_adapter("b")
    want = F.linear(x.double(), layer.weight.double() + 4.0 * B2.double() @ A2.double(), layer.bias.double())
    assert _rel(layer(x), want) < 1e-5  # eager serves b
    assert _rel(program(x), want) < 1e-5


# -- the None merge-snapshot buffers ahead of a real buffer: torch.export's IndexError ------------------------------

def test_export_of_an_unmerged_embedding_with_a_tensor_embed_scale():
    """The MergedLinear fix moved the None _merged_A/_merged_B after lora_ind; Embedding's embed_scale buffer (a
    tensor: Gemma's) still comes after them, and torch.export.export(layer, ...) (non-strict, the default) raises
    IndexError 'list index out of range' from inside torch."""
    emb = _filled(lora.Embedding(10, 4, r=2, lora_alpha=3, embed_scale=torch.tensor(2.0)), std=1.0)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    ep = torch.export.export(emb, (ids,))
    want = 2.0 * (F.embedding(ids, emb.weight.double())
                  + emb.scaling * F.embedding(ids, emb.lora_A.double().t()) @ emb.lora_B.double().t())
    assert _rel(ep.module()(ids), want) < 1e-6


def test_export_of_a_merged_linear_pickled_before_the_buffer_fix():
    """A MergedLinear pickled before 73cd791 (torch.save(model)) holds _buffers in the old order (_merged_A,
    _merged_B, lora_ind); __setstate__ does not reorder them, so its export still raises torch's IndexError."""
    layer = _filled(lora.MergedLinear(6, 9, r=2, lora_alpha=3, enable_lora=[True, False, True]))
    layer._buffers["lora_ind"] = layer._buffers.pop("lora_ind")  # the order such a pickle holds
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    old = torch.load(buf, weights_only=False)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    ep = torch.export.export(old, (x,))
    assert _rel(ep.module()(x), _merged_linear64(old, x)) < 1e-5


# -- _check_plain_factors: a refusal after earlier layers were written --------------------------------------------

def test_model_set_adapter_refused_at_a_pruned_layer_leaves_earlier_merged_weights_bit_for_bit():
    """lora.set_adapter(model, 'b') where the second layer's lora_B is pruned: the first (merged, float32,
    lossy merge) is switched (its weight rewritten), then the second refuses and the first is switched back.
    The refusal comes after a write: the first layer's weight and state_dict come back off by float32 rounding
    (4.8e-7 absolute here) instead of bit for bit; every layer's check could run before the first write."""
    torch.manual_seed(0)

    def make():
        layer = lora.Linear(16, 24, r=4, lora_alpha=8)
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_(0, 0.4)
        layer.add_adapter("b", torch.randn(4, 16) * 0.3, torch.randn(24, 4) * 0.3, 0.7)
        return layer

    model = nn.Sequential(make(), make())
    model.requires_grad_(False)
    prune.identity(model[1], "lora_B")
    model.eval()
    assert model[0].merged
    weight = model[0].weight.detach().clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="not a Parameter"):
        lora.set_adapter(model, "b")
    assert [m.active_adapter for m in model] == ["default", "default"]
    assert torch.equal(model[0].weight, weight)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_spectral_norm_on_a_factor_is_not_blamed_on_prune():
    """torch.nn.utils.spectral_norm(layer, 'lora_B') leaves lora_B_orig like prune does: the refusal says
    '(torch.nn.utils.prune)' and tells the user to call prune.remove / remove_weight_norm; the tool in use is
    spectral_norm (remove_spectral_norm)."""
    torch.manual_seed(0)
    layer = lora.Linear(16, 24, r=4, lora_alpha=8)
    layer.add_adapter("b", torch.randn(4, 16), torch.randn(24, 4), 0.5)
    layer.requires_grad_(False)
    torch.nn.utils.spectral_norm(layer, "lora_B")
    with pytest.raises(ValueError) as info:
        layer.set_adapter("b")
    assert "prune" not in str(info.value) and "remove_spectral_norm" in str(info.value), str(info.value)


# -- _apply's new warning path and eval() afterwards ---------------------------------------------------------------


# -- (training flows) each adapter's own lora_dropout --------------------------------------------------------

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)

    def forward(self, x):
        return self.lin(x)


def _base():
    torch.manual_seed(0)
    return _Net().double()


def _save_peft(path, dropout, seed):
    from peft import LoraConfig, get_peft_model
    pm = get_peft_model(_base(), LoraConfig(target_modules=["lin"], r=2, lora_alpha=4, lora_dropout=dropout))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_()
    pm.save_pretrained(path)
    A = pm.base_model.model.lin.lora_A["default"].weight.detach().clone()
    B = pm.base_model.model.lin.lora_B["default"].weight.detach().clone()
    return A, B


def _train_step_reference(model_lin_w, model_lin_b, A, B, scaling, x, g, p, seed):
    """y = x W^T + b + scaling * (dropout_p(x) A^T) B^T, the dropout mask drawn once after manual_seed(seed) (as
    peft's and lora_ext's forwards draw it: the base linear draws nothing); gradients of A and B for loss (y * g).sum()."""
    A = A.clone().requires_grad_()
    B = B.clone().requires_grad_()
    torch.manual_seed(seed)
    xd = F.dropout(x, p, training=True) if p > 0 else x
    y = F.linear(x, model_lin_w, model_lin_b) + scaling * (xd @ A.t()) @ B.t()
    (y * g).sum().backward()
    return y.detach(), A.grad, B.grad


def _ext_step(m, x, g, seed):
    m.train()
    torch.manual_seed(seed)
    y = m(x)
    (y * g).sum().backward()
    lin = m.lin
    return y.detach(), lin.lora_A.grad, lin.lora_B.grad


@pytest.mark.parametrize("first, second", [(0.0, 0.5), (0.5, 0.0)])
def test_second_loaded_adapter_trains_with_its_own_lora_dropout(tmp_path, first, second):
    """Adapter "a" is loaded first, then adapter "b", both trainable, each with its own config's lora_dropout. peft
    trains each adapter with its own (a ModuleDict of dropouts per adapter); lora_ext's layer kept the dropout of
    the adapter that created it, so "b" trained with a's: other outputs, other gradients, silently."""
    _save_peft(tmp_path / "a", first, seed=1)
    A, B = _save_peft(tmp_path / "b", second, seed=2)
    m = _base()
    lora.load_peft_adapter(m, str(tmp_path / "a"), "a", is_trainable=True)
    lora.load_peft_adapter(m, str(tmp_path / "b"), "b", is_trainable=True)
    assert lora.active_adapter(m) == "b"
    torch.manual_seed(5)
    x = torch.randn(4, 6, dtype=torch.float64)
    g = torch.randn(4, 5, dtype=torch.float64)
    y, dA, dB = _ext_step(m, x, g, seed=11)
    base = _base().lin
    y_ref, dA_ref, dB_ref = _train_step_reference(base.weight.detach(), base.bias.detach(), A, B, 2.0, x, g, second,
                                                  11)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dA, dA_ref)
    torch.testing.assert_close(dB, dB_ref)


def test_saved_adapter_config_keeps_the_adapters_own_lora_dropout(tmp_path):
    """save_peft_adapter of adapter "b" (loaded with lora_dropout 0.5 into a layer adapter "a", lora_dropout 0.0,
    created) writes the layer's dropout, 0.0, into b's adapter_config.json: peft resuming training from that file
    trains without b's dropout."""
    import json
    _save_peft(tmp_path / "a", 0.0, seed=1)
    _save_peft(tmp_path / "b", 0.5, seed=2)
    m = _base()
    lora.load_peft_adapter(m, str(tmp_path / "a"), "a", is_trainable=True)
    lora.load_peft_adapter(m, str(tmp_path / "b"), "b", is_trainable=True)
    lora.save_peft_adapter(m, str(tmp_path / "out_b"), "b")
    with open(tmp_path / "out_b" / "adapter_config.json") as f:
        assert json.load(f)["lora_dropout"] == 0.5


def test_a_layer_switch_sets_each_adapters_own_dropout_and_remembers_a_changed_one():
    layer = lora.Linear(6, 5, r=2)
    layer.add_adapter("b", torch.randn(2, 6), torch.randn(5, 2), 1.0)
    layer.set_adapter_dropout("b", 0.5)
    assert isinstance(layer.lora_dropout, nn.Identity)  # default's own (lora_dropout=0.0): unchanged
    layer.set_adapter("b")
    assert isinstance(layer.lora_dropout, nn.Dropout) and layer.lora_dropout.p == 0.5 and layer.lora_dropout.training
    layer.lora_dropout.p = 0.25  # changed while b is active: b's from now on
    layer.eval()
    layer.set_adapter("default")
    assert isinstance(layer.lora_dropout, nn.Identity) and not layer.lora_dropout.training
    assert layer.adapter_dropout("b") == 0.25 and layer.adapter_dropout("default") == 0.0
    layer.set_adapter("b")
    assert isinstance(layer.lora_dropout, nn.Dropout) and layer.lora_dropout.p == 0.25
    assert not layer.lora_dropout.training  # (the layer's mode)
    with pytest.raises(ValueError, match="lora_dropout"):
        layer.set_adapter_dropout("default", 1.0)


def test_a_forward_after_resize_token_embeddings_names_the_resize():
    model = llama()
    lora.inject(model, ["embed_tokens"], r=2)
    model.resize_token_embeddings(model.config.vocab_size + 8, mean_resizing=False)
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        model(tokens())


# -- (a second pass) dropout, reserve_rank and the resize hint ----------------------------------------------

class _LinEmb(nn.Module):
    """A Linear registered before an Embedding (module order: lin, emb)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.emb = nn.Embedding(10, 6)

    def forward(self, t):
        return self.lin(self.emb(t))


class _Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)

    def forward(self, x):
        return self.lin(x)


def _peft_save(base_fn, path, targets, p, seed):
    pm = get_peft_model(base_fn(), LoraConfig(target_modules=list(targets), r=2, lora_alpha=4, lora_dropout=p))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, q in pm.named_parameters():
            if "lora_" in n:
                q.normal_()
    pm.save_pretrained(path)


def _lin_emb():
    torch.manual_seed(0)
    return _LinEmb().double()


def _lin():
    torch.manual_seed(0)
    return _Lin().double()


# -- 1. per-adapter lora_dropout ------------------------------------------------------------------------------


def test_saved_lora_dropout_is_not_overwritten_by_an_embedding_of_the_adapter(tmp_path):
    """A peft adapter (lora_dropout 0.5) targeting a Linear and an Embedding that comes after it in module order.
    Loaded and saved again, its adapter_config.json says lora_dropout 0.0: save_peft_adapter now takes
    adapter_dropout() of every layer, the Embedding's nn.Identity reads as 0.0 and, being last, wins (before 3333fcf
    getattr(Identity, "p", dropout) skipped it). peft resuming training from the file trains without dropout."""
    _peft_save(_lin_emb, tmp_path / "a", ["lin", "emb"], 0.5, seed=1)
    m = _lin_emb()
    lora.load_peft_adapter(m, str(tmp_path / "a"), "a", is_trainable=True)
    assert isinstance(m.lin.lora_dropout, nn.Dropout) and m.lin.lora_dropout.p == 0.5  # (it trains with 0.5)
    lora.save_peft_adapter(m, str(tmp_path / "out"), "a")
    with open(tmp_path / "out" / "adapter_config.json") as f:
        saved = json.load(f)["lora_dropout"]
    # real peft, loading the saved file, trains lin with:
    pm = PeftModel.from_pretrained(_lin_emb(), str(tmp_path / "a"), is_trainable=True)
    assert saved == pm.base_model.model.lin.lora_dropout["default"].p == 0.5


def test_weighted_adapter_dropout_does_not_depend_on_which_adapter_is_active(tmp_path):
    """add_weighted_adapter(["b", "c"], ..., "bc"): peft gives "bc" the config (lora_dropout) of adapters[0], "b".
    lora_ext records nothing for "bc", so adapter_dropout("bc") -- what it trains with after set_adapter("bc") and
    what save_peft_adapter writes -- is whatever adapter happens to be active: saving "bc" while "c" is active writes
    c's 0.3 (while "b" is active: 0.0)."""
    _peft_save(_lin, tmp_path / "b", ["lin"], 0.0, seed=2)
    _peft_save(_lin, tmp_path / "c", ["lin"], 0.3, seed=3)
    pm = PeftModel.from_pretrained(_lin(), str(tmp_path / "b"), adapter_name="b")
    pm.load_adapter(str(tmp_path / "c"), adapter_name="c")
    pm.add_weighted_adapter(["b", "c"], [1.0, 1.0], "bc", combination_type="cat")
    want = pm.peft_config["bc"].lora_dropout
    assert want == 0.0

    m = _lin()
    lora.load_peft_adapter(m, str(tmp_path / "b"), "b")
    lora.load_peft_adapter(m, str(tmp_path / "c"), "c")
    lora.add_weighted_adapter(m, ["b", "c"], [1.0, 1.0], "bc", combination_type="cat")
    assert lora.active_adapter(m) == "c"
    lora.save_peft_adapter(m, str(tmp_path / "bc"), "bc")
    with open(tmp_path / "bc" / "adapter_config.json") as f:
        assert json.load(f)["lora_dropout"] == want
    lora.set_adapter(m, "bc")  # trains with
    assert m.lin.adapter_dropout("bc") == want


class _MyDropout(nn.Dropout):
    """A user's own dropout (a subclass of nn.Dropout with its own forward)."""

    def forward(self, x):
        return F.dropout(x, self.p, self.training) * 0.5


def test_a_users_dropout_subclass_survives_switches():
    """The README/docstring: "a module of the user's (not nn.Dropout / nn.Identity) is left alone". A subclass of
    nn.Dropout passes isinstance(drop, nn.Dropout): a switch to an adapter recorded at 0.0 replaces it with
    nn.Identity, and switching back gives a plain nn.Dropout(p): the user's module (and its forward) is gone."""
    layer = lora.Linear(6, 5, r=2)
    mine = _MyDropout(0.1)
    layer.lora_dropout = mine
    layer.add_adapter("b", torch.randn(2, 6), torch.randn(5, 2), 1.0)
    layer.set_adapter_dropout("b", 0.0)
    layer.set_adapter("b")
    layer.set_adapter("default")
    assert layer.lora_dropout is mine


def test_hooks_on_lora_dropout_survive_switches():
    """A forward hook on the layer's lora_dropout (layers.py's _operands honours hooks on an identity dropout,
    e.g. accelerate's add_hook_to_module). A switch to an adapter with another probability puts a new module in its
    place: after switching away and back the hook is gone silently (1 call seen, 2 expected)."""
    layer = lora.Linear(6, 5, r=2)
    seen = []
    layer.lora_dropout.register_forward_hook(lambda mod, i, o: seen.append(1))
    layer.add_adapter("b", torch.randn(2, 6), torch.randn(5, 2), 1.0)
    layer.set_adapter_dropout("b", 0.5)
    layer(torch.randn(3, 6))
    layer.set_adapter("b")
    layer.set_adapter("default")
    layer(torch.randn(3, 6))
    assert len(seen) == 2


def test_hotswap_with_another_lora_dropout_changes_nothing_else(tmp_path):
    """peft's hotswap_adapter refuses configs whose lora_dropout differ ("Configs are incompatible: for lora_dropout").
    lora_ext's hotswap_adapter says "nothing else changes" (it writes factors in place so a compiled model does not
    recompile), but since 3333fcf the load's set_adapter_dropout swaps the active layer's nn.Identity for
    nn.Dropout(0.5). Leaving the module alone (before 3da6540) made the swapped adapter train and save with the
    old dropout; now the swap is refused as peft refuses it, before anything changes, and one with the same dropout
    goes through leaving the module alone."""
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap
    _peft_save(_lin, tmp_path / "a", ["lin"], 0.0, seed=1)
    _peft_save(_lin, tmp_path / "b", ["lin"], 0.5, seed=2)
    pm = PeftModel.from_pretrained(_lin(), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="lora_dropout"):
        peft_hotswap(pm, str(tmp_path / "b"), adapter_name="default")
    m = _lin()
    lora.load_peft_adapter(m, str(tmp_path / "a"))
    before = m.lin.lora_dropout
    held = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"lora_dropout 0\.5, layer 'lin' holds it with 0\.0"):
        lora.hotswap_adapter(m, str(tmp_path / "b"))
    assert m.lin.lora_dropout is before and m.lin.adapter_dropout("default") == 0.0
    assert all(torch.equal(v, held[k]) for k, v in m.state_dict().items())
    _peft_save(_lin, tmp_path / "c", ["lin"], 0.0, seed=3)  # the same dropout: swapped, the module left alone
    lora.hotswap_adapter(m, str(tmp_path / "c"))
    assert m.lin.lora_dropout is before
    assert not torch.equal(m.lin.lora_A, held["lin.lora_A"])


class _QV(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(6, 6)
        self.v = nn.Linear(6, 6)

    def forward(self, x):
        return self.v(self.q(x))


def _qv():
    torch.manual_seed(0)
    return _QV().double()


def test_a_hotswap_gives_its_dropout_to_layers_where_the_adapter_was_a_stand_in(tmp_path):
    """(a hostile pass over the hotswap refusal) v held adapter x as a stand-in of zeros; the swap gives it x's
    factors. The swap kept v's stand-in dropout (0.0, where the file says 0.5: x trained there without dropout and a
    save warned of disagreeing layers), and a second hotswap of the very same file was then refused."""
    _peft_save(_qv, tmp_path / "xq", ["q"], 0.5, seed=1)
    _peft_save(_qv, tmp_path / "yv", ["v"], 0.0, seed=2)
    _peft_save(_qv, tmp_path / "xqv", ["q", "v"], 0.5, seed=3)
    m = _qv()
    lora.load_peft_adapter(m, str(tmp_path / "xq"), "x")
    lora.load_peft_adapter(m, str(tmp_path / "yv"), "y", activate=False)
    assert m.v.is_placeholder("x") and m.v.active_adapter == "x"
    lora.reserve_rank(m, 2)
    lora.hotswap_adapter(m, str(tmp_path / "xqv"), "x")
    assert not m.v.is_placeholder("x")
    assert (m.q.adapter_dropout("x"), m.v.adapter_dropout("x")) == (0.5, 0.5)
    assert type(m.v.lora_dropout) is nn.Dropout and m.v.lora_dropout.p == 0.5  # x is active on v
    assert m.v.adapter_dropout("y") == 0.0
    lora.hotswap_adapter(m, str(tmp_path / "xqv"), "x")  # the same file again: nothing to refuse
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "layers ... train with different lora_dropout"
        lora.save_peft_adapter(m, str(tmp_path / "out"), "x")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["lora_dropout"] == 0.5


def test_a_hotswap_gives_its_dropout_to_layers_the_adapter_did_not_reach(tmp_path):
    _peft_save(_qv, tmp_path / "a", ["q", "v"], 0.0, seed=1)
    _peft_save(_qv, tmp_path / "xq", ["q"], 0.5, seed=2)
    _peft_save(_qv, tmp_path / "xqv", ["q", "v"], 0.5, seed=3)
    m = _qv()
    lora.load_peft_adapter(m, str(tmp_path / "a"), "a")
    lora.load_peft_adapter(m, str(tmp_path / "xq"), "x", activate=False)
    assert not m.v.has_adapter("x")
    lora.hotswap_adapter(m, str(tmp_path / "xqv"), "x")
    assert (m.q.adapter_dropout("x"), m.v.adapter_dropout("x")) == (0.5, 0.5)
    assert type(m.v.lora_dropout) is nn.Identity  # a stays active there, with its own 0.0
    lora.set_adapter(m, "x")
    assert type(m.v.lora_dropout) is nn.Dropout and m.v.lora_dropout.p == 0.5


def test_a_hotswap_compares_the_dropout_of_layers_it_turns_into_zeros(tmp_path):
    """Layers that hold the adapter and that the file does not cover serve it as zeros after the swap, keeping their
    dropout: it is compared too (the refusal looked at the file's layers only)."""
    _peft_save(_qv, tmp_path / "x", ["q", "v"], 0.5, seed=1)
    _peft_save(_qv, tmp_path / "xq", ["q"], 0.5, seed=2)
    m = _qv()
    lora.load_peft_adapter(m, str(tmp_path / "x"), "x")
    m.v.set_adapter_dropout("x", 0.25)
    held = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"lora_dropout 0\.5, layer 'v' holds it with 0\.25"):
        lora.hotswap_adapter(m, str(tmp_path / "xq"), "x")
    assert all(torch.equal(v, held[k]) for k, v in m.state_dict().items())
    m.v.set_adapter_dropout("x", 0.5)
    lora.hotswap_adapter(m, str(tmp_path / "xq"), "x")
    assert m.v.is_placeholder("x") or float(m.v.lora_B.abs().max()) == 0.0


def test_save_refuses_or_warns_when_layers_of_one_adapter_disagree_on_dropout(tmp_path):
    """peft's LoraConfig has one lora_dropout per adapter. When the layers of one adapter train with different
    probabilities (here set_adapter_dropout on one layer), save_peft_adapter silently writes the last layer's in
    module order; peft resuming from the file trains every layer with it."""
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(6, 6)
            self.v = nn.Linear(6, 5)

        def forward(self, x):
            return self.v(self.q(x))
    torch.manual_seed(0)
    m = Two().double()
    lora.inject(m, ["q", "v"], r=2, lora_dropout=0.5)
    m.v.set_adapter_dropout("default", 0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            lora.save_peft_adapter(m, str(tmp_path / "out"))
        except ValueError as e:
            assert "dropout" in str(e)
            return
    assert any("dropout" in str(w.message) for w in caught), "saved 0.1 for q (trained at 0.5) silently"


# -- 2. functional_call told from the stack -------------------------------------------------------------------


def _filled_linear():
    g = torch.Generator().manual_seed(0)
    layer = lora.Linear(6, 5, r=2, lora_alpha=3)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return layer


def test_reserve_rank_over_a_pruned_factor_is_refused_before_anything_changes():
    """set_adapter (layer and model) refuses pruned factors before any write since a167e50; reserve_rank writes the
    live factors too but does not check: it pads layer 0 and the computed lora_A of layer 1 (prune recomputes it from
    lora_A_orig, still rank 2, while lora_B is padded to rank 4), returns, and every forward of the model then fails
    with "lora_B must have shape (5, 2) ... got (5, 4)", naming neither prune nor reserve_rank."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 5))
    lora.inject(m, ["0", "1"], r=2)
    with torch.no_grad():
        for layer in (m[0], m[1]):
            layer.lora_B.normal_()
    m.requires_grad_(False)
    prune.l1_unstructured(m[1], "lora_A", amount=0.5)
    x = torch.randn(3, 6)
    y0 = m(x).detach()
    with pytest.raises(ValueError, match="prune"):
        lora.reserve_rank(m, 4)
    assert tuple(m[0].lora_A.shape) == (2, 6)  # nothing changed
    torch.testing.assert_close(m(x), y0)


# -- 5. ops._check_factors' resize hint ---------------------------------------------------------------------------


def test_a_transposed_factor_given_to_ops_is_refused_naming_every_cause():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, generator=g)
    W, b = torch.randn(5, 6, generator=g), torch.randn(5, generator=g)
    A, B = torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g)
    with pytest.raises(ValueError, match="another layer or transposed, or a weight resized"):
        lora.ops.linear(x, x, W, b, A.t().contiguous(), B, 1.0)


@pytest.mark.parametrize("kind", ["Conv1d", "Conv2d", "Conv3d"])
@pytest.mark.parametrize("merged", [False, True])
def test_a_convolution_inside_disable_adapter_serves_the_base(kind, merged):
    torch.manual_seed(0)
    dims = int(kind[-2])
    layer = getattr(lora, kind)(3, 4, kernel_size=3, r=2, lora_alpha=4).double()
    with torch.no_grad():
        layer.lora_B.normal_()
    model = nn.Sequential(layer)
    weight = layer.conv.weight.detach().clone()  # the base (unmerged: train mode)
    model.train(not merged)
    x = torch.randn(2, 3, *([5] * dims), dtype=torch.float64)
    base = getattr(F, f"conv{dims}d")(x, weight, layer.conv.bias)
    with torch.no_grad():
        served = model(x)
        with lora.disable_adapter(model):
            out = model(x)
        after = model(x)
    assert torch.allclose(out, base, rtol=1e-12, atol=1e-12)
    assert (served - base).abs().max() > 1e-3 and torch.allclose(after, served, rtol=1e-12, atol=1e-12)


# -- (a third pass) stand-ins and add_weighted_adapter's dropout ----------------------------------------------

class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin1 = nn.Linear(6, 6)
        self.lin2 = nn.Linear(6, 5)

    def forward(self, x):
        return self.lin2(self.lin1(x))


def _two():
    return _Two().double()


def _save(path, targets, p, seed):
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=list(targets), lora_dropout=p)
    return save_random_peft(get_peft_model(_two(), cfg), path, seed, 0.3)


# -- 1. add_weighted_adapter: a layer where the first adapter is absent or a stand-in of zeros --------------------

@pytest.mark.parametrize("order", ["b then c (lin1 holds b as a stand-in)", "c then b (lin1 lacks b)"])
def test_weighted_adapter_takes_the_first_adapters_dropout_in_every_layer(tmp_path, order):
    """peft's add_weighted_adapter(["b", "c"], ..., combination_type="cat") makes the new adapter's config a copy of
    b's (lora_dropout 0.5) targeting the union of b's and c's modules: every layer of "bc", lin1 included (which b
    does not target), trains with Dropout(0.5). lora_ext's weighted.apply takes adapter_dropout(first) only where
    the layer holds "b": at lin1 it takes the stand-in's record (c's 0.0, copied at the switch) or, with no "b"
    there, records nothing (the module as it is: c's 0.0). So "bc" trains lin1 without dropout, and
    save_peft_adapter writes lora_dropout 0.0 into its config (with a warning), where peft's is 0.5."""
    _save(tmp_path / "b", ["lin2"], 0.5, seed=1)
    _save(tmp_path / "c", ["lin1", "lin2"], 0.0, seed=2)
    first, second = ("b", "c") if order.startswith("b") else ("c", "b")

    pm = PeftModel.from_pretrained(_two(), str(tmp_path / first), adapter_name=first, is_trainable=True)
    pm.load_adapter(str(tmp_path / second), adapter_name=second, is_trainable=True)
    pm.add_weighted_adapter(["b", "c"], [1.0, 1.0], "bc", combination_type="cat")
    want = {n: pm.base_model.model.get_submodule(n).lora_dropout["bc"].p for n in ("lin1", "lin2")}
    assert want == {"lin1": 0.5, "lin2": 0.5} and pm.peft_config["bc"].lora_dropout == 0.5

    m = _two()
    lora.load_peft_adapter(m, str(tmp_path / first), first, is_trainable=True)
    lora.load_peft_adapter(m, str(tmp_path / second), second, is_trainable=True)
    lora.add_weighted_adapter(m, ["b", "c"], [1.0, 1.0], "bc", combination_type="cat")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora.save_peft_adapter(m, str(tmp_path / "out"), "bc")
    with open(tmp_path / "out" / "adapter_config.json") as f:
        saved = json.load(f)["lora_dropout"]
    lora.set_adapter(m, "bc")
    got = {n: m.get_submodule(n).adapter_dropout("bc") for n in ("lin1", "lin2")}
    assert got == want and saved == 0.5, (got, saved)


# -- 2. a stand-in of zeros keeps another adapter's Dropout: a seeded training step is off peft's -------------

@pytest.mark.parametrize("how", ["set_adapter", "activate=False load"])
def test_a_stand_in_draws_no_dropout_mask_as_peft_draws_none(tmp_path, how):
    """Adapter "c" (lora_dropout 0.5) targets lin1 and lin2, adapter "b" (lora_dropout 0.5) lin2 only. peft's lin1
    with "b" active computes nothing of an adapter: no dropout, no draw from torch's generator. lora_ext's lin1
    serves b as a stand-in of zeros and keeps c's nn.Dropout(0.5) module: its forward draws a mask for nothing,
    shifting lin2's mask, so a step seeded as peft's gives other outputs and gradients (0.92 off the outputs, b's
    lora_B gradient 3.3 off on a max of 2.9). Same with activate=False: a layer that load injects for "c" serves
    the active "b" as a stand-in with c's Dropout(0.5) (the module made from c's config). A stand-in should draw
    nothing (identity dropout), as peft's untargeted layer."""
    _save(tmp_path / "c", ["lin1", "lin2"], 0.5, seed=2)
    _save(tmp_path / "b", ["lin2"], 0.5, seed=1)
    torch.manual_seed(7)
    x = torch.randn(8, 6, dtype=torch.float64)
    g = torch.randn(8, 5, dtype=torch.float64)

    pm = PeftModel.from_pretrained(_two(), str(tmp_path / "c"), adapter_name="c", is_trainable=True)
    pm.load_adapter(str(tmp_path / "b"), adapter_name="b", is_trainable=True)
    pm.set_adapter("b")
    pm.train()
    torch.manual_seed(3)
    y_ref = pm(x)
    (y_ref * g).sum().backward()
    dB_ref = pm.base_model.model.lin2.lora_B["b"].weight.grad

    m = _two()
    if how == "set_adapter":
        lora.load_peft_adapter(m, str(tmp_path / "c"), "c", is_trainable=True)
        lora.load_peft_adapter(m, str(tmp_path / "b"), "b", is_trainable=True)
    else:
        lora.load_peft_adapter(m, str(tmp_path / "b"), "b", is_trainable=True)
        lora.load_peft_adapter(m, str(tmp_path / "c"), "c", is_trainable=True, activate=False)
    assert lora.active_adapter(m) == "b" and m.lin1.is_placeholder("b")
    m.train()
    torch.manual_seed(3)
    y = m(x)
    (y * g).sum().backward()
    torch.testing.assert_close(y.detach(), y_ref.detach())
    torch.testing.assert_close(m.lin2.lora_B.grad, dB_ref)
