"""A hostile pass of 2026-12-02 (tenth session): each test failed before its fix.

- A non-finite value (inf, -inf, NaN) written into a merged weight with a lossless record (float16/bfloat16 by
  default, float32 with lossless=True) on an element whose record holds a code, not its bits (a diverged optimizer
  step, a masked fill): unmerge, state_dict and a switch gave NaN or the largest finite value there (the code's
  one step from inf's ordinal), where a lossy unmerge, loralib and a float32 weight give the value written.
  Restores now give a non-finite merged value back as it is, on every backend.
- torch.func.functional_call(model, model.state_dict(), x) of a merged (eval()) model dropped the adapter (1.7 off
  on a Linear): state_dict() holds the base, and the merged forward computed from the weight alone. loralib's
  state_dict holds the merged weight, so its stateless call gives model(x). The base a merged layer's state_dict
  gives is now marked, and a forward that finds it in place of the weight computes the adapter's part.
- A peft Conv2d adapter loaded with is_trainable=True trained in loralib's layout (B of r*k0 columns, peft's B
  (x) I_k0 trained whole): steps differ from peft's (0.04 after one SGD step that moved peft's output 0.18) and
  the trained adapter saved at rank r*k0*k0, without a word. The load now warns, naming the convolutions.
- A hostile pass over those fixes: the first form of the non-finite rule (keep the merged value where W' - d is not
  finite) lost the base of a record merged by the kernels (whose fma chain kept a huge sum finite) and unmerged on
  the CPU (whose float32 matmul overflowed to inf): the rule now looks at the merged value itself. The state_dict
  mark reached the live weight through torch.utils.swap_tensors and then served the adapter twice; a
  tensor-parallel layer and a mixed batch given that base still dropped (or subtracted) the adapter.
- hotswap_adapter (and load_peft_adapter of the active adapter's name) into a merged model wrote layer by layer:
  a refusal at a later layer (a lossless record's overflow, out of memory) left the layers before it serving the
  new adapter and the rest the old one, all named alike (logits 0.32 off both adapters). The layers written get
  their old values back now, and the refusal leaves the model bit for bit as it was.
- unload took no model lock (forwards on other threads saw some layers unloaded and merged, others not: 27 of 393
  matched neither the adapter's logits nor the base's) and a refused merge at a later layer left the model half
  unloaded. It now holds the model's lock and merges (or unmerges) every layer before the first is taken out.
- copy.deepcopy of a merged bfloat16 layer while another thread switched it copied one adapter's weight with the
  other's bookkeeping (191 of 400 copies gave a wrong base back, 0.12 off; sometimes a raw "dictionary keys
  changed during iteration"). The copy is made under the layer's lock now.
- A mixed batch of base rows only (every row None) left its thread counted among the slot pool's holders, so that
  thread's later batches were refused at once ("held by other open batches") instead of waiting for a slot.
- A hostile pass over those: the refused reload's put-back gave a reserved model's adapter its padded rank as its own
  (save_peft_adapter then wrote r=16 for an r=4 adapter); a reload of an inactive adapter's name with
  activate=True whose activation was refused left the adapter replaced (0.4 off once served); unload listed the
  layers before taking the model's lock, so layers a load on another thread installed meanwhile stayed.
"""
import copy
import json
import math
import threading
import time
import warnings

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model

import lora_ext as lora
from lora_ext import lossless, ops
from helpers import bits, layer_forward64, load_sim, randomize_, save_random_peft
from test_session_hostile11 import LOSSLESS_KINDS, _lossless_layer
from tiny_models import gpt2, llama, randomize_lora, snapshot, tokens, unchanged


@pytest.fixture(params=["cpu_pass", "pure_torch", "kernels"])
def restore_path(request, monkeypatch):
    """Where a CPU weight's lossless pass runs: the C++ CPU pass (lora_ext._cpu), the pure-torch reference
    (lossless._pass_reference), or the CUDA kernels' code (the simulator standing in for _C)."""
    if request.param == "pure_torch":
        monkeypatch.setattr(lossless, "_cpu", None)
    if request.param != "kernels":
        yield request.param
        return
    sim = load_sim()
    if sim is None:
        pytest.skip("lora_ext._sim is not built")
    with ops.use_kernels(sim, "cpu"):
        yield request.param


