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
"""
import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model

import lora_ext as lora
from lora_ext import lossless, ops
from helpers import bits, layer_forward64, load_sim, randomize_
from test_session_hostile11 import LOSSLESS_KINDS, _lossless_layer
from tiny_models import gpt2, randomize_lora, tokens


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
