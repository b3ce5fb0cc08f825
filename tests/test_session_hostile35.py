"""Forty-second session: what the hostile rounds of this session found, each with a test that fails on the commit
before its fix."""
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model

import lora_ext as lora
from tiny_models import llama, randomize_lora


def _peft_dir(tmp_path, seed=1):
    pm = get_peft_model(llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(seed)
    randomize_lora(pm)
    out = str(tmp_path / f"adapter{seed}")
    pm.save_pretrained(out)
    return out


def test_a_config_that_is_not_a_regular_file_is_named_as_such(tmp_path):
    """h9: an adapter_config.json that is a FIFO (or a directory) was reported as missing."""
    d = _peft_dir(tmp_path)
    cfg = os.path.join(d, "adapter_config.json")
    os.remove(cfg)
    os.mkfifo(cfg)
    model = llama()
    with pytest.raises(ValueError, match=r"adapter_config.json: not a regular file"):
        lora.load_peft_adapter(model, d, "x")
    assert not any(isinstance(m, lora.LoRALayer) for m in model.modules())


def test_a_hub_snapshot_without_its_weights_is_named_as_such(tmp_path, monkeypatch):
    """h9: a cached snapshot holding the config but no weights file was reported as 'neither in the Hub cache'."""
    from huggingface_hub import constants
    root = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    d = _peft_dir(tmp_path)
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = root / "models--owner--cut" / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "adapter_config.json").write_bytes(open(os.path.join(d, "adapter_config.json"), "rb").read())
    (root / "models--owner--cut" / "refs").mkdir()
    (root / "models--owner--cut" / "refs" / "main").write_text(commit)
    with pytest.raises(FileNotFoundError, match=r"'owner/cut' is not a local path, and its adapter_config.json is in "
                                                r"the Hub cache but neither adapter_model.safetensors nor "
                                                r"adapter_model.bin is"):
        lora.load_peft_adapter(llama(), "owner/cut", "x")