@pytest.mark.parametrize("via", ["train", "state_dict", "switch"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", sorted(LOSSLESS_KINDS))
def test_a_non_finite_write_while_merged_is_kept(kind, dtype, value, via, restore_path):
    layer, w = _lossless_layer(kind, dtype)
    layer.lossless = True  # (the default for 16-bit weights; float32 asks for it)
    layer.requires_grad_(False)
    layer.add_adapter("b", torch.randn_like(layer.lora_A) * 0.3, torch.randn_like(layer.lora_B) * 0.3, 0.5)
    base = w.detach().clone()
    layer.eval()
    assert layer.merged and layer._merged_record.exceptions > 0  # (listed elements beside the coded ones)
    written = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) < 0.3
    with torch.no_grad():
        w[written] = value
    key = "conv.weight" if hasattr(layer, "conv") else "weight"
    if via == "state_dict":
        got = layer.state_dict()[key]
    else:
        if via == "switch":
            layer.set_adapter("b")
            served = w.detach()[written]
            assert bool((served.isnan() if math.isnan(value) else served == value).all())
        layer.train()
        got = w.detach()
    # the written elements: the value written (a lossy unmerge's inf - d, NaN - d)
    if math.isnan(value):
        assert bool(got[written].isnan().all())
    else:
        assert bool((got[written] == value).all())
    # the others: the base, bit for bit
    assert torch.equal(bits(got[~written]), bits(base[~written]))


def _input(layer, dtype):
    if isinstance(layer, lora.Embedding):
        return torch.randint(0, layer.num_embeddings, (3, 5))
    if isinstance(layer, lora.ConvLoRA):
        return torch.randn(2, layer.conv.in_channels, 6, 6, dtype=dtype)
    return torch.randn(3, layer.in_features, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", sorted(LOSSLESS_KINDS))
def test_functional_call_with_a_merged_layers_state_dict(kind, dtype):
    torch.manual_seed(4)
    layer = randomize_(LOSSLESS_KINDS[kind](), 0.3).to(dtype)
    x = _input(layer, dtype)
    p64 = {n: t.detach().double() for n, t in layer.named_parameters()}
    want = layer_forward64(layer, p64, x if x.dtype == torch.long else x.double(), layer.scaling)
    tol = 1e-5 if dtype == torch.float32 else 0.08 * float(want.abs().max())
    layer.eval()
    assert layer.merged
    state = layer.state_dict()
    got = torch.func.functional_call(layer, state, (x,))
    assert float((got.double() - want).abs().max()) <= tol
    # the merged weight's own values (the Parameters, or detached views of them) still serve the merge
    own = {n: t.detach() for n, t in layer.named_parameters()}
    assert float((torch.func.functional_call(layer, own, (x,)).double() - want).abs().max()) <= tol
    assert float((layer(x).double() - want).abs().max()) <= tol
    # loaded back (assign=True too), the layer merges again and serves the adapter once
    layer.load_state_dict(state, assign=True)
    assert layer.merged and float((layer(x).double() - want).abs().max()) <= tol
    layer.train()
    assert float((torch.func.functional_call(layer, state, (x,)).double() - want).abs().max()) <= tol


def test_functional_call_with_a_merged_models_state_dict():
    model = gpt2()
    lora.inject(model, ["c_attn", "c_proj"], r=4, lora_alpha=8)
    randomize_lora(model)
    ids = tokens()
    with torch.no_grad():
        want = model(ids).logits
        model.eval()
        got = torch.func.functional_call(model, model.state_dict(), (ids,), tie_weights=False).logits
    assert all(m.merged for _, m in lora.serving.lora_layers(model))
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())


class _Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pointwise = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.pointwise(self.conv(x))


@pytest.mark.parametrize("targets", [["conv", "pointwise"], ["pointwise"]])
def test_training_a_peft_conv_adapter_warns_that_its_steps_differ(tmp_path, targets):
    torch.manual_seed(5)
    base = _Convs().double()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    pm.save_pretrained(tmp_path)
    x, y = torch.randn(5, 3, 6, 6, dtype=torch.float64), torch.randn(5, 4, 6, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # serving: no warning
        frozen = copy.deepcopy(base)
        lora.load_peft_adapter(frozen, tmp_path)
    ours = copy.deepcopy(base)
    if "conv" in targets:
        with pytest.warns(UserWarning, match=r"adapter_config.json: the convolutions 'conv' train in loralib's "
                                             r"ConvLoRA layout .* steps differ from peft's"):
            lora.load_peft_adapter(ours, tmp_path, is_trainable=True)
    else:  # a 1x1 convolution's layouts are the same (k0 = 1): it trains as peft's does
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            lora.load_peft_adapter(ours, tmp_path, is_trainable=True)
    with torch.no_grad():
        assert float((pm(x) - ours(x)).abs().max()) < 1e-12 and float((pm(x) - frozen(x)).abs().max()) < 1e-12
    for m in (pm, ours):  # one identical SGD step
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        (m(x) - y).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        apart = float((pm(x) - ours(x)).abs().max())
    assert (apart > 1e-3) if "conv" in targets else (apart < 1e-12)  # what the warning says, and only then


def test_a_record_merged_by_the_kernels_is_not_taken_for_a_write_where_the_cpus_update_overflows(restore_path):
    """Weights near the float32/bfloat16 limit under factors of 1e19: the kernels' fma chain keeps the rank's sum
    finite (the element is coded), the CPU passes' float32 matmul gives inf. The kernels give the base back bit for
    bit; the CPU passes cannot (their update is inf: the base comes back non-finite, as before), but they must
    not keep the merged value as if it had been written while merged."""
    sim = load_sim()
    if sim is None:
        pytest.skip("lora_ext._sim is not built")
    for dtype in (torch.bfloat16, torch.float32):
        layer = lora.Linear(2, 2, r=2, lora_alpha=0.5, bias=False, lossless=True).to(dtype)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([[-3e38, -2.9e38], [-2.5e38, -3.1e38]]))
            layer.lora_A.copy_(torch.tensor([[1e19, 1e19], [1.87e19, 1.87e19]]))
            layer.lora_B.copy_(torch.tensor([[-1e19, 1.87e19], [-1e19, 1.87e19]]))
        layer.requires_grad_(False)
        base = layer.weight.detach().clone()
        with ops.use_kernels(sim, "cpu"):
            layer.eval()
        merged = layer.weight.detach().clone()
        assert bool(merged.isfinite().all()) and not torch.equal(bits(merged), bits(base))
        layer.train()  # on the restore_path's backend
        got = layer.weight.detach()
        if restore_path == "kernels":
            assert torch.equal(bits(got), bits(base)), dtype
        else:
            assert not bool((bits(got) == bits(merged)).any()), dtype


def _merged_linear(seed=6):
    torch.manual_seed(seed)
    layer = randomize_(lora.Linear(8, 6, r=2, lora_alpha=4), 1.0)
    x = torch.randn(3, 8)
    p = {n: t.detach().double() for n, t in layer.named_parameters()}
    return layer, x, layer_forward64(layer, p, x.double(), layer.scaling)


def test_the_state_dict_mark_moved_onto_the_live_weight_does_not_add_the_adapter_twice():
    layer, x, want = _merged_linear()
    checkpoint = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.eval()
    torch.utils.swap_tensors(layer.weight, layer.state_dict()["weight"])  # the marked base is the live weight now
    assert getattr(layer._parameters["weight"], "_lora_ext_unmerged", False)
    with torch.no_grad():
        # (it holds the base: the adapter added once; the forward sees new memory under the Parameter, compares it
        # with the old memory the swap left in the other tensor, and forgets the merge: tests/test_new_memory.py)
        with pytest.warns(UserWarning, match="taken as the base"):
            assert float((layer(x).double() - want).abs().max()) < 1e-5
        assert not layer.merged
        layer.load_state_dict(checkpoint)  # loaded as a base (unmerged: the adapter on the fly until eval())
        assert not layer.merged and float((layer(x).double() - want).abs().max()) < 1e-5
    layer.train()
    layer.eval()
    with torch.no_grad():
        assert float((layer(x).double() - want).abs().max()) < 1e-5


def test_functional_call_with_the_state_dict_in_a_mixed_batch():
    layer, x, want_default = _merged_linear()
    model = nn.Sequential(layer)
    A_b, B_b = torch.randn(2, 8), torch.randn(6, 2)
    layer.add_adapter("b", A_b, B_b, 3.0)
    p = {n: t.detach().double() for n, t in layer.named_parameters()}
    want_b = layer_forward64(layer, {**p, "lora_A": A_b.double(), "lora_B": B_b.double()}, x.double(), 3.0)
    want_base = layer_forward64(layer, p, x.double(), 0.0)
    want = torch.stack([want_default[0], want_b[1], want_base[2]])
    model.eval()
    state = model.state_dict()
    with torch.no_grad(), lora.batch_adapters(model, ["default", "b", None]):
        served = model(x).double()
        stateless = torch.func.functional_call(model, state, (x,)).double()
    assert float((served - want).abs().max()) < 1e-4
    assert float((stateless - want).abs().max()) < 1e-4


def tp_functional_case(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from test_tensor_parallel import PLAN, build, data
    net = build()
    ids = data()[0][0]
    parallelize_module(net, init_device_mesh("cpu", (world,)), PLAN)
    with torch.no_grad():
        out = {"unmerged": net(ids)}
        net.eval()
        out["merged"] = net(ids)
        out["stateless"] = torch.func.functional_call(net, net.state_dict(), (ids,))
    return out


def test_functional_call_with_a_tensor_parallel_models_state_dict():
    from dist import run_ranks
    for r in run_ranks(tp_functional_case):
        scale = float(r["unmerged"].abs().max())
        assert float((r["merged"] - r["unmerged"]).abs().max()) < 1e-5 * scale
        assert float((r["stateless"] - r["unmerged"]).abs().max()) < 1e-5 * scale


def _merged_bfloat16_llama(path):
    """A bfloat16 tiny Llama serving the peft adapter at `path` as "a", merged (lossless); its input and logits."""
    model = llama().to(torch.bfloat16)
    lora.load_peft_adapter(model, path, "a")
    model.eval()
    ids = tokens()
    with torch.no_grad():
        return model, ids, model(ids).logits


@pytest.mark.parametrize("how", ["hotswap", "load"])
@pytest.mark.parametrize("refusal", ["overflow", "out_of_memory"])
def test_a_swap_refused_at_a_later_layer_leaves_the_whole_model_as_it_was(tmp_path, how, refusal, monkeypatch):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    old = save_random_peft(get_peft_model(llama(), config), tmp_path / "old", seed=1, std=0.05)
    new = get_peft_model(llama(), config)
    save_random_peft(new, tmp_path / "new", seed=2, std=0.05)
    last = [n for n, _ in new.named_parameters() if "lora_B" in n][-1]
    if refusal == "overflow":  # |s B A| >> |W| in the last layer: its lossless swap is refused
        with torch.no_grad():
            new.get_parameter(last).mul_(3e3)
        new.save_pretrained(str(tmp_path / "new"))
    model, ids, before = _merged_bfloat16_llama(old)
    snap = snapshot(model)
    if refusal == "out_of_memory":  # the last layer's swap, before it writes
        real, calls = ops.swap_, []

        def swap_(*args, **kwargs):
            calls.append(1)
            if len(calls) == 4:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return real(*args, **kwargs)
        monkeypatch.setattr(ops, "swap_", swap_)
    with pytest.raises((ValueError, torch.OutOfMemoryError)):
        if how == "hotswap":
            lora.hotswap_adapter(model, str(tmp_path / "new"), "a")
        else:
            lora.load_peft_adapter(model, str(tmp_path / "new"), "a")
    monkeypatch.undo()
    assert unchanged(model, snap)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert all(m.merged and m.active_adapter == "a" for _, m in lora.serving.lora_layers(model))
    model.train()  # the base, bit for bit (the lossless records are the old adapter's)
    assert all(torch.equal(bits(m.weight.detach()), bits(llama().to(torch.bfloat16).get_submodule(n).weight))
               for n, m in lora.serving.lora_layers(model))


@pytest.mark.parametrize("merge", [True, False])
def test_unload_refused_at_a_later_layer_leaves_every_layer_in_place(tmp_path, merge, monkeypatch):
    model = llama()
    lora.load_peft_adapter(model, save_random_peft(get_peft_model(llama(), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])), tmp_path / "a", seed=1, std=0.05))
    if not merge:
        model.eval()
    found = lora.serving.lora_layers(model)
    states = [m.merged for _, m in found]
    ids = tokens()
    with torch.no_grad():
        before = model(ids).logits
    victim = type(found[-1][1])
    real = victim.merge if merge else victim.unmerge

    def refuse(self):
        if self is found[-1][1]:
            raise torch.OutOfMemoryError("CPU out of memory (injected)")
        return real(self)
    monkeypatch.setattr(victim, "merge" if merge else "unmerge", refuse)
    with pytest.raises(torch.OutOfMemoryError):
        lora.unload(model, merge=merge)
    monkeypatch.undo()
    assert [m.merged for _, m in lora.serving.lora_layers(model)] == states and len(states) == len(found)
    with torch.no_grad():  # (float32: the layers merged and taken back by the refusal are one rounding off)
        assert float((model(ids).logits - before).abs().max()) < 1e-5 * float(before.abs().max())
    lora.unload(model, merge=merge)
    assert not lora.serving.lora_layers(model)


