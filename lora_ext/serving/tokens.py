"""peft's trainable tokens (a LoRA config's `trainable_token_indices`): an adapter holds new values for a few rows
of an embedding (the rows of tokens added for a chat template, say) and the model serves them in place of the
embedding's own rows while the adapter is active. peft stores them as `<module>.token_adapter.
trainable_tokens_delta` (the rows' values, which replace the rows: not a difference, despite the name).

`TrainableTokens` is a ModulesToSave (serving/saved_modules.py) whose copies are `TokenRows`: one adapter's rows
over the model's own module, which stays the module that computes (`original_module`, never written while
serving). So set_adapter, delete_adapter, disable_adapter, mixed batches (each row its adapter's rows) and the
DDP checks treat them as they treat modules saved whole, and a switch writes nothing.

A module that shares the input embedding's weight (a tied output head) serves the same rows when the model's config
ties the word embeddings: its logits for those tokens are computed from the new rows, as peft's tied token adapter
does (rows of another module, or of a model whose config does not tie, are served by that module alone, as
peft's). Its TokenRows hold the embedding's rows (the same Parameter) and are not saved apart (peft ties them again
on load).

unload(merge=True) writes the active adapter's rows into the weight (peft's merge_and_unload does the same);
merge=False puts the module back as it was. `lora-ext merge` writes the rows into the checkpoint.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops, sharded
from ..layers import LoRALayer
from .injection import parameter_owners, scaled_embedding
from .saved_modules import ModulesToSave, original, wrappers

DELTA_SUFFIX = ".token_adapter.trainable_tokens_delta"  # peft's key of a module's rows in an adapter file


def _is_head(module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _rows_of(module) -> Tuple[int, int]:
    """(rows, row length) of the weight whose rows an adapter's tokens replace: an embedding's (num_embeddings,
    embedding_dim), an output head's (out_features, in_features)."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return module.out_features, module.in_features


class TokenRows(nn.Module):
    """One adapter's rows of the model's `module` (an embedding, or an output head): `trainable_tokens_delta`, the
    rows' values (len(indices) x row length, in the weight's dtype), at `token_indices`. Called as the module, it
    gives the module's output with those rows' values in place of the weight's own. `module` is referenced, not
    held (its parameters are the wrapper's original module's)."""

    def __init__(self, module: nn.Module, indices: Sequence[int], values, tied: bool = False):
        super().__init__()
        self.__dict__["_module"] = module
        # an embedding whose lookup is times its embed_scale (Gemma's: _check_module admits no other forward)
        self.__dict__["_scaled"] = isinstance(module, nn.Embedding) and type(module).forward is not nn.Embedding.forward
        self.__dict__["tied"] = tied  # the rows of the embedding whose weight this head shares (saved with it)
        self.trainable_tokens_delta = values if isinstance(values, nn.Parameter) else nn.Parameter(
            values, requires_grad=False)
        device = self.trainable_tokens_delta.device
        # (the lookup sorts these at each call: a load_state_dict that changes them changes what is served)
        self.register_buffer("token_indices", torch.tensor(list(indices), dtype=torch.long, device=device))

    @property
    def indices(self) -> List[int]:
        return self._buffers["token_indices"].tolist()

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        module = self.__dict__["_module"]
        out = module(x, *args, **kwargs)
        values = self._parameters["trainable_tokens_delta"]
        if isinstance(module, nn.Embedding):
            ids = x.long()
            slots, order = torch.sort(self._buffers["token_indices"])
            pos = torch.searchsorted(slots, ids).clamp_(max=slots.numel() - 1)
            hit = slots[pos] == ids
            rows = F.embedding(order[pos], values)
            if module.padding_idx is not None:  # (as F.embedding's padding_idx: that row's value, no gradient)
                rows = torch.where((ids == module.padding_idx % module.num_embeddings).unsqueeze(-1), rows.detach(),
                                   rows)
            if self.__dict__["_scaled"]:  # (read now: .to() gives the module a new buffer)
                scale = module.embed_scale
                rows = rows * (scale.to(rows.dtype) if isinstance(scale, Tensor) else scale)
            return torch.where(hit.unsqueeze(-1), rows.to(out.dtype), out)
        index = self._buffers["token_indices"]
        bias = module.bias
        cols = F.linear(x, values, None if bias is None else bias.index_select(0, index))
        return out.index_copy(-1, index, cols.to(out.dtype))

    @property
    def weight(self) -> Tensor:
        """The module's weight with the rows replaced (a new tensor, as peft's wrapper gives)."""
        w = self.__dict__["_module"].weight
        return w.index_copy(0, self._buffers["token_indices"], self._parameters["trainable_tokens_delta"].to(w.dtype))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "_module" not in self.__dict__:
                raise
        return getattr(self.__dict__["_module"], name)

    def write_into(self, weight: Tensor) -> None:
        """The rows written into `weight` (in place)."""
        with torch.no_grad(), ops.inference_writes(weight):
            weight.index_copy_(0, self._buffers["token_indices"].to(weight.device),
                               self._parameters["trainable_tokens_delta"].to(weight.device, weight.dtype))

    def extra_repr(self) -> str:
        return f"tokens={len(self._buffers['token_indices'])}" + (", tied" if self.__dict__["tied"] else "")


