"""lora_ext under FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel) on 2 gloo ranks. FSDP1 flattens a module's
parameters into a flat parameter: between forwards each original Parameter holds a 1-D shard piece, inside
summon_full_params a gathered view that writeback=False drops on exit, and a factor given a new Parameter is never
seen by the flat parameter. Merges, unmerges and switches used to write there: eval() inside
summon_full_params(writeback=False) left merged=True over weights that never held the adapter (33.5 off, then a
train() took the adapter out of the base), a switch served the old factors at the new scaling, others failed inside
ops with messages naming no layer, or broke every later forward. They are refused now, naming the layer, before
anything is written: eval() warns and serves the adapter on the fly (the model in eval mode, every layer
unmerged). lora_state_dict gave each rank's flat pieces under FSDP1's wrapper names; it gives whole tensors under the
model's keys now. Oracles are float64 formulas on the tensors the test made."""
import warnings

import pytest
import torch
import torch.nn as nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

import lora_ext as lora
from dist import run_ranks

REFUSED = "FSDP1 .FullyShardedDataParallel. holds its"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = lora.Linear(8, 16, r=4, lora_alpha=8)
        self.l2 = lora.Linear(16, 4, r=2, lora_alpha=6)
        g = torch.Generator().manual_seed(1)
        self.b_factors = {}  # (a plain attribute: not the module's state)
        for name, layer in (("l1", self.l1), ("l2", self.l2)):
            with torch.no_grad():
                layer.lora_A.normal_(0, 0.5)
                layer.lora_B.normal_(0, 0.5)
            self.b_factors[name] = (torch.randn(layer.lora_A.shape, generator=g) * 0.5,
                                    torch.randn(layer.lora_B.shape, generator=g) * 0.5)
            layer.add_adapter("b", *self.b_factors[name], 1.7)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


def _params64(net, name, adapter="default"):
    layer = getattr(net, name)
    A, B, s = (layer.lora_A, layer.lora_B, layer.scaling) if adapter == "default" else (*net.b_factors[name], 1.7)
    return {"W": layer.weight.detach().double().clone(), "b": layer.bias.detach().double().clone(),
            "A": A.detach().double().clone(), "B": B.detach().double().clone(), "s": s}


def _net64(p1, p2, x):
    def lin(p, h):
        return h @ p["W"].T + p["b"] + p["s"] * (h @ p["A"].T @ p["B"].T)
    return lin(p2, torch.relu(lin(p1, x.double())))


def _wrapped(use_orig_params=True):
    net = Net()
    refs = {a: (_params64(net, "l1", a), _params64(net, "l2", a)) for a in ("default", "b")}
    if not use_orig_params:
        for p in net.parameters():  # (FSDP1 flattens a module's parameters only when they agree on requires_grad)
            p.requires_grad_(True)
    return net, FSDP(net, use_orig_params=use_orig_params, device_id=torch.device("cpu")), refs


def _err(model, refs, adapter="default"):
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return float((model(x).double() - _net64(*refs[adapter], x)).abs().max())


def _eval_told(model, summon):
    """model.eval() (inside summon_full_params(writeback=summon) unless None); the warnings naming FSDP1."""
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        if summon is None:
            model.eval()
        else:
            with FSDP.summon_full_params(model, writeback=summon):
                model.eval()
    return [str(w.message) for w in ws if "FSDP1" in str(w.message)]


def _eval_refused(rank, world, summon):
    net, model, refs = _wrapped()
    model(torch.randn(2, 8))  # (between forwards: shard pieces)
    told = _eval_told(model, summon)
    out = {"merged": [net.l1.merged, net.l2.merged], "told": told, "eval_err": _err(model, refs)}
    with FSDP.summon_full_params(model, writeback=True):
        model.train()
    out["train_err"] = _err(model, refs)
    state = model.state_dict()  # (FSDP1's full state dict: the base weights)
    out["base_err"] = float((state["l1.weight"].double() - refs["default"][0]["W"]).abs().max())
    with pytest.raises(ValueError, match=REFUSED) as e:
        net.l1.merge()
    out["merge_refusal"] = str(e.value)
    out["merged_after"] = net.l1.merged
    return out