def test_forwards_on_other_threads_see_unload_whole():
    """unload(merge=False) while another thread forwards: each output is the adapter's or the base's, never a mix of
    layers taken out and layers still serving the adapter."""
    model = llama()
    ids = tokens()
    with torch.no_grad():
        base = model(ids).logits
    lora.inject(model, ["q_proj", "v_proj", "up_proj", "down_proj"], r=4, lora_alpha=8)
    randomize_lora(model)
    factors = {k: v.clone() for k, v in lora.lora_state_dict(model).items()}
    with torch.no_grad():
        adapter = model(ids).logits
    scale = float(adapter.abs().max())
    assert float((adapter - base).abs().max()) > 1e-2 * scale
    seen, mixes = [], []
    for _ in range(30):
        if not lora.serving.lora_layers(model):
            lora.inject(model, ["q_proj", "v_proj", "up_proj", "down_proj"], r=4, lora_alpha=8)
            model.load_state_dict(factors, strict=False)
        lora.set_adapter(model, "default")  # (the model's lock, before forwards run on other threads)
        stop = threading.Event()

        def forward():
            with torch.no_grad():
                while not stop.is_set():
                    seen.append(model(ids).logits)
        thread = threading.Thread(target=forward)
        thread.start()
        try:
            while not seen:  # (sleeping, not spinning: a spinning loop holds the GIL the forwards need)
                time.sleep(0.0005)
            time.sleep(0.005)
            lora.unload(model, merge=False)
            count = len(seen)
            while len(seen) < count + 1:
                time.sleep(0.0005)
        finally:
            stop.set()
            thread.join()
        mixes += [out for out in seen if float((out - adapter).abs().max()) > 1e-5 * scale
                  and float((out - base).abs().max()) > 1e-5 * scale]
        seen.clear()
    assert not mixes, f"{len(mixes)} forwards served a mix"