def test_merge_never_walks_into_a_link_back_up_the_base(tmp_path):
    """h9: a link inside --base back up the tree (loop -> ., or a -> b with b/back -> a) was walked into
    loop/loop/... until the system refused the path: the merge was refused with a 1.4 KB message of loop/loop/...,
    and a loop beside no weights would have copied a side file at every depth. Now such links are not walked into;
    two links to one directory elsewhere are both followed."""
    from lora_ext.cli import main
    from transformers import AutoModelForCausalLM
    model = llama()
    base = tmp_path / "base"
    model.save_pretrained(str(base), max_shard_size="60KB")
    os.symlink(".", base / "loop")
    os.symlink("..", base / "up")  # (r12: the parent was walked; it holds the adapter's weights, named as the base's)
    (base / "a").mkdir()
    (base / "b").mkdir()
    (base / "a" / "note.txt").write_text("a")
    os.symlink("../a", base / "b" / "back")  # b/back -> a
    os.symlink("../b", base / "a" / "down")  # a/down -> b: b/back/down/back/... would loop
    shared = tmp_path / "shared_tok"
    shared.mkdir()
    (shared / "tokenizer.json").write_text("{}")
    os.symlink(shared, base / "tok1")
    os.symlink(shared, base / "tok2")
    pm = get_peft_model(llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    torch.manual_seed(3)
    randomize_lora(pm)
    adapter = str(tmp_path / "adapter")
    pm.save_pretrained(adapter)
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(base), "--adapter", adapter, "--out", str(out), "--quiet"]) == 0
    found = sorted(os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(out) for f in fs)
    side = [f for f in found if not f.startswith(("model", "config.json", "generation_config.json"))]
    assert side == ["a/note.txt", "b/back/note.txt", "tok1/tokenizer.json",
                    "tok2/tokenizer.json"], side
    x = torch.randint(0, 32, (2, 5))
    with torch.no_grad():
        ref = pm.merge_and_unload()(x).logits
        got = AutoModelForCausalLM.from_pretrained(str(out)).eval()(x).logits
    assert (got - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_lora_state_dict_keys_a_layer_under_each_of_its_names(bias):
    """P1: a LoRA layer registered twice (self.b = self.a) was saved under its first name only; a load with
    strict=False (loralib's recipe) then reported b's factors missing. loralib and state_dict() key both."""
    import loralib
    import torch.nn as nn

    def net(lib):
        m = nn.Module()
        m.a = lib.Linear(4, 4, r=2, lora_alpha=4)
        m.b = m.a
        m.c = lib.Linear(4, 4, r=2)
        return m
    ours, theirs = net(lora), net(loralib)
    want = sorted(loralib.lora_state_dict(theirs, bias))
    assert "b.lora_A" in want
    sd = lora.lora_state_dict(ours, bias)
    assert sorted(sd) == want
    assert sd["b.lora_A"].data_ptr() != ours.a.lora_A.data_ptr() and torch.equal(sd["b.lora_A"], ours.a.lora_A)
    res = net(lora).load_state_dict(sd, strict=False)
    assert not [k for k in res.missing_keys if "lora_" in k]


@pytest.mark.parametrize("build", [lambda: lora.Conv2d(3, 4, 3, r=2), lambda: lora.Linear(3, 4, r=2),
                                   lambda: torch.nn.Sequential(torch.nn.ReLU(), lora.Embedding(5, 3, r=2))],
                         ids=["conv2d", "linear", "inside-a-model"])
def test_torch_jit_script_is_refused_naming_the_layer(build):
    """P1: torch.jit.script of a Conv2d (which loralib's scripts) failed with "Expected a single top-level function",
    naming nothing."""
    with pytest.raises(RuntimeError, match=r"(Conv2d\(3, 4, kernel_size=\(3, 3\)\)|Linear\(3, 4\)|Embedding\(5, 3\)): "
                                           r"a lora_ext layer cannot be compiled by torch.jit.script"):
        torch.jit.script(build())


def _eval_after_training_in_eval(rank, world, lossless, how):
    """A merged model trained through its merge (eval mode), a no_grad forward, eval() (merges the trained factors),
    train() (the base again): outputs and base weights (float64)."""
    import torch.nn as nn
    torch.manual_seed(0)
    net = nn.Sequential(lora.Linear(8, 6, r=2, lora_alpha=4, lossless=lossless),
                        lora.Linear(6, 4, r=2, lora_alpha=4, lossless=lossless))
    for m in net:
        nn.init.normal_(m.lora_B, std=0.3)
    lora.mark_only_lora_as_trainable(net)
    if world:
        from torch.distributed.fsdp import fully_shard
        if how == "keep":
            for m in net:
                fully_shard(m, reshard_after_forward=False)
        fully_shard(net)  # (the root: its parameters stay gathered after a forward)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    net.eval()
    net(x).square().mean().backward()
    opt.step()
    with torch.no_grad():
        net(x)
    net.eval()
    with torch.no_grad():
        y_eval = net(x).double()
    net.train()
    with torch.no_grad():
        y_train = net(x).double()
    for m in net.modules():
        if hasattr(m, "reshard"):
            m.reshard()
    ws = [(m.weight.full_tensor() if hasattr(m.weight, "full_tensor") else m.weight).double() for m in net]
    return y_eval, y_train, ws


@pytest.mark.parametrize("lossless", [None, True], ids=["lossy", "lossless"])
def test_fsdp2_eval_after_training_through_the_merge_writes_the_shards(lossless):
    """F1: eval() of a layer merged and trained since (_merge_trained) wrote its merge into FSDP2's all-gathered
    copy (a root-only fully_shard, or reshard_after_forward=False, after a forward), which the next reshard dropped;
    train() then took the trained factors out of the old merge: the base 0.709 off for good, the outputs 2.43 off
    one process. lossless=True raised an AttributeError naming nothing."""
    from dist import run_ranks
    torch.manual_seed(0)
    w0 = [lora.Linear(8, 6, r=2), lora.Linear(6, 4, r=2)]  # (the same seed draws the same base weights)
    w0 = [m.weight.detach().double() for m in w0]
    one = _eval_after_training_in_eval(0, 0, lossless, "root")
    assert max((w - b).abs().max().item() for w, b in zip(one[2], w0)) < 1e-6
    for how in ("root", "keep"):
        for y_eval, y_train, ws in run_ranks(_eval_after_training_in_eval, lossless, how):
            assert (y_eval - one[0]).abs().max().item() < 1e-5, how
            assert (y_train - one[1]).abs().max().item() < 1e-5, how
            assert max((w - b).abs().max().item() for w, b in zip(ws, one[2])) < 1e-6, how


def test_a_checkpoint_wrapped_model_saves_under_its_plain_names(tmp_path):
    """F1: after torch's apply_activation_checkpointing (FSDP's recipe), lora_state_dict and save_peft_adapter kept
    `_checkpoint_wrapped_module.` in their keys (and save_peft_adapter in target_modules), where state_dict(),
    torch.distributed.checkpoint and loralib leave it out: loralib's load with strict=False loaded nothing (0.842
    off), and the saved adapter matched no module of the plain model."""
    import torch.nn as nn
    from peft import PeftModel
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    x = torch.randint(0, 100, (2, 6))
    torch.manual_seed(0)
    model = llama()
    lora.inject(model, ["q_proj", "v_proj"], r=2, lora_alpha=4)
    for m in model.modules():
        if isinstance(m, lora.LoRALayer):
            nn.init.normal_(m.lora_B, std=0.5)
    plain_keys = sorted(lora.lora_state_dict(model))
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_modules())
    sd = lora.lora_state_dict(model)
    assert sorted(sd) == plain_keys and "model.layers.0.self_attn.q_proj.lora_A" in sd
    with torch.no_grad():
        ref = model.eval()(x).logits
    fresh = llama()
    lora.inject(fresh, ["q_proj", "v_proj"], r=2, lora_alpha=4)
    res = fresh.load_state_dict(sd, strict=False)  # loralib's recipe
    assert not res.unexpected_keys
    with torch.no_grad():
        assert (fresh.eval()(x).logits - ref).abs().max().item() < 1e-5
    lora.save_peft_adapter(model, str(tmp_path / "ad"))
    import json
    cfg = json.load(open(tmp_path / "ad" / "adapter_config.json"))
    assert "_checkpoint_wrapped_module" not in json.dumps(cfg)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(llama(), str(tmp_path / "ad")).eval()(x).logits
        ours = llama()
        lora.load_peft_adapter(ours, str(tmp_path / "ad"), "x")
        ours = ours.eval()(x).logits
    assert (theirs - ref).abs().max().item() < 1e-5 and (ours - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float16], ids=str)
