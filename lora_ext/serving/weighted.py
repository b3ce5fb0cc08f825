"""A new adapter made from weighted adapters the model holds (peft's add_weighted_adapter): "cat" (exact: the ranks
stacked), "svd" (the weighted update refactored by its SVD, truncated to svd_rank when one is given: peft's default),
"linear" (peft's weighted sum of the factors, of equal ranks: an approximation, exact for one adapter), and peft's
pruning combinations (see _combine): "ties", "dare_linear", "dare_ties", "magnitude_prune" on the factors as
"linear", and their "_svd" forms on each block's updates s_i B_i A_i (pruned as the weight holds them: a transposed
layout is transposed back first, so dare draws the masks peft draws), refactored as "svd" (without svd_rank: the sum
of the layer's ranks; a pruned update has no exact low rank).

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

from .. import ops, sharded
from ..layers import ConvLoRA, LoRALayer, MergedLinear, set_trained_dropout, trained_dropout
from ..named_adapters import check_adapter_name, each_or_none
from .saved_modules import wrappers
from .tokens import TrainableTokens

# peft's combination types. Factor level ("linear" and the pruned ones without _svd) combines lora_A's and lora_B's
# separately (equal ranks); the _svd ones combine each block's updates s_i B_i A_i and refactor the result.
FACTOR_LEVEL = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
UPDATE_LEVEL = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATIONS = ("cat",) + UPDATE_LEVEL + FACTOR_LEVEL
# how each pruned combination sparsifies its tensors (magnitude: the largest density fraction of |values| kept;
# random: each value kept with probability density, then scaled by 1/density, DARE's rescale)
PRUNING = {"ties": "magnitude", "magnitude_prune": "magnitude", "dare_linear": "random", "dare_ties": "random"}
SIGN_ELECTING = ("ties", "dare_ties")  # TIES' sign election and disjoint mean after pruning
SIGN_METHODS = ("total", "frequency")
SVD_DRIVERS = ("gesvd", "gesvdj", "gesvda")


def _base(combination_type: str) -> str:
    """The combination without its _svd suffix: how tensors are combined."""
    return combination_type[:-len("_svd")] if combination_type.endswith("_svd") else combination_type


def _prune(t: Tensor, like: Tensor, density: float, how: str) -> Tensor:
    """t (float64 or float32) sparsified by `how` (see PRUNING); `like` is the tensor as held (random masks are drawn
    on a tensor of its dtype and shape, as peft draws them, so both consume the generator alike)."""
    if density >= 1:
        return t
    if how == "magnitude":
        flat = t.reshape(-1)
        keep = torch.zeros(flat.shape, dtype=torch.bool, device=t.device)
        keep[flat.abs().topk(int(density * flat.numel())).indices] = True
        return t * keep.view(t.shape)
    mask = torch.bernoulli(torch.full_like(like, float(density)))
    return t * mask.to(t.dtype) / float(density)


def _combine(combination: str, tensors: List[Tensor], likes: List[Tensor], weights: List[float], density,
             sign_method: str) -> Tensor:
    """The weighted combination of same-shaped `tensors` by `combination` (without _svd): pruned first if it prunes
    (each tensor on its own), then summed with `weights`, or for ties/dare_ties: each value's sign elected across
    the pruned tensors (the sign of their sum, "total", or the sign most of them have, "frequency"; ties go to +),
    and the weighted values agreeing with it averaged (peft's order: the election sees the unweighted tensors)."""
    how = PRUNING.get(combination)
    if how is not None:
        tensors = [_prune(t, like, density, how) for t, like in zip(tensors, likes)]
    stacked = torch.stack(tensors)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
    if combination not in SIGN_ELECTING:
        return (stacked * w).sum(0)
    signs = stacked.sign()
    votes = stacked.sum(0) if sign_method == "total" else signs.sum(0)
    agree = signs == torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    return (stacked * w * agree).sum(0) / agree.sum(0).clamp(min=1)


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


def _factor_level(layer, parts, weights, where, combination, density, sign_method) -> Tuple[Tensor, Tensor]:
    """peft's factor-level combinations (equal ranks): lora_A's combined with weights sign(w s) sqrt|w s| and
    lora_B's with sqrt|w s| ("linear": summed; the others pruned first, see _combine), block by block (a
    MergedLinear's blocks are pruned each on its own)."""
    shapes = {(tuple(A.shape), tuple(B.shape)) for A, B, _ in parts}
    if len(shapes) > 1:
        ranks = [layer.rank_of(A) for A, _, _ in parts]
        raise ValueError(f"add_weighted_adapter: combination_type {combination!r} combines the factors, which needs "
                         f"equal ranks; {where} holds ranks {ranks} (use 'cat' or an _svd combination)")
    sides = [_sides(w, s) for (_, _, s), w in zip(parts, weights)]
    held = [_split(layer, A, B) for A, B, _ in parts]
    A_new, B_new = [], []
    for j in range(len(held[0])):
        for side, out in ((0, A_new), (1, B_new)):
            likes = [blocks[j][side] for blocks in held]
            out.append(_combine(combination, [t.double() for t in likes], likes, [sd[side] for sd in sides],
                                density, sign_method))
    return torch.cat(A_new), torch.cat(B_new)


def _max_rank(layer) -> int:
    """The largest rank this layer's factors can usefully have: the smallest whose rank rows per block (a
    convolution's: rank times kernel size) reach the block's smaller side (rounded up: a Conv1d(5, 7, 3)'s 21 x 5
    update needs rank 2, 6 rows, to hold its rank 5; rounded down it was cut to rank 1)."""
    (ra, ka), (rb, _) = layer.factor_shapes(1)
    n = _blocks(layer)
    per_rank = ra // n  # rank rows per rank, per block
    return max(1, -(-min(ka, rb // n) // per_rank))


def _quantile(values: Tensor, q: float) -> float:
    """torch.quantile(values, q) (linear interpolation) without its 2^24-element limit."""
    ordered = values.sort().values
    pos = q * (ordered.numel() - 1)
    low = int(pos)
    high = min(low + 1, ordered.numel() - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (pos - low))


def _overflow(where: str, dtype) -> ValueError:
    return ValueError(f"add_weighted_adapter: the weighted update of {where} is not finite in {dtype} (weights times "
                      f"updates overflow); use smaller weights")


def _svd(layer, parts, weights, rank: int, where: str, combination="svd", density=None, sign_method="total",
         clamp=None, driver=None, exact_rank=False) -> Tuple[Tensor, Tensor]:
    """Each block's weighted update (sum_i w_i s_i B_i A_j; the _svd combinations prune and combine the updates
    s_i B_i A_i, see _combine), truncated to the new rank by its SVD (lora_B = U S, lora_A = Vh); with `clamp`,
    both clamped to the clamp quantile of their values' distribution, as peft's svd_clamp (`exact_rank`, no svd_rank
    given: over the directions above the rounding noise, the rows past them zeros)."""
    dtype = torch.float64 if parts[0][0].dtype == torch.float64 else torch.float32  # (peft: the factors' dtype)
    held = dtype  # (the dare masks are drawn in it, as peft draws them, whatever dtype the update is computed in)
    if exact_rank and clamp is not None:  # (the cut below in float64: float32's rounding of terms that cancel,
        dtype = torch.float64  # weighed against the terms' size, cut a whole real adapter beside them, r11)
    blocks = [_split(layer, A.to(dtype), B.to(dtype)) for A, B, _ in parts]
    (a_shape, b_shape) = layer.factor_shapes(rank)
    n = len(blocks[0])
    q = a_shape[0] // n  # rank rows per block (a convolution's rank rows: rank * kernel size)
    transposed = layer._layout().get("transposed", False)  # pruned as the weight holds it (peft's delta weight)
    A_new, B_new = [], []
    for j in range(n):
        if combination == "svd":
            update = sum((w * s) * (blocks[i][j][1] @ blocks[i][j][0])
                         for i, ((_, _, s), w) in enumerate(zip(parts, weights)))
        else:
            updates = [s * (blocks[i][j][1] @ blocks[i][j][0]) for i, (_, _, s) in enumerate(parts)]
            updates = [u.t().contiguous() for u in updates] if transposed else updates
            # (W1: with svd_clamp and no svd_rank the updates are float64, and masks drawn on them took other random
            # values than peft's, and than the same combination's with svd_rank, under one seed)
            likes = [u if u.dtype == held else torch.empty_like(u, dtype=held) for u in updates]
            update = _combine(_base(combination), updates, likes, weights, density, sign_method)
            update = update.t() if transposed else update
        if not bool(torch.isfinite(update).all()):
            raise _overflow(where, update.dtype)
        U, S, Vh = torch.linalg.svd(update, full_matrices=False, driver=driver)
        # an update of zeros gets factors of zeros (its SVD's unit vectors would make svd_clamp's quantile 0);
        # otherwise every direction up to the rank, as peft keeps them (a rank past the update's weighs
        # directions of singular values near 0 in svd_clamp's quantile, there as here)
        k = min(q, S.shape[0]) if S.numel() and float(S[0]) > 0 else 0
        if k and exact_rank and clamp is not None:  # no svd_rank: without directions of rounding noise, whose
            # arbitrary unit vectors weighed in svd_clamp's quantile (the same adapter twice, or a weight of 0: clamped
            # by an amount the noise chose, 0.284 off peft, and 1 ulp of a weight moved it by 0.0165, h8); a floor of
            # the noise's size (4 sqrt(n) eps S0: n eps S0 dropped real directions, 2.4e-5 of an 8e-3 update, r9),
            # and only where the clamp would weigh them (unclamped, they add nothing but their rounding)
            size = float(S[0])
            if combination == "svd":  # (the terms' size: a near-cancelling sum keeps their rounding, r10; in float64
                # that rounding is 1e-16 of them, below any direction float32 factors can hold beside them)
                size = max(size, sum(abs(w * s) * float(torch.linalg.matrix_norm(blocks[i][j][1], 2))
                                     * float(torch.linalg.matrix_norm(blocks[i][j][0], 2))
                                     for i, ((_, _, s), w) in enumerate(zip(parts, weights))))
            floor = size * 4 * math.sqrt(max(update.shape)) * torch.finfo(S.dtype).eps
            k = min(k, int((S > floor).sum()))
        B_k, A_k = U[:, :k] * S[:k], Vh[:k]
        if not (bool(torch.isfinite(B_k).all()) and bool(torch.isfinite(A_k).all())):
            raise _overflow(where, update.dtype)
        if clamp is not None and k:
            high = _quantile(torch.cat([B_k.reshape(-1), A_k.reshape(-1)]), clamp)
            if not high > 0:
                raise ValueError(f"add_weighted_adapter: svd_clamp={clamp} bounds the factors of {where} by "
                                 f"{high:g}, which is not positive (clamping to it would zero or flip every value); "
                                 f"its quantile must reach the factors' positive values: use a higher svd_clamp")
            B_k, A_k = B_k.clamp(-high, high), A_k.clamp(-high, high)
        A_j = update.new_zeros(q, update.shape[1])
        B_j = update.new_zeros(update.shape[0], q)
        A_j[:k] = A_k
        B_j[:, :k] = B_k
        A_new.append(A_j)
        B_new.append(B_j)
    A_new, B_new = torch.cat(A_new), torch.cat(B_new)
    assert (tuple(A_new.shape), tuple(B_new.shape)) == (tuple(a_shape), tuple(b_shape))
    return A_new, B_new


def _check_arguments(adapters, weights, adapter_name, combination_type, svd_rank, density, majority_sign_method,
                     svd_clamp, svd_full_matrices, svd_driver):
    """Checks every argument; returns (weights as floats, density as given or a tensor's number, svd_rank as an int
    or None)."""
    if isinstance(adapters, str) or not isinstance(adapters, Sequence) or not adapters:
        raise TypeError(f"add_weighted_adapter: adapters must be a non-empty list of adapter names, got {adapters!r}")
    if any(not isinstance(a, str) for a in adapters) or len(set(adapters)) != len(adapters):
        raise ValueError(f"add_weighted_adapter: adapters must be distinct adapter names, got {list(adapters)!r}")
    if isinstance(weights, Tensor) or type(weights).__module__ == "numpy":  # a 1-D array of the weights
        weights = list(weights.tolist()) if getattr(weights, "ndim", 1) == 1 else weights
    if isinstance(weights, (str, Tensor)) or not isinstance(weights, Sequence) or len(weights) != len(adapters):
        raise ValueError(f"add_weighted_adapter: weights must be a list of {len(adapters)} numbers, one per adapter, "
                         f"got {weights!r}")
    as_floats = []
    for a, w in zip(adapters, weights):
        if isinstance(w, Tensor) and w.numel() == 1 and not w.is_complex():
            w = w.item()
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ValueError(f"add_weighted_adapter: the weight of adapter {a!r} must be a finite number, got {w!r}")
        as_floats.append(float(w))
    check_adapter_name(adapter_name)
    if combination_type not in COMBINATIONS:
        raise ValueError(f"add_weighted_adapter: combination_type must be one of {', '.join(COMBINATIONS)}, "
                         f"got {combination_type!r}")
    base = _base(combination_type)
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, numbers.Integral)
                                 or svd_rank < 1):
        raise ValueError(f"add_weighted_adapter: svd_rank must be a positive int, got {svd_rank!r}")
    if isinstance(density, Tensor) and density.numel() == 1 and density.is_floating_point():
        density = density.item()
    if base in PRUNING:
        if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0 < density <= 1:
            raise ValueError(f"add_weighted_adapter: combination_type {combination_type!r} prunes; density (the "
                             f"fraction of values kept) must be a number in (0, 1], got {density!r}")
    elif density is not None:
        raise ValueError(f"add_weighted_adapter: density={density!r} is for the pruning combinations (ties, dare, "
                         f"magnitude_prune and their _svd forms); combination_type {combination_type!r} does not prune")
    if majority_sign_method is not None:
        if majority_sign_method not in SIGN_METHODS:
            raise ValueError(f"add_weighted_adapter: majority_sign_method must be 'total' or 'frequency', got "
                             f"{majority_sign_method!r}")
        if base not in SIGN_ELECTING and majority_sign_method != "total":  # ("total", peft's default, changes nothing)
            raise ValueError(f"add_weighted_adapter: majority_sign_method={majority_sign_method!r} is for the "
                             f"combinations that elect signs (ties, dare_ties and their _svd forms), not "
                             f"{combination_type!r}")
    svd_args = {"svd_rank": svd_rank, "svd_clamp": svd_clamp, "svd_driver": svd_driver}
    given = [k for k, v in svd_args.items() if v is not None]
    if given and combination_type not in UPDATE_LEVEL:
        raise ValueError(f"add_weighted_adapter: {given[0]} is for the svd combinations ({', '.join(UPDATE_LEVEL)}); "
                         f"combination_type {combination_type!r} does not refactor by an SVD")
    if svd_clamp is not None and (isinstance(svd_clamp, bool) or not isinstance(svd_clamp, numbers.Real)
                                  or not 0 < svd_clamp <= 1):
        raise ValueError(f"add_weighted_adapter: svd_clamp is a quantile and must be a number in (0, 1], got "
                         f"{svd_clamp!r}")
    if not isinstance(svd_full_matrices, bool):
        raise ValueError(f"add_weighted_adapter: svd_full_matrices must be True or False, got {svd_full_matrices!r}")
    if svd_driver is not None and svd_driver not in SVD_DRIVERS:
        raise ValueError(f"add_weighted_adapter: svd_driver must be None or one of {', '.join(SVD_DRIVERS)} (cuSOLVER's "
                         f"methods), got {svd_driver!r}")
    # (density as given: peft computes a magnitude pruning's count in its own type, a float32's too)
    return as_floats, density, None if svd_rank is None else int(svd_rank)


def plan(model: nn.Module, found, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
         combination_type: str = "svd", svd_rank: Optional[int] = None, density: Optional[float] = None,
         majority_sign_method: Optional[str] = None, svd_clamp: Optional[float] = None,
         svd_full_matrices: bool = True, svd_driver: Optional[str] = None) -> Dict[LoRALayer, Tuple[Tensor, Tensor]]:
    """{layer: (lora_A, lora_B)} of the new adapter (scaling 1) for the layers `found` ((name, layer) pairs) holding
    any of `adapters`; every check made, nothing changed. Layers are combined in `found`'s order and each layer's
    adapters in `adapters`' order (the dare combinations draw their masks from torch's generator in that order)."""
    weights, density, svd_rank = _check_arguments(adapters, weights, adapter_name, combination_type, svd_rank, density,
                                                  majority_sign_method, svd_clamp, svd_full_matrices, svd_driver)
    sign_method = majority_sign_method or "total"
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
        if with_copy and isinstance(w, TrainableTokens):
            raise ValueError(f"add_weighted_adapter: adapter {with_copy[0]!r} replaces rows of tokens of module "
                             f"{path!r} (trainable_token_indices); rows of tokens cannot be weighted with others")
        if with_copy:
            raise ValueError(f"add_weighted_adapter: adapter {with_copy[0]!r} saves module {path!r} whole "
                             f"(modules_to_save); a copy of a module cannot be weighted with others")
    if len(adapters) == 1 and combination_type != "cat":
        # peft combines one adapter linearly (a scaled copy, exact), dropping what was asked; here a pruning
        # request is refused and an svd truncation (svd_rank or svd_clamp given) is made
        if _base(combination_type) in PRUNING:
            raise ValueError(f"add_weighted_adapter: combination_type {combination_type!r} combines two adapters or "
                             f"more (peft combines one adapter linearly, without pruning); pass two or more, or "
                             f"'linear' for a scaled copy")
        if combination_type != "svd" or (svd_rank is None and svd_clamp is None):
            combination_type = "linear"
    present = {}
    for path, m in found:
        with m._lock:  # (see below)
            names = [a for a in adapters if m.has_adapter(a) and not m.is_stand_in(a)]
        if names:
            if (m.__dict__.get("_tp") is not None or sharded.is_dtensor(m.lora_A)
                    or sharded.is_dtensor(m._weight_or_none())):
                raise ValueError(f"add_weighted_adapter: layer {path!r} is sharded (FSDP2 or tensor parallel); "
                                 f"combine the adapters before sharding the model")
            present[path, m] = names
    out = {}
    for (path, m), names in present.items():
        # copies taken under the layer's lock: a switch of the layer alone on another thread (layer.set_adapter, which
        # takes no model lock) rewrites its live factors, in place when they serve (h38: 'w' came out of one adapter
        # twice in 227 of 1000 combinations racing layer switches)
        with m._lock:
            parts = [(A.detach().clone(), B.detach().clone(), float(s)) for A, B, s in
                     (m.get_adapter(a) for a in names)]
        w = [weights[adapters.index(a)] for a in names]
        device = parts[0][0].device
        parts = [(A.to(device), B.to(device), s) for A, B, s in parts]
        where = f"layer {path!r}"
        if device.type == "meta":
            raise ValueError(f"add_weighted_adapter: the factors of {where} are on the meta device (no values to "
                             f"combine); load the model's weights first")
        for a, (A, B, s) in zip(names, parts):
            ops.check_finite(f"add_weighted_adapter: {where}, adapter {a!r}", A, B, s)
        if m.reserved_rank is not None:  # combined at their own ranks (pruning counts values), the result padded
            parts = [(*(t.to(device) for t in m.own_factors(a)), s) for a, (_, _, s) in zip(names, parts)]
            where += f" (held at the rank {m.reserved_rank} reserve_rank fixed; the ranks are the adapters' own)"
        if svd_driver is not None and device.type != "cuda":
            raise ValueError(f"add_weighted_adapter: svd_driver={svd_driver!r} picks a cuSOLVER method; the factors "
                             f"of {where} are on {device}, where torch has one SVD (pass no svd_driver)")
        if combination_type in PRUNING and isinstance(m, ConvLoRA):
            # (loralib's layout holds a peft conv adapter's lora_B as B (x) I_k: pruning its values there is not
            # pruning peft's B, and random masks break the structure)
            raise ValueError(f"add_weighted_adapter: combination_type {combination_type!r} prunes the factors, but "
                             f"{where} is a convolution, whose factors lora_ext holds in loralib's layout (not "
                             f"peft's): use {combination_type + '_svd'!r}, which prunes the update as peft does")
        if combination_type == "cat":
            A_new, B_new = _cat(m, parts, w)
        elif combination_type in FACTOR_LEVEL:
            A_new, B_new = _factor_level(m, parts, w, where, combination_type, density, sign_method)
        else:  # the exact update's rank without svd_rank (see the module's docstring); never past the shape's
            rank = sum(m.rank_of(A) for A, _, _ in parts) if svd_rank is None else svd_rank
            A_new, B_new = _svd(m, parts, w, min(rank, _max_rank(m)), where, combination_type, density, sign_method,
                                None if svd_clamp is None else float(svd_clamp), svd_driver, svd_rank is None)
        dtype = m.lora_A.dtype
        A_new, B_new = A_new.to(dtype), B_new.to(dtype)
        if m.reserved_rank is not None and m.rank_of(A_new) > m.reserved_rank:
            raise ValueError(f"add_weighted_adapter: the new adapter {adapter_name!r} at {path!r} has rank "
                             f"{m.rank_of(A_new)}, over the rank {m.reserved_rank} that reserve_rank fixed for the "
                             f"model's layers: "
                             + (f"svd_rank={m.reserved_rank} keeps it within (or reserve a rank of at least "
                                f"{m.rank_of(A_new)} first, then capture again)" if combination_type.endswith("svd")
                                else f"an svd combination with svd_rank={m.reserved_rank} fits it, or reserve a rank "
                                     f"of at least {m.rank_of(A_new)} first (then capture again)"))
        m.check_adapter(A_new, B_new, 1.0, name=f"add_weighted_adapter: the new adapter {adapter_name!r} at {path!r}")
        out[m] = (A_new, B_new)
    return out


def apply(plan_: Dict[LoRALayer, Tuple[Tensor, Tensor]], adapter_name: str, first: str) -> None:
    """Adds the planned adapter to its layers, all or none (Ctrl-C lands after), with the lora_dropout of the first
    adapter combined (peft's new config is a copy of that adapter's)."""
    # the first adapter's own: read where it is not a stand-in (every layer of the new adapter takes it, as peft's
    # copied config does, also those the first adapter does not target; an Embedding's 0.0 is no config's)
    own = [trained_dropout(m, first) for m in plan_ if m.has_adapter(first) and not m.is_placeholder(first)]
    p = next((q for q in own if q is not None), None)

    def add(m):
        m.add_adapter(adapter_name, *plan_[m], 1.0)
        if p is not None and m.adapter_dropout(adapter_name) is not None:
            set_trained_dropout(m, adapter_name, p)

    def undo(m):
        if m.has_adapter(adapter_name) and m.active_adapter != adapter_name:
            m.delete_adapter(adapter_name)
    each_or_none(list(plan_), add, undo)