def test_deepcopy_of_a_layer_another_thread_switches_is_whole():
    torch.manual_seed(7)
    layer = lora.Linear(128, 128, r=8, lora_alpha=16).to(torch.bfloat16)
    base = layer.weight.detach().clone()
    gen = torch.Generator().manual_seed(1)
    for name in ("default", "b"):
        layer.add_adapter(name, torch.randn(8, 128, generator=gen) * 0.05, torch.randn(128, 8, generator=gen) * 0.05,
                          2.0)
    layer.eval()
    stop = threading.Event()

    def switch():
        while not stop.is_set():
            layer.set_adapter("b" if layer.active_adapter == "default" else "default")
    thread = threading.Thread(target=switch)
    thread.start()
    wrong = 0
    try:
        for _ in range(150):
            replica = copy.deepcopy(layer)
            replica.train()
            wrong += not torch.equal(bits(replica.weight.detach()), bits(base))
    finally:
        stop.set()
        thread.join()
    assert wrong == 0, f"{wrong} of 150 copies gave another base back"


def test_a_batch_of_base_rows_only_leaves_no_holder_behind(tmp_path):
    model = llama()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    lora.load_peft_adapter(model, save_random_peft(get_peft_model(llama(), config), tmp_path / "a", 1, 0.05), "a")
    lora.load_peft_adapter(model, save_random_peft(get_peft_model(llama(), config), tmp_path / "b", 2, 0.05), "b",
                           activate=False)
    lora.configure_slots(model, slots=1)  # one slot: a batch of b waits for a batch of a to close
    ids = tokens()
    with torch.no_grad(), lora.batch_adapters(model, [None, None]):
        model(ids)
    assert not model.__dict__["_lora_ext_slot_pool"].holders
    opened, served = threading.Event(), []

    def hold_a():
        with torch.no_grad(), lora.batch_adapters(model, ["a", "a"]):
            model(ids)
            opened.set()
            time.sleep(0.5)
    thread = threading.Thread(target=hold_a)
    thread.start()
    try:
        opened.wait()
        with torch.no_grad(), lora.batch_adapters(model, ["b", "b"]):  # waits for the slot, is not refused
            served.append(model(ids).logits)
    finally:
        thread.join()
    assert served