def test_a_mixed_batch_under_autocast_takes_the_merged_update_out_in_the_weights_dtype(seed, weight_dtype):
    """B1: a float32 layer merged with adapter a, served in a mixed batch under CPU autocast(bfloat16): the other
    rows took a's update out of the merged output rounded to bfloat16, so they carried bfloat16's rounding of
    |W + a's update| (a tiny Llama: 0.080 off float64, where the row served alone was 0.0074). Now they are within
    what the same rows served unmerged (bfloat16 matmuls) are. r15: a float16 weight (16 bits, as bfloat16, but 11
    significant to its 8) was left out: the base row 16x worse than unmerged (0.0062 against 0.00038)."""
    torch.manual_seed(seed)
    d, names = 128, ["a", "b", None, "b", "a"]
    m = lora.Linear(d, d, r=8, bias=False, lossless=False)
    with torch.no_grad():
        m.weight.normal_(0, 0.002)  # the merged update ~100 times the weight
    factors = {}
    for name in ("a", "b"):
        A, B = torch.randn(8, d) * 0.1, torch.randn(d, 8) * 0.1
        m.add_adapter(name, A, B, 2.0)
        factors[name] = (A.double(), B.double())
    m = m.to(weight_dtype)
    W0 = m.weight.detach().double().clone()
    m.set_adapter("a")
    m.eval()
    assert m.merged
    x = torch.randn(len(names), d)
    ref = x.double() @ W0.t()
    for i, name in enumerate(names):
        if name is not None:
            A, B = factors[name]
            ref[i] += 2.0 * (x[i].double() @ A.t() @ B.t())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with lora.batch_adapters(m, names):
            got = m(x)
        m.unmerge()
        with lora.batch_adapters(m, names):
            unmerged = m(x)
    assert got.dtype == torch.bfloat16  # (as autocast gives)
    for i, name in enumerate(names):
        err, base_err = ((t[i].double() - ref[i]).abs().max().item() for t in (got, unmerged))
        # bfloat16's rounding of the row's own output (8 bits), where |W + a's update| rounded gave ~30x that
        assert err <= 2 * base_err + 2 ** -8 * ref[i].abs().max().item(), (name, err, base_err)


def _two_adapters():
    import torch.nn as nn
    torch.manual_seed(0)
    net = nn.Sequential(lora.Linear(8, 6, r=2, lora_alpha=4), lora.Linear(6, 4, r=2, lora_alpha=4))
    g = torch.Generator().manual_seed(1)
    for m in net:
        nn.init.normal_(m.lora_B, std=0.3)
        m.add_adapter("b", torch.randn(2, m.lora_A.shape[1], generator=g) * 0.3,
                      torch.randn(m.lora_B.shape[0], 2, generator=g) * 0.3, 2.0)
    lora.mark_only_lora_as_trainable(net)
    return net


def _switch_with_gradients(rank, world, mode):
    """FSDP2 (2 ranks, each half of the batch), mode "accumulate": a backward of 'default' without gradient sync, a
    trainable switch to 'b', a backward of 'b', a step; "step-after": a backward of 'default', the switch, a step;
    "frozen": a backward of 'default', the switch made while frozen, a backward of 'b', a step.
    Then back to 'default' and a step. Each adapter's factors after."""
    import torch.nn as nn
    from torch.distributed.fsdp import fully_shard
    net = _two_adapters()
    for m in net:
        fully_shard(m)
    fully_shard(net)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 4, generator=g)
    half = slice(rank * 2, rank * 2 + 2)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    net.set_requires_gradient_sync(mode != "accumulate")
    nn.functional.mse_loss(net(x[0, half]), y[0, half]).backward()
    net.set_requires_gradient_sync(True)
    if mode == "frozen":
        net.requires_grad_(False)  # (an evaluation between: the switch made frozen, r12)
    lora.set_adapter(net, "b")
    if mode == "frozen":
        lora.mark_only_lora_as_trainable(net)
    if mode in ("accumulate", "frozen"):
        nn.functional.mse_loss(net(x[1, half]), y[1, half]).backward()
    opt.step()  # (no zero_grad here: it would zero every adapter's gradients of these factors, as in one process)
    lora.set_adapter(net, "default")  # its gradient, kept through the switch, comes back
    if mode == "accumulate":  # (never reduced: a backward with sync adding nothing reduces it)
        (net(x[0, half]).sum() * 0).backward()
    opt.step()
    out = {}
    for name in ("b", "default"):
        lora.set_adapter(net, name)
        out[name] = {k: v.double() for k, v in lora.lora_state_dict(net).items()}
    return out


def test_fsdp2_a_trainable_switch_keeps_each_adapters_gradients_with_it():
    """F1: FSDP2 holds one pair of sharded live factors, which a switch writes the next adapter's values into: the
    gradient of a backward (or of accumulation without sync) before the switch stayed on them, so 'b' stepped with
    'default''s gradient (0.31 off) or accumulated onto it (1.35 off), on every rank alike; r12: a switch made while
    the factors were frozen kept them there (0.0438 off). Now each adapter's gradients go with it, as each
    adapter's own Parameters hold theirs in one process."""
    import torch.nn as nn
    from dist import run_ranks
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 4, generator=g)

    def alone(name, batch):  # one process, the adapter trained alone on its micro-batch (the ranks' mean)
        net = _two_adapters()
        lora.set_adapter(net, name)
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
        if batch is not None:
            nn.functional.mse_loss(net(x[batch]), y[batch]).backward()
            opt.step()
        return {k: v.double() for k, v in lora.lora_state_dict(net).items()}
    for mode in ("accumulate", "step-after", "frozen"):
        want = {"b": alone("b", None if mode == "step-after" else 1), "default": alone("default", 0)}
        for out in run_ranks(_switch_with_gradients, mode):
            for name in ("b", "default"):
                err = max((out[name][k] - want[name][k]).abs().max().item() for k in want[name])
                assert err < 1e-6, (mode, name, err)


