"""New memory under a merged layer's weight Parameter: `weight.data = W`, `weight.set_(W)`,
`torch.utils.swap_tensors(weight, P)`, torch.nn.utils.vector_to_parameters (all outside module.to()). The Parameter
object stays; what it holds is other memory. A merged layer used to keep saying merged over it: a base put there
was served without its adapter, and train() took the adapter out of a weight that never held it. Now the layer
looks at the memory at its next forward, write or state_dict: memory holding the merged values (a copy bit for
bit, a cast) keeps the merge; anything else is taken as the base, with a warning naming the layer, as a new
Parameter is. Oracles are float64 formulas on the tensors the test made."""
import warnings

import pytest
import torch
import torch.nn as nn

import lora_ext as lora
from helpers import bits, layer_forward64, rel_err

TAKEN = "taken as the base"


def _layer(kind, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    if kind == "linear":
        layer = lora.Linear(48, 40, r=4, lora_alpha=8)
    elif kind == "fan":
        layer = lora.Linear(48, 40, r=4, lora_alpha=8, fan_in_fan_out=True)
    elif kind == "merged_linear":
        layer = lora.MergedLinear(48, 3 * 16, r=4, lora_alpha=8, enable_lora=[True, False, True])
    elif kind == "embedding":
        layer = lora.Embedding(50, 24, r=4, lora_alpha=8)
    else:
        layer = lora.Conv2d(6, 10, kernel_size=3, r=2, lora_alpha=4)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.lora_A.normal_(0, 0.3)
    layer.to(dtype)
    base = layer.state_dict()["conv.weight" if kind == "conv" else "weight"].clone()
    layer.eval()
    assert layer.merged
    return layer, base


def _param(layer):
    return layer.conv.weight if isinstance(layer, lora.ConvLoRA) else layer.weight


def _input(layer, kind):
    g = torch.Generator().manual_seed(7)
    if kind == "embedding":
        return torch.randint(0, 50, (3, 5), generator=g)
    dtype = _param(layer).dtype
    if kind == "conv":
        return torch.randn(2, 6, 9, 9, generator=g).to(dtype)
    return torch.randn(3, 48, generator=g).to(dtype)


def _expected64(layer, weight, x):
    """The layer's output with `weight` as its base and its active adapter added, in float64 (helpers' oracle)."""
    p = {n: t.detach().double() for n, t in layer.named_parameters()}
    p["conv.weight" if isinstance(layer, lora.ConvLoRA) else "weight"] = weight.double()
    return layer_forward64(layer, p, x.double() if x.is_floating_point() else x, layer.scaling)


def _replace(how, param, new):
    with torch.no_grad():
        if how == "data":
            param.data = new
        elif how == "set_":
            param.set_(new)
        else:
            torch.utils.swap_tensors(param, nn.Parameter(new, requires_grad=param.requires_grad))


def _new_base_under(layer, base, how="data", step=0.01):
    """A new base of its own (another checkpoint's: the old one changed by `step` x noise) put under the merged
    layer's weight Parameter by `how`; returns it."""
    new_base = (base.float() + step * torch.randn(base.shape)).to(base.dtype)
    _replace(how, _param(layer), new_base.clone())
    return new_base


def _serves_the_adapter_on(layer, new_base, x):
    """The layer adds its adapter to `new_base` on the fly, and train() leaves that base bit for bit."""
    with torch.no_grad():
        assert rel_err(layer(x), _expected64(layer, new_base, x)) < 1e-6
    layer.train()
    assert torch.equal(bits(_param(layer).detach()), bits(new_base))


def _quietly_serves(layer, x, before):
    """The layer serves `before` again, bit for bit, warning nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            assert torch.equal(bits(layer(x)), bits(before))


KINDS = ["linear", "fan", "merged_linear", "embedding", "conv"]


@pytest.mark.parametrize("how", ["data", "set_", "swap_tensors"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_base_in_new_memory_is_taken_as_the_base(kind, how):
    layer, base = _layer(kind)
    x = _input(layer, kind)
    new_base = _new_base_under(layer, base, how)
    with pytest.warns(UserWarning, match=TAKEN) as ws:
        out = layer(x)
    assert any(type(layer).__name__ in str(w.message) and "data" in str(w.message) for w in ws)
    assert not layer.merged
    assert rel_err(out, _expected64(layer, new_base, x)) < 1e-6  # served with its adapter
    layer.train()  # nothing to take out: the weight stays the new base, bit for bit
    assert torch.equal(bits(_param(layer).detach()), bits(new_base))
    layer.eval()  # merged again, into the new base
    assert layer.merged
    with torch.no_grad():
        assert rel_err(layer(x), _expected64(layer, new_base, x)) < 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_the_merged_values_in_new_memory_keep_the_merge(kind):
    layer, base = _layer(kind)
    x = _input(layer, kind)
    with torch.no_grad():
        before = layer(x)
    param = _param(layer)
    param.data = param.data.clone()  # the old memory is gone: the layer compares the values it noted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            after = layer(x)
    assert layer.merged
    assert torch.equal(bits(after), bits(before))  # no adapter twice
    layer.train()
    assert rel_err(_param(layer).detach(), base) < 1e-6  # the adapter taken out of the new memory (float32: lossy)


def test_vector_to_parameters_round_trip_keeps_the_merge():
    layer, base = _layer("linear", torch.bfloat16)  # (16-bit: lossless by default, so train() gives the base exactly)
    model = nn.Sequential(layer)
    x = _input(layer, "linear")
    with torch.no_grad():
        before = model(x)
    vec = nn.utils.parameters_to_vector(model.parameters()).clone()
    nn.utils.vector_to_parameters(vec, model.parameters())  # `param.data = vec[...]` for each
    _quietly_serves(model, x, before)
    model.train()
    assert torch.equal(bits(layer.weight.detach()), bits(base))  # the lossless record kept


def test_a_cast_of_the_merged_weight_keeps_the_merge():
    layer, base = _layer("linear")
    x = _input(layer, "linear")
    merged = layer.weight.detach().clone()
    layer.weight.data = layer.weight.data.to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.train()  # unmerged from the cast copy: the adapter taken out, rounded to bfloat16
    assert not layer.merged and layer.weight.dtype == torch.bfloat16
    expected = (merged.double() - layer.scaling * (layer.lora_B.double() @ layer.lora_A.double()))
    assert rel_err(layer.weight.detach(), expected) < 1e-2
    assert rel_err(layer.weight.detach(), base) < 1e-2
    del x


def test_old_memory_still_held_elsewhere_is_compared_whole():
    # the caller keeps the old tensor: the new memory is compared with it as a new Parameter is (a base here)
    layer, base = _layer("linear")
    old = layer.weight.data
    new_base = _new_base_under(layer, base)
    with pytest.warns(UserWarning, match=TAKEN):
        layer.train()
    assert torch.equal(bits(layer.weight.detach()), bits(new_base))
    # and the old memory kept its merged values (nothing wrote it)
    assert rel_err(old, base.double() + layer.scaling * (layer.lora_B.double() @ layer.lora_A.double())) < 1e-6


def test_a_copy_of_the_old_memory_swapped_in_keeps_the_merge():
    layer, base = _layer("linear", torch.bfloat16)
    merged = layer.weight.detach().clone()
    torch.utils.swap_tensors(layer.weight, nn.Parameter(merged.clone(), requires_grad=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.train()
    assert torch.equal(bits(layer.weight.detach()), bits(base))


def _after_train(layer):
    layer.train()
    return layer.weight.detach()


def _after_unmerge(layer):
    layer.unmerge()
    return layer.weight.detach()


def _after_to_float64(layer):
    layer.double()  # (a dtype change unmerges first)
    return layer.weight.detach()


ENTRIES = {"train": _after_train, "unmerge": _after_unmerge, "state_dict": lambda layer: layer.state_dict()["weight"],
           "to_float64": _after_to_float64}


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_each_entry_gives_a_base_in_new_memory_back(entry, dtype):
    # each took the adapter out of the new base: train()/unmerge() in place, state_dict() in its copy, .double()
    # before converting
    layer, base = _layer("linear", dtype)
    new_base = _new_base_under(layer, base, step=0.05)
    with pytest.warns(UserWarning, match=TAKEN):
        got = ENTRIES[entry](layer)
    assert not layer.merged
    assert torch.equal(bits(got), bits(new_base.to(got.dtype)))


def test_a_merged_switch_after_new_memory_switches_on_the_fly():
    layer, base = _layer("linear")
    x = _input(layer, "linear")
    layer.add_adapter("other", torch.randn(4, 48) * 0.3, torch.randn(40, 4) * 0.3, 0.5)
    new_base = _new_base_under(layer, base)
    with pytest.warns(UserWarning, match=TAKEN):
        layer.set_adapter("other")
    assert layer.active_adapter == "other"
    assert torch.equal(bits(layer.weight.detach()), bits(new_base))  # no swap written into the new base
    with torch.no_grad():
        assert rel_err(layer(x), _expected64(layer, new_base, x)) < 1e-6


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
def test_a_copy_made_after_new_memory_serves_the_adapter(copier):
    import copy
    import pickle
    layer, base = _layer("linear")
    x = _input(layer, "linear")
    new_base = _new_base_under(layer, base)
    with pytest.warns(UserWarning, match=TAKEN):
        twin = copy.deepcopy(layer) if copier == "deepcopy" else pickle.loads(pickle.dumps(layer))
    assert not twin.merged and not layer.merged
    _serves_the_adapter_on(twin, new_base, x)


def test_eval_again_merges_into_the_new_base_of_a_model():
    # a model already in eval(): eval() again looks at each layer first, then merges where the weight is a base
    torch.manual_seed(3)
    model = nn.Sequential(lora.Linear(32, 32, r=4, lora_alpha=8), nn.ReLU(), lora.Linear(32, 16, r=4, lora_alpha=8))
    for m in (model[0], model[2]):
        with torch.no_grad():
            m.lora_B.normal_(0, 0.3)
    new_base = model[2].weight.detach().clone() + 0.01 * torch.randn(16, 32)  # (the base, before the merge, changed)
    model.eval()
    x = torch.randn(4, 32)
    model[2].weight.data = new_base.clone()
    with pytest.warns(UserWarning, match=r"Linear\(32, 16\)"):
        model.eval()
    assert model[0].merged and model[2].merged
    A, B, s = model[2].lora_A.double(), model[2].lora_B.double(), model[2].scaling
    assert rel_err(model[2].weight.detach(), new_base.double() + s * (B @ A)) < 1e-6
    with torch.no_grad():
        h = model[1](model[0](x)).double()
        assert rel_err(model(x), h @ (new_base.double() + s * (B @ A)).t() + model[2].bias.double()) < 1e-6


def test_a_zero_size_weight_in_new_memory_keeps_the_merge():
    layer = lora.Linear(0, 8, r=2)
    layer.eval()
    layer.weight.data = torch.empty(8, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert layer(torch.randn(3, 0)).shape == (3, 8)
        layer.train()
    assert not layer.merged


def test_a_load_without_the_weight_after_new_memory_leaves_the_new_base():
    # strict=False without the weight: the load unmerged first (taking the adapter out of the new base), then merged
    layer, base = _layer("linear")
    new_base = _new_base_under(layer, base)
    A = torch.randn(4, 48) * 0.3
    with pytest.warns(UserWarning, match=TAKEN):
        layer.load_state_dict({"lora_A": A}, strict=False)
    assert not layer.merged  # (forgotten before the load: added on the fly until the next eval() or merge())
    assert torch.equal(layer.lora_A.detach(), A)
    x = _input(layer, "linear")
    _serves_the_adapter_on(layer, new_base, x)


# -- found by a hostile read of the first version (a sample at 64 hashed positions, the old memory trusted) -------


def test_an_update_in_a_few_rows_is_still_seen():
    # an embedding adapter trained only for tokens added at the end of the vocabulary: hashed positions missed
    # every row the update touches, so a base put back was kept as merged (0.26 off, and train() took it out)
    torch.manual_seed(0)
    emb = lora.Embedding(32000, 64, r=4, lora_alpha=8)
    with torch.no_grad():
        emb.lora_B.normal_(0, 0.3)
        emb.lora_A.zero_()
        emb.lora_A[:, 31990:] = torch.randn(4, 10) * 0.3
    base = emb.weight.detach().clone()
    emb.eval()
    emb.weight.data = base.clone()
    ids = torch.tensor([[31995, 31996, 1, 2]])
    with pytest.warns(UserWarning, match=TAKEN):
        out = emb(ids)
    A, B = emb.lora_A.detach().double(), emb.lora_B.detach().double()
    assert rel_err(out, base.double()[ids] + emb.scaling * A.t()[ids] @ B.t()) < 1e-6
    emb.train()
    assert torch.equal(bits(emb.weight.detach()), bits(base))


def _double_buffered(layer, new, old):
    """The weight moved into a second buffer holding `new`, then the first buffer refilled with `old`; returns both
    buffers, for the caller to hold (the old memory alive, as a double buffer keeps it)."""
    pool = [layer.weight.data, new.clone()]
    layer.weight.data = pool[1]
    pool[0].copy_(old)
    return pool


def test_an_update_in_a_few_output_rows_is_still_seen():
    # the Linear form: lora_B nonzero in rows 2-4 only (the rows of largest |B| are where the update is)
    layer, base = _layer("linear")
    layer.train()  # (merged again below with the new lora_B)
    with torch.no_grad():
        layer.weight.copy_(base)  # (float32 unmerges lossily: the exact base back)
        keep = layer.lora_B[2:5].clone()
        layer.lora_B.zero_()
        layer.lora_B[2:5] = keep
    layer.eval()
    x = _input(layer, "linear")
    layer.weight.data = base.clone()
    with pytest.warns(UserWarning, match=TAKEN):
        _serves_the_adapter_on(layer, base, x)


def test_old_memory_refilled_with_the_base_is_not_trusted():
    # a double buffer: the new memory holds the base, and so does the old one by the time the layer looks
    layer, base = _layer("linear")
    x = _input(layer, "linear")
    pool = _double_buffered(layer, base, base)
    assert layer._written.old() is not None  # (the case: the old memory alive, holding the base now)
    with pytest.warns(UserWarning, match=TAKEN):
        _serves_the_adapter_on(layer, base, x)
    del pool


def test_old_memory_reused_for_something_else_is_not_trusted():
    # the new memory holds the merged values; the old buffer was overwritten with noise
    layer, base = _layer("linear")
    x = _input(layer, "linear")
    pool = _double_buffered(layer, layer.weight.detach(), torch.randn(base.shape))
    assert layer._written.old() is not None  # (the case: the old memory alive, overwritten)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            out = layer(x)
    assert layer.merged
    assert rel_err(out, _expected64(layer, base, x)) < 1e-5
    layer.train()
    assert rel_err(layer.weight.detach(), base) < 1e-6
    del pool


def _fake_quant(w, bits_=8):
    step = w.abs().amax(dim=1, keepdim=True) / (2 ** (bits_ - 1) - 1)
    return (w / step).round() * step


@pytest.mark.parametrize("how", ["half_then_float", "bf16_then_fp16", "fake_quant", "conv_half_float"])
def test_a_rounded_copy_of_the_merged_weight_keeps_the_merge(how):
    kind = "conv" if how == "conv_half_float" else "linear"
    layer, base = _layer(kind)
    p = _param(layer)
    merged = p.detach().double().clone()
    if how == "half_then_float":
        p.data = p.data.half()
        p.data = p.data.float()
    elif how == "bf16_then_fp16":
        p.data = p.data.bfloat16()
        p.data = p.data.half()
    elif how == "fake_quant":
        p.data = _fake_quant(p.data)
    else:
        layer.conv.half()  # straight on the inner nn.Conv2d: `.data =` twice, nothing looks in between
        layer.conv.float()
    rounded = p.detach().double().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.train()  # the adapter taken out once, from the rounded copy
    unmerged = p.detach().double()
    assert rel_err(unmerged, base) < 0.05 * rel_err(merged, base)  # nearer the base than one update off
    delta = merged - base.double()
    assert rel_err(unmerged, rounded - delta) < 1e-2


@pytest.mark.parametrize("placeholder", ["empty", "meta"])
def test_a_placeholder_then_the_values_put_back_keeps_the_merge(placeholder):
    # ZeRO-3 or an offload: `.data = torch.empty(0)` (or a meta Parameter swapped in), something looks, then the
    # values come back: the placeholder is not judged; the values put back are
    layer, base = _layer("linear")
    x = _input(layer, "linear")
    with torch.no_grad():
        before = layer(x)
    if placeholder == "empty":
        saved = layer.weight.data
        layer.weight.data = torch.empty(0)
    else:
        saved = nn.Parameter(torch.empty(40, 48, device="meta"), requires_grad=False)
        torch.utils.swap_tensors(layer.weight, saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.eval()  # (already in eval: it looks at the memory only)
        assert layer.merged
    if placeholder == "empty":
        layer.weight.data = saved
    else:
        torch.utils.swap_tensors(layer.weight, saved)
    _quietly_serves(layer, x, before)
    layer.train()
    assert rel_err(layer.weight.detach(), base) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["linear", "merged_linear", "embedding", "conv"])
def test_new_memory_on_the_device(cuda, kind):
    # the sample is taken and compared on the weight's device (a bfloat16 lossless merge there)
    layer, base = _layer(kind, torch.bfloat16)
    layer.to(cuda.device)
    assert layer.merged
    x = _input(layer, kind).to(cuda.device)
    with torch.no_grad():
        before = layer(x)
    p = _param(layer)
    p.data = p.data.clone()  # the merged values: kept
    _quietly_serves(layer, x, before)
    new_base = (base.float() + 0.05 * torch.randn(base.shape)).bfloat16()
    p.data = new_base.to(cuda.device)  # a base: taken as one
    with pytest.warns(UserWarning, match=TAKEN):
        layer.train()
    assert torch.equal(bits(_param(layer).detach().cpu()), bits(new_base))


# -- found by a second hostile read (FSDP1, wrapper tensors, a fresh adapter) --------------------------------------


def test_a_flat_piece_between_forwards_is_not_judged():
    # FSDP1 (use_orig_params=True) puts each rank's 1-D piece of its flat parameter under the weight Parameter between
    # forwards, and views of the gathered values of the weight's shape for each forward: the piece was taken as a
    # base (the adapter then added twice), and the next eval() failed in the merge
    layer, base = _layer("linear")
    x = _input(layer, "linear")
    with torch.no_grad():
        before = layer(x)
    merged = layer.weight.data
    flat = merged.reshape(-1).clone()
    for _ in range(2):
        layer.weight.data = flat[: flat.numel() // 2]  # this rank's piece
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            layer.eval()  # (already in eval: it looks only)
            copy_ = __import__("copy").deepcopy(layer)
        assert layer.merged and copy_.merged
        layer.weight.data = flat.view(merged.shape)  # gathered for the forward: the merged values
        _quietly_serves(layer, x, before)
    layer.train()
    assert rel_err(layer.weight.detach(), base) < 1e-6


def test_a_wrapper_tensor_under_data_is_refused_by_torch_not_a_crash():
    # `weight.data = TwoTensor(w, w)` is accepted by torch and leaves a tensor whose data is not allocated; the
    # sample's indexing of it crashed the process (SIGSEGV) where torch's forward raises
    import subprocess
    import sys
    code = (
        "import torch, lora_ext as lora\n"
        "from torch.testing._internal.two_tensor import TwoTensor\n"
        "m = lora.Linear(5, 4, r=2)\n"
        "torch.nn.init.normal_(m.lora_B)\n"
        "m.eval()\n"
        "w = m.weight.detach().clone()\n"
        "m.weight.data = TwoTensor(w, w.clone())\n"
        "try:\n"
        "    m(torch.randn(3, 5))\n"
        "except RuntimeError as err:\n"
        "    print('refused:', err)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "refused:" in done.stdout


def test_a_fresh_adapter_in_new_memory_keeps_quiet():
    # lora_B of zeros (loralib's start): the merge wrote nothing, so a rounded copy is neither base nor merged; it was
    # taken as a base with a warning
    torch.manual_seed(1)
    layer = lora.Linear(48, 40, r=4, lora_alpha=8)
    layer.eval()
    layer.weight.data = layer.weight.data.half().float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.train()
    assert not layer.merged
