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
the optimizer applies them. torch's stock ColwiseParallel / RowwiseParallel are refused at the first forward,
with a message naming these styles.
"""
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from .layers import Embedding, Linear, LoRALayer, MergedLinear


class Spec(NamedTuple):
    style: str      # "colwise" or "rowwise"
    mesh: object    # the 1-D device mesh (a deepcopy of the layer shares it)
    lo: int         # the features this rank holds: output ones (colwise), input ones (rowwise)
    hi: int

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

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        kinds = (Linear, MergedLinear, Embedding) if self.style == "colwise" else (Linear, MergedLinear)
        if not isinstance(module, kinds):
            raise ValueError(f"{type(self).__name__} takes lora_ext {', '.join(k.__name__ for k in kinds)} layers, "
                             f"got {type(module).__name__}")
        if device_mesh.ndim != 1:
            raise ValueError(f"{type(self).__name__}: a 1-D device mesh, got {device_mesh.ndim}-D")
        if isinstance(module, Embedding) and module.max_norm is not None:
            raise ValueError(f"{type(self).__name__}: {module._describe()} has max_norm={module.max_norm}: each rank "
                             f"would renormalise its slice of the embedding by that slice's norm; not supported")
        with module._lock:
            if module.merged and module._merged_A is not None:
                raise ValueError(f"{type(self).__name__}: {module._describe()} is merged; unmerge it (train()) "
                                 f"before parallelize_module")
            out_dim, in_dim = _feature_dims(module)
            dim = out_dim if self.style == "colwise" else in_dim

            def place(name, placements):
                p = module._parameters.get(name)
                if p is not None and not isinstance(p, DTensor):
                    module._parameters[name] = nn.Parameter(distribute_tensor(p.detach(), device_mesh, placements),
                                                            requires_grad=p.requires_grad)

            place("weight", [Shard(dim)])
            for name in ("bias", "lora_A", "lora_B"):
                place(name, [Replicate()])
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
            w = module.weight
            shape, offset = compute_local_shape_and_global_offset(w.shape, device_mesh, w.placements)
            module.__dict__["_tp"] = Spec(self.style, device_mesh, offset[dim], offset[dim] + shape[dim])
        return module


class ColwiseLoRA(_LoRAStyle):
    """Column-parallel lora_ext Linear / MergedLinear / Embedding (see the module's docstring)."""
    style = "colwise"


class RowwiseLoRA(_LoRAStyle):
    """Row-parallel lora_ext Linear / MergedLinear (see the module's docstring)."""
    style = "rowwise"


def _blocks(layer):
    """(j, block id, rows per block) of the enabled blocks of a layer's output features."""
    if isinstance(layer, MergedLinear):
        nb = layer.out_features // len(layer.enable_lora)
        return [(j, e, nb) for j, e in enumerate(layer._block_ids)]
    out = layer.embedding_dim if isinstance(layer, Embedding) else layer.out_features
    return [(0, 0, out)]


def forward(layer: LoRALayer, x: torch.Tensor) -> torch.Tensor:
    """A tensor-parallel layer's forward on the local shards (layer.__dict__["_tp"] set by a style)."""
    spec = layer.__dict__["_tp"]
    lora_on = layer.has_lora and not layer.merged
    s = layer.scaling if layer.has_lora else 0.0
    w = layer.weight.to_local()
    if isinstance(layer, Embedding):
        y = F.embedding(x, w, layer.padding_idx, layer.max_norm, layer.norm_type, layer.scale_grad_by_freq,
                        layer.sparse)
        if lora_on:
            A = layer.lora_A.to_local(grad_placements=[Partial()])
            B = layer.lora_B.to_local(grad_placements=[Partial()])
            y = y + s * (F.embedding(x, A.t(), layer.padding_idx) @ B[spec.lo:spec.hi].t())
        return y
    wl = w.t() if layer.fan_in_fan_out else w
    if spec.style == "colwise":
        x = _CopyToParallel.apply(x, spec.group)
        bias = None if layer.bias is None else layer.bias.to_local(grad_placements=[Partial()])[spec.lo:spec.hi]
        y = F.linear(x, wl, bias)
        if lora_on:
            A = layer.lora_A.to_local(grad_placements=[Partial()])
            B = layer.lora_B.to_local(grad_placements=[Partial()])
            xl = layer.lora_dropout(x)
            r = A.shape[0] // len(_blocks(layer))
            for j, e, nb in _blocks(layer):
                a, b = max(spec.lo, e * nb), min(spec.hi, (e + 1) * nb)
                if a < b:
                    t = xl @ A[j * r:(j + 1) * r].t()
                    upd = s * (t @ B[j * nb + a - e * nb:j * nb + b - e * nb].t())
                    y = torch.cat([y[..., :a - spec.lo], y[..., a - spec.lo:b - spec.lo] + upd, y[..., b - spec.lo:]],
                                  dim=-1)
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
        A = layer.lora_A.to_local(grad_placements=[Partial()])
        B = layer.lora_B.to_local()
        xl = layer.lora_dropout(x)
        blocks = _blocks(layer)
        r = A.shape[0] // len(blocks)
        upd = {}
        for j, e, nb in blocks:
            t = _ReduceFromParallel.apply(xl @ A[j * r:(j + 1) * r, spec.lo:spec.hi].t(), spec.group)
            upd[e] = s * (t @ B[j * nb:(j + 1) * nb].t())
        nb = blocks[0][2]
        y = torch.cat([y[..., e * nb:(e + 1) * nb] + upd[e] if e in upd else y[..., e * nb:(e + 1) * nb]
                       for e in range(y.shape[-1] // nb)], dim=-1)
    return y


def check_stock_style(layer: LoRALayer) -> None:
    """A DTensor weight in a forward without lora_ext.parallel's style: torch's stock styles do not know the
    factors (the custom op has no sharding rule); refused with what to use instead."""
    raise ValueError(f"{layer._describe()}: its weight is a DTensor in the forward (tensor parallel), but the "
                     f"layer was not parallelized with lora_ext.parallel's styles: torch's ColwiseParallel / "
                     f"RowwiseParallel shard the weight without the LoRA factors. Use "
                     f"lora_ext.parallel.ColwiseLoRA() / RowwiseLoRA() in the parallelize_module plan")