@pytest.mark.parametrize("summon", [None, False, True], ids=["between_forwards", "summon_no_writeback", "summon"])
def test_fsdp1_merges_are_refused_and_the_adapter_served_on_the_fly(summon):
    for out in run_ranks(_eval_refused, summon):
        assert out["merged"] == [False, False] and out["merged_after"] is False
        assert len(out["told"]) == 2 and "Linear(8, 16)" in out["told"][0] and "Linear(16, 4)" in out["told"][1]
        assert "Linear(8, 16)" in out["merge_refusal"] and "fully_shard" in out["merge_refusal"]
        assert out["eval_err"] < 1e-5 and out["train_err"] < 1e-5  # (before: 33.5 off, summon_no_writeback)
        assert out["base_err"] < 1e-6  # (before: 2.85 off after a train())


def _switch_refused(rank, world, how, summon):
    net, model, refs = _wrapped()
    if how == "serving":
        for p in net.parameters():
            p.requires_grad_(False)
    model(torch.randn(2, 8))
    summoned = FSDP.summon_full_params(model, writeback=summon) if summon is not None else None
    with pytest.raises(ValueError, match=REFUSED) as e:
        if summoned is not None:
            with summoned:
                (lora.set_adapter(model, "b") if how != "layer" else net.l1.set_adapter("b"))
        else:
            lora.set_adapter(model, "b") if how != "layer" else net.l1.set_adapter("b")
    return {"refusal": str(e.value), "active": [net.l1.active_adapter, net.l2.active_adapter],
            "err": _err(model, refs)}


@pytest.mark.parametrize("how, summon", [("serving", None), ("serving", False), ("trainable", True),
                                         ("layer", None)])
def test_fsdp1_switches_are_refused_before_anything_changes(how, summon):
    for out in run_ranks(_switch_refused, how, summon):
        assert "Linear(8, 16)" in out["refusal"] and "set_adapter('b')" in out["refusal"]
        assert out["active"] == ["default", "default"]
        assert out["err"] < 1e-5  # the old adapter, whole (before: its factors at b's scaling, 14.9 off b)


def _merged_before_wrapping(rank, world):
    net = Net()
    refs = {"default": (_params64(net, "l1"), _params64(net, "l2"))}
    net.eval()  # merged, then wrapped: FSDP1 flattens the merged weights
    model = FSDP(net, use_orig_params=True, device_id=torch.device("cpu"))
    out = {"merged": net.l1.merged, "err": _err(model, refs)}
    with pytest.raises(ValueError, match="unmerge before wrapping") as e:
        model.train()
    out["refusal"] = str(e.value)
    out["still_merged"] = net.l1.merged
    out["err_after"] = _err(model, refs)
    return out


def test_fsdp1_layers_merged_before_wrapping_serve_and_refuse_to_unmerge():
    for out in run_ranks(_merged_before_wrapping):
        assert out["merged"] and out["still_merged"]
        assert "Linear(8, 16)" in out["refusal"]
        assert out["err"] < 1e-5 and out["err_after"] < 1e-5


def _lora_state(rank, world, use_orig_params):
    net, model, refs = _wrapped(use_orig_params)
    model(torch.randn(2, 8))
    state = lora.lora_state_dict(model)
    plain = Net()
    missing, unexpected = plain.load_state_dict(state, strict=False)
    return {"keys": sorted(state), "shapes": {k: tuple(v.shape) for k, v in state.items()},
            "unexpected": unexpected,
            "err": max(float((state[f"{n}.{f}"].double() - refs["default"][i][f[-1]]).abs().max())
                       for i, n in enumerate(("l1", "l2")) for f in ("lora_A", "lora_B"))}


@pytest.mark.parametrize("use_orig_params", [True, False])
def test_fsdp1_lora_state_dict_is_whole_under_the_models_keys(use_orig_params):
    for out in run_ranks(_lora_state, use_orig_params):
        assert out["keys"] == ["l1.lora_A", "l1.lora_B", "l2.lora_A", "l2.lora_B"]  # (before: FSDP1's names)
        assert out["shapes"] == {"l1.lora_A": (4, 8), "l1.lora_B": (16, 4), "l2.lora_A": (2, 16),
                                 "l2.lora_B": (4, 2)}  # (before: 1-D pieces, another on each rank)
        assert out["unexpected"] == [] and out["err"] == 0.0


