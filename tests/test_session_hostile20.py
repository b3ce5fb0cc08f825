"""The twentieth session's hostile rounds: each test fails on the code before its fix (checked in a clone), unless
it says that it guards against a false tie or a cost."""
import copy
import io
import pickle
import threading

import pytest
import torch
import torch.nn as nn

import lora_ext as lora
from helpers import racing, rel_err
from lora_ext import ties
from test_session_hostile19 import _check_tied, _eval, _round_trip, _Tied


class _Pause(nn.Module):
    """Holds the unpickling (or deep copy) of a model at this module until the test lets it go."""
    reached = threading.Event()
    go = threading.Event()

    def __setstate__(self, state):
        super().__setstate__(state)
        _Pause.reached.set()
        assert _Pause.go.wait(60)

    def __deepcopy__(self, memo):
        _Pause.reached.set()
        assert _Pause.go.wait(60)
        return _Pause()


def _held(make, *args):
    """Runs make(*args) on a thread until it reaches the pause; returns (thread, result list)."""
    _Pause.reached.clear()
    _Pause.go.clear()
    out = []
    thread = threading.Thread(target=lambda: out.append(make(*args)))
    thread.start()
    assert _Pause.reached.wait(60)
    return thread, out


def _release(thread):
    _Pause.go.set()
    thread.join(60)
    assert not thread.is_alive()


@pytest.mark.parametrize("head_first", [True, False])
def test_an_unpickled_tie_survives_another_threads_eval_during_the_load(head_first):
    # thread A unpickles a model with a pause between its head and the plain embedding holding the head's weight;
    # thread B evals a model of its own while A's load is between the two: B's look for plain modules found none
    # for A's head and forgot that A's head was unpickled, so A's eval() merged into the embedding's lookups (13.7
    # off in the helper's threaded run); the embedding first, a look then noted it before the head existed (16.3)
    buf = io.BytesIO()
    torch.save(_Tied(head_first, between=_Pause()), buf)
    thread, out = _held(lambda: torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    _check_tied(_round_trip(_Tied(head_first=True)))  # B's own eval, during A's load
    _release(thread)
    _check_tied(out[0])


def test_a_copied_tie_survives_another_threads_eval_during_the_copy():
    # the same for a deep copy: a tie made in the copy after the copy (copy.head.weight = copy.emb.weight) was looked
    # for only if no other thread's look ran during the copy
    thread, out = _held(copy.deepcopy, _Tied(head_first=True, tie=False, between=_Pause()))
    _check_tied(_round_trip(_Tied(head_first=True)))
    _release(thread)
    model = out[0]
    model.head.weight = model.emb.weight
    _check_tied(model)


def test_no_look_over_the_interpreters_objects_after_the_first(monkeypatch):
    # guards against a cost: plain modules unpickled or copied note themselves, so loads, copies (an EMA's deepcopy
    # of a plain module every step: 69 ms a step at 1.3 M objects with a look after each), evals and ties look over
    # the interpreter's objects never after the first look (for modules made before lora_ext's import)
    with ties._lock:
        ties._look()
    looks = []
    find = ties._live_targets
    monkeypatch.setattr(ties, "_live_targets", lambda: looks.append(1) or find())
    data = pickle.dumps(_Tied(head_first=True))
    _check_tied(pickle.loads(data))
    model = pickle.loads(data)
    out = []
    thread = threading.Thread(target=lambda: out.append(_check_tied(model)))
    thread.start()
    thread.join(60)
    assert out == [None]
    layer, plain = lora.Linear(8, 8, r=2), nn.Linear(8, 8)
    for _ in range(3):
        copy.deepcopy(plain)
        layer.eval()
        layer.train()
    assert layer.merged is False and looks == []


def test_a_shallow_copy_of_a_tied_head_is_tied():
    # copy.copy of a head given a plain embedding's weight, put in the head's place: the copy had no givers (no plain
    # module was rebuilt, so no look ran) and eval() merged into the embedding's lookups (23.3 off)
    model = _Tied()
    model.head = copy.copy(model.head)
    _check_tied(model)


def test_the_look_for_plain_modules_leaves_other_threads_tuples_alone():
    # the look for an unpickled layer's plain modules held a list of every live object (gc.get_objects()) while Python
    # code ran: a tuple another thread was building (tuple() of a generator) then had two references and its resize
    # failed there with SystemError (the first look, in every run)
    data = pickle.dumps(_Tied(head_first=True))
    errors = []

    def numbers():
        yield from range(40)

    def build(stop):
        while not stop.is_set():
            try:
                tuple(numbers())
            except SystemError as e:
                errors.append(e)

    with racing(build):
        for _ in range(20):
            _check_tied(pickle.loads(data))
    assert not errors


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 50, bias=False)

    def forward(self, ids):
        return self.head(self.emb(ids))