class TrainableTokens(ModulesToSave):
    """An embedding (or an output head) some adapters replace rows of: `original_module` (the model's own) and one
    TokenRows per adapter in `modules_to_save`; forward runs the active adapter's rows, else the original."""

    def _moves_training(self, module: nn.Module) -> bool:
        return super()._moves_training(module) and not module.__dict__["tied"]

    def what(self) -> str:
        return "has rows of tokens (trainable_token_indices)"

    def put_back(self) -> nn.Module:
        """The module unload puts back: the original (unloaded writes the active adapter's rows into it)."""
        return self._modules["original_module"]

    def unloaded(self, merge: bool) -> nn.Module:
        """The module unload puts back: the original, with the active adapter's rows written into its weight when
        `merge` (a tied head's rows are its embedding's, written there)."""
        module = self.put_back()
        served = self.served()
        if merge and served is not module and not served.__dict__["tied"]:
            served.write_into(module.weight)
        return module

    def merge_refusal(self, model: nn.Module, path: str) -> Optional[str]:
        """Why unload(merge=True) cannot write the active adapter's rows into the weight of the module at `path`: a
        module of `model` that shares the weight (tied) is served other rows, or none (a head given rows over the
        weight of an embedding given none), and the merged weight would give it these rows too. peft's
        merge_and_unload writes them anyway; lora_ext refuses, as it refuses a merge into any tied weight."""
        module, served = self._modules["original_module"], self.served()
        if served is module or served.__dict__["tied"]:
            return None
        serving = {id(w._modules["original_module"]): w.served() for _, w in wrappers(model)
                   if isinstance(w, TrainableTokens)}
        for name in parameter_owners(model).get(id(module._parameters.get("weight")), []):
            m = model.get_submodule(name)
            if m is module:
                continue
            rows = serving.get(id(m))
            if isinstance(rows, TokenRows) and rows.indices == served.indices and torch.equal(
                    rows.trainable_tokens_delta, served.trainable_tokens_delta):
                continue  # (served the same rows: the merged weight serves both as now)
            whose = "none of them" if not isinstance(rows, TokenRows) else "other rows"
            return (f"module {path!r} has adapter {self.__dict__['active_adapter']!r}'s rows of tokens, but its weight "
                    f"is tied to {name!r}, which is served {whose}; written into the weight, the rows would "
                    f"reach {name!r} too (peft's merge_and_unload writes them anyway): unload with merge=False, or "
                    f"untie the weights first")
        return None


