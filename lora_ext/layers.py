"""loralib-compatible LoRA layers.

The layers own the parameters and the merge state; every bit of LoRA arithmetic goes through lora_ext.ops.
Differences from loralib 0.1.2 (its bugs, fixed):
- train()/eval() return the module;
- what was merged is remembered (a copy of A and B, r * (in + out) elements), so unmerging after
  lora_A/lora_B changed restores the true base weight;
- state_dict() always holds the base (unmerged) weight, and loading into a merged layer re-merges, so no
  checkpoint is ever merged twice;
- merges are in place on the parameter itself, so autograd sees them (version counter);
- MergedLinear with no enabled group, Conv1d/Conv3d with kernel_size > 1 and tuple kernel sizes work;
- lora_dropout is an nn.Module (layers pickle and deepcopy) and ConvLoRA applies it;
- low-precision base weights work with fp32 LoRA parameters.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops


def _remerge_after_load(module, incompatible_keys):
    if module._remerge_pending:
        module._remerge_pending = False
        module._merge()


class LoRALayer:
    """State shared by every LoRA layer; it comes first in the layers' bases so that its train(),
    state_dict() and loading override nn.Module's. Subclasses say where their weight is and how the delta lies in it
    (_weight_2d and _layout); this class does the merge bookkeeping."""

    _weight_key = "weight"

    def __init__(self, r, lora_alpha, lora_dropout, merge_weights):
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise ValueError(f"r must be a non-negative integer, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self.merged = False
        self.merge_weights = merge_weights
        self._remerge_pending = False
        # What is merged into the weight right now: the factors and scale at merge time.
        self.register_buffer("_merged_A", None, persistent=False)
        self.register_buffer("_merged_B", None, persistent=False)
        self._merged_scaling = None
        self.register_load_state_dict_post_hook(_remerge_after_load)

    @property
    def has_lora(self):
        return getattr(self, "lora_A", None) is not None

    def _weight_2d(self):
        return self.weight

    def _layout(self):
        return {}

    def _merge(self):
        with torch.no_grad():
            ops.merge_(self._weight_2d(), self.lora_A, self.lora_B, self.scaling, **self._layout())
        self._merged_A = self.lora_A.detach().clone()
        self._merged_B = self.lora_B.detach().clone()
        self._merged_scaling = self.scaling

    def _unmerge_from(self, weight_2d):
        ops.unmerge_(weight_2d, self._merged_A, self._merged_B, self._merged_scaling, **self._layout())

    def _unmerge(self):
        with torch.no_grad():
            self._unmerge_from(self._weight_2d())
        self._merged_A = self._merged_B = self._merged_scaling = None

    def train(self, mode=True):
        nn.Module.train(self, mode)
        if self.merge_weights and mode == self.merged:
            if self.has_lora:
                (self._unmerge if mode else self._merge)()
            self.merged = not mode
        return self

    def state_dict(self, *args, **kwargs):
        state = nn.Module.state_dict(self, *args, **kwargs)
        if self.merged and self._merged_A is not None:
            prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
            key = prefix + self._weight_key
            base = state[key].detach().clone()
            with torch.no_grad():
                self._unmerge_from(self._as_2d(base))
            state[key] = base
        return state

    def _as_2d(self, weight):
        return weight

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.merged and self._merged_A is not None:
            # Loading brings a base weight and/or new factors: hold the base now, merge again after.
            self._unmerge()
            self._remerge_pending = True
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)


class Embedding(LoRALayer, nn.Embedding):
    def __init__(self, num_embeddings, embedding_dim, r=0, lora_alpha=1, merge_weights=True, **kwargs):
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=0.0, merge_weights=merge_weights)
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((r, num_embeddings)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((embedding_dim, r)))
            self.scaling = self.lora_alpha / self.r
            self.weight.requires_grad = False
        self.reset_parameters()

    def reset_parameters(self):
        nn.Embedding.reset_parameters(self)
        if hasattr(self, "lora_A"):
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def _layout(self):
        return {"transposed": True}

    def forward(self, x):
        if self.r > 0 and not self.merged:
            return ops.embedding(x, self.weight, self.lora_A, self.lora_B, self.scaling,
                                 padding_idx=self.padding_idx, max_norm=self.max_norm,
                                 norm_type=self.norm_type, scale_grad_by_freq=self.scale_grad_by_freq,
                                 sparse=self.sparse)
        return nn.Embedding.forward(self, x)


class Linear(LoRALayer, nn.Linear):
    def __init__(self, in_features, out_features, r=0, lora_alpha=1, lora_dropout=0.0, fan_in_fan_out=False,
                 merge_weights=True, **kwargs):
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                           merge_weights=merge_weights)
        self.fan_in_fan_out = fan_in_fan_out
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((r, in_features)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((out_features, r)))
            self.scaling = self.lora_alpha / self.r
            self.weight.requires_grad = False
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1).contiguous()

    def reset_parameters(self):
        nn.Linear.reset_parameters(self)
        if hasattr(self, "lora_A"):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def _layout(self):
        return {"transposed": self.fan_in_fan_out}

    def forward(self, x):
        if self.r > 0 and not self.merged:
            return ops.linear(x, self.lora_dropout(x), self.weight, self.bias, self.lora_A, self.lora_B,
                              self.scaling, fan_in_fan_out=self.fan_in_fan_out)
        return F.linear(x, self.weight.t() if self.fan_in_fan_out else self.weight, self.bias)


class MergedLinear(LoRALayer, nn.Linear):
    def __init__(self, in_features, out_features, r=0, lora_alpha=1, lora_dropout=0.0, enable_lora=(False,),
                 fan_in_fan_out=False, merge_weights=True, **kwargs):
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                           merge_weights=merge_weights)
        enable_lora = [bool(e) for e in enable_lora]
        if not enable_lora or out_features % len(enable_lora):
            raise ValueError(
                f"enable_lora must be a non-empty list whose length divides out_features ({out_features}), "
                f"got length {len(enable_lora)}")
        self.enable_lora = enable_lora
        self.fan_in_fan_out = fan_in_fan_out
        self._block_ids = [i for i, e in enumerate(enable_lora) if e]
        if r > 0 and any(enable_lora):
            n = len(self._block_ids)
            self.lora_A = nn.Parameter(self.weight.new_zeros((r * n, in_features)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((out_features // len(enable_lora) * n, r)))
            self.scaling = self.lora_alpha / self.r
            self.weight.requires_grad = False
            mask = torch.zeros(len(enable_lora), out_features // len(enable_lora), dtype=torch.bool)
            mask[self._block_ids] = True
            self.register_buffer("lora_ind", mask.view(-1), persistent=False)
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1).contiguous()

    def reset_parameters(self):
        nn.Linear.reset_parameters(self)
        if hasattr(self, "lora_A"):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def _layout(self):
        return {"num_blocks": len(self.enable_lora), "block_ids": self._block_ids,
                "transposed": self.fan_in_fan_out}

    def merge_AB(self):
        """The unscaled dense delta-W in the weight's storage layout (loralib's merge_AB)."""
        return ops.delta_weight(self.lora_A, self.lora_B, 1.0, out_features=self.out_features,
                                dtype=self.weight.dtype, **self._layout())

    def forward(self, x):
        if self.has_lora and not self.merged:
            return ops.linear(x, self.lora_dropout(x), self.weight, self.bias, self.lora_A, self.lora_B,
                              self.scaling, num_blocks=len(self.enable_lora), block_ids=self._block_ids,
                              fan_in_fan_out=self.fan_in_fan_out)
        return F.linear(x, self.weight.t() if self.fan_in_fan_out else self.weight, self.bias)


def _as_tuple(kernel_size, dims):
    ks = (kernel_size,) * dims if isinstance(kernel_size, int) else tuple(kernel_size)
    if len(ks) != dims or not all(isinstance(k, int) and k > 0 for k in ks):
        raise ValueError(f"kernel_size must be a positive int or a tuple of {dims} positive ints, "
                         f"got {kernel_size!r}")
    return ks


class ConvLoRA(LoRALayer, nn.Module):
    """LoRA around a torch convolution. delta-W = B @ A viewed as the conv weight, with
    A: (r * k0, in_channels * k1 * ... ) and B: (out_channels // groups * k0, r * k0), k = kernel size;
    for Conv2d with an int kernel this is loralib's layout exactly."""

    _weight_key = "conv.weight"

    def __init__(self, conv_module, in_channels, out_channels, kernel_size, r=0, lora_alpha=1,
                 lora_dropout=0.0, merge_weights=True, **kwargs):
        nn.Module.__init__(self)
        self.conv = conv_module(in_channels, out_channels, kernel_size, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                           merge_weights=merge_weights)
        # torch expands int arguments such as dilation to one per spatial dimension
        ks = _as_tuple(kernel_size, len(self.conv.dilation))
        if r > 0:
            k0, rest = ks[0], math.prod(ks[1:])
            self.lora_A = nn.Parameter(self.conv.weight.new_zeros((r * k0, in_channels * rest)))
            self.lora_B = nn.Parameter(
                self.conv.weight.new_zeros((out_channels // self.conv.groups * k0, r * k0)))
            self.scaling = self.lora_alpha / self.r
            self.conv.weight.requires_grad = False
        self.reset_parameters()

    def reset_parameters(self):
        self.conv.reset_parameters()
        if hasattr(self, "lora_A"):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def _as_2d(self, weight):
        return weight.view(self.lora_B.shape[0], self.lora_A.shape[1])

    def _weight_2d(self):
        return self._as_2d(self.conv.weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Accept a plain nn.Conv*'s checkpoint (weight, bias) as well as our own (conv.weight, conv.bias).
        for name in ("weight", "bias"):
            if prefix + name in state_dict and prefix + "conv." + name not in state_dict:
                state_dict[prefix + "conv." + name] = state_dict.pop(prefix + name)
        LoRALayer._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)

    def forward(self, x):
        if self.r > 0 and not self.merged:
            return ops.conv(self.conv, x, self.lora_dropout(x), self.lora_A, self.lora_B, self.scaling)
        return self.conv(x)


class Conv1d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv1d, *args, **kwargs)


class Conv2d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv2d, *args, **kwargs)


class Conv3d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv3d, *args, **kwargs)
