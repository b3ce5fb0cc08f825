"""Tensor parallelism for lora_ext layers: styles for torch's parallelize_module.

    from torch.distributed.tensor.parallel import parallelize_module
    parallelize_module(model, mesh, {"attn.c_attn": ColwiseLoRA(), "attn.c_proj": RowwiseLoRA(), ...})

- ColwiseLoRA (Linear, MergedLinear, Embedding): the weight is sharded along its output features (as torch's
  ColwiseParallel shards it), the factors and the bias are replicated; the input is the whole activation and
  the output this rank's slice of the output features (a local tensor, as ColwiseParallel's default);
- RowwiseLoRA (Linear, MergedLinear): the weight is sharded along its input features; the input is this
  rank's slice of the features (a ColwiseLoRA's output) or the whole activation (sliced here), and the output
  is whole: one all-reduce of the base output and one of the r-wide LoRA activation.

Every rank holds the whole (small) factors, so a merge, an unmerge or a switch is local: each rank updates its
shard of the weight with the matching rows or columns of the factors (lora_ext/sharded.py), with no
communication. The forward computes on the local shards with explicit collectives (Megatron's pattern: the
input copied into the parallel region with its gradient all-reduced, partial outputs all-reduced with the
gradient passed through), and the factors' gradients are partial sums that torch.distributed.tensor reduces when
the optimizer applies them.

Fused layers whose consumer splits the output into blocks (GPT-2's c_attn: q, k, v) take
`ColwiseLoRA(blocks=3)`: each block is sharded by rows, so each rank holds its rows of every block (its heads of
q, k and v; a `_StridedShard` placement); merges write the local shard with the matching rows of lora_B. torch
2.11's DTensor.full_tensor() cannot gather that placement (2.14's can): lora_ext.sharded.full gathers it on both.
`gpt2_plan(model, mesh)` and `llama_plan(model, mesh)` give whole plans for transformers' GPT-2 and Llama
(attention heads and MLPs), with the attention modules' head counts fixed up when the plan is applied.

torch's stock ColwiseParallel / RowwiseParallel (and distribute_module) on a lora_ext layer are refused when they
are applied, with a message naming these styles (once this module is imported); a DTensor weight that reaches a
forward some other way is refused there.
"""
import contextlib
import sys
import warnings
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from . import ops, reference, sharded
from .layers import Embedding, Linear, LoRALayer, MergedLinear


class Spec(NamedTuple):
    style: str      # "colwise" or "rowwise"
    mesh: object    # the 1-D device mesh (a deepcopy of the layer shares it)
    lo: int         # the features this rank holds: output ones (colwise), input ones (rowwise); with blocks > 1,
    hi: int         # the rows lo:hi of each of the `blocks` equal chunks of the output features
    blocks: int = 1

    @property
    def group(self):
        return self.mesh.get_group()


class _CopyToParallel(torch.autograd.Function):
    """Identity forward; the input's gradient summed over the ranks (each computed part of it)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SliceOfWhole(torch.autograd.Function):
    """This rank's features lo:hi of a whole (replicated) input; the gradient of the whole input assembled from
    every rank's slice (an all-reduce of the zero-padded slices)."""

    @staticmethod
    def forward(ctx, x, lo, hi, group):
        ctx.lo, ctx.hi, ctx.width, ctx.group = lo, hi, x.shape[-1], group
        return x[..., lo:hi]

    @staticmethod
    def backward(ctx, grad):
        whole = grad.new_zeros(*grad.shape[:-1], ctx.width)
        whole[..., ctx.lo:ctx.hi] = grad
        dist.all_reduce(whole, group=ctx.group)
        return whole, None, None, None