def _reload_setup(tmp_path, blow_last=True):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    old = save_random_peft(get_peft_model(llama(), config), tmp_path / "old", seed=1, std=0.05)
    new = get_peft_model(llama(), config)
    save_random_peft(new, tmp_path / "new", seed=2, std=0.05)
    if blow_last:  # |s B A| >> |W| in the last layer: its lossless swap is refused
        with torch.no_grad():
            new.get_parameter([n for n, _ in new.named_parameters() if "lora_B" in n][-1]).mul_(3e3)
        new.save_pretrained(str(tmp_path / "new"))
    return old, str(tmp_path / "new")


def test_a_refused_reload_keeps_a_reserved_adapters_own_rank(tmp_path):
    old, new = _reload_setup(tmp_path)
    model = llama().to(torch.bfloat16)
    lora.load_peft_adapter(model, old, "a")
    lora.reserve_rank(model, 16)
    model.eval()
    with pytest.raises(ValueError):
        lora.load_peft_adapter(model, new, "a")
    lora.save_peft_adapter(model, tmp_path / "after", "a")
    saved = json.loads((tmp_path / "after" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and not saved.get("rank_pattern")


def test_a_reload_of_an_inactive_adapter_refused_at_activation_keeps_its_old_values(tmp_path):
    old, new = _reload_setup(tmp_path)
    model = llama().to(torch.bfloat16)
    lora.load_peft_adapter(model, save_random_peft(get_peft_model(llama(), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])), tmp_path / "first", seed=3, std=0.05), "first")
    lora.load_peft_adapter(model, old, "a", activate=False)
    model.eval()
    ids = tokens()
    lora.set_adapter(model, "a")
    with torch.no_grad():
        want = model(ids).logits
    lora.set_adapter(model, "first")
    with pytest.raises(ValueError):  # the switch to the new values overflows the last layer's record
        lora.load_peft_adapter(model, new, "a", activate=True)
    assert all(m.active_adapter == "first" for _, m in lora.serving.lora_layers(model))
    lora.set_adapter(model, "a")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)


