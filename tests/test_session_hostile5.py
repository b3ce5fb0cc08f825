"""Hostile tests of two fixes: ops._kernel_lossless / _take_back (an error between a kernel lossless pass and its
record takes the pass back) and sharded._settle / merge_parts / swap_parts (an error in one part of a sharded
weight on one rank is agreed on by every rank, every rank puts its parts back and raises).

What holds (plain tests): on 2 gloo ranks, errors (RuntimeError, KeyboardInterrupt, a refusal on one rank beside an
error on the other) injected into any part on either rank, for FSDP2 and ColwiseLoRA(blocks=3), float32 / float16 /
bfloat16, transposed layouts (fan_in_fan_out, Embedding), MergedLinear with disabled blocks and a rank whose shard
holds no enabled block: every rank raises, reaches the same number of agreements, keeps the weight as it was and
gives the base back bit for bit afterwards (lossy layers: within rounding); the success path makes one agreement.

What did not, found by this file and fixed since (each test says which): the CPU backends' lossless pass had the
window the kernel fix closed; a take-back inside the merge-back that failed too left `weight_is_base` claiming a
base the weight was not; a put-back that raised in merge_parts / swap_parts lost the original error, and in
swap_parts skipped the second agreement the other ranks wait in (a hang); sharded.unmerge_ and the `_whole` path
(a lossless record made before the weight was sharded) had no agreement at all.

A put-back that itself fails in merge_parts (a second fault) left that part merged under a layer that counted itself
unmerged (a strict xfail until the layer learnt to refuse a weight it cannot describe: LoRALayer._writing).

Two-rank scenarios run in a few spawned runs (module-scoped fixtures), each scenario on its own process group with
a short timeout, so that a hang shows as a timeout error in the results instead of stalling the run.
"""
import datetime
import functools
import traceback

import pytest
import torch

import lora_ext
from helpers import RecordingKernels, load_sim, requires_sim, same_bits, small_adapter, weight_with_infs
from lora_ext import lossless, ops, sharded

_sim = load_sim()
OUT, IN = 40, 148


_same = same_bits
_weight = functools.partial(weight_with_infs, OUT, IN)  # (infs, dtype=bfloat16, seed=0)
_adapter = functools.partial(small_adapter, OUT, IN)  # (seed, r=4, mag=0.05)


def _raising(exc_type):
    def record(*args, **kwargs):
        raise exc_type("injected at the record")
    return record


# ---------------------------------------------------------------------------------------------------------------
# single process: the ops-level window on the CPU backends, and a triple fault in the kernel path


def _raising_once(exc_type):
    real, state = lossless.MergeRecord, {"n": 0}

    def record(*args, **kwargs):
        state["n"] += 1
        if state["n"] == 1:
            raise exc_type("injected at the record")
        return real(*args, **kwargs)
    return record