class _ReduceFromParallel(torch.autograd.Function):
    """The partial outputs summed over the ranks; the gradient passed through (it is the same on every rank)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _feature_dims(layer):
    """(storage dim of the output features, storage dim of the input features)."""
    if isinstance(layer, Embedding):
        return 1, 0
    return (1, 0) if layer.fan_in_fan_out else (0, 1)


class _LoRAStyle(ParallelStyle):
    style = ""

    def __init__(self, blocks: int = 1):
        super().__init__()
        if not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"{type(self).__name__}: blocks is a positive int, got {blocks!r}")
        if blocks > 1 and self.style != "colwise":
            raise ValueError(f"{type(self).__name__}: blocks is for column-parallel fused layers (ColwiseLoRA)")
        self.blocks = blocks

    def _check(self, module: nn.Module, device_mesh) -> None:
        """Every refusal, before anything changes."""
        kinds = (Linear, MergedLinear, Embedding) if self.style == "colwise" else (Linear, MergedLinear)
        if not isinstance(module, kinds):
            raise ValueError(f"{type(self).__name__} takes lora_ext {', '.join(k.__name__ for k in kinds)} layers, "
                             f"got {type(module).__name__}")
        if device_mesh.ndim != 1:
            raise ValueError(f"{type(self).__name__}: a 1-D device mesh, got {device_mesh.ndim}-D")
        spec = module.__dict__.get("_tp")
        if spec is not None and (spec.style, spec.blocks, spec.mesh) != (self.style, self.blocks, device_mesh):
            # the weight keeps its first sharding (place() skips DTensors): the new spec would cut the wrong features
            raise ValueError(f"{type(self).__name__}(blocks={self.blocks}): {module._describe()} is parallelized "
                             f"already ({spec.style}, blocks={spec.blocks}, on {spec.mesh}); a plan applies once "
                             f"(the same style again changes nothing)")
        if spec is None:
            held = [n for n in ("weight", "bias", "lora_A", "lora_B")
                    if isinstance(module._parameters.get(n), DTensor)]
            if held:
                raise ValueError(f"{type(self).__name__}: {module._describe()}'s {', '.join(held)} are DTensors "
                                 f"already (fully_shard, distribute_module); tensor parallel takes a layer with plain "
                                 f"parameters (parallelize_module before fully_shard, on a 1-D mesh)")
        if isinstance(module, Embedding) and module.max_norm is not None:
            raise ValueError(f"{type(self).__name__}: {module._describe()} has max_norm={module.max_norm}: each rank "
                             f"would renormalise its slice of the embedding by that slice's norm; not supported")
        if module.merged and module._merged_A is not None:
            raise ValueError(f"{type(self).__name__}: {module._describe()} is merged; unmerge it (train()) "
                             f"before parallelize_module")
        if self.blocks > 1:
            if isinstance(module, Embedding):
                raise ValueError(f"{type(self).__name__}(blocks={self.blocks}) takes Linear / MergedLinear layers, "
                                 f"got {module._describe()}")
            if type(module) not in _STRIDED:
                raise ValueError(f"{type(self).__name__}(blocks={self.blocks}) takes lora_ext Linear / MergedLinear "
                                 f"layers, got {type(module).__name__}")
            n, out = device_mesh.size(), module.out_features
            nb = len(module.enable_lora) if isinstance(module, MergedLinear) else 1
            if self.blocks % nb or out % (self.blocks * n):
                raise ValueError(f"{type(self).__name__}(blocks={self.blocks}): {module._describe()} has {out} output "
                                 f"features in {nb} LoRA block(s); each of {self.blocks} chunks must split evenly over "
                                 f"{n} ranks and the chunks must tile the LoRA blocks")

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        with module._lock:
            self._check(module, device_mesh)
            out_dim, in_dim = _feature_dims(module)
            dim = out_dim if self.style == "colwise" else in_dim

            def place(name, placements):
                p = module._parameters.get(name)
                if p is not None and not isinstance(p, DTensor):
                    module._parameters[name] = nn.Parameter(distribute_tensor(p.detach(), device_mesh, placements),
                                                            requires_grad=p.requires_grad)

            if self.blocks > 1:
                from torch.distributed.tensor.placement_types import _StridedShard
                place("weight", [_StridedShard(dim, split_factor=self.blocks)])
            else:
                place("weight", [Shard(dim)])
            for name in ("bias", "lora_A", "lora_B"):
                place(name, [Replicate()])
            if self.blocks > 1:
                chunk = module.out_features // self.blocks
                per = chunk // device_mesh.size()
                rank = device_mesh.get_local_rank()
                module.__dict__["_tp"] = Spec(self.style, device_mesh, rank * per, (rank + 1) * per, self.blocks)
                module.__class__ = _STRIDED[type(module)]
                module._note_written()  # a loader writing the shard in place is seen (_load_from_state_dict)
                return module
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
            w = module.weight
            shape, offset = compute_local_shape_and_global_offset(w.shape, device_mesh, w.placements)
            module.__dict__["_tp"] = Spec(self.style, device_mesh, offset[dim], offset[dim] + shape[dim])
        return module


class ColwiseLoRA(_LoRAStyle):
    """Column-parallel lora_ext Linear / MergedLinear / Embedding (see the module's docstring). blocks=k: the output
    features are k equal chunks (a fused qkv: 3), each sharded over the ranks."""
    style = "colwise"


class RowwiseLoRA(_LoRAStyle):
    """Row-parallel lora_ext Linear / MergedLinear (see the module's docstring)."""
    style = "rowwise"

    def __init__(self):
        super().__init__()


# -------------------------------------------------------------------------------------------------------------
# fused layers sharded by blocks (ColwiseLoRA(blocks=k)): each rank holds rows lo:hi of each of the k chunks


def _strided_rows(layer, spec):
    """(the layout of the local shard's 2-D matrix for lora_ext.ops, [(j, rows of lora_B)] for each enabled
    block j, [(block id, local rows in that block)]): the local shard is itself a fused weight with the layer's
    blocks, each holding its chunks' rows lo:hi."""
    nb = len(layer.enable_lora) if isinstance(layer, MergedLinear) else 1
    ids = list(layer._block_ids) if isinstance(layer, MergedLinear) else [0]
    per_block = layer.out_features // nb
    m = spec.blocks // nb              # chunks per LoRA block
    c = layer.out_features // spec.blocks
    rows = [torch.cat([torch.arange(j * per_block + t * c + spec.lo, j * per_block + t * c + spec.hi)
                       for t in range(m)]) for j in range(len(ids))]
    layout = dict(num_blocks=nb, block_ids=ids, transposed=layer.fan_in_fan_out)
    return layout, list(enumerate(rows)), ids, nb, m * (spec.hi - spec.lo)


def _local_B(layer, B):
    rows = _strided_rows(layer, layer.__dict__["_tp"])[1]
    B = sharded.full(B)
    return torch.cat([B.index_select(0, r.to(B.device)) for _, r in rows]) if rows else B[:0]


@contextlib.contextmanager
def _one_record():
    """sharded's part functions put a list of records (one per part) on their errors; a strided layer has one part
    and keeps one record."""
    try:
        yield
    except BaseException as err:
        if isinstance(getattr(err, "record", None), list):
            err.record = err.record[0]
        raise


class _StridedMerges:
    """Merges, unmerges and switches of a layer sharded by ColwiseLoRA(blocks=k): one ops call on the local shard
    with the matching rows of lora_B, no communication but the agreement on a lossless refusal (as
    lora_ext.sharded's)."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self._written_in_place(state_dict, prefix, aliases=True):
            # torch.distributed.checkpoint writes a _StridedShard as one contiguous chunk, so this rank's shard holds
            # other rows: set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True) copies each rank's
            # slice of rank 0's tensors into the live parameters, and dcp.load into get_model_state_dict's tensors
            # (or model.state_dict()'s) reads a checkpoint into the live shard, before the load reaches the layer.
            # The shard is written already: the layer refuses to serve it until a load brings the weight again.
            spec = self.__dict__["_tp"]
            why = (f"ColwiseLoRA(blocks={spec.blocks}) {self._describe()} at {prefix!r}: a loader wrote its weight "
                   f"shard in place (torch.distributed.checkpoint: dcp.load, or set_model_state_dict with "
                   f"broadcast_from_rank0=True), cutting the block-strided shard as one contiguous chunk: this "
                   f"rank's shard now holds rows of other ranks")
            load = ("set_model_state_dict(model, full_state_dict, options=StateDictOptions(full_state_dict=True)) "
                    "with the whole tensors on every rank, broadcast_from_rank0=False")
            with self._lock:
                self._mark_broken(why, RuntimeError(why), load)
            raise RuntimeError(self.__dict__["_broken"])  # (why, what the layer refuses now, and the load to make)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _merge_into(self, weight, A, B, s, exact):
        if not sharded.is_dtensor(weight):
            return super()._merge_into(weight, A, B, s, exact)
        if isinstance(weight, nn.Parameter):  # the live weight: every rank merges the same adapter, or none does
            sharded.consensus(weight, "merge", self._describe(), (A, B), (s,))
        layout = _strided_rows(self, self.__dict__["_tp"])[0]
        part = sharded.Part(weight.to_local(), sharded.full(A), _local_B(self, B), layout)
        return sharded.merge_parts(weight, [part], s, exact, self._describe())[0]

    def _swap_into(self, weight, A, B, s, order=None):
        if not sharded.is_dtensor(weight):
            return super()._swap_into(weight, A, B, s, order)  # (a sharded one: the pairs ordered by value, per part)
        if isinstance(weight, nn.Parameter):
            sharded.consensus(weight, "switch", self._describe(), (self._merged_A, self._merged_B, A, B),
                              (self._merged_scaling, s))
        layout = _strided_rows(self, self.__dict__["_tp"])[0]
        w, rec = weight.to_local(), self._merged_record
        old = sharded.Part(w, sharded.full(self._merged_A), _local_B(self, self._merged_B), layout)
        new = sharded.Part(w, sharded.full(A), _local_B(self, B), layout)
        with _one_record():
            return sharded.swap_parts(weight, [old], [new], self._merged_scaling, s,
                                      None if rec is None else [rec], self._describe())[0]

    def _unmerge_from(self, weight):
        if not sharded.is_dtensor(weight):
            return super()._unmerge_from(weight)
        if isinstance(weight, nn.Parameter):
            sharded.consensus(weight, "unmerge", self._describe(), (self._merged_A, self._merged_B),
                              (self._merged_scaling,))
        layout = _strided_rows(self, self.__dict__["_tp"])[0]
        part = sharded.Part(weight.to_local(), sharded.full(self._merged_A), _local_B(self, self._merged_B), layout)
        rec = self._merged_record
        if not isinstance(weight, nn.Parameter):  # a copy (a state dict's): each rank's own business
            return ops.unmerge_(*part[:3], self._merged_scaling, record=rec, **layout)
        with _one_record():
            sharded.unmerge_parts(weight, [part], self._merged_scaling, None if rec is None else [rec],
                                  self._describe())


class _StridedLinear(_StridedMerges, Linear):
    pass


class _StridedMergedLinear(_StridedMerges, MergedLinear):
    pass


_StridedLinear.__name__, _StridedMergedLinear.__name__ = "Linear", "MergedLinear"  # in messages, the layer's kind
_STRIDED = {Linear: _StridedLinear, MergedLinear: _StridedMergedLinear,
            _StridedLinear: _StridedLinear, _StridedMergedLinear: _StridedMergedLinear}


def _blocks(layer):
    """(j, block id, rows per block) of the enabled blocks of a layer's output features."""
    if isinstance(layer, MergedLinear):
        nb = layer.out_features // len(layer.enable_lora)
        return [(j, e, nb) for j, e in enumerate(layer._block_ids)]
    out = layer.embedding_dim if isinstance(layer, Embedding) else layer.out_features
    return [(0, 0, out)]


def _factor(factor, **kwargs) -> torch.Tensor:
    """A factor's local shard for a forward: a copy where gradients are recorded, which the backward reads (a switch
    between the forward and its backward writes the live shards in place: a switch away and back, a reference
    adapter's forward between the two, was refused by torch naming no layer, where one process is exact, r8; a switch
    that stays is refused by the layer's own check, naming it)."""
    local = factor.to_local(**kwargs)
    return local.clone() if torch.is_grad_enabled() else local


def forward(layer: LoRALayer, x: torch.Tensor) -> torch.Tensor:
    """A tensor-parallel layer's forward on the local shards (layer.__dict__["_tp"] set by a style)."""
    spec = layer.__dict__["_tp"]
    if isinstance(x, DTensor):  # the local ops below would fail inside torch, without saying which layer
        raise ValueError(f"{'ColwiseLoRA' if spec.style == 'colwise' else 'RowwiseLoRA'}: {layer._describe()} takes "
                         f"a plain tensor (the whole activation, or for RowwiseLoRA this rank's slice of its "
                         f"features), got a DTensor placed as {tuple(x.placements)} (a sequence-parallel or "
                         f"use_local_output=False style before it); pass x.full_tensor()")
    lora_on = layer.has_lora and not layer._serves_merged()  # (a merged layer's state_dict base: see LoRALayer)
    if layer.has_lora and not lora_on and torch.is_grad_enabled() and not layer.__dict__.get("_told_untrained") \
            and (layer.lora_A.requires_grad or layer.lora_B.requires_grad):
        layer.__dict__["_told_untrained"] = True  # (once per layer; a plain layer trains through its merge instead)
        warnings.warn(f"{layer._describe()}: adapter {layer.active_adapter!r} is merged into its tensor-parallel "
                      f"weight and this forward records gradients for its factors, which the merged weight does not "
                      f"give them (their .grad stays None); call train() before training steps", stacklevel=3)
    s = layer.scaling if layer.has_lora else 0.0
    w = layer.weight.to_local()
    if isinstance(layer, Embedding):
        y = F.embedding(x, w, layer.padding_idx, layer.max_norm, layer.norm_type, layer.scale_grad_by_freq,
                        layer.sparse)
        if lora_on:  # (the factors in the table's dtype, scale_grad_by_freq on lora_A's lookup: as in one process)
            A = _factor(layer.lora_A, grad_placements=[Partial()])
            B = _factor(layer.lora_B, grad_placements=[Partial()])
            t = F.embedding(x, A.t(), layer.padding_idx, None, 2.0, layer.scale_grad_by_freq)
            t, b = _low(y, t, B[spec.lo:spec.hi], autocast=False)  # (a lookup is not autocast: as one process)
            with _no_autocast(y):
                y = _onto(y, s * (t @ b.t()))
        return y
    wl = w.t() if layer.fan_in_fan_out else w
    if spec.style == "colwise" and spec.blocks > 1:
        return _strided_forward(layer, spec, x, wl, s, lora_on)
    if spec.style == "colwise":
        x = _CopyToParallel.apply(x, spec.group)
        bias = None if layer.bias is None else layer.bias.to_local(grad_placements=[Partial()])[spec.lo:spec.hi]
        y = F.linear(x, wl, bias)
        if lora_on:
            A = _factor(layer.lora_A, grad_placements=[Partial()])
            B = _factor(layer.lora_B, grad_placements=[Partial()])
            xl = layer.lora_dropout(x)
            r = A.shape[0] // len(_blocks(layer))
            touched = False
            for j, e, nb in _blocks(layer):
                a, b = max(spec.lo, e * nb), min(spec.hi, (e + 1) * nb)
                if a < b:
                    touched = True
                    xj, aj, bj = _low(xl, xl, A[j * r:(j + 1) * r], B[j * nb + a - e * nb:j * nb + b - e * nb])
                    with _no_autocast(xl):
                        upd = s * ((xj @ aj.t()) @ bj.t())
                        y = torch.cat([y[..., :a - spec.lo], _onto(y[..., a - spec.lo:b - spec.lo], upd),
                                       y[..., b - spec.lo:]], dim=-1)
            if not touched and torch.is_grad_enabled() and (A.requires_grad or B.requires_grad):
                # no enabled block in this rank's rows (a MergedLinear's disabled ones, fewer outputs than ranks):
                # the factors still enter the graph, by an exact 0 from empty slices, so that this rank's gradients
                # are zeros, not None (T1: None skipped the optimizer's collective over the Partial gradients here,
                # and the other ranks hung in it)
                y = y + (A[:0].sum() + B[:0].sum()).to(y.dtype)
        return y
    # rowwise
    width = layer.in_features
    if x.shape[-1] == width and spec.hi - spec.lo != width:
        x = _SliceOfWhole.apply(x, spec.lo, spec.hi, spec.group)
    elif x.shape[-1] != spec.hi - spec.lo:
        raise ValueError(f"RowwiseLoRA: {layer._describe()} takes the whole input ({width} features) or this rank's "
                         f"{spec.hi - spec.lo} of them, got {x.shape[-1]}")
    y = _ReduceFromParallel.apply(F.linear(x, wl), spec.group)
    if layer.bias is not None:
        y = y + layer.bias.to_local().to(y.dtype)  # (under autocast y is in autocast's dtype, as F.linear's)
    if lora_on:
        A = _factor(layer.lora_A, grad_placements=[Partial()])
        B = _factor(layer.lora_B)
        xl = _dropout_slice(layer, x, spec)
        blocks = _blocks(layer)
        r = A.shape[0] // len(blocks)
        upd = {}
        for j, e, nb in blocks:
            xj, aj, bj = _low(xl, xl, A[j * r:(j + 1) * r, spec.lo:spec.hi], B[j * nb:(j + 1) * nb])
            with _no_autocast(xl):
                t = _ReduceFromParallel.apply(xj @ aj.t(), spec.group)
                upd[e] = s * (t @ bj.t())
        nb = blocks[0][2]
        with _no_autocast(xl):
            y = torch.cat([_onto(y[..., e * nb:(e + 1) * nb], upd[e]) if e in upd else y[..., e * nb:(e + 1) * nb]
                           for e in range(y.shape[-1] // nb)], dim=-1)
    return y


def _strided_forward(layer, spec, x, wl, s, lora_on):
    """ColwiseLoRA(blocks=k): the output holds rows lo:hi of each chunk, in order (a fused qkv: this rank's heads of
    q, then of k, then of v)."""
    x = _CopyToParallel.apply(x, spec.group)
    _, rows, ids, nb, nbl = _strided_rows(layer, spec)
    bias = None
    if layer.bias is not None:
        c = layer.out_features // spec.blocks
        idx = torch.cat([torch.arange(t * c + spec.lo, t * c + spec.hi) for t in range(spec.blocks)])
        bias = layer.bias.to_local(grad_placements=[Partial()]).index_select(0, idx.to(x.device))
    y = F.linear(x, wl, bias)
    if not lora_on:
        return y
    A = _factor(layer.lora_A, grad_placements=[Partial()])
    B = _factor(layer.lora_B, grad_placements=[Partial()])
    xl = layer.lora_dropout(x)
    r = A.shape[0] // len(ids)
    parts = [y[..., e * nbl:(e + 1) * nbl] for e in range(nb)]
    for (j, rj), e in zip(rows, ids):
        xj, aj, bj = _low(xl, xl, A[j * r:(j + 1) * r], B.index_select(0, rj.to(B.device)))
        with _no_autocast(xl):
            parts[e] = _onto(parts[e], s * ((xj @ aj.t()) @ bj.t()))
    return torch.cat(parts, dim=-1)


def _low(x: torch.Tensor, *operands: torch.Tensor, autocast: bool = True):
    """The low-rank term's operands as the single-process forward takes them: under autocast first rounded to
    autocast's dtype (ops.linear's autocast casts its inputs so; an embedding lookup is not autocast: autocast=False),
    then in the compute dtype of x's (reference.compute_dtype: float32 at least; x is the activation, or an
    embedding's output, whose dtype is the table's), the products to run under _no_autocast and the sum to be
    rounded once onto the output (_onto)."""
    device = x.device.type
    dtype = x.dtype
    if autocast and torch.is_autocast_enabled(device) and x.dtype != torch.float64:  # (as ops._autocast_cast)
        dtype = torch.get_autocast_dtype(device)
        operands = [t.to(dtype) if ops.autocast_eligible(t) else t for t in operands]
    cd = reference.compute_dtype(dtype)
    return [t.to(cd) for t in operands]


def _no_autocast(x: torch.Tensor):
    return torch.autocast(x.device.type, enabled=False)


def _onto(y: torch.Tensor, upd: torch.Tensor) -> torch.Tensor:
    """y + upd in y's dtype, summed in the wider of the two (one rounding)."""
    if upd.dtype == y.dtype:
        return y + upd
    wide = torch.promote_types(y.dtype, upd.dtype)
    return (y.to(wide) + upd.to(wide)).to(y.dtype)


def _dropout_slice(layer, x: torch.Tensor, spec) -> torch.Tensor:
    """lora_dropout of this rank's slice of the input features, its mask this rank's slice of one mask over the
    whole width: with the same seed on every rank (as the replicated factors' initialisation has), the ranks' masks
    are one process's, where a mask drawn per slice would repeat across the slices."""
    drop = layer.lora_dropout
    if not isinstance(drop, nn.Dropout) or not drop.training or spec.hi - spec.lo == layer.in_features:
        return drop(x)  # (no dropout, a whole width, or a module of the user's: as it was)
    mask = drop(x.new_ones(*x.shape[:-1], layer.in_features))
    return x * mask[..., spec.lo:spec.hi]


def check_stock_style(layer: LoRALayer) -> None:
    """A DTensor weight in a forward without lora_ext.parallel's style: torch's stock styles do not know the
    factors (the custom op has no sharding rule); refused with what to use instead."""
    raise ValueError(f"{layer._describe()}: its weight is a DTensor in the forward (tensor parallel), but the "
                     f"layer was not parallelized with lora_ext.parallel's styles: torch's ColwiseParallel / "
                     f"RowwiseParallel shard the weight without the LoRA factors. Use "
                     f"lora_ext.parallel.ColwiseLoRA() / RowwiseLoRA() in the parallelize_module plan")


# -------------------------------------------------------------------------------------------------------------
# torch's stock styles on a lora_ext layer: refused when they are applied


def _refuse_distribute_module(layer):
    """Read by torch's distribute_module (which ColwiseParallel / RowwiseParallel call on the module they shard)
    before it changes anything: a lora_ext layer is refused there, with what to use instead. Read from anywhere else
    (torch.jit.script reads every property of the class), the layer has no such attribute."""
    if sys._getframe(1).f_code.co_name != "distribute_module":
        raise AttributeError(f"{type(layer).__name__} has no attribute '_distribute_module_applied'")
    raise ValueError(f"{layer._describe()}: torch's ColwiseParallel / RowwiseParallel (distribute_module) shard the "
                     f"weight without the LoRA factors (and RowwiseParallel fails on the layer's lora_dropout child). "
                     f"Use lora_ext.parallel.ColwiseLoRA() / RowwiseLoRA() in the parallelize_module plan (or "
                     f"lora_ext.parallel.gpt2_plan / llama_plan)")


LoRALayer._distribute_module_applied = property(_refuse_distribute_module)


def _dir_without_refusal(layer):
    """dir() without the refusal above: what lists a module's names and reads each (torch.jit.trace and torch.onnx's
    TorchScript export, inspect.getmembers) would otherwise meet it there and fail with a message about tensor
    parallel. distribute_module reads the name itself, not dir()."""
    return [name for name in super(LoRALayer, layer).__dir__() if name != "_distribute_module_applied"]


LoRALayer.__dir__ = _dir_without_refusal


# -------------------------------------------------------------------------------------------------------------
# plans for transformers' GPT-2 and Llama


def _is_lora_linear(m):
    return isinstance(m, (Linear, MergedLinear))


class GPT2AttentionLoRA(ParallelStyle):
    """transformers' GPT2Attention: the fused c_attn column-parallel by heads (ColwiseLoRA(blocks=3): each rank
    holds its heads of q, k and v), c_proj row-parallel; the module's num_heads, embed_dim and split_size become
    this rank's, so that its forward splits and reshapes the local q, k, v. Both projections must be lora_ext
    layers (inject c_attn, fused or not, and c_proj)."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        _check_gpt2_attention(module, device_mesh.size(), type(module).__name__)
        col, row = ColwiseLoRA(blocks=3), RowwiseLoRA()
        with module.c_attn._lock, module.c_proj._lock:
            col._check(module.c_attn, device_mesh)
            row._check(module.c_proj, device_mesh)
        col._apply(module.c_attn, device_mesh)
        row._apply(module.c_proj, device_mesh)
        n = device_mesh.size()
        module.num_heads //= n
        module.embed_dim //= n
        module.split_size //= n
        return module


def _check_gpt2_attention(attn, n, where):
    if getattr(attn, "is_cross_attention", False):
        raise ValueError(f"gpt2_plan: {where} is a cross-attention (q_attn and a 2-block c_attn); not supported")
    if not (_is_lora_linear(getattr(attn, "c_attn", None)) and _is_lora_linear(getattr(attn, "c_proj", None))):
        raise ValueError(f"gpt2_plan: {where}: c_attn and c_proj must be lora_ext layers (inject them, e.g. "
                         f"lora_ext.inject(model, ['c_proj', 'c_fc'], fused={{'c_attn': [True, False, True]}}, ...)), "
                         f"got {type(getattr(attn, 'c_attn', None)).__name__} / "
                         f"{type(getattr(attn, 'c_proj', None)).__name__}")
    if attn.num_heads % n or attn.split_size != attn.embed_dim or attn.c_attn.out_features != 3 * attn.embed_dim:
        raise ValueError(f"gpt2_plan: {where} has {attn.num_heads} heads (embed_dim {attn.embed_dim}, split_size "
                         f"{attn.split_size}): the heads must split evenly over {n} ranks (and the module must not "
                         f"be parallelized already)")


def gpt2_plan(model: nn.Module, device_mesh) -> dict:
    """A parallelize_module plan for a transformers GPT-2 model with lora_ext injected into c_attn, c_proj and
    c_fc: each block's attention by heads (GPT2AttentionLoRA), its MLP's c_fc column- and c_proj row-parallel.
    Embeddings, layer norms and the head stay replicated. Every module is checked before the plan is returned."""
    n, plan = device_mesh.size(), {}
    for name, m in model.named_modules():
        if type(m).__name__ == "GPT2Attention":
            _check_gpt2_attention(m, n, name)
            plan[name] = GPT2AttentionLoRA()
        elif type(m).__name__ == "GPT2MLP":
            for child, style in (("c_fc", ColwiseLoRA()), ("c_proj", RowwiseLoRA())):
                c = getattr(m, child)
                if not _is_lora_linear(c):
                    raise ValueError(f"gpt2_plan: {name}.{child} must be a lora_ext layer, got {type(c).__name__}")
                style._check(c, device_mesh)
                plan[f"{name}.{child}"] = style
    if not plan:
        raise ValueError(f"gpt2_plan: no GPT2Attention / GPT2MLP modules in {type(model).__name__}")
    return plan


def llama_plan(model: nn.Module, device_mesh) -> dict:
    """A parallelize_module plan for a transformers Llama model: q, k, v, gate and up column-parallel, o and down
    row-parallel; lora_ext layers get ColwiseLoRA / RowwiseLoRA, plain nn.Linear ones torch's ColwiseParallel /
    RowwiseParallel. LlamaAttention reshapes with -1 heads and keeps its query/key-value group count, so its
    attributes need no change; the attention and key-value heads must split evenly over the ranks."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    n, plan = device_mesh.size(), {}
    cols = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    for name, m in model.named_modules():
        kind = type(m).__name__
        if kind == "LlamaAttention":
            cfg = m.config
            if cfg.num_attention_heads % n or cfg.num_key_value_heads % n:
                raise ValueError(f"llama_plan: {name} has {cfg.num_attention_heads} attention heads and "
                                 f"{cfg.num_key_value_heads} key-value heads: both must split evenly over {n} ranks")
            children = ("q_proj", "k_proj", "v_proj", "o_proj")
        elif kind == "LlamaMLP":
            children = ("gate_proj", "up_proj", "down_proj")
        else:
            continue
        for child in children:
            c = getattr(m, child)
            col = child in cols
            if isinstance(c, LoRALayer):
                style = ColwiseLoRA() if col else RowwiseLoRA()
                with c._lock:
                    style._check(c, device_mesh)
            elif type(c) is nn.Linear:
                style = ColwiseParallel() if col else RowwiseParallel()
            else:
                raise ValueError(f"llama_plan: {name}.{child} is a {type(c).__name__}: a lora_ext layer or an "
                                 f"nn.Linear expected")
            plan[f"{name}.{child}"] = style
    if not plan:
        raise ValueError(f"llama_plan: no LlamaAttention / LlamaMLP modules in {type(model).__name__}")
    return plan
