"""Bugs found by the thirty-third session's hostile testers, each shown failing on the code before its fix."""
import dis
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

import lora_ext as lora
from lora_ext import layers as layers_mod
from lora_ext.named_adapters import NamedAdapters, deferred_interrupt

_NOP = dis.opmap["NOP"]


class _Landed(Exception):
    """Stands in for an exception Python raises between two statements, which no hold keeps out (an asynchronous
    exception, PyThreadState_SetAsyncExc, as thread-timeout tools raise; a signal handler of its own on SIGUSR1)."""


def _two_adapters(merged: bool):
    """A Linear(16, 16) with 'default' and 'b' (float64 references of each), merged or not, frozen."""
    torch.manual_seed(0)
    layer = lora.Linear(16, 16, r=2, lora_alpha=2, lora_dropout=0.1)
    with torch.no_grad():
        layer.lora_A.normal_(0, 0.5)
        layer.lora_B.normal_(0, 0.5)
    layer.add_adapter("b", torch.randn(2, 16) * 0.5, torch.randn(16, 2) * 0.5, 1.5)
    layer.set_adapter_dropout("b", 0.3)
    layer.requires_grad_(False)
    x = torch.randn(5, 16)
    W, b = layer.weight.detach().double().clone(), layer.bias.detach().double().clone()
    refs = {}
    for name in ("default", "b"):
        A, B, s = layer.get_adapter(name) if name != layer.active_adapter else (layer.lora_A, layer.lora_B,
                                                                                 layer.scaling)
        refs[name] = x.double() @ (W + s * B.detach().double() @ A.detach().double()).T + b
    layer.train(not merged)
    return layer, x, refs


def _serves_what_it_says_or_refuses(layer, x, refs) -> str:
    """'refused' (naming the failed write), or 'served': the stated adapter, and each adapter after a switch to it
    (with its own dropout probability; the forwards with the dropout module off)."""
    layer.lora_dropout.eval()
    try:
        with torch.no_grad():
            y = layer(x).double()
    except RuntimeError as err:
        assert "failed part way" in str(err) or "then failed before its bookkeeping" in str(err), str(err)
        return "refused"
    assert float((y - refs[layer.active_adapter]).abs().max()) < 1e-4, f"says {layer.active_adapter!r}, serves another"
    dropouts = {"default": 0.1, "b": 0.3}
    for name in ("b", "default", "b"):
        layer.set_adapter(name)
        with torch.no_grad():
            assert float((layer(x).double() - refs[name]).abs().max()) < 1e-4, f"adapter {name!r} lost its values"
        assert layer.lora_dropout.p == dropouts[name], f"adapter {name!r} trains with another's dropout"
    return "served"


# a switch's own code, a write's and its marks' (not the ops: README names the window left inside them)
_WRITE_CODES = {NamedAdapters.set_adapter.__code__, NamedAdapters._activate.__code__,
                NamedAdapters._activate_as_normal_tensors.__code__, NamedAdapters._switch_dropout.__code__,
                lora.Linear._swap_merged.__code__, lora.Linear._merge.__code__, lora.Linear._unmerge.__code__,
                lora.Linear.merge.__code__, lora.Linear.unmerge.__code__, lora.Linear.train.__code__,
                layers_mod._WriteMark.__setitem__.__code__}


def _switch_landing_at(layer, line, op=lambda layer: layer.set_adapter("b")):
    """op(layer) with _Landed raised at the first time `line` (code, lineno) of _WRITE_CODES is reached, or (line
    None) the lines op reaches there; whether it landed."""
    seen, landed = [], [False]

    def tracer(frame, event, arg):
        if frame.f_code not in _WRITE_CODES:
            return None

        def local(frame, event, arg):
            # (not at a `try:` line's NOP, which lies outside the exception table of a `with` around it: raised
            # there, the exception skips the with's __exit__, which no real exception does; asynchronous ones land
            # at calls and jumps)
            if event == "line" and frame.f_code.co_code[frame.f_lasti] != _NOP:
                key = (frame.f_code, frame.f_lineno)
                if line is None:
                    seen.append(key)
                elif key == line and not landed[0]:
                    landed[0] = True
                    raise _Landed("landed between two statements")
            return local
        return local

    sys.settrace(tracer)
    try:
        op(layer)
    except _Landed:
        pass
    finally:
        sys.settrace(None)
    assert not layer._lock._is_owned() and not deferred_interrupt._open  # (every block around it ended)
    return seen if line is None else landed[0]


