"""state_dict() holds the active adapter's factors under loralib's keys (and every adapter's copies of modules
saved whole, under keys that name them). A state taken while adapter a served, loaded into a model serving e that
holds a too, wrote a's factors into e: e then served a mix (1.9 off, switching away and back did not repair it).
The state's metadata says whose factors they are; such a load is refused before the layer writes."""
import io

import pytest
import torch
import torch.nn as nn

import lora_ext as lora


def _model():
    torch.manual_seed(0)
    # (a plain module first: it loads before the layers; a refusal at the first layer came after it had loaded)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    lora.inject(model, ["1", "3"], r=2)
    g = torch.Generator().manual_seed(1)
    for layer in (model[1], model[3]):
        for name, s in (("a", 2.0), ("e", 0.5)):
            a, b = layer.factor_shapes(2)
            layer.add_adapter(name, torch.randn(a, generator=g), torch.randn(b, generator=g), s)
    return model


def _bits(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, \
        {n: [t.clone() for t in model[i].get_adapter(n)[:2]] for i in (1, 3) for n in ("a", "e")}


def _through_disk(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize("how", ["same_model_from_disk", "other_model", "lora_state_dict"])
def test_a_state_of_another_adapter_the_layer_holds_is_refused(how):
    source = _model()
    lora.set_adapter(source, "a")
    state = lora.lora_state_dict(source) if how == "lora_state_dict" else source.state_dict()
    target = source if how == "same_model_from_disk" else _model()
    if how == "same_model_from_disk":
        state = _through_disk(state)
    lora.set_adapter(target, "e")
    before, adapters = _bits(target)
    refusal = r"adapter 'a''s .* serves adapter 'e'.*set_adapter\(model, 'a'\).*nothing was"
    with pytest.raises(RuntimeError, match=refusal):
        target.load_state_dict(state, strict=how != "lora_state_dict")
    after, adapters_after = _bits(target)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(x, y) for n in adapters for x, y in zip(adapters[n], adapters_after[n]))
    lora.set_adapter(target, "a")  # the remedy the message gives
    target.load_state_dict(state, strict=how != "lora_state_dict")
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


def test_a_state_of_the_served_adapter_or_of_one_the_layer_lacks_loads():
    source = _model()
    lora.set_adapter(source, "a")
    state = _through_disk(source.state_dict())
    target = _model()
    lora.set_adapter(target, "a")
    target.load_state_dict(state)  # the same adapter: loads
    fresh = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    lora.inject(fresh, ["1", "3"], r=2)  # serves 'default' only: a state of 'a' loads into it, as loralib's
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh[i].lora_A, source[i].lora_A) and torch.equal(fresh[i].lora_B, source[i].lora_B)
               for i in (1, 3))
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