@pytest.mark.parametrize("how", ["pickled", "deepcopied"])
def test_a_new_layer_given_an_unpickled_or_copied_plain_modules_weight_is_tied(how):
    # a plain model unpickled or deep-copied registers nothing: a lora_ext head made afterwards and given its plain
    # embedding's weight was not tied to it, and eval() merged into the embedding's lookups
    model = pickle.loads(pickle.dumps(_Plain())) if how == "pickled" else copy.deepcopy(_Plain())
    model.head = lora.Linear(16, 50, r=4, lora_alpha=8, bias=False)
    nn.init.normal_(model.head.lora_B)
    model.head.weight = model.emb.weight
    _check_tied(model)


class _ScaledEmbedding(nn.Embedding):
    """A subclass of a plain layer (transformers' *ScaledWordEmbedding are such)."""


@pytest.mark.parametrize("how", ["made", "pickled", "merged first"])
def test_a_subclass_of_a_plain_layer_is_a_tie(how):
    # a lora_ext head given the weight of a subclass of nn.Embedding: only the exact classes counted, so eval()
    # merged into the embedding's lookups (17.7 off); and a subclass given a merged head's weight kept the merge
    model = _Tied()
    model.emb = _ScaledEmbedding(50, 16)
    if how == "merged first":
        model.head.weight = nn.Parameter(model.emb.weight.detach().clone())
        model.eval()
        assert model.head.merged
        with pytest.warns(UserWarning, match="was given to a _ScaledEmbedding"):
            model.emb.weight = model.head.weight
        assert not model.head.merged
        model.train()
    else:
        model.head.weight = model.emb.weight
    if how == "pickled":
        model = pickle.loads(pickle.dumps(model))
    _check_tied(model, giver="_ScaledEmbedding")


_BEFORE_IMPORT = """
import torch.nn as nn
class EqLinear(nn.Linear):  # (an __eq__ of its own and no __hash__: unhashable, as a dataclass)
    def __eq__(self, other):
        return self is other
lazy, unhashable = nn.LazyConv2d(8, 3), EqLinear(4, 4)
import copy, pickle, torch
import lora_ext as lora
layer = lora.Linear(4, 4, r=2)  # (the first query for ties looks for the modules made before the import)
layer.eval()
assert layer.merged
for module in (nn.LazyLinear(4), EqLinear(4, 4), lazy, unhashable):
    copy.deepcopy(module)
    pickle.loads(pickle.dumps(module))
lazy(torch.randn(1, 3, 8, 8))
print("ok")
"""


def test_lazy_and_unhashable_subclasses_are_made_copied_and_pickled():
    # guards this session's own regression (subclasses of the plain layers count as ties): a lazy module's weight
    # (an UninitializedParameter) raised ValueError at its registration, and an unhashable subclass TypeError, also
    # from the first query for ties when made before lora_ext's import
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", _BEFORE_IMPORT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("how", ["parametrize", "spectral_norm", "weight_norm"])
def test_a_parametrized_giver_is_still_a_tie(how):
    # a head given a plain embedding's weight, then the embedding parametrized: it computes from that Parameter
    # still (parametrizations.weight.original; the old weight_norm's weight_v over its bytes), but only its
    # 'weight' Parameter was looked at, so eval() merged into its lookups (4.59 off; spectral_norm 0.18,
    # weight_norm 1.83)
    from torch.nn.utils import parametrizations, parametrize, weight_norm
    model = _Tied()
    original = model.emb.weight.detach().clone()
    if how == "parametrize":
        parametrize.register_parametrization(model.emb, "weight", _Double())
    elif how == "spectral_norm":
        parametrizations.spectral_norm(model.emb)
    else:
        weight_norm(model.emb)
    ids = torch.randint(0, 50, (12,))
    model.emb.eval()
    with torch.no_grad():
        looked_up = model.emb(ids).double()
    delta = (model.head.lora_B.detach().double() @ model.head.lora_A.detach().double()) * 2.0
    warned = _eval(model)
    assert not model.head.merged and any("shared with a" in m for m in warned)
    assert torch.equal(model.head.weight.detach(), original)
    with torch.no_grad():
        assert torch.equal(model.emb(ids).double(), looked_up)
        assert rel_err(model(ids).double(), looked_up @ (original.double() + delta).t()) < 1e-6
