"""Bugs found by the thirty-fourth session's hostile testers and its own reading, each shown failing on the code
before its fix."""
import dis
import os
import signal
import sys

import pytest

from lora_ext.named_adapters import deferred_interrupt

_NOP = dis.opmap["NOP"]


class _Landed(Exception):
    """Stands in for an exception Python raises between two statements (an asynchronous exception,
    PyThreadState_SetAsyncExc, as thread-timeout tools raise)."""


def _lines_of(function, op):
    """The (code, line) pairs of `function` that op() reaches, in order (not `try:` NOPs: see hostile26)."""
    seen = []

    def tracer(frame, event, arg):
        if frame.f_code is not function.__code__:
            return None

        def local(frame, event, arg):
            if event == "line" and frame.f_code.co_code[frame.f_lasti] != _NOP:
                seen.append(frame.f_lineno)
            return local
        return local
    sys.settrace(tracer)
    try:
        op()
    finally:
        sys.settrace(None)
    return list(dict.fromkeys(seen))


def _landing_at(function, line, op):
    """op() with _Landed raised at the first arrival at `line` of `function`; whether it landed."""
    landed = [False]

    def tracer(frame, event, arg):
        if frame.f_code is not function.__code__:
            return None

        def local(frame, event, arg):
            if (event == "line" and frame.f_code.co_code[frame.f_lasti] != _NOP and frame.f_lineno == line
                    and not landed[0]):
                landed[0] = True
                raise _Landed("landed between two statements")
            return local
        return local
    sys.settrace(tracer)
    try:
        op()
    except _Landed:
        pass
    finally:
        sys.settrace(None)
    return landed[0]


def _on_term(sig, frame):
    raise TimeoutError("SIGTERM handler ran")


@pytest.fixture
def handlers():
    """SIGINT's default Python handler and a raising SIGTERM handler, put back after the test."""
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_term)
    yield
    for sig, handler in old.items():
        signal.signal(sig, handler)


def _hold_still_works():
    """Nothing is left held: the handlers are the test's, and a new hold defers Ctrl-C to its end."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "Ctrl-C's handler left swapped"
    assert signal.getsignal(signal.SIGTERM) is _on_term, "SIGTERM's handler left swapped"
    assert deferred_interrupt._open is None, "a hold left marked open: later holds would hold nothing"
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            reached.append(True)
    assert reached == [True]


def _one_hold():
    with deferred_interrupt():
        pass


@pytest.mark.parametrize("where", ["__enter__", "deliver"])
def test_an_exception_landing_in_a_hold_never_leaves_ctrl_c_held(handlers, where):
    # h36: an exception landing after __enter__ swapped the handlers, before it noted them (its last statements,
    # outside its try), left Ctrl-C and SIGTERM caught by a hold nobody would end (the `with` runs no __exit__ for
    # an __enter__ that raised): the process ignored both for good. __exit__'s call of deliver(), and deliver()
    # before it put the handlers back, left them swapped the same way (and the hold marked open: later holds held
    # nothing)
    function = getattr(deferred_interrupt, where)
    lines = _lines_of(function, _one_hold)
    assert len(lines) >= 4
    for line in lines:
        assert _landing_at(function, line, _one_hold), line
        _hold_still_works()
