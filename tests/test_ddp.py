"""lora_ext under DistributedDataParallel on 2 gloo ranks (127.0.0.1, spawned by the test), against one process
on the same data: training steps, merge cycles, switches, lora_state_dict, torch.compile of a DDP model."""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import lora_ext as lora
from dist import run_ranks
from helpers import hf_model
from lora_ext.serving.adapters import lora_layers

STEPS, BATCH, LR = 3, 8, 0.5


class Net(nn.Module):
    """Every layer kind, both fan_in_fan_out values; lossless merges (float32 weights), so that a merge cycle
    gives the base back bit for bit on every rank."""

    def __init__(self):
        super().__init__()
        kw = dict(r=2, lora_alpha=4, lossless=True)
        self.emb = lora.Embedding(20, 16, **kw)
        self.fifo = lora.Linear(16, 16, fan_in_fan_out=True, **kw)
        self.qkv = lora.MergedLinear(16, 24, enable_lora=[True, False, True], **kw)
        self.qkv_fifo = lora.MergedLinear(24, 24, enable_lora=[True, False, True], fan_in_fan_out=True, **kw)
        self.conv = lora.Conv1d(24, 8, kernel_size=3, padding=1, **kw)
        self.out = lora.Linear(8, 5, **kw)

    def forward(self, ids):
        h = self.qkv_fifo(self.qkv(torch.tanh(self.fifo(self.emb(ids)))))
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.out(torch.tanh(h))


def build(seed=0):
    torch.manual_seed(seed)
    net = Net()
    for m in net.modules():
        if isinstance(m, lora.LoRALayer):
            nn.init.normal_(m.lora_B, std=0.1)
    lora.mark_only_lora_as_trainable(net)
    return net


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 20, (STEPS, BATCH, 6), generator=g), torch.randn(STEPS, BATCH, 6, 5, generator=g)


def train(model, ids, target, rank=0, world=1):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    per = BATCH // world
    for step in range(STEPS):
        x, y = ids[step, rank * per:(rank + 1) * per], target[step, rank * per:(rank + 1) * per]
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def lora_params(model):
    return {k: v.detach().clone() for k, v in lora.lora_state_dict(model).items()}


def ddp_cases(rank, world):
    out = {}
    net = build()
    ddp = DDP(net)
    ids, target = data()
    train(ddp, ids, target, rank, world)
    out["trained"] = lora_params(ddp)
    out["keys"] = sorted(lora.lora_state_dict(ddp))
    # merge cycle: eval() merges on every rank, train() gives the base back
    base = {k: v.detach().clone() for k, v in net.state_dict().items() if "lora_" not in k}
    ddp.eval()
    with torch.no_grad():
        out["merged_out"] = ddp(ids[0])
    ddp.train()
    out["base_back"] = all(torch.equal(v, net.state_dict()[k]) for k, v in base.items())
    # a reserved rank would change the shapes DDP's buckets hold: refused, nothing changes
    shapes = {k: tuple(v.shape) for k, v in lora.lora_state_dict(net).items()}
    try:
        lora.reserve_rank(ddp, 8)
        out["reserve_refusal"] = None
    except ValueError as e:
        out["reserve_refusal"] = str(e)
    out["reserve_unchanged"] = shapes == {k: tuple(v.shape) for k, v in lora.lora_state_dict(net).items()}
    # a switch of trainable factors under DDP is refused, naming what to rebuild
    for _, m in lora_layers(net):
        (ra, ca), (rb, cb) = m.factor_shapes(4)
        m.add_adapter("wide", torch.randn(ra, ca) * 0.1, torch.randn(rb, cb) * 0.1, 1.0)
    try:
        lora.set_adapter(ddp, "wide")
        out["refusal"] = None
    except ValueError as e:
        out["refusal"] = str(e)
    # the documented way: switch the inner model, wrap again, train on
    lora.set_adapter(net, "wide")
    ddp = DDP(net)
    train(ddp, ids, target, rank, world)
    out["wide_trained"] = lora_params(ddp)
    dist.barrier()
    return out


