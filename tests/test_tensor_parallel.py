"""lora_ext.parallel's tensor-parallel styles on 2 gloo ranks (127.0.0.1, spawned by the test), against one
process: forward, training steps, merges and switches local to each rank, lora_state_dict; torch's stock
ColwiseParallel refused with a message; transformers' GPT-2 and Llama through gpt2_plan / llama_plan."""
import pytest
import torch
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

import lora_ext as lora
from dist import run_ranks
from helpers import lora_layers_of, seed_adapters
from lora_ext.parallel import ColwiseLoRA, RowwiseLoRA

STEPS, LR = 3, 0.5


class Net(nn.Module):
    """Column- and row-parallel layers in pairs (a column-parallel output is a row-parallel input): every kind,
    both fan_in_fan_out values, a scaled embedding; lossless merges (float32), so merge cycles give the base back
    bit for bit."""

    def __init__(self):
        super().__init__()
        kw = dict(r=2, lora_alpha=4, lossless=True)
        self.emb = lora.Embedding(20, 16, embed_scale=torch.tensor(1.5), **kw)  # colwise (scaled, as Gemma's)
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
    try:  # refused when applied, before anything changes
        parallelize_module(stock.emb, init_device_mesh("cpu", (world,)), ColwiseParallel())
        stock.emb(torch.zeros(2, 3, dtype=torch.long))
        out["stock"] = None
    except ValueError as e:
        out["stock"] = str(e)
    out["stock_untouched"] = not isinstance(stock.emb.weight, DTensor)
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
        assert r["stock_untouched"], "a refused stock style must leave the layer as it was"


# -------------------------------------------------------------------------------------------------------------
# transformers GPT-2 and Llama from small configs: lora_ext.parallel.gpt2_plan / llama_plan

HF_STEPS, HF_LR = 2, 0.1


def tp_hf_model(kind):
    """GPT-2: c_attn fused (MergedLinear, fan_in_fan_out) in block 0 and a plain LoRA Linear in block 1 (peft's
    c_attn), c_proj and c_fc; 4 heads. Llama: LoRA in q, v, o, gate, down (k and up stay nn.Linear: torch's own
    styles), 4 attention and 2 key-value heads. Lossless merges; a second adapter "b"; only LoRA trainable."""
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=40, n_positions=16,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(cfg)
        lora.inject(model, ["h.1.attn.c_attn", "c_proj", "c_fc"], r=2, lora_alpha=4,
                    fused={"h.0.attn.c_attn": [True, False, True]}, lossless=True)
    else:
        cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=40,
                                       max_position_embeddings=16)
        model = transformers.LlamaForCausalLM(cfg)
        lora.inject(model, ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"], r=2, lora_alpha=4,
                    lossless=True)
    seed_adapters(model, "b", torch.Generator().manual_seed(3), std=0.1)
    lora.mark_only_lora_as_trainable(model)
    return model


def hf_ids():
    return torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(5))


def _whole(v):
    # lora_ext's gather: GPT-2's c_attn (ColwiseLoRA(blocks=3), a lone _StridedShard) has no DTensor.full_tensor()
    # on torch 2.11; the callers compare what it gives with the unsharded model's weights bit for bit
    from lora_ext import sharded
    return sharded.full(v)