def check_spec(where: str, spec) -> Optional[Dict[Optional[str], List[int]]]:
    """trainable_token_indices as {module name or None (the input embedding): [indices]}; None when absent.
    ValueError naming `where` for anything peft would not read as token indices."""
    if spec is None or (isinstance(spec, dict) and not spec):  # (peft reads {} as no tokens)
        return None
    if isinstance(spec, (list, tuple)):
        spec = {None: spec}
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"{where}: trainable_token_indices must be a list of token indices or a non-empty dict "
                         f"{{module name: list of token indices}}, got {spec!r}")
    out = {}
    for name, indices in spec.items():
        label = f"{where}: trainable_token_indices" + ("" if name is None else f"[{name!r}]")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"{where}: trainable_token_indices keys must be module names, got {name!r}")
        if not isinstance(indices, (list, tuple)) or not indices or any(
                isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices):
            raise ValueError(f"{label} must be a non-empty list of non-negative token indices, got {indices!r}")
        if len(set(indices)) != len(indices):
            raise ValueError(f"{label} lists token {next(i for i in indices if indices.count(i) > 1)} more than "
                             f"once (peft's rows for it would be whichever write lands last)")
        out[name] = list(indices)
    return out


def input_embedding_name(model: nn.Module) -> Optional[str]:
    """The name of the model's input embedding (get_input_embeddings), or None."""
    try:
        emb = model.get_input_embeddings()
    except Exception:  # (none, or a model's own error: the model has no input embedding to speak of)
        return None
    if isinstance(emb, TrainableTokens):
        emb = emb.original_module
    for name, module in model.named_modules():
        if module is emb or (isinstance(module, TrainableTokens) and module.original_module is emb):
            return name
    return None


def plan(model: nn.Module, spec: Dict[Optional[str], List[int]], tensors: Dict[str, Tensor], prefix: str,
         where: str, cfg_file: str) -> List[Tuple[List[str], nn.Module, TokenRows]]:
    """[(every name of the module, the module or its TrainableTokens, the adapter's TokenRows)] for `spec` (from
    check_spec), taking the rows' tensors out of `tensors` (keys prefix + name + DELTA_SUFFIX); every check made
    (modules, indices in range, shapes, finite values), nothing in the model changed. Modules sharing an embedding
    target's weight (tied heads) get its rows."""
    names = {}  # module -> every name it has (a module shared under several names is served the same at each)
    for n, m in model.named_modules(remove_duplicate=False):
        if n:
            names.setdefault(m, []).append(n)
    inside = [n + "." for m, ns in names.items() if isinstance(m, (LoRALayer, ModulesToSave)) for n in ns]
    targets = []  # (name, module, indices)
    for key, indices in spec.items():
        if key is None:
            key = input_embedding_name(model)
            if key is None:
                raise ValueError(f"{cfg_file}: trainable_token_indices is a list, which names the model's input "
                                 f"embedding, but {type(model).__name__} has none (get_input_embeddings); name the "
                                 f"module ({{'embed_tokens': [...]}})")
            matched = [(key, model.get_submodule(key))]
        else:
            matched = [(n, m) for n, m in model.named_modules(remove_duplicate=False)
                       if n and n.endswith(key) and not any(n.startswith(i) for i in inside)]
            if not matched:
                raise ValueError(f"{cfg_file}: trainable_token_indices names module {key!r}, which the model does not "
                                 f"have (peft matches the end of a module's name)")
        targets += [(n, m, indices) for n, m in matched]
    seen = {}
    for n, m, indices in targets:
        if original(m) in seen:
            other = seen[original(m)][0]
            raise ValueError(f"{cfg_file}: trainable_token_indices chooses module {n!r} twice" if other == n else
                             f"{cfg_file}: trainable_token_indices chooses module {n!r} and {other!r}, which are one "
                             f"module (shared under both names); name it once")
        seen[original(m)] = (n, m, indices)
    out = []
    for n, m, indices in seen.values():
        base = _check_module(n, m, cfg_file)
        key = prefix + n + DELTA_SUFFIX
        rows, length = _rows_of(base)
        label = f"{where}: {key!r}"
        if max(indices) >= rows:
            raise ValueError(f"{cfg_file}: trainable_token_indices for module {n!r} lists token {max(indices)}, but "
                             f"it has {rows} rows")
        t = tensors.pop(key, None)
        if t is None:
            tie = _tied_embedding(base, seen)
            if tie is not None and tie[2] == indices and ties_rows(model, original(tie[1])):
                continue  # a head tied to an embedding target with the same tokens: peft saves its rows once
            raise ValueError(f"{where}: holds no {key!r}, the rows of the tokens trainable_token_indices lists for "
                             f"module {n!r} ({cfg_file})")
        if tuple(t.shape) != (len(indices), length):
            raise ValueError(f"{label} has shape {tuple(t.shape)}; module {n!r} needs ({len(indices)}, {length}) "
                             f"(one row of {length} per listed token)")
        weight = base.weight
        if not t.is_floating_point():
            raise ValueError(f"{label} is {t.dtype}; the rows must be floating point")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{label} holds non-finite values (inf/NaN)")
        t = t.to(weight.device, weight.dtype)
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{label} overflows the weight's dtype {weight.dtype} (values past its range)")
        out.append((names[m], m, TokenRows(base, indices, t)))
    # targets that share the input embedding's tied weight with the same tokens must hold the same rows: peft ties
    # them (one set served by all); otherwise each module's rows are its own (peft ties nothing: BART's and T5's
    # {"embed_tokens": ...}), served so and never merged (merge_refusal)
    by_weight = {}
    for ns, m, rows in out:
        by_weight.setdefault(id(original(m).weight), []).append((ns[0], m, rows))
    for group in by_weight.values():
        if not any(ties_rows(model, original(m)) for _, m, _ in group):
            continue
        first, _, rows = group[0]
        for other, _, more in group[1:]:
            if more.indices == rows.indices and not torch.equal(more.trainable_tokens_delta,
                                                                 rows.trainable_tokens_delta):
                raise ValueError(f"{where}: modules {first!r} and {other!r} share one weight (tied), and the adapter "
                                 f"gives them the same tokens with other rows; peft serves one set through both "
                                 f"(tied): lora_ext refuses it")
    embeddings = {original(m): rows for _, m, rows in out if isinstance(original(m), nn.Embedding)}
    done = {original(m) for _, m, _ in out}
    for emb, rows in embeddings.items():
        if not ties_rows(model, emb):  # (the named module alone serves them; a merge refuses: merge_refusal)
            continue
        for m, ns in names.items():
            if any(n.startswith(i) for n in ns for i in inside) or original(m) in done:
                continue
            if original(m)._parameters.get("weight") is not emb.weight:
                continue
            head = _check_module(ns[0], m, cfg_file, tied_to=emb)
            out.append((ns, m, TokenRows(head, rows.indices, rows.trainable_tokens_delta, tied=True)))
            done.add(head)
    return out