def _unfreeze_after_a_gathered_forward(rank, world, how):
    import torch.nn as nn
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    net = nn.Sequential(lora.Linear(8, 6, r=2, lora_alpha=4), lora.Linear(6, 4, r=2, lora_alpha=4))
    for m in net:
        nn.init.normal_(m.lora_B, std=0.3)
    net.requires_grad_(False)  # served frozen first
    if how == "per-layer":
        for m in net:
            fully_shard(m, reshard_after_forward=False)
    fully_shard(net)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        net(x)  # leaves the parameters gathered
    lora.mark_only_lora_as_trainable(net, bias="all")
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    net(x).square().mean().backward()
    opt.step()
    return {k: v.double() for k, v in lora.lora_state_dict(net).items()}


def test_fsdp2_mark_only_lora_as_trainable_after_a_gathered_forward_trains_the_factors():
    """F1: mark_only_lora_as_trainable after a forward that left FSDP2's parameters gathered set the flags on the
    gathered copies, which the next reshard dropped: the factors never trained (the biases did, so nothing
    raised)."""
    import torch.nn as nn
    from dist import run_ranks
    torch.manual_seed(0)
    net = nn.Sequential(lora.Linear(8, 6, r=2, lora_alpha=4), lora.Linear(6, 4, r=2, lora_alpha=4))
    for m in net:
        nn.init.normal_(m.lora_B, std=0.3)
    lora.mark_only_lora_as_trainable(net, bias="all")
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    before = {k: v.double().clone() for k, v in lora.lora_state_dict(net).items()}
    net(x).square().mean().backward()
    opt.step()
    want = {k: v.double() for k, v in lora.lora_state_dict(net).items()}
    assert max((want[k] - before[k]).abs().max().item() for k in want if "lora_" in k) > 1e-3
    for how in ("root", "per-layer"):
        for got in run_ranks(_unfreeze_after_a_gathered_forward, how):
            assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-6, how


def _near_the_top(dtype):
    """Linear(4, 3) of `dtype`: W[0, 0] = 0.9 max, an adapter whose update is 0.2 max along row 0 (W + update
    overflows there), and one whose update is 0.01 max along row 1 (W + update fits)."""
    big = torch.finfo(dtype).max
    layer = lora.Linear(4, 3, r=1, lora_alpha=1)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, 0] = big * 0.9
        layer.lora_A.fill_(1.0)
        layer.lora_B.zero_()
        layer.lora_B[1, 0] = big * 0.01
        A = torch.ones(1, 4)
        B = torch.zeros(3, 1)
        B[0, 0] = big * 0.2
    layer.add_adapter("over", A, B, 1.0)
    return layer.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=str)
def test_a_merge_past_the_weights_range_is_refused_before_it_writes(dtype):
    """L1: a bfloat16 or float32 weight near its dtype's max merged an update that took it past: inf in the
    weight without a word (the merged forward NaN), and a lossy float32 unmerge left inf in the base for good. Only
    float16's range was checked. Now every dtype's is, before anything is written."""
    layer = _near_the_top(dtype)
    w0 = layer.weight.detach().clone()
    layer.eval()  # 'default' fits: merged
    assert layer.merged and torch.isfinite(layer.weight).all()
    with pytest.raises(ValueError, match=rf"switching from adapter 'default' to 'over': the weight plus the update reaches "
                                         rf".* beyond {dtype}'s range .*nothing was written"):
        layer.set_adapter("over")  # a merged switch past the range: refused, the weight as it was
    assert layer.merged and layer.active_adapter == "default"
    layer.train()
    assert torch.equal(layer.weight.view(torch.uint8), w0.view(torch.uint8)) or dtype == torch.float32
    assert (layer.weight.double() - w0.double()).abs().max().item() <= 1e-6 * w0.double().abs().max().item()
    layer.set_adapter("over")
    with pytest.raises(ValueError, match=rf"adapter 'over': the weight plus the update reaches .* beyond {dtype}'s "
                                         rf"range"):
        layer.eval()
    assert not layer.merged and torch.isfinite(layer.weight).all()


def test_the_weights_kept_bound_is_forgotten_when_the_weight_is_written_otherwise():
    """_weight_room keeps its bound on a bfloat16 or float32 weight between lora_ext's own writes; an optimizer's
    step or an in-place write since is a write it did not make: the weight is looked at again."""
    layer = _near_the_top(torch.float32)
    with torch.no_grad():
        layer.weight.zero_()
    layer.eval()
    layer.train()  # a bound kept: max|W| about 0.01 max
    assert "_weight_bound" in layer.__dict__
    with torch.no_grad():
        layer.weight[0, 0] = torch.finfo(torch.float32).max * 0.9  # an in-place write: version counter
    layer.set_adapter("over")
    with pytest.raises(ValueError, match="beyond torch.float32's range"):
        layer.eval()
    assert torch.isfinite(layer.weight).all()


def _written_at_the_top(dtype, unmerge, d_row0):
    """An 8 x 8 weight of `dtype`, an adapter merged losslessly (d = s B A: d_row0 along row 0, 0.001 elsewhere),
    rows 0 and 1 then written to the dtype's largest value, and unmerged by `unmerge`: (the base, rows 0-1 after,
    d's rows 0-1), float64."""
    from lora_ext import ops
    torch.manual_seed(0)
    w = torch.randn(8, 8).to(dtype)
    w0 = w.double().clone()
    A = torch.ones(1, 8)
    B = torch.full((8, 1), 0.001)
    B[0, 0] = d_row0
    rec = ops.merge_(w, A, B, 1.0, lossless=True)
    with torch.no_grad():
        w[:2] = torch.finfo(dtype).max
    unmerge(w, A, B, 1.0, rec)
    return w0[:2], w[:2].double(), (B.double() @ A.double())[:2]


