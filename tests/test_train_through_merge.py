"""Training through a merged layer: a forward that autograd records while the factors require grad (the model in
eval mode for frozen BatchNorm statistics or no dropout, training after merge(), a checkpointed forward recomputed
after eval()). loralib's merged layers compute from the weight alone there: lora_A and lora_B got no gradient
(None), and an optimizer skipped them silently. Now such a forward computes W x + s B A x from the merged weight and
the live factors (their stack with the merged snapshot's, negated), so the factors get their gradients and optimizer
steps take effect at once; the weight is not written. Oracles are float64 formulas (helpers.layer_forward64) on
tensors the test made."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import lora_ext as lora
from helpers import bits, layer_forward64, rel_err

KINDS = ["linear", "fan", "merged_linear", "merged_fan", "embedding", "conv"]


def _layer(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "linear":
        layer = lora.Linear(24, 20, r=4, lora_alpha=8)
    elif kind == "fan":
        layer = lora.Linear(24, 20, r=4, lora_alpha=8, fan_in_fan_out=True)
    elif kind in ("merged_linear", "merged_fan"):
        layer = lora.MergedLinear(24, 3 * 8, r=2, lora_alpha=6, enable_lora=[True, False, True],
                                  fan_in_fan_out=kind == "merged_fan")
    elif kind == "embedding":
        layer = lora.Embedding(30, 12, r=4, lora_alpha=8)
    else:
        layer = lora.Conv2d(3, 5, kernel_size=3, r=2, lora_alpha=4)
    with torch.no_grad():
        layer.lora_A.normal_(0, 0.3)
        layer.lora_B.normal_(0, 0.3)
    return layer


def _weight_name(layer):
    return "conv.weight" if isinstance(layer, lora.ConvLoRA) else "weight"


def _param(layer):
    """The weight Parameter (state_dict() of a merged layer gives the base instead)."""
    return layer.conv.weight if isinstance(layer, lora.ConvLoRA) else layer.weight


def _input(kind, seed=7):
    g = torch.Generator().manual_seed(seed)
    if kind == "embedding":
        return torch.randint(0, 30, (3, 5), generator=g)
    if kind == "conv":
        return torch.randn(2, 3, 7, 7, generator=g)
    return torch.randn(4, 24, generator=g)


def _params64(layer, base, requires_grad=False):
    """The layer's parameters in float64 with `base` as its weight (a merged layer's Parameter holds W + s B A)."""
    p = {n: t.detach().double() for n, t in layer.named_parameters()}
    p[_weight_name(layer)] = base.double()
    return {n: t.requires_grad_(requires_grad) for n, t in p.items()}


def _x64(x):
    return x.double() if x.is_floating_point() else x


@pytest.mark.parametrize("kind", KINDS)
def test_a_merged_forward_with_gradients_gives_the_factors_theirs(kind):
    layer = _layer(kind)
    base = layer.state_dict()[_weight_name(layer)].clone()
    p64 = _params64(layer, base, requires_grad=True)
    layer.eval()
    assert layer.merged
    merged_bits = bits(_param(layer).detach()).clone()
    x = _input(kind)
    if x.is_floating_point():
        x.requires_grad_()
    x64 = _x64(x.detach()).requires_grad_(x.is_floating_point())
    y = layer(x)
    y64 = layer_forward64(layer, p64, x64, layer.scaling)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(11))
    y.backward(g)
    y64.backward(g.double())
    assert rel_err(y, y64) < 2e-6
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None  # (loralib: None)
    assert rel_err(layer.lora_A.grad, p64["lora_A"].grad) < 1e-5
    assert rel_err(layer.lora_B.grad, p64["lora_B"].grad) < 1e-5
    if x.is_floating_point():
        assert rel_err(x.grad, x64.grad) < 1e-5
    weight = _param(layer)
    assert not weight.requires_grad and weight.grad is None  # (frozen by the layer, as loralib's)
    assert layer.merged and torch.equal(bits(weight.detach()), merged_bits)  # nothing written


@pytest.mark.parametrize("kind", KINDS)
def test_training_in_eval_mode_trains_as_in_training_mode(kind):
    a = _layer(kind)
    base = a.state_dict()[_weight_name(a)].clone()
    _param(a).requires_grad_(False)
    b = copy.deepcopy(a)
    a.eval()  # merged: frozen BatchNorm statistics would be the reason in a real model
    b.train()  # unmerged, no dropout: the same function
    opts = [torch.optim.SGD([m.lora_A, m.lora_B], lr=0.1) for m in (a, b)]
    for step in range(3):
        x = _input(kind, seed=step)
        for m, opt in zip((a, b), opts):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    assert a.merged
    for name in ("lora_A", "lora_B"):
        assert rel_err(getattr(a, name), getattr(b, name)) < 1e-5
        assert rel_err(getattr(a, name), getattr(_layer(kind), name)) > 1e-3  # the steps moved them
    x = _input(kind, seed=9)
    with torch.no_grad():  # between training steps: what was trained, not the merge from before them
        assert rel_err(a(x), layer_forward64(a, _params64(a, base), _x64(x), a.scaling)) < 2e-6
    a.train()  # the snapshot taken out: the base again
    assert rel_err(a.state_dict()[_weight_name(a)], base) < 1e-6
    a.eval()  # the trained factors merged
    with torch.no_grad():
        assert rel_err(a(x), layer_forward64(a, _params64(a, base), _x64(x), a.scaling)) < 2e-6


@pytest.mark.parametrize("kind", ["linear", "embedding", "conv"])
def test_forwards_without_gradients_for_the_factors_compute_from_the_weight_alone(kind):
    layer = _layer(kind)
    layer.eval()
    x = _input(kind)
    with torch.no_grad():
        alone = layer._weight_forward(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            assert torch.equal(bits(layer(x)), bits(alone))
        with torch.inference_mode():
            assert torch.equal(bits(layer(x)), bits(alone))
        layer.lora_A.requires_grad_(False)
        layer.lora_B.requires_grad_(False)
        y = layer(x)  # gradients on, factors frozen (an input's gradient, a saliency map)
        assert torch.equal(bits(y.detach()), bits(alone))
    # none of these trained the factors: written by hand, they wait for the next merge (the README's rule)
    with torch.no_grad():
        layer.lora_B.add_(1.0)
        assert torch.equal(bits(layer(x)), bits(alone))


@pytest.mark.parametrize("how", ["train_eval", "eval", "merge", "unmerge_merge"])
@pytest.mark.parametrize("kind", ["linear", "merged_fan", "conv"])
def test_a_new_merge_computes_from_the_weight_alone_again(kind, how):
    layer = _layer(kind)
    base = layer.state_dict()[_weight_name(layer)].clone()
    layer.eval()
    x = _input(kind)
    layer(x).sum().backward()  # trained through the merge: later forwards read the live factors
    with torch.no_grad():
        layer.lora_B.add_(0.5)
        trained = layer(x)
    assert rel_err(trained, layer_forward64(layer, _params64(layer, base), x.double(), layer.scaling)) < 2e-6
    if how == "train_eval":
        layer.train()
        layer.eval()
    elif how == "eval":
        layer.eval()  # already in eval mode and merged: the trained factors merged in place of the snapshot
    elif how == "merge":
        layer.merge()
    else:
        layer.unmerge()
        layer.merge()
    assert layer.merged
    with torch.no_grad():
        assert torch.equal(bits(layer(x)), bits(layer._weight_forward(x)))  # the weight alone
        assert rel_err(layer(x), trained) < 2e-6
        layer.lora_B.add_(0.5)
        if how in ("eval", "merge"):  # merged since it trained through its merge: writes are served at once
            assert rel_err(layer(x), layer_forward64(layer, _params64(layer, base), _x64(x), layer.scaling)) < 2e-6
        else:  # unmerged in between: a new merge, whose writes by hand wait for the next merge (the README's rule)
            assert torch.equal(bits(layer(x)), bits(layer._weight_forward(x)))
    layer.train()
    assert rel_err(layer.state_dict()[_weight_name(layer)], base) < 1e-6  # the base back


def test_a_lossless_merge_gives_the_base_back_bit_for_bit_after_training_through_it():
    layer = _layer("linear")
    layer.to(torch.bfloat16)  # (16-bit: lossless by default)
    base = layer.weight.detach().clone()
    layer.eval()
    x = _input("linear").to(torch.bfloat16)
    for _ in range(2):
        layer(x).float().square().sum().backward()
        with torch.no_grad():
            for p in (layer.lora_A, layer.lora_B):
                p.sub_(0.01 * p.grad)
                p.grad = None
        layer.eval()  # the trained factors merged in place of the merged ones, losslessly
    layer.train()
    assert torch.equal(bits(layer.weight.detach()), bits(base))


def test_a_switch_computes_from_the_weight_alone_again():
    layer = _layer("linear")
    gen = torch.Generator().manual_seed(3)
    layer.add_adapter("other", torch.randn(layer.lora_A.shape, generator=gen),
                      torch.randn(layer.lora_B.shape, generator=gen), 1.5)
    base = layer.state_dict()["weight"].clone()
    layer.eval()
    x = _input("linear")
    layer(x).sum().backward()
    layer.set_adapter("other")  # a merged switch: the snapshot is "other" now
    with torch.no_grad():
        assert torch.equal(bits(layer(x)), bits(layer._weight_forward(x)))
        assert rel_err(layer(x), layer_forward64(layer, _params64(layer, base), x.double(), layer.scaling)) < 2e-6


def test_a_checkpointed_forward_recomputed_after_eval_gets_the_gradients():
    layer = _layer("linear")
    ref = copy.deepcopy(layer)
    x = _input("linear").requires_grad_()
    y = checkpoint(layer, x, use_reentrant=True)  # training mode: unmerged
    layer.eval()  # merged between the forward and its backward (the recomputation runs merged)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    y.backward(g)
    ref(x.detach()).backward(g)
    assert layer.lora_A.grad is not None  # (before: None)
    assert rel_err(layer.lora_A.grad, ref.lora_A.grad) < 1e-5
    assert rel_err(layer.lora_B.grad, ref.lora_B.grad) < 1e-5
    assert rel_err(x.grad, _x_grad64(ref, x.detach(), g)) < 1e-5


def _x_grad64(layer, x, g):
    x64 = x.double().requires_grad_()
    layer_forward64(layer, _params64(layer, layer.weight), x64, layer.scaling).backward(g.double())
    return x64.grad


def test_a_checkpointed_forward_without_reentrance_recomputed_after_eval_is_refused_by_torch():
    layer = _layer("linear")
    y = checkpoint(layer, _input("linear").requires_grad_(), use_reentrant=False)
    layer.eval()
    with pytest.raises(RuntimeError, match=r"its forward served adapter 'default', and before this backward it was "
                                           r"changed to 'default' merged: torch.utils.checkpoint computes the forward "
                                           r"again"):
        y.sum().backward()  # (the layer says so before the recomputation, which torch refused too: other tensors)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_training_through_a_merged_layer(backend):
    layer = _layer("linear")
    base = layer.state_dict()["weight"].clone()
    layer.eval()
    compiled = torch.compile(layer, backend=backend)
    for step in range(2):
        x = _input("linear", seed=step)
        p64 = _params64(layer, base, requires_grad=True)
        layer.zero_grad()
        compiled(x).square().sum().backward()
        layer_forward64(layer, p64, x.double(), layer.scaling).square().sum().backward()
        assert rel_err(layer.lora_A.grad, p64["lora_A"].grad) < 1e-5
        assert rel_err(layer.lora_B.grad, p64["lora_B"].grad) < 1e-5
        with torch.no_grad():
            layer.lora_B.sub_(0.1 * layer.lora_B.grad)  # a step: the next compiled call serves it
    assert layer.merged


def test_autocast_training_through_a_merged_layer():
    layer = _layer("linear")
    base = layer.state_dict()["weight"].clone()
    layer.eval()
    x = _input("linear")
    p64 = _params64(layer, base, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    layer_forward64(layer, p64, x.double(), layer.scaling).square().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32
    assert rel_err(layer.lora_A.grad, p64["lora_A"].grad) < 3e-2  # (bfloat16 activations)
    assert rel_err(layer.lora_B.grad, p64["lora_B"].grad) < 3e-2


def test_a_model_in_eval_mode_with_batchnorm_trains_its_adapters():
    """The case that brought this up: a CNN trained with its BatchNorm statistics frozen by model.eval()."""
    torch.manual_seed(0)
    model = nn.Sequential(lora.Conv2d(3, 8, kernel_size=3, r=2, lora_alpha=4), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), lora.Linear(8 * 5 * 5, 4, r=2, lora_alpha=4))
    lora.mark_only_lora_as_trainable(model)
    model.eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(6, 3, 7, 7)
    target = torch.randn(6, 4)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = (model(x) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_dtype_change_after_training_through_the_merge_keeps_serving_what_was_trained(dtype):
    layer = _layer("linear")
    base = layer.state_dict()["weight"].clone()
    layer.eval()
    x = _input("linear")
    layer(x).sum().backward()
    with torch.no_grad():
        layer.lora_B.sub_(0.2 * layer.lora_B.grad)  # a step
    layer.to(dtype)  # (the snapshot is merged again into the converted base)
    assert layer.merged
    with torch.no_grad():
        out = layer(x.to(dtype))
    expected = layer_forward64(layer, _params64(layer, base), x.double(), layer.scaling)
    assert rel_err(out, expected) < (1e-2 if dtype == torch.bfloat16 else 1e-6)  # the step served, not the merge


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["linear", "merged_fan", "embedding", "conv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_through_the_merge_on_the_device(cuda, kind, dtype):
    layer = _layer(kind)
    base = layer.state_dict()[_weight_name(layer)].clone()
    layer.to(cuda.device)
    owner = layer.conv if isinstance(layer, lora.ConvLoRA) else layer
    for name in ("weight", "bias"):  # a 16-bit base with float32 factors (inject's default)
        if getattr(owner, name, None) is not None:
            getattr(owner, name).data = getattr(owner, name).data.to(dtype)
    base = base.to(dtype)
    layer.eval()
    assert layer.merged
    x = _input(kind)
    xd = x.to(cuda.device, dtype) if x.is_floating_point() else x.to(cuda.device)
    p64 = _params64(layer, base, requires_grad=True)
    y = layer(xd)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    y.backward(g.to(y.device, y.dtype))
    layer_forward64(layer, p64, _x64(x), layer.scaling).backward(g.double())
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(layer.lora_A.grad, p64["lora_A"].grad) < tol
    assert rel_err(layer.lora_B.grad, p64["lora_B"].grad) < tol
    assert layer.merged


# -- found by a hostile read: other paths that read a merged weight or trust the flag ------------------------------

def _trained_in_eval_mode(kind="linear", steps=2):
    layer = _layer(kind)
    base = layer.state_dict()[_weight_name(layer)].clone()
    layer.eval()
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.1)
    for step in range(steps):
        opt.zero_grad()
        layer(_input(kind, seed=step)).square().mean().backward()
        opt.step()
    return layer, base


@pytest.mark.parametrize("kind", ["linear", "merged_fan", "embedding", "conv"])
def test_unload_merges_what_was_trained_through_the_merge(kind):
    layer, base = _trained_in_eval_mode(kind)
    model = nn.Sequential(layer)
    x = _input(kind, seed=9)
    expected = layer_forward64(layer, _params64(layer, base), _x64(x), layer.scaling)
    lora.unload(model, merge=True)  # (took the weight as it was: the merge from before training, 1.3 off)
    assert not isinstance(model[0], lora.LoRALayer)
    with torch.no_grad():
        assert rel_err(model[0](x), expected) < 2e-6


def test_merge_adapter_merges_what_was_trained_through_the_merge():
    layer, base = _trained_in_eval_mode()
    model = nn.Sequential(layer)
    lora.merge_adapter(model)
    x = _input("linear", seed=9)
    with torch.no_grad():
        assert torch.equal(bits(layer(x)), bits(layer._weight_forward(x)))  # the weight alone holds it now
        assert rel_err(layer(x), layer_forward64(layer, _params64(layer, base), x.double(), layer.scaling)) < 2e-6


def test_a_mixed_batch_over_a_layer_trained_through_its_merge_is_refused_until_it_merges_again():
    layer, base = _trained_in_eval_mode()
    model = nn.Sequential(layer)
    x = _input("linear", seed=9)
    with torch.no_grad():
        with pytest.raises(ValueError, match="trained adapter 'default' through its merge"):
            with lora.batch_adapters(model, ["default"] * 4):
                model(x)  # (served the merge from before training: 1.04 off)
        model.eval()
        with lora.batch_adapters(model, ["default", None, "default", None]):
            out = model(x)
    expected = layer_forward64(layer, _params64(layer, base), x.double(), layer.scaling)
    assert rel_err(out[0::2], expected[0::2]) < 2e-6
    assert rel_err(out[1::2], x.double()[1::2] @ base.double().T + layer.bias.double()) < 2e-6


def _ddp_unsynchronised_switch(rank, world, mode):
    from torch.nn.parallel import DistributedDataParallel
    layer = _layer("linear")
    layer.add_adapter("b", torch.randn(layer.lora_A.shape) * 0.3, torch.randn(layer.lora_B.shape) * 0.3, 2.0)
    model = nn.Sequential(layer)
    lora.mark_only_lora_as_trainable(model)
    ddp = DistributedDataParallel(model)
    getattr(model, mode)()
    lora.set_adapter(model, "b")  # trainable: new Parameters, which DDP was not built with
    with pytest.raises(RuntimeError, match="does not synchronise") as e:
        ddp(_input("linear", seed=rank)).square().mean().backward()
    return {"refusal": str(e.value), "merged": layer.merged}


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_ddp_refuses_unsynchronised_factors_trained_through_a_merge(mode):
    from dist import run_ranks
    for out in run_ranks(_ddp_unsynchronised_switch, mode):
        assert "Linear(24, 20)" in out["refusal"]  # (eval: trained through the merge, ranks apart by 0.08)
        assert out["merged"] == (mode == "eval")


def _fsdp2_eval_mode_training(rank, world):
    from torch.distributed.fsdp import fully_shard
    kinds = ["linear", "merged_fan", "embedding", "conv"]
    out = {}
    for kind in kinds:
        layer = _layer(kind)
        base = layer.state_dict()[_weight_name(layer)].clone()
        p64 = _params64(layer, base, requires_grad=True)  # (before fully_shard makes them DTensors)
        model = nn.Sequential(layer)
        lora.mark_only_lora_as_trainable(model)
        fully_shard(model)
        model.eval()
        merged = layer.merged
        x = _input(kind, seed=3)  # (the same on both ranks: the gradients all-reduce to the one-process ones)
        model(x).square().mean().backward()
        layer_forward64(layer, p64, _x64(x), layer.scaling).square().mean().backward()
        grads = [g.full_tensor() if hasattr(g, "full_tensor") else g for g in (layer.lora_A.grad, layer.lora_B.grad)]
        out[kind] = {"merged": merged and layer.merged,
                     "err": max(rel_err(grads[0], p64["lora_A"].grad), rel_err(grads[1], p64["lora_B"].grad))}
    return out


def test_fsdp2_training_through_a_merge():
    from dist import run_ranks
    for out in run_ranks(_fsdp2_eval_mode_training):
        for kind, res in out.items():
            assert res["merged"], kind
            assert res["err"] < 1e-5, (kind, res)  # (before: torch's DTensor error from torch.cat, naming no layer)


@pytest.mark.parametrize("how", ["export", "jit_trace"])
def test_a_program_of_a_merged_model_traces_the_weight_alone(how):
    """torch.export / torch.jit.trace with gradients on and trainable factors (a serving program): the weight
    alone, as before; the layer is not put on the live path by the trace."""
    layer = _layer("linear")
    model = nn.Sequential(layer).eval()
    x = _input("linear")
    if how == "export":
        program = torch.export.export(model, (x,)).module()
        ops_used = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.jit.trace(model, (x,), check_trace=False)
        ops_used = {n.kind() for n in program.inlined_graph.nodes()}
    assert not any("cat" in o or "lora_ext" in o for o in ops_used), ops_used
    assert not layer._trained()
    with torch.no_grad():
        assert torch.equal(bits(program(x)), bits(layer._weight_forward(x)))


def test_a_program_of_a_layer_trained_through_its_merge_serves_what_was_trained():
    layer, base = _trained_in_eval_mode()
    model = nn.Sequential(layer)
    x = _input("linear", seed=9)
    program = torch.export.export(model, (x,)).module()
    with torch.no_grad():
        assert rel_err(program(x), layer_forward64(layer, _params64(layer, base), x.double(), layer.scaling)) < 2e-6


def test_a_forward_with_gradients_that_no_backward_follows_trains_nothing():
    """A validation forward without torch.no_grad (or a generator resumed on another thread, where no_grad is not in
    force): later forwards compute from the weight alone, and mixed batches still open."""
    layer = _layer("linear")
    model = nn.Sequential(layer).eval()
    x = _input("linear")
    y = model(x)
    assert y.requires_grad  # (the live path: a backward would train the factors)
    del y
    with torch.no_grad():
        assert torch.equal(bits(model(x)), bits(layer._weight_forward(x)))
        with lora.batch_adapters(model, ["default", None, "default", None]):
            model(x)
    model(x).sum().backward()  # now trained through the merge
    with torch.no_grad():
        layer.lora_B.add_(0.5)
        assert not torch.equal(bits(model(x)), bits(layer._weight_forward(x)))  # the live factors, stepped


# -- a third hostile read: backwards that ask for one factor, merges between forward and backward, replicas ---------

@pytest.mark.parametrize("how", ["backward_inputs", "autograd_grad"])
def test_a_backward_for_lora_A_alone_marks_the_layer_trained(how):
    layer = _layer("linear")
    base = layer.state_dict()["weight"].clone()
    layer.eval()
    x = _input("linear")
    loss = layer(x).square().sum()
    if how == "backward_inputs":
        loss.backward(inputs=[layer.lora_A])
        grad = layer.lora_A.grad
    else:
        (grad,) = torch.autograd.grad(loss, [layer.lora_A])
    with torch.no_grad():
        layer.lora_A.sub_(0.05 * grad)  # (before: the hook sat on B's stack only, which this backward never reached)
        assert rel_err(layer(x), layer_forward64(layer, _params64(layer, base), x.double(), layer.scaling)) < 2e-6
    layer.eval()  # merges the stepped lora_A
    with torch.no_grad():
        assert rel_err(layer(x), layer_forward64(layer, _params64(layer, base), x.double(), layer.scaling)) < 2e-6


@pytest.mark.parametrize("how", ["merge_adapter", "eval", "merge"])
def test_a_merge_between_a_forward_and_its_backward_keeps_the_step(how):
    layer, base = _trained_in_eval_mode(steps=1)
    model = nn.Sequential(layer)
    x = _input("linear", seed=4)
    loss = model(x).square().mean()  # (marked already: before, no hook was put on this forward)
    {"merge_adapter": lambda: lora.merge_adapter(model), "eval": model.eval, "merge": layer.merge}[how]()
    loss.backward()  # (the merge swapped the factors in: a new snapshot, unmarked, until this backward marks it)
    with torch.no_grad():
        layer.lora_B.sub_(0.1 * layer.lora_B.grad)
        assert rel_err(model(x), layer_forward64(layer, _params64(layer, base), x.double(), layer.scaling)) < 2e-6


def test_a_replica_trained_through_the_merge_marks_the_layer_it_was_made_from():
    """nn.DataParallel's replicas are shallow copies (Module._replicate_for_data_parallel) whose forwards train the
    original's factors; the hook marked the replica only (0.787 off after the step)."""
    layer = _layer("linear")
    base = layer.state_dict()["weight"].clone()
    layer.eval()
    replica = layer._replicate_for_data_parallel()
    for name, p in layer._parameters.items():  # (as nn.parallel.replicate gives them: tensors that pass gradients back)
        replica._parameters[name] = p.view_as(p)
    x = _input("linear")
    replica(x).square().sum().backward()
    with torch.no_grad():
        layer.lora_B.sub_(0.1 * layer.lora_B.grad)
        assert rel_err(layer(x), layer_forward64(layer, _params64(layer, base), x.double(), layer.scaling)) < 2e-6


