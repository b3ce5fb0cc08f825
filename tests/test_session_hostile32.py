"""Found by the thirty-ninth session's hostile helpers and reviews (v1, v2, ...) and the last note's leftovers; each
test failed on the commit before its fix. Numbers are checked against float64 references written here."""
import numpy as np
import pytest
import torch

import lora_ext as lora
from lora_ext import batched


def _two_adapter_layer(seed=7):
    """A Linear(16, 12) in eval holding adapters a (rank 2) and b (rank 4), a active, and the float64 oracle."""
    g = torch.Generator().manual_seed(seed)
    layer = lora.Linear(16, 12, r=2, lora_alpha=4)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(12, 16, generator=g))
    adapters = {"a": (torch.randn(2, 16, generator=g), torch.randn(12, 2, generator=g), 0.5),
                "b": (torch.randn(4, 16, generator=g), torch.randn(12, 4, generator=g), 1.5)}
    for name, (A, B, s) in adapters.items():
        layer.add_adapter(name, A, B, s)
    layer.set_adapter("a")
    W, bias = layer.weight.detach().double().clone(), layer.bias.detach().double().clone()
    layer.eval()

    def oracle(x, name):
        y = x.double() @ W.T + bias
        if name is not None:
            A, B, s = adapters[name]
            y += s * (x.double() @ A.double().T @ B.double().T)
        return y
    return layer, oracle


def _rel(a, b):
    return float((a.double() - b).abs().max() / b.abs().max())


# --- r51's leftover: numpy integers for batch_adapters' expand and rows (refused before) -------------------------

@pytest.mark.parametrize("kind", ["numpy scalar", "numpy array", "tensor scalars"])
def test_batch_adapters_takes_numpy_integers_for_expand_and_rows(kind):
    layer, oracle = _two_adapter_layer()
    rows = {"numpy scalar": [np.int64(1), np.int32(-1), np.int64(0)],
            "numpy array": np.array([1, -1, 0]),
            "tensor scalars": list(torch.tensor([1, -1, 0]))}[kind]
    xx = torch.randn(3 * 2, 16)
    with torch.no_grad(), lora.batch_adapters(layer, ["a", "b"], rows=rows, expand=np.int64(2)):
        yy = layer(xx)
    for j, name in enumerate(["b", "b", None, None, "a", "a"]):
        assert _rel(yy[j], oracle(xx[j], name)) < 1e-6, (j, name)
    assert not batched.ANY_OPEN


@pytest.mark.parametrize("bad", [[1.0, 0], [True, 0], ["1", 0], [torch.tensor(1.0), 0]])
def test_batch_adapters_still_refuses_rows_that_are_not_integers(bad):
    layer, _ = _two_adapter_layer()
    with pytest.raises(TypeError, match="rows must be a 1-D int tensor or a list of ints, got an entry"):
        with lora.batch_adapters(layer, ["a", "b"], rows=bad):
            pass
    assert not batched.ANY_OPEN


# --- u6's leftover: hotswap_adapter's refusal at one layer names the layer's path ------------------------------

def test_hotswap_refusal_at_one_layer_names_its_path_and_changes_nothing(tmp_path):
    from safetensors.torch import load_file, save_file

    from helpers import peft_with_adapters, save_random_peft
    from tiny_models import llama, snapshot, tokens, unchanged
    target = dict(r=4, lora_alpha=4, target_modules=["q_proj", "gate_proj"])
    d = save_random_peft(peft_with_adapters(llama().to(torch.bfloat16), {"default": target}), tmp_path / "d", 4, 0.05)
    h = tmp_path / "h"
    h.mkdir()
    for f in ("adapter_config.json",):
        (h / f).write_bytes((tmp_path / "d" / f).read_bytes())
    tensors = load_file(f"{d}/adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if "layers.1." in k and "gate_proj.lora_B" in k)
    tensors[key] = tensors[key] * 1e3  # its update far above |W|: a lossless merge of it overflows its exceptions
    save_file(tensors, f"{h}/adapter_model.safetensors")
    model = llama().to(torch.bfloat16)
    lora.load_peft_adapter(model, d)
    model.eval()
    ids = tokens()
    before, out = snapshot(model), model(ids).logits
    with pytest.raises(ValueError, match=r"^layer 'model\.layers\.1\.mlp\.gate_proj': .*lossless merge would need"):
        lora.hotswap_adapter(model, h)
    assert unchanged(model, before)
    assert torch.equal(model(ids).logits, out)