def _cpu_unmerge(w, A, B, s, rec):
    from lora_ext import ops
    ops.unmerge_(w, A, B, s, record=rec)


def _reference_unmerge(w, A, B, s, rec):
    from unittest import mock

    from lora_ext import lossless, ops
    with mock.patch.object(lossless, "_pass", lossless._pass_reference):
        ops.unmerge_(w, A, B, s, record=rec)


def _sim_unmerge(w, A, B, s, rec):
    from helpers import load_sim

    from lora_ext import ops
    with ops.use_kernels(load_sim(), "cpu"):
        ops.unmerge_(w, A, B, s, record=rec)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("unmerge", [_cpu_unmerge, _reference_unmerge, _sim_unmerge], ids=["cpu", "reference", "sim"])
def test_a_finite_value_written_at_the_top_of_the_range_unmerges_as_a_lossy_unmerge_would(dtype, unmerge):
    """L1: a merged float16/bfloat16 weight written with the dtype's largest value came back inf from a lossless
    unmerge where the value minus d is finite (d > 0: 20 of 64 float16, 23 of 64 bfloat16 elements), and NaN
    (bits 0x7c01) where it is past the top (d < 0), one code step past the largest value, on every backend. Such an
    element takes its lossy unmerge, T(value - d): finite where that is, inf where that is, never NaN."""
    if unmerge is _sim_unmerge:
        from helpers import load_sim
        if load_sim() is None:
            pytest.skip("lora_ext._sim is not built")
    top = torch.finfo(dtype).max
    ulp = top * torch.finfo(dtype).eps
    for d_row0 in (0.001, -20.0 if dtype == torch.float16 else -1e36):
        base, rows, d = _written_at_the_top(dtype, unmerge, d_row0)
        assert not rows.isnan().any(), (d_row0, rows)
        lossy = (top - d).to(dtype).double()  # T(value - d): inf past the top
        near = (rows - lossy).abs() <= ulp
        same_inf = rows.isinf() & lossy.isinf() & (rows.sign() == lossy.sign())
        escaped = rows == base  # (an escape holds its base bits in the record)
        assert (near | same_inf | escaped).all(), (d_row0, rows, lossy)
        if d_row0 > 0:
            assert torch.isfinite(rows).all(), rows


@pytest.mark.parametrize("old_scale", [1e-30, 1e-36])
def test_a_kernel_swap_between_scales_far_apart_keeps_both_terms(old_scale):
    """K1: the swap kernel folds the smaller scale into a float32 multiplier of the larger (merge_host.h): scales
    more than float32's normal range apart made it subnormal or 0, and the old adapter's term was lost (old scale
    1e-38 beside 1e10: 7.86 off float64, the whole term). Checked through the simulator standing in for the CUDA
    kernels."""
    from helpers import load_sim

    from lora_ext import ops
    sim = load_sim()
    if sim is None:
        pytest.skip("lora_ext._sim is not built")
    torch.manual_seed(0)
    w0 = torch.randn(16, 16)
    a2, b2, new_scale = torch.randn(2, 16) * 1e-5, torch.randn(16, 2) * 1e-5, 1e10
    fac = (1.0 / old_scale) ** 0.5
    a1, b1 = torch.randn(2, 16) * fac, torch.randn(16, 2) * fac
    ref = w0.double() - old_scale * (b1.double() @ a1.double()) + new_scale * (b2.double() @ a2.double())
    assert (old_scale * (b1.double() @ a1.double())).abs().max().item() > 1  # the old term matters
    w = w0.clone()
    with ops.use_kernels(sim, "cpu"):
        ops.swap_(w, a1, b1, old_scale, a2, b2, new_scale)
    assert (w.double() - ref).abs().max().item() < 1e-6 * max(1.0, ref.abs().max().item())


def test_a_float64_weight_past_float32s_range_merges():
    """r12: the range check took max|W| in float32, so a float64 weight holding 1e300 was refused every merge
    ("can reach 0.000456 on a weight of up to inf"); and sharded.abs_max gave 3.4e38 for inf with finite=False."""
    from lora_ext import sharded
    layer = lora.Linear(4, 3, r=1, lora_alpha=1).double()
    with torch.no_grad():
        layer.weight[0, 0] = 1e300
        layer.lora_B.fill_(0.5)
    w0 = layer.weight.detach().clone()
    layer.eval()
    assert layer.merged
    want = w0 + layer.lora_B.detach() @ layer.lora_A.detach()
    assert torch.equal(layer.weight, want)
    assert sharded.abs_max(torch.tensor([1.0, float("inf")])).item() == float("inf")
    assert sharded.abs_max(torch.tensor([1.0, float("nan")])).item() == float("inf")
    assert sharded.abs_max(torch.tensor([-3.0, float("inf")]), finite=True).item() == 3.0
    assert sharded.abs_max(torch.tensor([-2.0, 1e300], dtype=torch.float64)).item() == 1e300
    f8 = torch.tensor([1.0, -4.0, float("nan")]).to(torch.float8_e5m2)
    assert sharded.abs_max(f8, finite=True).item() == 4.0


_X3 = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(2))
_Y3 = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(3))