def compiled_ddp_case(rank, world):
    net = build()
    ddp = torch.compile(DDP(net), backend="aot_eager")
    ids, target = data()
    train(ddp, ids, target, rank, world)
    return {"trained": lora_params(ddp), "keys": sorted(lora.lora_state_dict(ddp))}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def single():
    """One process, the whole batch: what DDP on 2 ranks must reproduce."""
    net = build()
    ids, target = data()
    train(net, ids, target)
    ref = {"trained": lora_params(net)}
    net.eval()
    with torch.no_grad():
        ref["merged_out"] = net(ids[0])
    net.train()
    return ref


def test_ddp_training_merge_and_switch_match_one_process(single):
    results = run_ranks(ddp_cases)
    r0, r1 = results
    for k in single["trained"]:
        assert torch.equal(r0["trained"][k], r1["trained"][k]), f"{k}: the ranks differ"
        assert _rel(r0["trained"][k], single["trained"][k]) < 1e-5, k
    assert r0["keys"] == sorted(single["trained"]) and not any(k.startswith("module.") for k in r0["keys"])
    assert _rel(r0["merged_out"], single["merged_out"]) < 1e-5
    assert r0["base_back"] and r1["base_back"]
    assert r0["refusal"] is not None and "DistributedDataParallel" in r0["refusal"]
    assert r0["reserve_refusal"] is not None and "reserve_rank: the model is wrapped in DistributedDataParallel" \
        in r0["reserve_refusal"] and r0["reserve_unchanged"] and r1["reserve_unchanged"]
    assert "rank 2" in r0["refusal"] and "rank 4" in r0["refusal"] and "ddp.module" in r0["refusal"]
    assert all(torch.equal(r0["wide_trained"][k], r1["wide_trained"][k]) for k in r0["wide_trained"])
    assert r0["wide_trained"]["out.lora_A"].shape[0] == 4


def test_compiled_ddp_trains_like_one_process(single):
    r0, r1 = run_ranks(compiled_ddp_case)
    assert r0["keys"] == sorted(single["trained"])
    for k in single["trained"]:
        assert torch.equal(r0["trained"][k], r1["trained"][k]), k
        assert _rel(r0["trained"][k], single["trained"][k]) < 1e-5, k


def test_lora_state_dict_of_wrapped_models_has_the_inner_keys():
    net = build()
    compiled = torch.compile(copy.deepcopy(net), backend="eager")
    assert sorted(lora.lora_state_dict(compiled)) == sorted(lora.lora_state_dict(net))
    fresh = build(seed=5)
    missing, unexpected = fresh.load_state_dict(lora.lora_state_dict(compiled), strict=False)
    assert not unexpected
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in lora.lora_state_dict(net).items())


def hf_steps(model, ids, rank=0, world=1):
    """Two training steps (each rank its half of the batch), then a merge cycle: the trained factors, the merged
    logits and whether train() gave the base back bit for bit."""
    inner = model.module if isinstance(model, DDP) else model
    base = {k: v.clone() for k, v in inner.state_dict().items() if "lora_" not in k}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    per = ids.shape[0] // world
    for _ in range(2):
        opt.zero_grad()
        x = ids[rank * per:(rank + 1) * per]
        model(x, labels=x).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
    model.train()
    back = all(torch.equal(inner.state_dict()[k], v) for k, v in base.items())
    return {"trained": lora.lora_state_dict(model), "merged": logits, "base_back": back}


def hf_ddp_case(rank, world, kind):
    ids = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(5))
    return hf_steps(DDP(hf_model(kind)), ids, rank, world)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_ddp_on_transformers_models(kind):
    pytest.importorskip("transformers")
    ids = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(5))
    single = hf_steps(hf_model(kind), ids)
    for r in run_ranks(hf_ddp_case, kind):
        for k, v in single["trained"].items():
            assert _rel(r["trained"][k], v) < 1e-5, f"{kind} {k}"
        assert _rel(r["merged"], single["merged"]) < 1e-5
        assert r["base_back"] and single["base_back"]