@pytest.mark.parametrize("merged", [True, False], ids=["merged", "unmerged"])
def test_an_exception_landing_anywhere_in_a_layers_switch_leaves_it_serving_what_it_says_or_refusing(merged):
    # h34: the switch wrote the weight and the live factors, then its bookkeeping; an exception landing in between
    # (at `del self._adapters[name]`, after _activate's merged write, ...) left the layer saying 'default' while it
    # served 'b' (merged and unmerged alike, up to 53 off), and filed b's values under 'default' for good. Now every
    # landing once the switch began writing leaves the layer refusing, naming the failed switch
    layer, x, refs = _two_adapters(merged)
    lines = list(dict.fromkeys(_switch_landing_at(layer, None)))
    assert len(lines) > 20
    outcomes = {}
    for line in lines:
        layer, x, refs = _two_adapters(merged)
        assert _switch_landing_at(layer, line)
        outcome = _serves_what_it_says_or_refuses(layer, x, refs)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("served") and outcomes.get("refused")  # (landings before the first write change nothing)


class _LandAtGradModeChange(TorchFunctionMode):
    """Raises KeyboardInterrupt at the first grad-mode change once armed: torch.no_grad()'s exit right after the
    write."""
    armed = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if _LandAtGradModeChange.armed and func is torch._C._set_grad_enabled:
            _LandAtGradModeChange.armed = False
            raise KeyboardInterrupt("landed as no_grad exits")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("what,method", [("merge", "_merge_into"), ("unmerge", "_unmerge_from")])
def test_an_exception_as_no_grad_exits_after_a_merge_leaves_the_layer_refusing(what, method):
    # h34: the write was marked done only after the no_grad block: an exception at its exit left a merge saying
    # unmerged over a merged weight (the adapter twice, 9.42 off) and an unmerge saying merged over the base
    layer, x, refs = _two_adapters(merged=(what == "unmerge"))
    write = getattr(layer, method)

    def armed(*args, **kwargs):
        out = write(*args, **kwargs)
        _LandAtGradModeChange.armed = True
        return out

    setattr(layer, method, armed)
    grad = torch.is_grad_enabled()
    try:
        with _LandAtGradModeChange(), pytest.raises(KeyboardInterrupt):
            layer.merge() if what == "merge" else layer.unmerge()
    finally:
        torch.set_grad_enabled(grad)  # (the exception kept no_grad's exit from putting it back)
        _LandAtGradModeChange.armed = False
        delattr(layer, method)
    assert torch.is_grad_enabled() == grad
    with pytest.raises(RuntimeError, match=f"an? {what} wrote its weight, then failed before its bookkeeping"):
        layer(x)


@pytest.mark.parametrize("what", ["merge", "unmerge", "eval", "train"])
def test_an_exception_landing_anywhere_in_a_merge_or_unmerge_leaves_the_layer_serving_what_it_says_or_refusing(what):
    # r34: landing on `written[0] = True` itself (after the op returned) or between _merge's end and merge()'s
    # `self.merged = True` (and the same for unmerge, train and eval) left `merged` saying the opposite of the weight
    # (the adapter twice, 6.36 off; or dropped, 2.17). Now the weight's version counter tells a write the mark has not
    # said yet, and `merged` is part of the write's bookkeeping
    op = {"merge": lambda m: m.merge(), "unmerge": lambda m: m.unmerge(), "eval": lambda m: m.eval(),
          "train": lambda m: m.train()}[what]
    merged = what in ("unmerge", "train")
    layer, x, refs = _two_adapters(merged)
    lines = list(dict.fromkeys(_switch_landing_at(layer, None, op)))
    assert len(lines) > 10
    outcomes = {}
    for line in lines:
        layer, x, refs = _two_adapters(merged)
        assert _switch_landing_at(layer, line, op)
        outcome = _serves_what_it_says_or_refuses(layer, x, refs)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("served") and outcomes.get("refused")
