"""Which tensors the compiled backends (lora_ext._C's CUDA launchers, lora_ext._cpu's C++ loops, lora_ext._sim) may
read. They read a tensor's storage through its data pointer, with its sizes and strides, and nothing else:

- a tensor subclass may have no storage (a wrapper such as DTensor or TwoTensor: reading it crashed the process) or
  a meaning of its own that plain reads would skip, so only plain Tensors and Parameters are taken;
- a negative-bit view (torch._neg_view, some views of complex tensors) holds -x in storage that reads as x;
- under a torch.func transform (grad, vmap, jacrev, functionalize) the tensors are wrappers too, and under forward-mode
  AD a dual tensor's tangent would be dropped.

Everything else goes to the pure-torch reference, which every transform, subclass and AD mode sees through."""
import torch
from torch import Tensor
from torch.autograd import forward_ad

_Parameter = torch.nn.Parameter


def transformed() -> bool:
    """Whether a torch.func transform or a forward-mode AD level (torch.autograd.forward_ad.dual_level) is active."""
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


def plain(*tensors) -> bool:
    """Whether every tensor among `tensors` (others ignored) is a plain Tensor or Parameter, no subclass."""
    for t in tensors:
        kind = type(t)
        if kind is not Tensor and kind is not _Parameter and t is not None and isinstance(t, Tensor):
            return False
    return True


def readable(*tensors) -> bool:
    """Whether the compiled backends may read every tensor among `tensors` (others, such as ints or None, ignored).
    On every forward: written for host time (about 1 us for a linear's seven operands)."""
    if transformed():
        return False
    for t in tensors:
        kind = type(t)
        if kind is Tensor or kind is _Parameter:
            if t.is_neg():
                return False
        elif t is not None and isinstance(t, Tensor):
            return False
    return True
