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

Serving additions: a layer holds named adapters (the active one is lora_A/lora_B, so state dicts keep
loralib's keys; the others wait in `_adapters`, on the device or in host memory), `set_adapter` switches
between them (one pass over the weight when merged), and a per-layer lock makes merge, unmerge and switch
atomic with respect to forward calls of the same layer on other threads.
"""
import contextlib
import math
import threading
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops


def _stamp(lora_A, lora_B):
    """What identifies the values of a factor pair until one is written in place or given other storage
    (weak references: a stamp keeps nothing alive). Spelled out for two tensors: it runs on every switch."""
    return (weakref.ref(lora_A), lora_A._version, lora_A.data_ptr(),
            weakref.ref(lora_B), lora_B._version, lora_B.data_ptr())


def _unchanged(stamp, lora_A, lora_B):
    """Whether (lora_A, lora_B) are the stamped pair, unwritten since."""
    return (stamp is not None and stamp[0]() is lora_A and stamp[3]() is lora_B
            and stamp[1] == lora_A._version and stamp[4] == lora_B._version
            and stamp[2] == lora_A.data_ptr() and stamp[5] == lora_B.data_ptr())


def _remerge_after_load(module, incompatible_keys):
    with module._lock:
        if module._remerge_pending:
            module._remerge_pending = False
            module._merge()
            module.merged = True


_MERGED = object()  # the key of the merged snapshot's stamp


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
        self.active_adapter = "default"
        # Inactive named adapters: name -> (lora_A, lora_B, scaling), kept where they were given.
        self._adapters = {}
        self._active_home = None
        self._finite_stamps = {}
        self._lock = threading.RLock()
        self.register_load_state_dict_post_hook(_remerge_after_load)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_lock", None)  # locks do not pickle or deepcopy; each copy gets its own
        state["_finite_stamps"] = {}  # copies have new tensors: their values are checked again when used
        return state

    def __setstate__(self, state):
        nn.Module.__setstate__(self, state)
        self.__dict__.setdefault("active_adapter", "default")
        self.__dict__.setdefault("_adapters", {})
        self.__dict__.setdefault("_active_home", None)
        self.__dict__.setdefault("_finite_stamps", {})
        self._lock = threading.RLock()

    def _guard(self):
        # Under torch.compile there is no other thread to exclude within the traced graph.
        if torch.compiler.is_compiling():
            return contextlib.nullcontext()
        return self._lock

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
        known = self._known_finite(self.active_adapter)
        self._set_merged(self.lora_A.detach().clone(), self.lora_B.detach().clone(), self.scaling)
        self._stamp_finite(_MERGED, known)

    def _set_merged(self, lora_A, lora_B, scaling):
        """Records what is merged now. The factors are buffers (they follow .to()); they are set in _buffers
        directly because nn.Module.__setattr__ costs tens of microseconds here, more than a switch's kernel."""
        self._buffers["_merged_A"], self._buffers["_merged_B"] = lora_A, lora_B
        self._merged_scaling = scaling

    def _unmerge_from(self, weight_2d):
        ops.unmerge_(weight_2d, self._merged_A, self._merged_B, self._merged_scaling, **self._layout())

    def _unmerge(self):
        with torch.no_grad():
            self._unmerge_from(self._weight_2d())
        self._set_merged(None, None, None)
        self._finite_stamps.pop(_MERGED, None)

    def train(self, mode=True):
        with self._lock:
            nn.Module.train(self, mode)
            if self.merge_weights and mode == self.merged:
                if self.has_lora:
                    (self._unmerge if mode else self._merge)()
                self.merged = not mode
        return self

    def merge(self):
        """Merges the active adapter into the weight now, whatever the train/eval mode."""
        with self._lock:
            if self.has_lora and not self.merged:
                self._merge()
            self.merged = True

    def unmerge(self):
        """Restores the base weight now (forwards then add the adapter on the fly)."""
        with self._lock:
            if self.merged and self._merged_A is not None:
                self._unmerge()
            self.merged = False

    # -- named adapters ------------------------------------------------------------------------------

    def _rank_of(self, lora_A):
        """The adapter rank r of factors with lora_A's shape (lora_A has r * _rank_rows() rows)."""
        return lora_A.shape[0] // self._rank_rows()

    def _rank_rows(self):
        return 1

    def factor_shapes(self, r):
        """(lora_A shape, lora_B shape) of a rank-r adapter for this layer."""
        raise NotImplementedError

    def _add_factors(self, weight):
        """Creates lora_A/lora_B of rank self.r beside `weight` (same dtype and device) and freezes it."""
        a_shape, b_shape = self.factor_shapes(self.r)
        self.lora_A = nn.Parameter(weight.new_zeros(a_shape))
        self.lora_B = nn.Parameter(weight.new_zeros(b_shape))
        self.scaling = self.lora_alpha / self.r
        weight.requires_grad = False

    def reset_parameters(self):
        super().reset_parameters()
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        if hasattr(self, "lora_A"):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def forward(self, x):
        with self._guard():
            return self._forward(x)

    @property
    def adapter_names(self):
        return [self.active_adapter, *self._adapters]

    def get_adapter(self, name):
        """(lora_A, lora_B, scaling) of a named adapter; the active one's are the live parameters."""
        if name == self.active_adapter:
            return self.lora_A, self.lora_B, self.scaling
        if name not in self._adapters:
            raise KeyError(f"adapter {name!r} is not in this layer (it holds {self.adapter_names})")
        return self._adapters[name]

    def check_adapter(self, lora_A, lora_B, scaling, name="adapter", values=True):
        """Raises ValueError unless the factors fit this layer and (values=True) all values are finite."""
        if not self.has_lora:
            raise ValueError(f"{name}: this layer was built with r=0 and holds no adapter")
        for what, t in (("lora_A", lora_A), ("lora_B", lora_B)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise ValueError(f"{name}: {what} must be a 2-D tensor, got {getattr(t, 'shape', type(t))}")
        r = self._rank_of(lora_A)
        want = self.factor_shapes(max(r, 1))
        if r < 1 or (tuple(lora_A.shape), tuple(lora_B.shape)) != want:
            raise ValueError(f"{name}: factors of shape {tuple(lora_A.shape)} and {tuple(lora_B.shape)} do not fit "
                             f"this layer; a rank-{max(r, 1)} adapter needs {want[0]} and {want[1]}")
        if values:
            ops.check_finite(name, lora_A, lora_B, scaling)

    # Adapter values are checked for non-finite values when they come in and again only after they changed:
    # a check costs a device sync, more than a switch's pass over a 4096 x 4096 weight on a GPU. What was
    # found finite is stamped with the tensors' version counters and storage (in-place writes and new
    # storage void the stamp). Added adapters are copied, and the live factors get storage of their own when
    # they become active, so no tensor outside the layer shares storage with them under another version
    # counter. Writes through `.data` bypass version counters, as they bypass autograd's checks: after
    # such writes, call check_values.

    def _finite_tensors(self, key):
        if key is _MERGED:
            return (self._merged_A, self._merged_B)
        if key == self.active_adapter:
            return (self.lora_A, self.lora_B)
        return self._adapters[key][:2]

    def _known_finite(self, key):
        return _unchanged(self._finite_stamps.get(key), *self._finite_tensors(key))

    def _stamp_finite(self, key, known=True):
        if known:
            self._finite_stamps[key] = _stamp(*self._finite_tensors(key))
        else:
            self._finite_stamps.pop(key, None)

    def check_values(self, name, label=None):
        """Raises ValueError unless adapter `name` (and its scaling) is finite; remembers the answer until
        its factors are written in place."""
        with self._lock:
            if self._known_finite(name):
                return
            ops.check_finite(label or repr(name), *self.get_adapter(name))
            self._stamp_finite(name)

    def add_adapter(self, name, lora_A, lora_B, scaling):
        """Adds (or replaces) a named adapter, copying its factors. Replacing the active one changes the
        layer at once (in one pass over the weight when merged); any other adapter is kept where it was
        given (device or host memory) until set_adapter makes it active."""
        self.check_adapter(lora_A, lora_B, scaling, name=repr(name))
        with self._lock:
            if name == self.active_adapter:
                self._activate(name, lora_A, lora_B, float(scaling))  # which makes the live factors' own copy
            else:
                self._adapters[name] = (lora_A.detach().clone(), lora_B.detach().clone(), float(scaling))
                self._stamp_finite(name)

    def delete_adapter(self, name):
        if name == self.active_adapter:
            raise ValueError(f"adapter {name!r} is active; set another adapter active before deleting it")
        with self._lock:
            del self._adapters[name]
            self._finite_stamps.pop(name, None)

    def set_adapter(self, name):
        """Makes a named adapter the active one; the previous one is kept under its name (moved back to
        where it was given). Merged: one pass over the weight, W += s2 B2 A2 - s1 B1 A1."""
        if name == self.active_adapter:
            return
        if name not in self._adapters:
            raise KeyError(f"adapter {name!r} is not in this layer (it holds {self.adapter_names})")
        with self._lock:
            lora_A, lora_B, scaling = self._adapters[name]  # shapes checked by add_adapter
            self.check_values(name)
            home = lora_A.device
            old_name, old_known = self.active_adapter, self._known_finite(self.active_adapter)
            old = (self.lora_A.detach(), self.lora_B.detach(), self.scaling)
            old_home = self._active_home or old[0].device
            self._activate(name, lora_A, lora_B, scaling)
            del self._adapters[name]
            self._adapters[old_name] = (old[0].to(old_home), old[1].to(old_home), old[2])
            self.__dict__.update(active_adapter=name, _active_home=home)  # plain attributes, as in _activate
            self._stamp_finite(old_name, old_known)

    def _activate(self, name, lora_A, lora_B, scaling):
        """Makes (lora_A, lora_B, scaling) the live factors of adapter `name`; the caller holds the lock and
        has checked them (shapes and values)."""
        # copies on the live parameters' device and dtype: storage no other tensor holds (a caller of
        # get_adapter may hold the stored tensors)
        lora_A = lora_A.detach().to(self.lora_A.device, self.lora_A.dtype, copy=True)
        lora_B = lora_B.detach().to(self.lora_B.device, self.lora_B.dtype, copy=True)
        if self.merged and self._merged_A is not None:
            if not self._known_finite(_MERGED):
                ops.check_finite("the merged adapter", self._merged_A, self._merged_B, self._merged_scaling)
            with torch.no_grad():
                ops.swap_(self._weight_2d(), self._merged_A, self._merged_B, self._merged_scaling,
                          lora_A, lora_B, scaling, check_values=False, **self._layout())
            self._set_merged(lora_A.clone(), lora_B.clone(), scaling)
            self._stamp_finite(_MERGED)
        self.lora_A.data = lora_A
        self.lora_B.data = lora_B
        r = self._rank_of(lora_A)
        # plain attributes: straight into __dict__, which is where nn.Module.__setattr__ would put them
        self.__dict__.update(r=r, scaling=scaling, lora_alpha=scaling * r)
        self._finite_stamps[name] = _stamp(self.lora_A, self.lora_B)

    def state_dict(self, *args, **kwargs):
        with self._lock:
            return self._state_dict(*args, **kwargs)

    def _state_dict(self, *args, **kwargs):
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
        with self._lock:
            self._load_state(state_dict, prefix, *args, **kwargs)

    def _load_state(self, state_dict, prefix, *args, **kwargs):
        if self.merged and self._merged_A is not None:
            # Loading brings a base weight and/or new factors: hold the base now, merge again after.
            self._unmerge()
            self.merged = False  # until the post-load hook merges again: forwards in between stay right
            self._remerge_pending = True
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)


class Embedding(LoRALayer, nn.Embedding):
    def __init__(self, num_embeddings, embedding_dim, r=0, lora_alpha=1, merge_weights=True, **kwargs):
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=0.0, merge_weights=merge_weights)
        if r > 0:
            self._add_factors(self.weight)
        self.reset_parameters()

    def reset_lora_parameters(self):
        if hasattr(self, "lora_A"):
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def factor_shapes(self, r):
        return (r, self.num_embeddings), (self.embedding_dim, r)

    def _layout(self):
        return {"transposed": True}

    def _forward(self, x):
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
            self._add_factors(self.weight)
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1).contiguous()

    def factor_shapes(self, r):
        return (r, self.in_features), (self.out_features, r)

    def _layout(self):
        return {"transposed": self.fan_in_fan_out}

    def _forward(self, x):
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
            self._add_factors(self.weight)
            mask = torch.zeros(len(enable_lora), out_features // len(enable_lora), dtype=torch.bool)
            mask[self._block_ids] = True
            self.register_buffer("lora_ind", mask.view(-1), persistent=False)
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1).contiguous()

    def _rank_rows(self):
        return len(self._block_ids)

    def factor_shapes(self, r):
        n = len(self._block_ids)
        return (r * n, self.in_features), (self.out_features // len(self.enable_lora) * n, r)

    def _layout(self):
        return {"num_blocks": len(self.enable_lora), "block_ids": self._block_ids,
                "transposed": self.fan_in_fan_out}

    def merge_AB(self):
        """The unscaled dense delta-W in the weight's storage layout (loralib's merge_AB)."""
        return ops.delta_weight(self.lora_A, self.lora_B, 1.0, out_features=self.out_features,
                                dtype=self.weight.dtype, **self._layout())

    def _forward(self, x):
        if self.has_lora and not self.merged:
            return ops.linear(x, self.lora_dropout(x), self.weight, self.bias, self.lora_A, self.lora_B,
                              self.scaling, num_blocks=len(self.enable_lora), block_ids=self._block_ids,
                              fan_in_fan_out=self.fan_in_fan_out)
        return F.linear(x, self.weight.t() if self.fan_in_fan_out else self.weight, self.bias)


def _check_kernel_size(kernel_size, dims):
    ks = (kernel_size,) * dims if isinstance(kernel_size, int) else tuple(kernel_size)
    if len(ks) != dims or not all(isinstance(k, int) and k > 0 for k in ks):
        raise ValueError(f"kernel_size must be a positive int or a tuple of {dims} positive ints, "
                         f"got {kernel_size!r}")


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
        _check_kernel_size(kernel_size, len(self.conv.dilation))
        if r > 0:
            self._add_factors(self.conv.weight)
        self.reset_parameters()

    def reset_parameters(self):
        self.conv.reset_parameters()
        self.reset_lora_parameters()

    def _rank_rows(self):
        return self.conv.kernel_size[0]

    def factor_shapes(self, r):
        c, k0 = self.conv, self.conv.kernel_size[0]
        rest = math.prod(c.kernel_size[1:])
        return (r * k0, c.in_channels * rest), (c.out_channels // c.groups * k0, r * k0)

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

    def _forward(self, x):
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