def base_weights(model):
    """The base (non-LoRA) state, whole tensors; the state dict of a merged model holds the base."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return {k: _whole(v).clone() for k, v in get_model_state_dict(model).items() if "lora_" not in k}


def hf_tp_run(model):
    ids, out = hf_ids(), {}
    with torch.no_grad():
        out["unmerged"] = model(ids).logits
        model.eval()
        out["merged"] = model(ids).logits
        lora.set_adapter(model, "b")
        out["merged_b"] = model(ids).logits
        out["merged_state"] = base_weights(model)
        model.train()
        out["unmerged_b"] = model(ids).logits
        lora.set_adapter(model, "default")
        out["back"] = model(ids).logits
    out["base"] = base_weights(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=HF_LR)
    for step in range(HF_STEPS):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        if step == 0:
            out["grads"] = {n: _whole(p.grad).clone() for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
    out["trained"] = lora.lora_state_dict(model)
    model.eval()
    with torch.no_grad():
        out["trained_merged"] = model(ids).logits
    return out


def hf_tp_case(rank, world):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from lora_ext.parallel import gpt2_plan, llama_plan
    mesh = init_device_mesh("cpu", (world,))
    res = {}
    for kind, plan in (("gpt2", gpt2_plan), ("llama", llama_plan)):
        model = tp_hf_model(kind)
        parallelize_module(model, mesh, plan(model, mesh))
        out = hf_tp_run(model)
        attn = model.transformer.h[0].attn if kind == "gpt2" else model.model.layers[0].self_attn
        out["local_qkv"] = tuple(attn.c_attn.weight.to_local().shape) if kind == "gpt2" else \
            tuple(attn.q_proj.weight.to_local().shape)
        # the trained adapter into a fresh parallelized model, merged: the same outputs
        fresh = tp_hf_model(kind)
        parallelize_module(fresh, mesh, plan(fresh, mesh))
        fresh.eval()
        opts = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(fresh, dict(out["trained"]), options=opts)  # (it adds keys to the dict it is given)
        with torch.no_grad():
            out["reloaded_merged"] = fresh(hf_ids()).logits
        out["reloaded_sd"] = lora.lora_state_dict(fresh)
        res[kind] = out
    return res


@pytest.fixture(scope="module")
def hf_ranks():
    pytest.importorskip("transformers")
    return run_ranks(hf_tp_case, timeout=180)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tensor_parallel_on_transformers_models(kind, hf_ranks):
    model = tp_hf_model(kind)
    base0 = base_weights(model)
    single = hf_tp_run(model)
    for rank, res in enumerate(hf_ranks):
        r = res[kind]
        for key in ("unmerged", "merged", "merged_b", "unmerged_b", "back", "trained_merged"):
            assert _rel(r[key], single[key]) < 1e-5, f"{kind} rank {rank} {key}: {_rel(r[key], single[key]):.3g}"
        assert _rel(r["reloaded_merged"], single["trained_merged"]) < 1e-5, f"{kind}: the reloaded adapter"
        assert sorted(r["grads"]) == sorted(single["grads"])
        for k, v in single["grads"].items():
            assert _rel(r["grads"][k], v) < 1e-5, f"{kind} gradient {k}: {_rel(r['grads'][k], v):.3g}"
        assert sorted(r["trained"]) == sorted(single["trained"])
        for k, v in single["trained"].items():
            assert _rel(r["trained"][k], v) < 1e-5, f"{kind} trained {k}"
            assert torch.equal(r["reloaded_sd"][k], r["trained"][k]), f"{kind} lora_state_dict round trip {k}"
        for k, v in base0.items():  # lossless merges on the shards: the base back bit for bit
            assert torch.equal(r["merged_state"][k], v), f"{kind} state dict of the merged model {k}"
            assert torch.equal(r["base"][k], v), f"{kind} base after merge cycles {k}"
    # each rank holds half the heads of q, k and v (GPT-2's fused c_attn: (in, 3 * 32 / 2), fan_in_fan_out)
    assert hf_ranks[0][kind]["local_qkv"] == ((32, 48) if kind == "gpt2" else (16, 32))
    for k in single["trained"]:
        assert torch.equal(hf_ranks[0][kind]["trained"][k], hf_ranks[1][kind]["trained"][k]), k


# -- under autocast: the low-rank term as one process computes it ------------------------------------------------

_IDS = torch.tensor([[1, 2, 2, 2, 3], [2, 0, 0, 5, 1]])
_X = torch.tensor([[1., 1, 1, 1], [1., 3, 0.5, 0.25]])  # x A^T = (257, 256), (259, 256): not bfloat16-exact


def _autocast_embedding():
    torch.manual_seed(0)
    m = lora.Embedding(8, 4, r=3, lora_alpha=6)
    with torch.no_grad():
        m.lora_B.normal_()
        m.lora_A.normal_()
    return m


def _autocast_linear():
    """x A^T large and its update small (B's columns cancel): a 16-bit x A^T loses the update."""
    torch.manual_seed(0)
    m = lora.Linear(4, 4, r=2, lora_alpha=2, bias=False)
    with torch.no_grad():
        m.weight.normal_()
        m.lora_A.copy_(torch.tensor([[256., 1, 0, 0], [256., 0, 0, 0]]))
        m.lora_B.copy_(torch.tensor([[1., -1], [1., -1], [-1., 1], [2., -2]]))
    return m


def _autocast_cases(rank, world):
    mesh = init_device_mesh("cpu", (world,))
    e, col, row = _autocast_embedding(), _autocast_linear(), _autocast_linear()
    parallelize_module(e, mesh, ColwiseLoRA())
    parallelize_module(col, mesh, ColwiseLoRA())
    parallelize_module(row, mesh, RowwiseLoRA())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return e(_IDS), col(_X), row(_X)


def test_tensor_parallel_under_autocast_computes_the_low_rank_term_as_one_process():
    """Under CPU autocast the ranks computed x A^T in bfloat16 (one process: the operands rounded to bfloat16, the
    products in float32): 2 off where one process is 0.01 off; a float32 embedding's rows were rounded to bfloat16
    (0.033 off where one process is 2e-7). Expected values: float64 from the operands one process uses."""
    tp = run_ranks(_autocast_cases)
    e, lin = _autocast_embedding(), _autocast_linear()
    d = torch.Tensor.double
    ref_e = d(e.weight.detach())[_IDS] + e.scaling * d(e.lora_A.detach()).t()[_IDS] @ d(e.lora_B.detach()).t()
    got_e = torch.cat([tp[0][0], tp[1][0]], -1)
    assert got_e.dtype == torch.float32 and (d(got_e) - ref_e).abs().max().item() < 1e-5

    def bf(t):
        return t.detach().bfloat16().double()
    ref = bf(_X) @ bf(lin.weight).t() + lin.scaling * (bf(_X) @ bf(lin.lora_A).t()) @ bf(lin.lora_B).t()
    for got in (torch.cat([tp[0][1], tp[1][1]], -1), tp[0][2]):
        assert got.dtype == torch.bfloat16
        assert (d(got) - ref).abs().max().item() <= 2 ** -7 * ref.abs().max().item()  # (0.01: one process's)


def _f64_linear():
    torch.manual_seed(0)
    m = lora.Linear(4, 4, r=2, lora_alpha=2).double()
    with torch.no_grad():
        m.lora_B.normal_()  # (random: not bfloat16-exact)
    return m


_X64 = torch.randn(2, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _f64_cases(rank, world):
    mesh = init_device_mesh("cpu", (world,))
    col, row = _f64_linear(), _f64_linear()
    parallelize_module(col, mesh, ColwiseLoRA())
    parallelize_module(row, mesh, RowwiseLoRA())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return col(_X64), row(_X64)


def test_a_float64_layer_under_autocast_computes_in_float64_on_the_ranks():
    """torch's autocast casts no float64 tensor: the ranks rounded a float64 layer's low-rank operands to bfloat16
    (5e-3 off a float64 reference where F.linear is exact). Expected: float64, from plain torch."""
    tp = run_ranks(_f64_cases)
    lin = _f64_linear()
    x, W, A, B = _X64, lin.weight.detach(), lin.lora_A.detach(), lin.lora_B.detach()
    ref = x @ W.t() + lin.bias.detach() + lin.scaling * (x @ A.t()) @ B.t()
    for got in (torch.cat([tp[0][0], tp[1][0]], -1), tp[0][1]):
        assert got.dtype == torch.float64
        assert (got - ref).abs().max().item() < 1e-12
