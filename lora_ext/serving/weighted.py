"""A new adapter made from weighted adapters the model holds (peft's add_weighted_adapter): "cat" (exact: the ranks
stacked), "svd" (the weighted update refactored by its SVD, truncated to svd_rank when one is given: peft's default)
and "linear" (peft's weighted sum of the factors, of equal ranks: an approximation, exact for one adapter).

svd without svd_rank keeps the exact update (each layer's rank: the sum of its adapters' ranks, at most what its
shape allows). peft truncates to the largest r of the adapters' configs, which a layer does not hold (rank_pattern
gives layers other ranks): taking the layers' largest rank instead truncated where peft is exact, so the default
here never truncates.

In every layer holding at least one of the adapters (stand-ins of zeros do not count), the new adapter's update is
built from the present adapters' updates s_i B_i A_i weighted by w_i; layers holding none get nothing (a switch to
the new adapter gives them a stand-in, serving their base, as peft's zero factors do). Its scaling is 1: the factors
carry the weights and scalings. peft gives its new adapter lora_alpha = r and keeps the first adapter's use_rslora,
so with use_rslora its cat and svd adapters come out scaled by sqrt(r); here the update is the weighted sum.

Factors are split by the layer's blocks: a MergedLinear's lora_A holds one r-row block per enabled output block
and its lora_B the matching rows, both with the rank along lora_B's columns; a convolution's rank dimension is r
times the kernel size (lora_A's rows, lora_B's columns). cat stacks each block's ranks; svd decomposes each block's
update B_j A_j (best approximation of that block at the new rank, in the Frobenius norm)."""
import math
import numbers
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .. import sharded
from ..layers import LoRALayer, MergedLinear
from ..named_adapters import check_adapter_name, each_or_none
from .saved_modules import wrappers

COMBINATIONS = ("svd", "cat", "linear")


def _blocks(layer: LoRALayer) -> int:
    """How many row blocks lora_A and lora_B are split in (a MergedLinear's enabled blocks; 1 otherwise)."""
    return len(layer.block_ids) if isinstance(layer, MergedLinear) else 1


def _split(layer, A: Tensor, B: Tensor) -> List[Tuple[Tensor, Tensor]]:
    n = _blocks(layer)
    ra, rb = A.shape[0] // n, B.shape[0] // n
    return [(A[j * ra:(j + 1) * ra], B[j * rb:(j + 1) * rb]) for j in range(n)]


def _sides(w: float, s: float) -> Tuple[float, float]:
    """w s split between lora_A's side (with its sign) and lora_B's: sqrt|w s| each, as peft's linear splits it."""
    return math.copysign(math.sqrt(abs(w * s)), w * s), math.sqrt(abs(w * s))


def _cat(layer, parts, weights) -> Tuple[Tensor, Tensor]:
    """parts: [(A, B, scaling)] of the present adapters; each block's ranks stacked, w s split between the sides
    (sign(w s) sqrt|w s| on lora_A's, sqrt|w s| on lora_B's: a large weight does not overflow one side of a 16-bit
    factor); in float64, each factor rounded once."""
    blocks = [_split(layer, A.double(), B.double()) for A, B, _ in parts]
    sides = [_sides(w, s) for (_, _, s), w in zip(parts, weights)]
    A_new, B_new = [], []
    for j in range(len(blocks[0])):
        A_new.append(torch.cat([blocks[i][j][0] * sides[i][0] for i in range(len(parts))]))
        B_new.append(torch.cat([blocks[i][j][1] * sides[i][1] for i in range(len(parts))], dim=1))
    return torch.cat(A_new), torch.cat(B_new)


def _linear(layer, parts, weights, where) -> Tuple[Tensor, Tensor]:
    """peft's "linear": sum of sign(w s) sqrt|w s| A_i and of sqrt|w s| B_i (equal ranks)."""
    shapes = {(tuple(A.shape), tuple(B.shape)) for A, B, _ in parts}
    if len(shapes) > 1:
        ranks = [layer.rank_of(A) for A, _, _ in parts]
        raise ValueError(f"add_weighted_adapter: combination_type 'linear' sums the factors, which needs equal ranks; "
                         f"{where} holds ranks {ranks} (use 'cat' or 'svd')")
    A_new = sum(_sides(w, s)[0] * A.double() for (A, _, s), w in zip(parts, weights))
    B_new = sum(_sides(w, s)[1] * B.double() for (_, B, s), w in zip(parts, weights))
    return A_new, B_new