@pytest.mark.parametrize("how", ["eval", "merge_adapter", "switch_and_back"])
def test_a_merge_or_switch_between_a_backward_and_its_step_keeps_the_step(how):
    """A fourth hostile read: the merge swapped the trained factors in (a new snapshot, unmarked) before the
    optimizer stepped them, and nothing served the step, not even eval(), merge_adapter or unload (0.33 off)."""
    layer = _layer("linear")
    base = layer.state_dict()["weight"].clone()
    layer.add_adapter("b", torch.randn(layer.lora_A.shape) * 0.3, torch.randn(layer.lora_B.shape) * 0.3, 1.5)
    model = nn.Sequential(layer).eval()
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.1)
    x = _input("linear", seed=5)
    for step in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        if how == "eval":
            model.eval()
        elif how == "merge_adapter":
            lora.merge_adapter(model)
        else:
            lora.set_adapter(model, "b")
            lora.set_adapter(model, "default")
        opt.step()
        expected = layer_forward64(layer, _params64(layer, base), x.double(), layer.scaling)
        with torch.no_grad():
            assert rel_err(model(x), expected) < 2e-6, step
    model.eval()  # merges the last step
    with torch.no_grad():
        assert torch.equal(bits(model(x)), bits(layer._weight_forward(x)))
        assert rel_err(model(x), expected) < 2e-6
    plain = copy.deepcopy(model)
    lora.unload(plain, merge=True)
    with torch.no_grad():
        assert rel_err(plain(x), expected) < 2e-6