def test_unload_takes_the_layers_a_load_on_another_thread_installed_before_it(tmp_path, monkeypatch):
    model = llama()
    lora.load_peft_adapter(model, save_random_peft(get_peft_model(llama(), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"])), tmp_path / "a", seed=1, std=0.05), "a")
    more = save_random_peft(get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"])),
                            tmp_path / "b", seed=2, std=0.05)
    from lora_ext.serving import injection
    real, inside = injection.install, threading.Event()

    def slow_install(*args, **kwargs):  # the load is inside its locked section, installing o_proj
        inside.set()
        time.sleep(0.3)
        return real(*args, **kwargs)
    monkeypatch.setattr(injection, "install", slow_install)
    thread = threading.Thread(target=lambda: lora.load_peft_adapter(model, more, "b", activate=False))
    thread.start()
    try:
        inside.wait(30)
        names = lora.unload(model, merge=False)
    finally:
        thread.join()
    assert not lora.serving.lora_layers(model) and any(n.endswith("o_proj") for n in names)


def test_a_load_refused_at_activation_takes_its_new_layers_back(tmp_path):
    """The load's new layers (o_proj) go (they stayed, inactive, until the sixteenth session; see
    test_session_hostile16): the model serves what it served, and no layer serves the refused adapter."""
    first = save_random_peft(get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
                             tmp_path / "a", seed=1, std=0.05)
    more = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    save_random_peft(more, tmp_path / "c", seed=2, std=0.05)
    with torch.no_grad():  # the last q_proj's lossless swap overflows: the activation is refused
        more.get_parameter("base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight").mul_(3e3)
    more.save_pretrained(str(tmp_path / "c"))
    model, ids, before = _merged_bfloat16_llama(first)
    with pytest.raises(ValueError):
        lora.load_peft_adapter(model, str(tmp_path / "c"), "c", activate=True)
    assert {m.active_adapter for _, m in lora.serving.lora_layers(model)} == {"a"}
    assert lora.adapter_names(model) == ["a"]
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("o_proj"))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