def _per_adapter_loop(net, opts, x, y, how):
    """3 iterations; each: [both optimizers zeroed ("top", "skip")], then per adapter: switch, [its optimizer zeroed
    ("each")], backward, step (none in the second iteration under "skip", as GradScaler skips a step on inf)."""
    import torch.nn as nn
    for it in range(3):
        if how in ("top", "skip"):
            for o in opts.values():
                o.zero_grad()
        for name in ("default", "b"):
            lora.set_adapter(net, name)
            if how == "each":
                opts[name].zero_grad()
            nn.functional.mse_loss(net(x[it]), y[it]).backward()
            if not (how == "skip" and it == 1):
                opts[name].step()
    out = {}
    for name in ("b", "default"):
        lora.set_adapter(net, name)
        out[name] = {k: v.double().clone() for k, v in lora.lora_state_dict(net).items()}
    return out


def _per_adapter_ranks(rank, world, how):
    from torch.distributed.fsdp import fully_shard
    net = _two_adapters()
    for m in net:
        fully_shard(m)
    fully_shard(net)
    params = [p for p in net.parameters() if p.requires_grad]
    opts = {n: torch.optim.SGD(params, lr=0.05) for n in ("default", "b")}
    half = slice(rank * 2, rank * 2 + 2)
    return _per_adapter_loop(net, opts, _X3[:, half], _Y3[:, half], how)


@pytest.mark.parametrize("how", ["top", "each", "skip"])
def test_fsdp2_per_adapter_optimizers_train_as_in_one_process(how):
    """r12 on swap_grads: an optimizer per adapter over FSDP2's live factors, each adapter stepped after its own
    backward. Zeroed together at the top of each iteration ("top"), a gradient already stepped came back at the
    switch and was added to (0.157 off); r13: a step skipped (GradScaler's, on inf), the gradient zeroed at the top
    came back at the switch (0.0394 off). One process, each adapter its own Parameters and optimizer, is the
    reference."""
    from dist import run_ranks

    def own(net, name):
        lora.set_adapter(net, name)
        lora.mark_only_lora_as_trainable(net)
        return [p for n, p in net.named_parameters() if "lora_" in n]
    net = _two_adapters()
    want = _per_adapter_loop(net, {n: torch.optim.SGD(own(net, n), lr=0.05) for n in ("default", "b")},
                             _X3, _Y3, how)
    for out in run_ranks(_per_adapter_ranks, how):
        for name in ("default", "b"):
            err = max((out[name][k] - want[name][k]).abs().max().item() for k in want[name])
            assert err < 1e-6, (how, name, err)


@pytest.mark.parametrize("kind", ["conv2d", "linear-autocast"])
def test_an_in_place_switch_under_inductor_freezing_is_seen_unmerged(kind):
    """X1: inductor's freezing folds what aten ops compute from the factors into constants: an unmerged
    convolution's delta, and autocast's bfloat16 casts of a Linear's factors. An in-place switch to an adapter of
    the same scaling then went on serving the adapter switched away from (a Conv2d 101 off, a Linear under autocast
    45 off, a tiny GPT-2 0.98). The forward now guards on the count of the factors' in-place writes."""
    import contextlib

    import torch._inductor.config as inductor
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    if kind == "conv2d":
        layer = lora.Conv2d(3, 4, 3, r=2, lora_alpha=4)
        x = torch.randn(2, 3, 6, 6, generator=g)
    else:
        layer = lora.Linear(16, 8, r=4, lora_alpha=8)
        x = torch.randn(3, 16, generator=g)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    A, B, s = layer.get_adapter(layer.active_adapter)
    factors = {}
    for name in ("a", "b"):
        factors[name] = (torch.randn(A.shape, generator=g), torch.randn(B.shape, generator=g))
        layer.add_adapter(name, factors[name][0].clone(), factors[name][1].clone(), s)  # (one scaling)
    layer.requires_grad_(False)
    layer.set_adapter("a")
    conv = layer.conv if kind == "conv2d" else layer
    W, bias = conv.weight.detach().double(), conv.bias.detach().double()

    def want(name):
        a, b = (t.double() for t in factors[name])
        if kind == "conv2d":
            return F.conv2d(x.double(), W + s * (b @ a).view(W.shape), bias)
        return x.double() @ (W + s * b @ a).t() + bias
    cast = torch.autocast("cpu", torch.bfloat16) if kind != "conv2d" else contextlib.nullcontext()
    tol = 0.5 if kind != "conv2d" else 1e-4  # (bfloat16 rounding; the adapters' outputs are tens apart)
    torch._dynamo.reset()
    try:
        with torch.no_grad(), inductor.patch(freezing=True), cast:
            compiled = torch.compile(layer)
            for name in ("a", "b", "a", "b"):
                layer.set_adapter(name)
                other = "a" if name == "b" else "b"
                got = compiled(x).double()
                assert (got - want(name)).abs().max().item() < tol, name
                assert (got - want(other)).abs().max().item() > 10 * tol, name
    finally:
        torch._dynamo.reset()


def _accumulate_onto_a_stepped_gradient(rank, world):
    import torch.nn as nn
    net = _two_adapters()
    if world:
        from torch.distributed.fsdp import fully_shard
        for m in net:
            fully_shard(m)
        fully_shard(net)
    half = slice(rank * 2, rank * 2 + 2) if world else slice(None)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05)
    nn.functional.mse_loss(net(_X3[0, half]), _Y3[0, half]).backward()
    opt.step()
    nn.functional.mse_loss(net(_X3[1, half]), _Y3[1, half]).backward()  # (no zero_grad: it adds onto the stepped)
    lora.set_adapter(net, "b")  # (an evaluation of b between)
    lora.set_adapter(net, "default")
    opt.step()
    return {k: v.double().clone() for k, v in lora.lora_state_dict(net).items()}