def ties_rows(model: nn.Module, emb: nn.Module) -> bool:
    """Whether the modules sharing embedding `emb`'s weight serve its rows too, as peft ties them: only where `emb`
    is the model's input embedding (get_input_embeddings) and its config ties the word embeddings. Rows listed for
    another module sharing that weight (T5's encoder.embed_tokens beside `shared`), or in a model whose config does
    not tie, are served by that module alone (peft's); lora_ext gave them to every module sharing the weight."""
    name = input_embedding_name(model)
    if name is None or original(model.get_submodule(name)) is not emb:
        return False
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


def _tied_embedding(module, seen):
    return next((v for b, v in seen.items() if isinstance(b, nn.Embedding) and b is not module
                 and getattr(module, "weight", None) is b.weight), None)


def _check_module(name: str, module: nn.Module, cfg_file: str, tied_to=None) -> nn.Module:
    """The model's own module for rows of tokens at `name`, checked: a plain or scaled nn.Embedding, or a plain
    nn.Linear; not a LoRA target, not saved whole, not sharded or on meta."""
    what = (f"module {name!r}, which shares the weight of the embedding whose rows trainable_token_indices lists,"
            if tied_to is not None else f"trainable_token_indices chooses module {name!r}, which")
    if isinstance(module, LoRALayer):
        raise ValueError(f"{cfg_file}: {what} is a lora_ext layer (an adapter's LoRA target); peft does not give a "
                         f"LoRA target trainable tokens")
    if isinstance(module, ModulesToSave) and not isinstance(module, TrainableTokens):
        raise ValueError(f"{cfg_file}: {what} is saved whole by adapter(s) {module.adapter_names} (modules_to_save); "
                         f"peft does not give such a module trainable tokens")
    base = original(module)
    if isinstance(base, nn.Embedding):
        if base.max_norm is not None:
            raise ValueError(f"{cfg_file}: {what} is an Embedding with max_norm={base.max_norm}, which renormalises "
                             f"the rows a lookup reads in place; lora_ext refuses it")
        if type(base).forward is not nn.Embedding.forward and scaled_embedding(base) is None:
            raise ValueError(f"{cfg_file}: {what} is a {type(base).__name__} with a forward of its own, which is not "
                             f"a lookup (times embed_scale); its tokens' rows cannot be put in its output")
    elif not _is_head(base):
        raise ValueError(f"{cfg_file}: {what} is a {type(base).__name__}; tokens' rows are an nn.Embedding's (or a "
                         f"plain nn.Linear output head's)")
    weight = base._parameters.get("weight")
    if weight is None:
        raise ValueError(f"{cfg_file}: {what} has no weight parameter (a parametrization computes it)")
    if weight.is_meta:
        raise ValueError(f"{cfg_file}: {what} is on the meta device; load the model's weights first")
    if sharded.is_dtensor(weight):
        raise ValueError(f"{cfg_file}: {what} is sharded (a DTensor: FSDP2 or tensor parallel); load the adapter "
                         f"before sharding the model")
    return base