def _max_rank(layer) -> int:
    """The largest rank this layer's factors can usefully have: each block's rank rows (a convolution's: rank times
    kernel size) at most the block's smaller side."""
    (ra, ka), (rb, _) = layer.factor_shapes(1)
    n = _blocks(layer)
    per_rank = ra // n  # rank rows per rank, per block
    return max(1, min(ka, rb // n) // per_rank)


def _svd(layer, parts, weights, rank: int) -> Tuple[Tensor, Tensor]:
    """Each block's weighted update B_j A_j, truncated to the new rank by its SVD (lora_B = U S, lora_A = Vh)."""
    dtype = torch.float64 if parts[0][0].dtype == torch.float64 else torch.float32  # (peft: the factors' dtype)
    blocks = [_split(layer, A.to(dtype), B.to(dtype)) for A, B, _ in parts]
    (a_shape, b_shape) = layer.factor_shapes(rank)
    n = len(blocks[0])
    q = a_shape[0] // n  # rank rows per block (a convolution's: rank * kernel size)
    A_new, B_new = [], []
    for j in range(n):
        update = sum((w * s) * (blocks[i][j][1] @ blocks[i][j][0])
                     for i, ((_, _, s), w) in enumerate(zip(parts, weights)))
        U, S, Vh = torch.linalg.svd(update, full_matrices=False)
        k = min(q, S.shape[0])
        A_j = update.new_zeros(q, update.shape[1])
        B_j = update.new_zeros(update.shape[0], q)
        A_j[:k] = Vh[:k]
        B_j[:, :k] = U[:, :k] * S[:k]
        A_new.append(A_j)
        B_new.append(B_j)
    A_new, B_new = torch.cat(A_new), torch.cat(B_new)
    assert (tuple(A_new.shape), tuple(B_new.shape)) == (tuple(a_shape), tuple(b_shape))
    return A_new, B_new


def _check_arguments(adapters, weights, adapter_name, combination_type, svd_rank):
    if isinstance(adapters, str) or not isinstance(adapters, Sequence) or not adapters:
        raise TypeError(f"add_weighted_adapter: adapters must be a non-empty list of adapter names, got {adapters!r}")
    if any(not isinstance(a, str) for a in adapters) or len(set(adapters)) != len(adapters):
        raise ValueError(f"add_weighted_adapter: adapters must be distinct adapter names, got {list(adapters)!r}")
    if isinstance(weights, (str, Tensor)) or not isinstance(weights, Sequence) or len(weights) != len(adapters):
        raise ValueError(f"add_weighted_adapter: weights must be a list of {len(adapters)} numbers, one per adapter, "
                         f"got {weights!r}")
    for a, w in zip(adapters, weights):
        if isinstance(w, Tensor) and w.numel() == 1 and not w.is_complex():
            w = w.item()
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ValueError(f"add_weighted_adapter: the weight of adapter {a!r} must be a finite number, got {w!r}")
    check_adapter_name(adapter_name)
    if combination_type not in COMBINATIONS:
        raise ValueError(f"add_weighted_adapter: combination_type must be one of {', '.join(COMBINATIONS)} (peft's "
                         f"ties/dare/magnitude_prune variants are not supported), got {combination_type!r}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"add_weighted_adapter: svd_rank must be a positive int, got {svd_rank!r}")


def plan(model: nn.Module, found, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
         combination_type: str = "svd", svd_rank: Optional[int] = None) -> Dict[LoRALayer, Tuple[Tensor, Tensor]]:
    """{layer: (lora_A, lora_B)} of the new adapter (scaling 1) for the layers `found` ((name, layer) pairs) holding
    any of `adapters`; every check made, nothing changed."""
    _check_arguments(adapters, weights, adapter_name, combination_type, svd_rank)
    weights = [float(w.item() if isinstance(w, Tensor) else w) for w in weights]
    held = {n for _, m in found for n in m.adapter_names if not m.is_stand_in(n)}
    saved = {n for _, w in wrappers(model) for n in w.adapter_names}
    missing = [a for a in adapters if a not in held]
    if missing:
        raise KeyError(f"add_weighted_adapter: no lora_ext layer holds an adapter {missing[0]!r} (the model holds "
                       f"{sorted(held | saved)})")
    if adapter_name in held | saved or any(m.has_adapter(adapter_name) for _, m in found):
        raise ValueError(f"add_weighted_adapter: the model already holds an adapter {adapter_name!r}; delete it first "
                         f"or choose another name")
    for path, w in wrappers(model):
        with_copy = [a for a in adapters if a in w.adapter_names]
        if with_copy:
            raise ValueError(f"add_weighted_adapter: adapter {with_copy[0]!r} saves module {path!r} whole "
                             f"(modules_to_save); a copy of a module cannot be weighted with others")
    if len(adapters) == 1:  # (peft: one adapter is always combined linearly, which is then exact)
        combination_type = "linear"
    present = {}
    for path, m in found:
        names = [a for a in adapters if m.has_adapter(a) and not m.is_stand_in(a)]
        if names:
            if m.__dict__.get("_tp") is not None or sharded.is_dtensor(m.lora_A) or sharded.is_dtensor(m._weight_param()):
                raise ValueError(f"add_weighted_adapter: layer {path!r} is sharded (FSDP2 or tensor parallel); "
                                 f"combine the adapters before sharding the model")
            present[path, m] = names
    out = {}
    for (path, m), names in present.items():
        parts = [m.get_adapter(a) for a in names]
        w = [weights[adapters.index(a)] for a in names]
        parts = [(A.detach(), B.detach(), float(s)) for A, B, s in parts]
        device = parts[0][0].device
        parts = [(A.to(device), B.to(device), s) for A, B, s in parts]
        if combination_type == "cat":
            A_new, B_new = _cat(m, parts, w)
        elif combination_type == "linear":
            A_new, B_new = _linear(m, parts, w, f"layer {path!r}")
        else:  # the exact update's rank without svd_rank (see the module's docstring); never past the shape's
            rank = sum(m.rank_of(A) for A, _, _ in parts) if svd_rank is None else svd_rank
            A_new, B_new = _svd(m, parts, w, min(rank, _max_rank(m)))
        dtype = m.lora_A.dtype
        A_new, B_new = A_new.to(dtype), B_new.to(dtype)
        m.check_adapter(A_new, B_new, 1.0, name=f"add_weighted_adapter: the new adapter {adapter_name!r} at {path!r}")
        out[m] = (A_new, B_new)
    return out


def apply(plan_: Dict[LoRALayer, Tuple[Tensor, Tensor]], adapter_name: str) -> None:
    """Adds the planned adapter to its layers, all or none (Ctrl-C lands after)."""
    def undo(m):
        if m.has_adapter(adapter_name) and m.active_adapter != adapter_name:
            m.delete_adapter(adapter_name)
    each_or_none(list(plan_), lambda m: m.add_adapter(adapter_name, *plan_[m], 1.0), undo)