def test_fsdp2_a_gradient_added_onto_a_stepped_one_is_kept_through_a_switch():
    """r13: FSDP2 accumulates into an existing gradient through its local shard, which the DTensor's version does not
    see: the gradient was taken for the stepped one and dropped at a switch away and back (0.0452 off)."""
    from dist import run_ranks
    want = _accumulate_onto_a_stepped_gradient(0, 0)
    for out in run_ranks(_accumulate_onto_a_stepped_gradient):
        assert max((out[k] - want[k]).abs().max().item() for k in want) < 1e-6


def test_the_range_check_takes_what_rounds_to_the_top_and_plain_parameter_subclasses():
    """r13: a merged switch whose sum lands within half an ulp past float16's largest value (it rounds to it) was
    refused; a weight that is a plain subclass of nn.Parameter (vLLM's) was not checked at all (inf merged); factors
    whose product B @ A is past float32's range under a tiny scaling merged inf (NaN unmerged)."""
    import torch.nn as nn
    layer = lora.Linear(2, 2, r=1, lora_alpha=1, bias=False).half()
    with torch.no_grad():
        layer.weight.fill_(65472.0)
        layer.lora_A.fill_(1.0)
        layer.lora_B.fill_(20.0)
    layer.add_adapter("b", torch.ones(1, 2), torch.full((2, 1), 30.0), 1.0)
    layer.eval()
    layer.set_adapter("b")  # 65472 + 30 = 65502: rounds to 65504
    assert layer.merged and torch.isfinite(layer.weight).all()

    class MyParam(nn.Parameter):
        pass
    layer = lora.Linear(2, 2, r=1, lora_alpha=1, bias=False).half()
    with torch.no_grad():
        layer.lora_A.fill_(1.0)
        layer.lora_B.fill_(1000.0)
    layer.weight = MyParam(torch.full((2, 2), 65000.0, dtype=torch.float16), requires_grad=False)
    with pytest.raises(ValueError, match="beyond torch.float16's range"):
        layer.eval()
    assert not layer.merged and torch.equal(layer.weight, torch.full((2, 2), 65000.0, dtype=torch.float16))
    layer = lora.Linear(2, 2, r=1, lora_alpha=1e-10, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.lora_A.fill_(1e20)
        layer.lora_B.fill_(1e20)
    with pytest.raises(ValueError, match=r"the factors' product B @ A \(before the scaling\) is past torch.float32's "
                                         r"range"):
        layer.eval()
    assert torch.equal(layer.weight, torch.ones(2, 2))


def test_a_conv_batch_opened_under_autocast_takes_its_slot_deltas_in_float32():
    """r13: a mixed batch opened inside autocast computed a convolution's slot deltas (B @ A) in bfloat16: a merged
    Conv2d then served the base row as the merged weight minus a bfloat16 delta, 1.98 off float64 on outputs of at
    most 1.26 (opened outside autocast, the forward still under it: 0.0037)."""
    import torch.nn as nn

    def build():
        torch.manual_seed(0)
        layer = lora.Conv2d(8, 16, 3, r=4, lora_alpha=4)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            layer.conv.weight.copy_(torch.randn(layer.conv.weight.shape, generator=g) * 0.05)
        A, B, s = layer.get_adapter("default")
        for n in ("a", "b"):
            layer.add_adapter(n, torch.randn(A.shape, generator=g) * 3, torch.randn(B.shape, generator=g) * 3, s)
        layer.requires_grad_(False)
        layer.set_adapter("a")
        return layer
    x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(5))
    plain = build()
    want = torch.nn.functional.conv2d(x.double(), plain.conv.weight.double(), plain.conv.bias.double())[0]
    errs = {}
    for inside in (True, False):
        net = nn.Sequential(build()).eval()  # merges 'a'
        with torch.no_grad():
            if inside:
                with torch.autocast("cpu", torch.bfloat16), lora.batch_adapters(net, [None, "b"]):
                    out = net(x)
            else:
                with lora.batch_adapters(net, [None, "b"]), torch.autocast("cpu", torch.bfloat16):
                    out = net(x)
        errs[inside] = (out[0].double() - want).abs().max().item()
    assert errs[True] <= 2 * errs[False] + 1e-3, errs


def test_a_load_state_dict_into_the_live_factors_under_inductor_freezing_is_seen():
    """r13: load_state_dict writing new values into the live factors in place was not counted for freezing's guard:
    a compiled Conv2d went on serving the old factors (918.9 off)."""
    import torch._inductor.config as inductor
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    layer = lora.Conv2d(3, 4, 3, r=2, lora_alpha=4)
    x = torch.randn(2, 3, 6, 6, generator=g)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    layer.requires_grad_(False)
    W, bias, s = layer.conv.weight.double(), layer.conv.bias.double(), layer.scaling

    def want():
        a, b = layer.lora_A.double(), layer.lora_B.double()
        return F.conv2d(x.double(), W + s * (b @ a).view(W.shape), bias)
    torch._dynamo.reset()
    try:
        with torch.no_grad(), inductor.patch(freezing=True):
            compiled = torch.compile(layer)
            assert (compiled(x).double() - want()).abs().max().item() < 1e-3
            new = {"lora_A": torch.randn(layer.lora_A.shape, generator=g) * 3,
                   "lora_B": torch.randn(layer.lora_B.shape, generator=g) * 3}
            layer.load_state_dict(new, strict=False)
            assert (compiled(x).double() - want()).abs().max().item() < 1e-3
    finally:
        torch._dynamo.reset()