@pytest.mark.parametrize("every", [False, True], ids=["once", "every_time"])
@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("op", ["merge", "swap"])
def test_cpu_backend_lossless_pass_whose_record_fails_leaves_the_weight(monkeypatch, backend, op, every):
    """Found by this file: the CPU backends had the window b4a7408 closed for the kernels (the record built after
    the pass wrote W, outside any take-back; Ctrl-C held back by the C++ pass lands there). Now: the weight as it
    was; a swap whose merge-back's record fails too (every_time, C++ path) says weight_is_base over the base."""
    if backend == "cpp" and lossless._cpu is None:
        pytest.skip("lora_ext._cpu not built")
    w0 = _weight(40)
    old, new = _adapter(1) + (0.5,), _adapter(2) + (-0.75,)
    w = w0.clone()
    rec = ops.merge_(w, *old, lossless=True) if op == "swap" else None
    before = w.clone()
    if backend == "reference":
        monkeypatch.setattr(lossless, "_cpu", None)
    monkeypatch.setattr(lossless, "MergeRecord", _raising(KeyboardInterrupt) if every
                        else _raising_once(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt) as err:
        if op == "swap":
            ops.swap_(w, *old, *new, record=rec)
        else:
            ops.merge_(w, *new, lossless=True)
    monkeypatch.undo()
    # (the reference puts a swap's chunks back without a record; the C++ path merges the old adapter back)
    base = op == "swap" and every and backend == "cpp"
    assert getattr(err.value, "weight_is_base", False) == base
    if base:
        assert _same(w, w0)
        return
    assert _same(w, before), "the op raised with the new adapter merged into W and no record for it"
    if op == "swap":
        ops.unmerge_(w, *old, record=getattr(err.value, "record", rec))
        assert _same(w, w0)


@requires_sim
def test_weight_is_base_is_not_claimed_when_the_merge_backs_take_back_fails(monkeypatch):
    """Found by this file: ops._merge_back set err.weight_is_base whenever its merge failed, also when that merge's
    own take-back failed: W held the old adapter's merge, and a layer trusting weight_is_base counted itself
    unmerged on it. Now: no weight_is_base, a note, and W the old merge (made on this backend: bit for bit)."""
    w0 = _weight(40)
    old, new = _adapter(1) + (0.5,), _adapter(2) + (-0.75,)
    w = w0.clone()
    with ops.use_kernels(_sim, "cpu"):
        rec = ops.merge_(w, *old, lossless=True)
    before = w.clone()
    monkeypatch.setattr(ops, "MergeRecord", _raising(RuntimeError))  # every record fails
    # 1 swap pass, 2 its take-back, 3 the merge-back's pass, 4 the merge-back's take-back: fails
    seen = RecordingKernels(fail_at=4, exc=RuntimeError("CUDA error: an illegal memory access"))
    with ops.use_kernels(seen, "cpu"), pytest.raises(RuntimeError, match="injected at the record") as err:
        ops.swap_(w, *old, *new, record=rec)
    monkeypatch.undo()
    assert seen.calls == ["swap_lossless_", "unmerge_lossless_", "merge_lossless_", "unmerge_lossless_"]
    assert not getattr(err.value, "weight_is_base", False)
    assert any("merged back, but its record could not be made" in n for n in getattr(err.value, "__notes__", []))
    assert _same(w, before)
    with ops.use_kernels(_sim, "cpu"):
        ops.unmerge_(w, *old, record=rec)
    assert _same(w, w0)


# ---------------------------------------------------------------------------------------------------------------
# single process: merge_parts / swap_parts with the agreement stood in for (another rank failed)


class _Agreements:
    """Stands in for sharded._all_agree: every rank agreed on the same fingerprint; the other ranks' worst outcome is
    `first` at the first agreement (their part of the write), `later` after (_FAILED: a part holds the base)."""

    def __init__(self, first, later=sharded._OK):
        self.first, self.later, self.calls = first, later, 0

    def __call__(self, weight, fingerprint, outcome=sharded._OK):
        self.calls += 1
        return True, max(self.first if self.calls == 1 else self.later, outcome)


def _two_parts(dtype=torch.float32):
    """A (40, 148) weight cut into two row parts, as a rank's shard meeting two blocks; adapters a and b."""
    w = _weight(0, dtype)
    a, b = _adapter(1), _adapter(2)
    old = [sharded.Part(w[:20], a[0], a[1][:20].contiguous(), {}),
           sharded.Part(w[20:], a[0], a[1][20:].contiguous(), {})]
    new = [sharded.Part(w[:20], b[0], b[1][:20].contiguous(), {}),
           sharded.Part(w[20:], b[0], b[1][20:].contiguous(), {})]
    return w, old, new


@pytest.mark.parametrize("lossless_", [True, False], ids=["lossless", "lossy"])
def test_the_success_path_makes_one_agreement(monkeypatch, lossless_):
    w, old, new = _two_parts()
    agree = _Agreements(sharded._OK)
    monkeypatch.setattr(sharded, "_all_agree", agree)
    recs = sharded.merge_parts(w, old, 0.5, lossless_, "t")
    assert agree.calls == 1 and len(recs) == 2
    sharded.swap_parts(w, old, new, 0.5, 1.5, recs if lossless_ else None, "t")
    assert agree.calls == 2


@pytest.mark.parametrize("lossless_", [True, False], ids=["lossless", "lossy"])
def test_a_failure_elsewhere_puts_both_parts_back(monkeypatch, lossless_):
    w, old, new = _two_parts()
    w0 = w.clone()
    monkeypatch.setattr(sharded, "_all_agree", _Agreements(sharded._OK))
    recs = sharded.merge_parts(w, old, 0.5, lossless_, "t")
    merged = w.clone()
    agree = _Agreements(sharded._FAILED)
    monkeypatch.setattr(sharded, "_all_agree", agree)
    with pytest.raises(RuntimeError, match="failed on another rank") as err:
        sharded.swap_parts(w, old, new, 0.5, 1.5, recs if lossless_ else None, "t")
    assert agree.calls == 2  # (the second agreement: whether every part everywhere is back)
    if lossless_:
        assert _same(w, merged) and len(err.value.record) == 2
        for p, rec in zip(old, err.value.record):
            ops.unmerge_(p.weight, p.lora_A, p.lora_B, 0.5, record=rec)
        assert _same(w, w0)
    else:
        torch.testing.assert_close(w, merged, atol=1e-6, rtol=0)
    agree = _Agreements(sharded._FAILED)
    monkeypatch.setattr(sharded, "_all_agree", agree)
    w1 = w.clone()
    with pytest.raises(RuntimeError, match="failed on another rank"):
        sharded.merge_parts(w, new, 1.0, lossless_, "t")
    assert agree.calls == 1
    if lossless_:
        assert _same(w, w1)
    else:
        torch.testing.assert_close(w, w1, atol=1e-6, rtol=0)


def test_a_base_elsewhere_takes_every_part_here_to_the_base(monkeypatch):
    w, old, new = _two_parts(torch.bfloat16)
    w0 = w.clone()
    monkeypatch.setattr(sharded, "_all_agree", _Agreements(sharded._OK))
    recs = sharded.merge_parts(w, old, 0.5, True, "t")
    agree = _Agreements(sharded._FAILED, later=sharded._FAILED)
    monkeypatch.setattr(sharded, "_all_agree", agree)
    with pytest.raises(RuntimeError, match="failed on another rank") as err:
        sharded.swap_parts(w, old, new, 0.5, 1.5, recs, "t")
    assert agree.calls == 2 and err.value.weight_is_base and _same(w, w0)


def test_a_back_swap_that_raises_still_makes_the_second_agreement(monkeypatch):
    """Found by this file (fixed): a back-swap that raised left the rank before swap_parts' second agreement, which
    the other ranks make (a hang)."""
    w, old, new = _two_parts()
    monkeypatch.setattr(sharded, "_all_agree", _Agreements(sharded._OK))
    recs = sharded.merge_parts(w, old, 0.5, True, "t")
    agree = _Agreements(sharded._FAILED)  # another rank failed: this one swapped both parts and puts them back
    monkeypatch.setattr(sharded, "_all_agree", agree)
    real, n = ops.swap_, []

    def swap(*args, **kwargs):
        n.append(1)
        if len(n) == 3:  # the first back-swap
            raise RuntimeError("CUDA out of memory (in the put-back)")
        return real(*args, **kwargs)
    monkeypatch.setattr(ops, "swap_", swap)
    with pytest.raises(BaseException):
        sharded.swap_parts(w, old, new, 0.5, 1.5, recs, "t")
    assert agree.calls == 2, "a rank whose put-back raised made fewer agreements than the ranks that wait for it"


def test_a_put_back_that_raises_keeps_the_original_error(monkeypatch):
    """Found by this file (fixed): an unmerge raising in merge_parts' put-back replaced the error being settled."""
    w, old, _ = _two_parts()
    monkeypatch.setattr(sharded, "_all_agree", _Agreements(sharded._OK))
    real_merge, n = ops.merge_, []

    def merge(*args, **kwargs):
        n.append(1)
        if len(n) == 2:
            raise RuntimeError("CUDA out of memory (the original)")
        return real_merge(*args, **kwargs)

    def unmerge(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (in the put-back)")
    monkeypatch.setattr(ops, "merge_", merge)
    monkeypatch.setattr(ops, "unmerge_", unmerge)
    with pytest.raises(RuntimeError) as err:
        sharded.merge_parts(w, old, 0.5, True, "t")
    seen, e = [], err.value
    while e is not None:
        seen.append(str(e))
        e = e.__cause__ or e.__context__
    seen += getattr(err.value, "__notes__", [])
    assert any("the original" in s for s in seen), seen


# ---------------------------------------------------------------------------------------------------------------
# two gloo ranks


def _mesh(seconds):
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    dist.barrier()  # (the default group): every rank done with the previous scenario
    return DeviceMesh.from_group(dist.new_group(timeout=datetime.timedelta(seconds=seconds)), "cpu")


def _make(mesh, style="fsdp", kind="ml", enable=(True, True, True), dtype=torch.float32, lossless_=True,
          merge_first=False):
    torch.manual_seed(0)
    if kind == "emb":
        layer = lora_ext.Embedding(24, 16, r=2, lora_alpha=2, lossless=lossless_)
    else:
        layer = lora_ext.MergedLinear(16, 24, r=2, lora_alpha=2, enable_lora=list(enable), lossless=lossless_,
                                      fan_in_fan_out=kind == "fan")
    torch.nn.init.normal_(layer.lora_B, std=0.2)
    g = torch.Generator().manual_seed(3)
    (ra, ca), (rb, cb) = layer.factor_shapes(2)
    layer.add_adapter("b", torch.randn(ra, ca, generator=g) * 0.3, torch.randn(rb, cb, generator=g) * 0.3, 1.5)
    layer = layer.to(dtype)
    if merge_first:  # a lossless record for the whole weight, made before it was sharded (sharded._whole)
        layer.eval()
    if style == "fsdp":
        from torch.distributed.fsdp import fully_shard
        fully_shard(layer, mesh=mesh)
    else:
        from torch.distributed.tensor.parallel import parallelize_module

        from lora_ext.parallel import ColwiseLoRA
        layer = parallelize_module(layer, mesh, ColwiseLoRA(blocks=3))
    return layer


def _local(layer):
    return layer.weight.detach().to_local().clone()


class _Inject:
    """ops.merge_ / swap_ / unmerge_ raising plan[(rank, name, n)] = (type, *args) at their n-th call (fresh each)."""

    def __init__(self, rank, plan):
        self.rank, self.plan, self.n, self.saved = rank, plan, {}, {}

    def __enter__(self):
        for name in ("merge_", "swap_", "unmerge_"):
            self.saved[name] = real = getattr(ops, name)

            def f(*args, _real=real, _name=name, **kwargs):
                self.n[_name] = self.n.get(_name, 0) + 1
                exc = self.plan.get((self.rank, _name, self.n[_name]))
                if exc is not None:
                    raise exc[0](*exc[1:])
                return _real(*args, **kwargs)
            setattr(ops, name, f)
        return self

    def __exit__(self, *exc):
        for name, real in self.saved.items():
            setattr(ops, name, real)


def _scenario(rank, op, plan, after=True, seconds=8, **kw):
    layer = _make(_mesh(seconds), **kw)
    base = _local(layer)
    if op in ("switch", "unmerge"):
        layer.eval()
    before = _local(layer)
    out = {"error": None, "timed_out": False}
    agreements, real_agree = [], sharded._all_agree

    def counting(*args, **kwargs):
        agreements.append(1)
        return real_agree(*args, **kwargs)
    sharded._all_agree = counting
    try:
        with _Inject(rank, plan):
            {"switch": lambda: layer.set_adapter("b"), "merge": layer.eval, "unmerge": layer.train}[op]()
    except BaseException as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {e}"
        out["timed_out"] = "Timed out" in str(e) or "timeout" in str(e)
        out["weight_is_base"] = getattr(e, "weight_is_base", False)
        out["notes"] = list(getattr(e, "__notes__", []))
    finally:
        sharded._all_agree = real_agree
    now = _local(layer)
    out.update(agreements=len(agreements), merged=layer.merged, active=layer.active_adapter,
               is_before=_same(now, before), is_base=_same(now, base),
               close_before=bool(torch.allclose(now.float(), before.float(), atol=1e-5, rtol=0)),
               broken=layer.__dict__.get("_broken") is not None)
    if out["broken"]:  # (no forward here: under FSDP2 the other rank would wait in its all-gather)
        try:
            layer.state_dict()
            out["state_dict_refused"] = False
        except RuntimeError as e:
            out["state_dict_refused"] = "left its weight unknown" in str(e)
    if after:  # the layer goes on: unmerged gives the base back; a merge and a switch work
        layer.train()
        out["train_base"] = _same(_local(layer), base)
        out["train_close"] = bool(torch.allclose(_local(layer).float(), base.float(), atol=1e-5, rtol=0))
        layer.eval()
        layer.set_adapter("b")
        layer.train()
        out["cycle_close"] = bool(torch.allclose(_local(layer).float(), base.float(), atol=1e-5, rtol=0))
    return out


def run_scenarios(rank, world, cases):
    """Each case in turn on this rank: {name: result}, an unexpected error recorded as {"crash": traceback}."""
    res = {}
    for name, kw in cases:
        try:
            res[name] = _scenario(rank, **kw)
        except BaseException:  # noqa: BLE001
            res[name] = {"crash": traceback.format_exc()[-1500:]}
    return res


def _run(cases, timeout=120):
    from dist import run_ranks
    return run_ranks(run_scenarios, cases, timeout=timeout)


OOM = (RuntimeError, "CUDA out of memory (injected)")
KBI = (KeyboardInterrupt,)
REFUSED = (lossless.ExceptionOverflow, "refused (injected)")

# name: (kwargs, the rank whose error is its own (others: "failed on another rank"), its error type)
GOOD = {
    "fsdp_merge_rank0_part2": (dict(op="merge", plan={(0, "merge_", 2): OOM}), 0, "RuntimeError"),
    "fsdp_merge_kbi_rank1_part1": (dict(op="merge", plan={(1, "merge_", 1): KBI}), 1, "KeyboardInterrupt"),
    "fsdp_bf16_switch_rank0_part2": (dict(op="switch", dtype=torch.bfloat16, plan={(0, "swap_", 2): OOM}), 0,
                                     "RuntimeError"),
    "fsdp_fp16_merge_rank1_part2": (dict(op="merge", dtype=torch.float16, plan={(1, "merge_", 2): OOM}), 1,
                                    "RuntimeError"),
    # rank 0's shard (rows 0:12) meets no enabled block: no parts there
    "zero_parts_merge": (dict(op="merge", enable=(False, False, True), plan={(1, "merge_", 1): OOM}), 1,
                         "RuntimeError"),
    "zero_parts_switch": (dict(op="switch", enable=(False, False, True), plan={(1, "swap_", 1): OOM}), 1,
                          "RuntimeError"),
    "zero_parts_switch_other_side": (dict(op="switch", enable=(True, False, False), plan={(0, "swap_", 1): OOM}), 0,
                                     "RuntimeError"),
    "embedding_bf16_switch": (dict(op="switch", kind="emb", dtype=torch.bfloat16, plan={(1, "swap_", 1): OOM}), 1,
                              "RuntimeError"),
    "fan_in_fan_out_fp16_switch": (dict(op="switch", kind="fan", dtype=torch.float16,
                                        plan={(1, "swap_", 1): OOM}), 1, "RuntimeError"),
    "fan_in_fan_out_merge_kbi": (dict(op="merge", kind="fan", plan={(0, "merge_", 1): KBI}), 0, "KeyboardInterrupt"),
    "tp_bf16_switch_kbi": (dict(op="switch", style="tp", dtype=torch.bfloat16, plan={(0, "swap_", 1): KBI}), 0,
                           "KeyboardInterrupt"),
    "tp_merge_disabled_block": (dict(op="merge", style="tp", enable=(False, True, True),
                                     plan={(1, "merge_", 1): OOM}), 1, "RuntimeError"),
    "refusal_on_one_rank_error_on_the_other": (dict(op="switch", plan={(1, "swap_", 1): REFUSED,
                                                                       (0, "swap_", 2): OOM}), 0, "RuntimeError"),
    "lossy_merge": (dict(op="merge", lossless_=False, plan={(1, "merge_", 2): OOM}), 1, "RuntimeError"),
    "lossy_switch": (dict(op="switch", lossless_=False, plan={(1, "swap_", 2): OOM}), 1, "RuntimeError"),
    "success_switch": (dict(op="switch", plan={}), None, None),
}


@pytest.fixture(scope="module")
def good_results():
    return _run([(name, kw) for name, (kw, _, _) in GOOD.items()])


@pytest.mark.parametrize("name", list(GOOD))
def test_two_ranks_settle_an_error_anywhere(good_results, name):
    kw, own, kind = GOOD[name]
    lossy = kw.get("lossless_") is False
    results = [good_results[0][name], good_results[1][name]]
    for rank, r in enumerate(results):
        assert "crash" not in r, (rank, r)
        assert not r["timed_out"], (rank, r)
        if own is None:
            assert r["error"] is None and r["active"] == "b", (rank, r)
        elif rank == own:
            assert r["error"].startswith(kind + ":"), (rank, r)
        elif name == "refusal_on_one_rank_error_on_the_other":
            assert r["error"].startswith("ExceptionOverflow:"), (rank, r)
        else:
            assert r["error"].startswith("RuntimeError:") and "failed on another rank" in r["error"], (rank, r)
        if own is not None:
            assert r["active"] == "default" and r["merged"] == (kw["op"] == "switch"), (rank, r)
            assert r["close_before"] if lossy else r["is_before"], (rank, r)
            assert not r["weight_is_base"], (rank, r)
        assert (r["train_close"] if lossy else r["train_base"]) and r["cycle_close"], (rank, r)
    assert results[0]["agreements"] == results[1]["agreements"], results


# -- bugs on two ranks ------------------------------------------------------------------------------------------

BUGS = [
    # rank 1 fails in its 2nd part; rank 0's put-back unmerge of its 1st part raises
    ("merge_put_back_raises", dict(op="merge", after=False, plan={(1, "merge_", 2): OOM,
                                                                  (0, "unmerge_", 1): (RuntimeError, "put-back")})),
    # sharded.unmerge_: no agreement; rank 1 fails in its 2nd part after unmerging its 1st
    ("unmerge_part_fails", dict(op="unmerge", after=False, plan={(1, "unmerge_", 2): OOM})),
    # a record made before fully_shard: sharded._whole, no agreement
    ("whole_unmerge_fails", dict(op="unmerge", after=False, merge_first=True, plan={(1, "unmerge_", 1): OOM})),
]


@pytest.fixture(scope="module")
def bug_results():
    return _run(BUGS)


def _consistent(r):
    """The layer's bookkeeping matches its shard: merged and as before, or unmerged and the base."""
    return (r["merged"] and r["is_before"]) or (not r["merged"] and r["is_base"])


def test_a_put_back_that_raises_leaves_the_layer_refusing_instead_of_merged_under_unmerged(bug_results):
    """Was a strict xfail: rank 0's put-back unmerge of its 1st part raised (a second fault) and left that part
    merged under a layer that counted itself unmerged: its next eval() merged the adapter a second time, and
    state_dict saved the merged part as the base. Now that layer is broken (LoRALayer._writing): it refuses, naming
    the error, until its weight is loaded again. Rank 1 put everything back and is consistent."""
    r0, r1 = (bug_results[rank]["merge_put_back_raises"] for rank in range(2))
    for rank, r in enumerate((r0, r1)):
        assert "crash" not in r and r["error"] is not None and not r["timed_out"], (rank, r)
    assert r0["broken"] and not r0["merged"] and not r0["is_base"], r0
    assert r0["state_dict_refused"], r0
    assert any("part 0 of this rank's shard could not be put back" in n for n in r0["notes"]), r0
    assert any("left its weight unknown" in n for n in r0["notes"]), r0
    assert not r1["broken"] and _consistent(r1), r1


def test_a_sharded_unmerge_that_fails_on_one_rank(bug_results):
    """Found by this file (fixed): sharded.unmerge_ had no agreement: one rank's error left it half unmerged under a
    merged layer while the others unmerged."""
    rs = [bug_results[rank]["unmerge_part_fails"] for rank in range(2)]
    assert all("crash" not in r for r in rs), rs
    assert rs[0]["merged"] == rs[1]["merged"], rs
    assert all(_consistent(r) for r in rs), rs


def test_a_whole_weight_unmerge_that_fails_on_one_rank(bug_results):
    """Found by this file (fixed): sharded._whole (a record made before sharding) had no agreement: one rank's error
    left the ranks apart."""
    rs = [bug_results[rank]["whole_unmerge_fails"] for rank in range(2)]
    assert all("crash" not in r for r in rs), rs
    assert rs[0]["merged"] == rs[1]["merged"], rs


def test_a_back_swap_that_raises_on_one_rank_hangs_the_other():
    """Found by this file (fixed): a back-swap raising on rank 0 skipped the agreement rank 1 waited in (a hang)."""
    cases = [("switch_put_back_raises", dict(op="switch", after=False, seconds=4,
                                             plan={(1, "swap_", 2): OOM, (0, "swap_", 3): (RuntimeError, "put-back")}))]
    rs = [r["switch_put_back_raises"] for r in _run(cases)]
    assert all("crash" not in r and r["error"] is not None for r in rs), rs
    assert not any(r["timed_out"] for r in rs), rs
    assert rs[0]["agreements"] == rs[1]["agreements"], rs


def test_a_whole_weight_switch_that_fails_on_one_rank():
    """Found by this file (fixed): sharded._whole's switch: rank 0 swapped while rank 1 failed, then waited in the
    factors' copy."""
    cases = [("whole_switch_fails", dict(op="switch", after=False, seconds=4, merge_first=True,
                                         plan={(1, "swap_", 1): OOM}))]
    rs = [r["whole_switch_fails"] for r in _run(cases)]
    assert all("crash" not in r and r["error"] is not None for r in rs), rs
    assert not any(r["timed_out"] for r in rs), rs
    assert all(r["active"] == "default" and r["is_before"] for r in rs), rs
