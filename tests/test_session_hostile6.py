"""Hostile pass on 07db2f1 (the forward reads weight/bias/lora_A/lora_B from the module's `_parameters`, falling back
to getattr, and skips an identity lora_dropout that has no hooks; Kernels.takes / autocast read Tensor.is_cuda /
is_cpu; finite_real takes a plain float first; ops.linear's fast path calls the kernels' linear directly).

Covers what held: torch.func.functional_call / stateless substitution of every operand (values and gradients),
parametrizations of bias and factors, weight as a buffer and a factor as a plain attribute, load_state_dict(assign=
True), hooks on the identity dropout added after torch.compile, the simulator kernels and CPU autocast, r=0 and
MergedLinear without enabled blocks, Conv/Embedding, finite_real's inputs.

What did not, found by this file and fixed since (each test says how): an identity dropout whose call is changed
without a torch hook (accelerate's add_hook_to_module, an instance-level `forward`) was skipped; a plain-callable
lora_dropout (loralib's own `lambda x: x`) raised KeyError; and, older than 07db2f1, a parametrized / weight-normed
`weight` raised KeyError in LoRALayer.forward (a merge into one is now refused with a message)."""
import math

import pytest
import torch
import torch.nn as nn

import lora_ext
from lora_ext import ops
from helpers import load_sim, requires_sim


def _layers():
    torch.manual_seed(11)
    out = [lora_ext.Linear(8, 6, r=2, lora_alpha=3),
           lora_ext.Linear(8, 6, r=2, lora_alpha=3, fan_in_fan_out=True),
           lora_ext.MergedLinear(8, 9, r=2, lora_alpha=3, enable_lora=[True, False, True])]
    for layer in out:
        nn.init.normal_(layer.lora_B)
    return out


IDS = ["linear", "fan_in_fan_out", "merged"]


def _expected(layer, x, lora_in=None, weight=None, bias=None, A=None, B=None):
    """float64 x W^T + b + s (lora_in A^T) B^T from the given (or the layer's) tensors; MergedLinear: B's rows in
    the enabled blocks."""
    t = lambda v, d: (d if v is None else v).detach().double()  # noqa: E731
    w, b, A, B = t(weight, layer.weight), t(bias, layer.bias), t(A, layer.lora_A), t(B, layer.lora_B)
    w = w.t() if layer.fan_in_fan_out else w
    lora_in = (x if lora_in is None else lora_in).double()
    if isinstance(layer, lora_ext.MergedLinear):
        ids, nb, r = layer._block_ids, w.shape[0] // len(layer.enable_lora), layer.r
        update = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float64)
        for j, e in enumerate(ids):
            update[:, e * nb:(e + 1) * nb] = lora_in @ A[j * r:(j + 1) * r].t() @ B[j * nb:(j + 1) * nb].t()
    else:
        update = lora_in @ A.t() @ B.t()
    return x.double() @ w.t() + b + layer.scaling * update


def _close(out, ref):
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# what held


@pytest.mark.parametrize("which", range(3), ids=IDS)
def test_functional_call_substitutes_every_operand_with_gradients(which):
    layer = _layers()[which]
    x = torch.randn(5, 8)
    sub = {n: (p.detach() * 1.5 + 0.25).requires_grad_() for n, p in layer.named_parameters()}
    out = torch.func.functional_call(layer, sub, (x,))
    _close(out, _expected(layer, x, weight=sub["weight"], bias=sub["bias"], A=sub["lora_A"], B=sub["lora_B"]))
    out.square().sum().backward()
    for name in ("weight", "bias", "lora_A", "lora_B"):
        assert sub[name].grad is not None and sub[name].grad.abs().sum() > 0, name
        assert getattr(layer, name).grad is None, name  # the layer's own were not used
    # plain tensors for a part of them, through the old stateless entry point too
    from torch.nn.utils import stateless
    part = {"lora_A": torch.ones_like(layer.lora_A), "bias": torch.zeros_like(layer.bias)}
    _close(torch.func.functional_call(layer, part, (x,)), _expected(layer, x, A=part["lora_A"], bias=part["bias"]))
    _close(stateless.functional_call(layer, part, (x,)), _expected(layer, x, A=part["lora_A"], bias=part["bias"]))
    _close(layer(x), _expected(layer, x))  # and the layer's own are back


@pytest.mark.parametrize("name", ["bias", "lora_B"])
@pytest.mark.parametrize("which", range(3), ids=IDS)
def test_parametrized_bias_and_lora_B_are_read_through_their_parametrization(which, name):
    from torch.nn.utils import parametrize

    class Neg(nn.Module):
        def forward(self, t):
            return -2.0 * t

    layer = _layers()[which]
    before = getattr(layer, name).detach().clone()
    parametrize.register_parametrization(layer, name, Neg())
    x = torch.randn(5, 8)
    out = layer(x)
    _close(out, _expected(layer, x, **{"bias" if name == "bias" else "B": -2.0 * before}))
    out.sum().backward()
    assert getattr(layer.parametrizations, name).original.grad.abs().sum() > 0