def test_deleted_adapter_names_leave_no_entries_behind():
    """M1: each layer kept a generation and a value epoch for every adapter name it ever held (a serving loop of
    request adapters: about 200 KB a layer per 1,000 names). They are numbers of one process-wide count now, never
    reused, and delete_adapter drops them."""
    layer = lora.Linear(8, 8, r=2)
    for i in range(200):
        layer.add_adapter(f"req{i}", torch.randn(2, 8), torch.randn(8, 2), 1.0)
        layer.check_values(f"req{i}")
        layer.delete_adapter(f"req{i}")
    assert len(layer.__dict__.get("_generations", {})) <= 1 and len(layer.__dict__.get("_value_epochs", {})) <= 1
    layer.add_adapter("x", torch.randn(2, 8), torch.randn(8, 2), 1.0)
    first = (layer._generations["x"], layer.value_epoch("x"))
    layer.delete_adapter("x")
    layer.add_adapter("x", torch.randn(2, 8), torch.randn(8, 2), 1.0)  # (a name again: new numbers, never the old)
    assert layer._generations["x"] > first[0] and layer.value_epoch("x") > first[1]


def _freed_after_a_trainable_switch(rank, world):
    import gc
    import weakref

    from torch.distributed.fsdp import fully_shard
    net = _two_adapters()
    for m in net:
        fully_shard(m)
    fully_shard(net)
    lora.set_adapter(net, "b")  # trainable: swap_grads looks up the layers' FSDPParams
    ref = weakref.ref(net[0])
    del net, m
    gc.collect()
    return ref() is None


def test_fsdp2_a_model_is_freed_after_a_trainable_switch():
    """M1: the map of each layer's FSDPParams (sharded._fsdp_params_of) held them strongly, and an FSDPParam holds
    its module: a deleted FSDP2 model stayed alive after a trainable switch."""
    from dist import run_ranks
    assert run_ranks(_freed_after_a_trainable_switch) == [True, True]


def test_the_range_checks_float64_sum_is_a_copy_and_float32_takes_no_half_ulp():
    """r14: the float64 sum of the range check was the weight itself for a float64 weight (.double() is no copy): the
    check wrote into it, a refused merge too ("nothing was written" over a weight of inf); and the half-ulp allowance,
    right where the sum is made wider than the weight and rounded once (float16, bfloat16), let a float32 merge whose
    own B @ A rounds up write inf."""
    top64 = torch.finfo(torch.float64).max
    layer = lora.Linear(2, 1, r=1, lora_alpha=1, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[top64, -3.0]], dtype=torch.float64))
        layer.lora_A.fill_(1.0)
        layer.lora_B.fill_(top64)
    w0 = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="beyond torch.float64's range"):
        layer.eval()
    assert torch.equal(layer.weight, w0) and not layer.merged
    top = torch.finfo(torch.float32).max
    layer = lora.Linear(2, 1, r=2, lora_alpha=2, bias=False)  # scaling 1
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, 0] = top
        layer.lora_A.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
        layer.lora_B.copy_(torch.tensor([[2.0 ** 102, 2.0 ** 102 - 2.0 ** 78]]))
    with pytest.raises(ValueError, match="beyond torch.float32's range"):
        layer.eval()
    assert torch.isfinite(layer.weight).all() and not layer.merged


def test_an_unpickled_layer_takes_fresh_generations_and_value_epochs():
    """r14: generations and value epochs are numbers of a process-wide count, pickled with the layer; the loading
    process's count starts again, so a number it gave later could equal a pickled one (a mixed batch's slot kept
    the values from before a .data write and check_values: 9.60 off; a checkpoint's backward check let a replaced
    adapter through). An unpickled layer renumbers them from this process's count."""
    import io
    import pickle
    layer = lora.Linear(4, 4, r=2)
    layer.add_adapter("b", torch.randn(2, 4), torch.randn(4, 2), 1.0)
    layer.check_values("b")
    buf = io.BytesIO()
    torch.save(layer, buf)
    from lora_ext import named_adapters
    given = next(named_adapters._EPOCHS)  # (the count's next number before the load)
    buf.seek(0)
    for copy in (torch.load(buf, weights_only=False), pickle.loads(pickle.dumps(layer))):
        assert copy._generations and all(v > given for v in copy._generations.values())
        assert all(v > given for v in copy.__dict__["_value_epochs"].values())


def test_a_check_values_through_a_shallow_copy_reaches_the_originals_batch_slots():
    """r15: the renumbering of an unpickled layer's value epochs (r14) built new dicts, and copy.copy, which shares
    the original's dicts and tensors, then kept its own: a .data write and check_values through the copy left the
    original's mixed-batch slot stale (8.83 off)."""
    import copy
    torch.manual_seed(0)
    m = lora.Linear(8, 8, r=2, bias=False)
    m.eval()
    m.add_adapter("b", torch.randn(2, 8), torch.randn(8, 2), 1.0)
    x = torch.randn(2, 8)
    with torch.no_grad():
        with lora.batch_adapters(m, ["b", None]):
            m(x)
        c = copy.copy(m)
        c._adapter("b")[1].data.mul_(3.0)  # (a write the version counters miss)
        c.check_values("b")
        with lora.batch_adapters(m, ["b", None]):
            y = m(x)
    A, B, s = m._adapter("b")
    want = x[0].double() @ m.weight.double().t() + s * (x[0].double() @ A.double().t() @ B.double().t())
    assert (y[0].double() - want).abs().max().item() < 1e-5