def _flat_eval(rank, world):
    net, model, refs = _wrapped(use_orig_params=False)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        model.eval()
    return {"told": [str(w.message) for w in ws if "unmerged" in str(w.message)], "merged": net.l1.merged,
            "err": _err(model, refs)}


def test_fsdp1_without_orig_params_says_fsdp1():
    for out in run_ranks(_flat_eval):
        assert out["merged"] is False and out["err"] < 1e-5
        assert len(out["told"]) == 2 and all("FSDP1" in t and "parametrization" not in t for t in out["told"])


# -- found by a hostile read: model-level calls, messages, state dicts ---------------------------------------------

class Masked(Net):
    """Net with a persistent buffer named like a bias (GPT-2's old attention mask): not a parameter."""

    def __init__(self):
        super().__init__()
        self.mask = nn.Module()
        self.mask.register_buffer("bias", torch.ones(3))


def _model_level_refusals(rank, world, use_orig_params):
    import os
    import tempfile
    net, model, refs = _wrapped(use_orig_params)
    model(torch.randn(2, 8))
    out = {}
    calls = {
        "set_adapter": lambda: lora.set_adapter(model, "b"),
        "layer.set_adapter": lambda: net.l1.set_adapter("b"),
        "reserve_rank": lambda: lora.reserve_rank(model, 8),
        "add_adapter_active": lambda: net.l1.add_adapter("default", torch.zeros(4, 8), torch.zeros(16, 4), 2.0),
        "merge_adapter": lambda: lora.merge_adapter(model),
        "unmerge_adapter": lambda: lora.unmerge_adapter(model),
        "unload_merge": lambda: lora.unload(model, merge=True),
        "unload": lambda: lora.unload(model, merge=False),
        "save_peft_adapter": lambda: lora.save_peft_adapter(model, os.path.join(tempfile.mkdtemp(), "a")),
        "add_weighted_adapter": lambda: lora.add_weighted_adapter(model, ["default", "b"], [0.5, 0.5], "w",
                                                                  combination_type="cat"),
    }
    for name, call in calls.items():
        try:
            call()
            out[name] = "accepted"
        except ValueError as e:
            out[name] = str(e)
    out["unchanged"] = ([net.l1.active_adapter, net.l2.active_adapter, type(model.module.l1).__name__],
                        _err(model, refs))
    return out


@pytest.mark.parametrize("use_orig_params", [True, False])
def test_fsdp1_model_level_calls_are_refused_naming_fsdp1_and_the_layer(use_orig_params):
    for out in run_ranks(_model_level_refusals, use_orig_params):
        active, err = out.pop("unchanged")
        assert active == ["default", "default", "Linear"] and err < 1e-5
        for name, message in out.items():
            assert "FSDP1" in message, (name, message)  # (before: a parametrization's or a hook's message, or none)
            assert "parametrization" not in message and "hook" not in message, (name, message)
        assert "l1" in out["unload"] and "l1" in out["save_peft_adapter"]  # the layer's path
        assert "lora_state_dict" in out["save_peft_adapter"]


def _partial_unmerge(rank, world):
    net = Net()
    refs = {"default": (_params64(net, "l1"), _params64(net, "l2"))}
    net.eval()  # merged, then l2 flattened and l1 left out (ignored_modules)
    model = FSDP(net, use_orig_params=True, device_id=torch.device("cpu"), ignored_modules=[net.l1])
    with pytest.raises(ValueError, match="FSDP1") as e:
        lora.unmerge_adapter(model)
    return {"merged": [net.l1.merged, net.l2.merged], "refusal": str(e.value), "err": _err(model, refs)}


def test_fsdp1_unmerge_adapter_refuses_before_any_layer_changes():
    for out in run_ranks(_partial_unmerge):
        assert out["merged"] == [True, True]  # (before: l1 unmerged, then l2 refused)
        assert "'_fsdp_wrapped_module.l2'" in out["refusal"] or "'l2'" in out["refusal"]
        assert out["err"] < 1e-5


def _inject_flattened(rank, world):
    torch.manual_seed(0)
    model = FSDP(nn.Sequential(nn.Linear(8, 6)), use_orig_params=True, device_id=torch.device("cpu"))
    with pytest.raises(ValueError, match="FSDP1") as e:
        lora.inject(model, ["0"], r=2)
    return {"refusal": str(e.value), "kind": type(model.module[0]).__name__}