@pytest.mark.parametrize("which", range(3), ids=IDS)
def test_factor_as_plain_attribute_or_buffer(which):
    layer = _layers()[which]
    x = torch.randn(5, 8)
    a, b = layer.lora_A.detach() * -2, layer.lora_B.detach() * 3
    del layer.lora_A
    layer.lora_A = a  # not a Parameter: a plain attribute
    del layer.lora_B
    layer.register_buffer("lora_B", b)
    assert "lora_A" not in layer._parameters and "lora_B" not in layer._parameters and layer.has_lora
    _close(layer(x), _expected(layer, x, A=a, B=b))


@pytest.mark.parametrize("which", range(3), ids=IDS)
def test_load_state_dict_assign_then_forward_and_grads(which):
    layer = _layers()[which]
    sd = {k: v * 2 for k, v in layer.state_dict().items()}
    layer.load_state_dict(sd, assign=True)
    x = torch.randn(5, 8)
    out = layer(x)
    _close(out, _expected(layer, x, weight=sd["weight"], bias=sd["bias"], A=sd["lora_A"], B=sd["lora_B"]))
    out.sum().backward()
    assert not layer.weight.requires_grad  # frozen, as loralib's
    assert all(p.grad is not None for p in layer.parameters() if p.requires_grad)
    assert layer.lora_A.grad.abs().sum() > 0


@pytest.mark.xfail(tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 14), strict=False,
                   raises=AssertionError,
                   reason="torch 2.11's dynamo (the GPU machine's; rehearse_torch211.sh) installs no guard on a hook "
                          "added after compiling: the compiled forward does not see it, as before 07db2f1 everywhere; "
                          "2.12 and 2.13 not checked")
@pytest.mark.parametrize("which", [0, 2], ids=["linear", "merged"])
def test_hooks_added_after_compile_on_the_identity_dropout_are_seen(which):
    # (07db2f1 reads the hook dicts in the forward itself, so dynamo guards on them: before it, dynamo's
    # skip_nnmodule_hook_guards left a hook added after compiling unseen. This pins the better behaviour.)
    torch._dynamo.reset()
    layer = _layers()[which]
    x = torch.randn(5, 8)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    _close(compiled(x), _expected(layer, x))
    handle = layer.lora_dropout.register_forward_hook(lambda m, args, out: out * 0.5)
    try:
        _close(compiled(x), _expected(layer, x, lora_in=0.5 * x))
    finally:
        handle.remove()
    _close(compiled(x), _expected(layer, x))
    torch._dynamo.reset()


@requires_sim
@pytest.mark.parametrize("which", range(3), ids=IDS)
def test_simulator_kernels_forward_and_grads_match(which):
    sim = load_sim()
    layer = _layers()[which]
    x = torch.randn(5, 8)
    with ops.use_kernels(sim, "cpu"):
        with torch.no_grad():
            _close(layer(x), _expected(layer, x))  # the fast path: the simulator's linear, called directly
        out = layer(x)
        out.sum().backward()
        with pytest.raises(ValueError, match="8 features"):  # the launcher's refusal worded by the checks
            with torch.no_grad():
                layer(torch.randn(5, 7))
    _close(out, _expected(layer, x))
    assert layer.lora_A.grad.abs().sum() > 0 and layer.bias.grad.abs().sum() > 0 and layer.weight.grad is None


