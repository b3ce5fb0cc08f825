"""Named adapters across a whole model: every lora_ext layer holds the same names; set_adapter switches them
all, each layer in one pass over its weight when merged and atomically with respect to its own forwards."""
from typing import List, Tuple

import torch.nn as nn

from ..layers import LoRALayer
from .injection import check_mergeable


def lora_layers(model: nn.Module) -> List[Tuple[str, LoRALayer]]:
    """(name, layer) for every lora_ext layer of the model that holds an adapter."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALayer) and m.has_lora]


def _layers_or_raise(model):
    found = lora_layers(model)
    if not found:
        raise ValueError("model holds no lora_ext layer with an adapter (inject first)")
    return found


def adapter_names(model: nn.Module) -> List[str]:
    """The adapter names every lora_ext layer of the model holds, active one first."""
    found = _layers_or_raise(model)
    names = found[0][1].adapter_names
    return [n for n in names if all(n in m.adapter_names for _, m in found)]


def active_adapter(model: nn.Module) -> str:
    actives = {m.active_adapter for _, m in _layers_or_raise(model)}
    if len(actives) != 1:
        raise RuntimeError(f"lora_ext layers disagree on the active adapter: {sorted(actives)}")
    return actives.pop()


def set_adapter(model: nn.Module, name: str) -> None:
    """Makes adapter `name` active in every lora_ext layer. All layers are checked (they hold it, its
    values are finite) before the first one changes."""
    found = _layers_or_raise(model)
    for layer_name, m in found:
        if name not in m.adapter_names:
            raise KeyError(f"set_adapter: layer {layer_name!r} holds no adapter {name!r} "
                           f"(it holds {m.adapter_names})")
        if name != m.active_adapter:
            m.check_values(name, label=f"adapter {name!r} at {layer_name!r}")
    for _, m in found:
        m.set_adapter(name)


def delete_adapter(model: nn.Module, name: str) -> None:
    found = _layers_or_raise(model)
    for layer_name, m in found:
        if name == m.active_adapter:
            raise ValueError(f"delete_adapter: {name!r} is active at {layer_name!r}; set another adapter first")
    for _, m in found:
        if m.has_adapter(name):
            m.delete_adapter(name)


def merge_adapter(model: nn.Module) -> None:
    """Merges the active adapter into the weights of every lora_ext layer, whatever the train/eval mode."""
    found = _layers_or_raise(model)
    for name, m in found:
        check_mergeable(name, m)
    for _, m in found:
        m.merge()


def unmerge_adapter(model: nn.Module) -> None:
    """Restores the base weights of every lora_ext layer (forwards then add the adapter on the fly)."""
    for _, m in _layers_or_raise(model):
        m.unmerge()