def test_fsdp1_inject_into_a_flattened_module_is_refused():
    for out in run_ranks(_inject_flattened):
        assert out["kind"] == "Linear" and "before wrapping" in out["refusal"]  # (before: accepted, then forwards
        # failed in ops with "weight must be 2-D", naming no layer)


def _disable_with_eval_inside(rank, world):
    net, model, refs = _wrapped()
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        with lora.disable_adapter(model):
            model.eval()
    return {"merged": [net.l1.merged, net.l2.merged], "err": _err(model, refs),
            "told": [str(w.message) for w in ws if "FSDP1" in str(w.message)]}


def test_fsdp1_eval_inside_disable_adapter_leaves_the_layers_unmerged_as_eval_does():
    for out in run_ranks(_disable_with_eval_inside):  # (before: the block's end raised)
        assert out["merged"] == [False, False] and out["err"] < 1e-5 and len(out["told"]) == 2


def _pickled_from_fsdp1(rank, world):
    import io
    net, model, refs = _wrapped()
    buf = io.BytesIO()
    with FSDP.summon_full_params(model, writeback=False):
        torch.save(net, buf)  # (Parameters pickle their attributes: FSDP1's mark among them)
    buf.seek(0)
    plain = torch.load(buf, weights_only=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain.eval()
    lora.set_adapter(plain, "b")
    state = lora.lora_state_dict(plain)
    return {"merged": plain.l1.merged, "active": plain.l1.active_adapter, "keys": sorted(state),
            "err": _err(plain, refs, "b")}


def test_a_layer_pickled_from_an_fsdp1_model_is_not_refused():
    for out in run_ranks(_pickled_from_fsdp1):  # (before: merges and switches refused, lora_state_dict KeyError)
        assert out["merged"] and out["active"] == "b" and out["err"] < 1e-5
        assert out["keys"] == ["l1.lora_A", "l1.lora_B", "l2.lora_A", "l2.lora_B"]


def _lora_state_edges(rank, world):
    net = Masked()
    plain_all = sorted(lora.lora_state_dict(net, bias="all"))
    model = FSDP(net, use_orig_params=True, device_id=torch.device("cpu"))
    model(torch.randn(2, 8))
    with pytest.raises(ValueError, match="pass the FullyShardedDataParallel model") as e:
        lora.lora_state_dict(model.module)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        wrapped_all = sorted(lora.lora_state_dict(model, bias="all"))
    return {"plain": plain_all, "wrapped": wrapped_all, "refusal": str(e.value)}


def test_fsdp1_lora_state_dict_edges():
    for out in run_ranks(_lora_state_edges):
        assert out["wrapped"] == out["plain"]  # (before: the buffer mask.bias too)
        assert "mask.bias" not in out["wrapped"] and "l1.bias" in out["wrapped"]
        assert "'l1'" in out["refusal"] or "l1" in out["refusal"]  # (before: KeyError(None) inside torch)


def _merged_before_wrapping_trained(rank, world, summon):
    net = Net()
    base = (_params64(net, "l1"), _params64(net, "l2"))
    lora.mark_only_lora_as_trainable(net)
    net.eval()  # merged, then wrapped: trained through the merge (train() is refused for it)
    model = FSDP(net, use_orig_params=True, device_id=torch.device("cpu"))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(7))
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    with FSDP.summon_full_params(model, writeback=False):
        trained = {"default": tuple(dict(p, A=getattr(net, n).lora_A.detach().double().clone(),
                                         B=getattr(net, n).lora_B.detach().double().clone())
                                    for n, p in zip(("l1", "l2"), base))}
    told = _eval_told(model, summon)
    with pytest.raises(ValueError, match="FSDP1"):
        net.l1.merge()
    return {"told": told, "merged": net.l1.merged,
            "err": _err(model, trained), "moved": _err(model, {"default": base})}


@pytest.mark.parametrize("summon", [None, False], ids=["between_forwards", "summon_no_writeback"])
def test_fsdp1_eval_after_training_through_a_merge_writes_nothing(summon):
    for out in run_ranks(_merged_before_wrapping_trained, summon):
        assert len(out["told"]) == 2 and out["merged"]  # (before: a crash naming no layer, or a write dropped)
        assert out["err"] < 1e-5 < 1e-2 < out["moved"]  # the step served, through the merge (before: 397 off)