@pytest.mark.parametrize("which", range(3), ids=IDS)
def test_cpu_autocast_bf16(which):
    layer = _layers()[which]
    x = torch.randn(5, 8)
    with torch.autocast("cpu", torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    ref = _expected(layer, x)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 2e-2
    assert ops._autocast_dtype(x) is None
    with torch.autocast("cpu", torch.bfloat16):
        assert ops._autocast_dtype(x) == torch.bfloat16
        assert ops._autocast_dtype(x.to("meta")) is None


def test_no_lora_layers_and_conv_embedding():
    torch.manual_seed(3)
    x = torch.randn(5, 8)
    none_on = lora_ext.MergedLinear(8, 9, r=2, enable_lora=[False, False, False])
    r0 = lora_ext.Linear(8, 6, r=0)
    assert not none_on.has_lora and not r0.has_lora
    torch.testing.assert_close(none_on(x), nn.functional.linear(x, none_on.weight, none_on.bias))
    torch.testing.assert_close(r0(x), nn.functional.linear(x, r0.weight, r0.bias))
    conv = lora_ext.Conv2d(3, 4, 3, r=2, lora_alpha=2, padding=1)
    emb = lora_ext.Embedding(10, 6, r=2, lora_alpha=2)
    nn.init.normal_(conv.lora_B)
    nn.init.normal_(emb.lora_A)
    xi, ids = torch.randn(2, 3, 5, 5), torch.tensor([[1, 2, 3]])
    o1, o2 = conv(xi), emb(ids)
    (o1.sum() + o2.sum()).backward()
    assert conv.lora_A.grad.abs().sum() > 0 and emb.lora_B.grad.abs().sum() > 0
    conv.eval()
    emb.eval()
    torch.testing.assert_close(conv(xi), o1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb(ids), o2, atol=1e-5, rtol=1e-5)


def test_finite_real_inputs():
    import numpy as np

    class F(float):
        pass

    assert ops.finite_real("s", 0.5) == 0.5 and type(ops.finite_real("s", F(0.5))) is float
    assert ops.finite_real("s", np.float64(0.25)) == 0.25 and ops.finite_real("s", torch.tensor(2.0)) == 2.0
    for bad in (math.inf, -math.inf, math.nan, F(math.nan), True, "1.0"):
        with pytest.raises(ValueError, match="s must be a finite number"):
            ops.finite_real("s", bad)
    with pytest.raises(ValueError, match="s must be a number, got a Tensor that requires grad"):
        ops.finite_real("s", torch.tensor(1.0, requires_grad=True))


# ---------------------------------------------------------------------------------------------------------------
# what did not hold, found by this file and fixed since


def test_accelerate_hook_on_the_identity_dropout_is_applied():
    """Found by this file (fixed): 07db2f1 skipped a hook-less nn.Identity dropout, but accelerate's
    add_hook_to_module wraps the instance's forward, not a torch hook: ignored. Now an instance forward counts
    as a hook (layers._hooked)."""
    hooks = pytest.importorskip("accelerate.hooks")

    class Halve(hooks.ModelHook):
        def post_forward(self, module, output):
            return output * 0.5

    layer = _layers()[0]
    x = torch.randn(5, 8)
    hooks.add_hook_to_module(layer.lora_dropout, Halve())
    with torch.no_grad():
        out = layer(x)
    _close(out, _expected(layer, x, lora_in=0.5 * x))


@pytest.mark.parametrize("which", [0, 2], ids=["linear", "merged"])
def test_an_instance_forward_on_the_identity_dropout_is_used(which):
    """Found by this file (fixed): 07db2f1 skipped an nn.Identity dropout whose instance forward was replaced. Now
    called."""
    layer = _layers()[which]
    layer.lora_dropout.forward = lambda t: 3.0 * t
    x = torch.randn(5, 8)
    _close(layer(x), _expected(layer, x, lora_in=3.0 * x))


@pytest.mark.parametrize("which", [0, 2], ids=["linear", "merged"])
def test_a_plain_callable_lora_dropout_is_used(which):
    """Found by this file (fixed): 07db2f1 read self._modules['lora_dropout']: a plain-callable lora_dropout
    (loralib's idiom) was a KeyError. Now called as an attribute."""
    layer = _layers()[which]
    del layer.lora_dropout
    layer.lora_dropout = lambda t: 2.0 * t  # not a Module: an instance attribute, as in loralib
    x = torch.randn(5, 8)
    try:
        out = layer(x)
    except KeyError as e:
        out = e
    assert isinstance(out, torch.Tensor), f"forward raised {out!r}"
    _close(out, _expected(layer, x, lora_in=2.0 * x))


@pytest.mark.parametrize("how", ["parametrize", "weight_norm"])
def test_a_parametrized_weight_is_read_through_its_parametrization(how):
    """Found by this file (fixed): older than 07db2f1: LoRALayer.forward read self._parameters['weight'] before
    anything else: a parametrized or weight-normed weight was a KeyError. Now forwards read it as an attribute
    (merges refuse it: test_a_merge_into_a_parametrized_weight_is_refused)."""
    from torch.nn.utils import parametrize
    layer = _layers()[0]
    x = torch.randn(5, 8)
    w = layer.weight.detach().clone()
    if how == "parametrize":
        class Neg(nn.Module):
            def forward(self, t):
                return -t
        parametrize.register_parametrization(layer, "weight", Neg())
        want = -w
    else:
        torch.nn.utils.parametrizations.weight_norm(layer, "weight")
        want = w
    try:
        out = layer(x)
    except KeyError as e:
        out = e
    assert isinstance(out, torch.Tensor), f"forward raised {out!r}"
    _close(out, _expected(layer, x, weight=want))


@pytest.mark.parametrize("how", ["parametrize", "weight_norm"])
def test_a_merge_into_a_parametrized_weight_is_refused(how):
    """A merge writes the weight parameter in place; a parametrized weight is computed on each read, so a merge would
    write a temporary. Refused before anything is written, naming the layer; the layer stays unmerged (eval() warns
    and goes on: a model's eval() does not stop at the layer, tests/test_parametrized.py)."""
    from torch.nn.utils import parametrize
    layer = _layers()[0]
    x = torch.randn(5, 8)
    if how == "parametrize":
        class Neg(nn.Module):
            def forward(self, t):
                return -t
        parametrize.register_parametrization(layer, "weight", Neg())
    else:
        torch.nn.utils.parametrizations.weight_norm(layer, "weight")
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    unmerged = layer(x).detach()
    with pytest.warns(UserWarning, match=r"unmerged: ParametrizedLinear\(8, 6\): its weight is not a registered"):
        layer.eval()
    assert not layer.merged and not layer.training
    with pytest.raises(ValueError, match=r"Linear\(8, 6\): its weight is not a registered parameter"):
        layer.merge()
    assert not layer.merged
    after = layer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(layer(x).detach(), unmerged)
