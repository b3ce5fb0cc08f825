"""Whether this thread's call is being traced into a program, and by what.

torch.compiler.is_compiling() reads one process-wide flag, which torch.compile sets for a whole compile session
(torch 2.14: convert_frame's _compile_session_context) and torch.export for an export: it is True on every thread
while any thread compiles or exports. lora_ext's eager paths that ask it (the model lock's hooks, the merged
forward's choice, the ops' fast paths) then took another thread's compile for their own: an eager forward skipped
the model's lock while a switch ran inside it (R4: outputs of layer 0 on one adapter and layer 1 on the other, 9.08
off either), and a merged layer's functional_call dropped its adapter (0.443 off). The questions here are this
thread's: dynamo's own trace (it folds torch.compiler.is_dynamo_compiling() to True), or a trace that runs Python
eagerly under a fake or proxy dispatch mode on this thread (torch.export's non-strict trace, make_fx, AOTAutograd's
fake propagation through custom ops)."""
import torch

_MODES = tuple(getattr(torch._C._TorchDispatchModeKey, key) for key in ("FAKE", "PROXY")
               if hasattr(torch._C._TorchDispatchModeKey, key))


def _traced_here() -> bool:
    """Whether a fake or proxy dispatch mode is on this thread's mode stack (thread-local)."""
    return any(torch._C._get_dispatch_mode(key) is not None for key in _MODES)


_compiler = torch.compiler
# the flag torch.compiler.is_compiling() returns (torch 2.11 and 2.14), read directly on the eager hot path (several
# times per layer's forward: 75 ns a call where is_compiling() made it 225); is_compiling() where a torch lacks it
_HAS_FLAG = isinstance(getattr(_compiler, "_is_compiling_flag", None), bool)


def compiling() -> bool:
    """torch.compiler.is_compiling(), for this thread: dynamo traces this call (torch.compile, strict export), or
    another tracer runs it under a fake or proxy mode (non-strict export, make_fx) while the process-wide flag is
    set. Eager calls on other threads during a compile get False. Two reads when no thread compiles."""
    if _compiler.is_dynamo_compiling():
        return True
    return (_compiler._is_compiling_flag if _HAS_FLAG else _compiler.is_compiling()) and _traced_here()


def exporting() -> bool:
    """torch.compiler.is_exporting(), for this thread: read from the flag torch.export sets (torch 2.11's dynamo
    folds is_exporting() to True in every trace it makes, torch.compile's too: a compiled merged layer then traced
    the forward an exported program serves, from the weight alone, and its factors got no gradient; dynamo reads the
    flag itself as the value it holds, with a guard on it), and only while this thread traces (compiling(): the flag
    is process-wide)."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return (torch.compiler.is_exporting() if flag is None else bool(flag)) and compiling()


def _eager_only(*functions) -> None:
    """Never compiled as frames of their own: under a torch.compile'd callable, code that dynamo gave up on runs
    eagerly, but each function it calls is compiled as a frame of its own, where dynamo folds is_dynamo_compiling()
    to True: these questions, asked from that eager code, then answered True (a compiled mixed batch ran its traced
    form eagerly and refused a BatchNorm that eager serves). Inlined into a frame dynamo traces, they still fold."""
    try:
        from torch._dynamo.eval_frame import skip_code
    except ImportError:  # (a torch without dynamo's frame strategies: nothing compiles them)
        return
    for function in functions:
        skip_code(function.__code__)


_eager_only(_traced_here, compiling, exporting)
