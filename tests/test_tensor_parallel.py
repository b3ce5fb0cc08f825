"""lora_ext.parallel's tensor-parallel styles on 2 gloo ranks (127.0.0.1, spawned by the test), against one
process: forward, training steps, merges and switches local to each rank, lora_state_dict; torch's stock
ColwiseParallel refused with a message."""
import torch
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

import lora_ext as lora
from dist import run_ranks
from helpers import lora_layers_of, seed_adapters
from lora_ext.parallel import ColwiseLoRA, RowwiseLoRA

STEPS, LR = 3, 0.5


class Net(nn.Module):
    """Column- and row-parallel layers in pairs (a column-parallel output is a row-parallel input): every kind,
    both fan_in_fan_out values; lossless merges (float32), so merge cycles give the base back bit for bit."""

    def __init__(self):
        super().__init__()
        kw = dict(r=2, lora_alpha=4, lossless=True)
        self.emb = lora.Embedding(20, 16, **kw)                                            # colwise
        self.down = lora.Linear(16, 12, **kw)                                              # rowwise
        self.up = lora.Linear(12, 18, fan_in_fan_out=True, **kw)                           # colwise
        self.mix = lora.MergedLinear(18, 6, enable_lora=[True, False, True], **kw)         # rowwise
        self.qkv = lora.MergedLinear(6, 9, enable_lora=[True, False, True], fan_in_fan_out=True, **kw)  # colwise
        self.out = lora.Linear(9, 4, fan_in_fan_out=True, **kw)                           # rowwise

    def forward(self, ids):
        h = torch.tanh(self.down(self.emb(ids)))
        h = self.mix(torch.tanh(self.up(h)))
        return self.out(torch.tanh(self.qkv(h)))


PLAN = {"emb": ColwiseLoRA(), "down": RowwiseLoRA(), "up": ColwiseLoRA(), "mix": RowwiseLoRA(),
        "qkv": ColwiseLoRA(), "out": RowwiseLoRA()}


layers = lora_layers_of


def build(seed=0):
    torch.manual_seed(seed)
    net = Net()
    g = torch.Generator().manual_seed(seed + 1)
    seed_adapters(net, "b", g)
    lora.mark_only_lora_as_trainable(net)
    return net


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 20, (STEPS, 4, 5), generator=g), torch.randn(STEPS, 4, 5, 4, generator=g)


def run(net):
    ids, target = data()
    out = {}
    with torch.no_grad():
        out["unmerged"] = net(ids[0])
        net.eval()
        out["merged"] = net(ids[0])
        lora.set_adapter(net, "b")
        out["merged_b"] = net(ids[0])
        net.train()
        out["unmerged_b"] = net(ids[0])
        lora.set_adapter(net, "default")
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=LR)
    for step in range(STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(net(ids[step]), target[step]).backward()
        opt.step()
    out["trained"] = lora.lora_state_dict(net)
    with torch.no_grad():
        out["trained_out"] = net(ids[0])
    return out


def tp_case(rank, world):
    net = build()
    base0 = {n: m.weight.detach().clone() for n, m in net.named_children()}
    parallelize_module(net, init_device_mesh("cpu", (world,)), PLAN)
    out = run(net)
    out["base_back"] = all(torch.equal(m.weight.full_tensor(), base0[n]) for n, m in net.named_children())
    out["local_rows"] = tuple(net.down.weight.to_local().shape)
    stock = build()
    parallelize_module(stock.emb, init_device_mesh("cpu", (world,)), ColwiseParallel())
    try:
        stock.emb(torch.zeros(2, 3, dtype=torch.long))
        out["stock"] = None
    except ValueError as e:
        out["stock"] = str(e)
    return out


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def test_tensor_parallel_matches_one_process():
    single = run(build())
    for r in run_ranks(tp_case):
        for key in ("unmerged", "merged", "merged_b", "unmerged_b", "trained_out"):
            assert _rel(r[key], single[key]) < 1e-5, f"{key}: {_rel(r[key], single[key]):.3g}"
        assert sorted(r["trained"]) == sorted(single["trained"])
        for k, v in single["trained"].items():
            assert _rel(r["trained"][k], v) < 1e-5, k
        assert r["base_back"], "merges and switches on the shards must give the base back bit for bit"
        assert r["local_rows"] == (12, 8), "the row-parallel weight holds half the input features"
        assert r["stock"] is not None and "ColwiseLoRA" in r["stock"]