def install(model: nn.Module, planned, adapter_name: str, set_submodule) -> None:
    """Puts each planned TokenRows in its module's TrainableTokens (made at every name of the module), as adapter
    `adapter_name` (from plan; cannot fail)."""
    for names, module, rows in planned:
        if not isinstance(module, TrainableTokens):
            wrapper = TrainableTokens(module).train(module.training)
            for n in names:
                set_submodule(model, n, wrapper)
            module = wrapper
        module.add(adapter_name, rows)


def file_copy(t: Tensor) -> Tensor:
    """A copy of t's values for an adapter file (save_peft_adapter: factors, modules saved whole, rows of tokens),
    contiguous on the CPU, that nothing else holds: the file is written after the model's lock is let go, and a
    serving switch on another thread writes the next adapter into the live tensors in place (a CPU tensor's .cpu()
    is the tensor itself). A sharded tensor (FSDP2, tensor parallel) is gathered whole: a collective, every rank
    calls it (save_peft_adapter)."""
    return sharded.full(t.detach()).cpu().clone(memory_format=torch.contiguous_format)


def saved_rows(model: nn.Module, adapter: str, prefix: str, tensors: Dict[str, Tensor], every: List[str]):
    """Puts adapter `adapter`'s rows of tokens into `tensors` under peft's keys; returns the config's
    trainable_token_indices (a list when only the input embedding's rows are saved, else a dict by module name;
    None when it holds none). ValueError where peft's name matching would choose other modules too."""
    from ..utils import plain_name
    held = {}
    for n, m in model.named_modules():
        n = plain_name(n)
        if isinstance(m, TrainableTokens) and adapter in m.adapter_names:
            rows = m.modules_to_save[adapter]
            if not rows.__dict__["tied"]:
                held[n] = rows
    if not held:
        return None
    for n, rows in held.items():
        others = [o for o in every if o != n and o.endswith(n)]
        if others:
            raise ValueError(f"save: adapter {adapter!r} has rows of tokens for module {n!r}, but peft's "
                             f"trainable_token_indices entry {n!r} would also choose {others[:3]} (their names end "
                             f"with it)")
        tensors[prefix + n + DELTA_SUFFIX] = file_copy(rows.trainable_tokens_delta)
    emb = input_embedding_name(model)
    if emb is not None and list(held) == [plain_name(emb)]:
        return next(iter(held.values())).indices
    return {n: rows.indices for n, rows in held.items()}
