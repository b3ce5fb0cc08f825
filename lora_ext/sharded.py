"""Merges, unmerges and switches of layers whose parameters are DTensors: FSDP2's fully_shard shards each
parameter along dim 0 over a 1-D mesh; lora_ext.parallel's tensor-parallel styles shard the weight along its
output (column parallel) or input (row parallel) features and replicate the factors.

A merge never writes into a copy: each rank updates its local shard of the weight in place, at its offset,
with the small factors gathered (`full`). The weight's logical 2-D matrix (the one ops.merge_ writes) is
cut into the parts that lie in the local shard:

- transposed storage (fan_in_fan_out, Embedding): the shard holds input rows r0:r1, so one part, with the
  columns r0:r1 of lora_A;
- otherwise the shard holds output rows r0:r1 (a convolution: output channels, f rows of the 2-D view each), so
  one part per enabled block that meets them, with those rows of that block's lora_B.

Each part is an ordinary ops call (lossless ones return a record each: the layer keeps the list). Nothing moves
between ranks but the factors. Placements other than Shard(0) or Replicate on a 1-D mesh are refused.
"""
import functools
import threading
import weakref
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import lossless as lossless_module

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch without distributed
    DTensor = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


_GATHERS = threading.local()  # full()'s gathers on this thread (gathers(): whether a call made collectives)


def gathers() -> int:
    """How many sharded tensors full() has gathered on this thread so far."""
    return getattr(_GATHERS, "n", 0)


def gathered_since(start: int) -> list:
    """(device mesh, placements) of the tensors full() gathered on this thread since gathers() was `start`, one
    entry per layout of ranks and placements (save_peft_adapter: who writes)."""
    return [(mesh, placements) for mesh, placements, n, _ in getattr(_GATHERS, "log", []) if n > start]


def writer_of(entries) -> Tuple[bool, Optional[object], Optional[int]]:
    """For a file every calling rank holds whole after gathering tensors of `entries` (gathered_since): (whether this
    rank writes it, the process group to agree on, the writer's global rank there). A rank writes where it is the
    first of a group it gathered with (its coordinate 0 along every dimension gathered over: not Replicate, more than
    one rank). Where every entry gathered over one set of ranks (told apart by the ranks, not by mesh objects or
    placements: Shard(0) beside Shard(1), per-layer meshes, an HSDP layer's (1, n) mesh beside the root's (n,)) and one
    entry did so along one dimension, that dimension's group is where the writer says whether it wrote. Tensors
    that made no collective (Replicate only): every rank writes, with no agreement."""
    real = []  # (mesh, this rank's coordinate, the dimensions gathered over, the ranks gathered over)
    for m, p in entries:
        dims = [d for d, x in enumerate(p) if not isinstance(x, Replicate) and m.mesh.shape[d] > 1]
        if not dims:
            continue
        coord = m.get_coordinate()
        ranks = None if coord is None else frozenset(
            m.mesh[tuple(slice(None) if d in dims else c for d, c in enumerate(coord))].flatten().tolist())
        real.append((m, coord, dims, ranks))
    if not real:
        return True, None, None
    writes = any(coord is not None and all(coord[d] == 0 for d in dims) for _, coord, dims, _ in real)
    one = next(((m, coord, dims) for m, coord, dims, _ in real if len(dims) == 1), None)
    if len({ranks for *_, ranks in real}) != 1 or real[0][3] is None or one is None:
        return writes, None, None
    mesh, coord, dims = one
    index = list(coord)
    index[dims[0]] = 0
    return writes, mesh.get_group(dims[0]), int(mesh.mesh[tuple(index)])


def full(t: Tensor) -> Tensor:
    """The whole tensor (a collective for a sharded DTensor: every rank must call it). A weight sharded by blocks
    (lora_ext.parallel.ColwiseLoRA(blocks=k): a lone _StridedShard on a 1-D mesh) is gathered here, since torch
    2.11's DTensor.full_tensor() cannot plan that placement (a ValueError from its redistribute planner)."""
    if not is_dtensor(t):
        return t
    _GATHERS.n = getattr(_GATHERS, "n", 0) + 1
    # [mesh, placements, the count when last seen, key], one per layout of ranks: fully_shard builds a DeviceMesh
    # object per call, so meshes are told apart by their ranks, not by identity
    log = _GATHERS.__dict__.setdefault("log", [])
    mesh, placements = t.device_mesh, tuple(t.placements)
    key = (tuple(mesh.mesh.shape), tuple(mesh.mesh.flatten().tolist()), placements)
    entry = next((e for e in log if e[3] == key), None)
    if entry is not None:
        entry[2] = _GATHERS.n
    else:
        log.append([mesh, placements, _GATHERS.n, key])
        log.sort(key=lambda e: e[2])
        del log[:-16]  # (a bound, the least recently gathered first out: a model has a few layouts)
    strided = _lone_strided_shard(t)
    return t.full_tensor() if strided is None else _gather_strided(t, *strided)


def _lone_strided_shard(t) -> Optional[tuple]:
    """(dim, split_factor) of a DTensor placed as one _StridedShard on a 1-D mesh, else None."""
    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:
        return None
    if t.device_mesh.ndim != 1 or len(t.placements) != 1 or not isinstance(t.placements[0], _StridedShard):
        return None
    return t.placements[0].dim, t.placements[0].split_factor


def _gather_strided(t, dim: int, blocks: int) -> Tensor:
    """The whole tensor of a _StridedShard(dim, split_factor=blocks) DTensor on a 1-D mesh of n ranks: the tensor
    is `blocks` equal chunks along dim, each split evenly over the ranks, and rank r holds its piece of every chunk
    in chunk order (ColwiseLoRA's check keeps the splits even). One all_gather of the local shards."""
    import torch.distributed as dist
    mesh = t.device_mesh
    local = t.to_local().detach().contiguous()
    n = mesh.size()
    if local.shape[dim] * n != t.shape[dim] or local.shape[dim] % blocks:
        raise ValueError(f"lora_ext.sharded.full: a {tuple(t.shape)} tensor placed {t.placements} on {n} ranks has a "
                         f"local shard of {tuple(local.shape)}, not an even split into {blocks} blocks")
    shards = [torch.empty_like(local) for _ in range(n)]
    dist.all_gather(shards, local, group=mesh.get_group())
    pieces = [s.chunk(blocks, dim) for s in shards]  # pieces[r][b]: rank r's rows of chunk b
    return torch.cat([pieces[r][b] for b in range(blocks) for r in range(n)], dim)


def local(t: Tensor) -> Tensor:
    return t.to_local() if is_dtensor(t) else t


def version(t: Tensor) -> Optional[int]:
    """The version counter of t (of its local shard); None for an inference tensor, which keeps none."""
    try:
        return local(t)._version
    except RuntimeError:
        return None


def abs_max(t: Tensor, finite: bool = False) -> Tensor:
    """max |t| as a float32 scalar tensor, 0 for no elements; NaN counts as inf, or with finite=True only finite
    elements count. A DTensor's is over every rank (a collective: every rank must call it): a rank whose shard is
    empty (FSDP2's dim-0 shards of a rank-r factor on more than r ranks, uneven tensor-parallel rows) gives 0,
    where DTensor's own amax raises on it."""
    x = local(t).detach()
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32  # (a float64 value past float32's range)
    if not x.numel():
        m = x.new_zeros((), dtype=wide)
    else:  # (aminmax: one pass, no temporaries, about 10x abs().amax() on a CPU; NaN comes out as NaN)
        if x.is_floating_point() and x.element_size() == 1:  # (float8: neither aminmax nor nan_to_num)
            x = x.float()
        lo, hi = torch.aminmax(x)
        m = torch.maximum(-lo.to(wide), hi.to(wide))
        if finite and not bool(m.isfinite()):  # (inf or NaN in it: the finite elements' max, the slow way)
            m = x.abs().nan_to_num(0.0, 0.0, 0.0).amax().to(wide)
        elif not finite:
            m = m.nan_to_num(float("inf"), float("inf"))
    m = m.reshape(1)
    return (_max_over_mesh(m, t.device_mesh) if is_dtensor(t) else m)[0]


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def _fsdp_params():
    """(FSDP2 module, its FSDPParam) for every parameter fully_shard manages in this process (none when
    torch.distributed is not initialised)."""
    if not _distributed():
        return
    try:
        from torch.distributed._composable_state import _module_state_mapping
    except ImportError:
        return
    for module in list(_module_state_mapping):  # every module with a composable state (FSDP2's among them)
        if not (hasattr(module, "reshard") and hasattr(module, "_get_fsdp_state")):
            continue
        for p in _state_params(module._get_fsdp_state()):
            yield module, p


def _state_params(state):
    """The FSDPParams of an FSDP2 state's parameter groups."""
    groups = getattr(state, "_fsdp_param_groups", None)  # a list since torch 2.10; before, one group
    if groups is None:
        groups = [g for g in (getattr(state, "_fsdp_param_group", None),) if g is not None]
    return [p for g in groups for p in g.fsdp_params]


_FSDP2 = [None, weakref.WeakSet()]  # (the composable states it was found at, the modules FSDP2 manages)


def fsdp2_owner(module) -> bool:
    """Whether FSDP2 (fully_shard) manages parameters of `module` itself: fsdp_managed, cheap enough for a forward
    (found again only when modules gain or lose a composable state)."""
    if not _distributed():
        return False
    try:
        from torch.distributed._composable_state import _module_state_mapping
    except ImportError:
        return False
    entries = getattr(_module_state_mapping, "data", None)  # (a WeakKeyDictionary's dict of weak references)
    if entries is None:
        return fsdp_managed(module)
    # (its size and its newest entry: a model sharded after another died may have as many states, r45)
    key = (len(entries), next(reversed(entries), None))
    if _FSDP2[0] != key:
        _FSDP2[1] = weakref.WeakSet(p._module_info.module for _, p in _fsdp_params())
        _FSDP2[0] = key
    return module in _FSDP2[1]


def reset_after_refused_backward(module) -> bool:
    """After a backward refused under FSDP2 (an exception inside it), torch's recovery: reset_iter_state() on the
    root FSDP module of `module`'s parameters (FSDP2 had already gathered the layer's weight and factors for the
    backward, and its next forward would use that copy: 0.22 off, r45), and the unreduced gradients dropped. False
    where it cannot (no root found, or the reset failed). On a torch without reset_iter_state (2.11) its steps
    (_reset_iter_state_before_it)."""
    try:
        owner = next((m for m, p in _fsdp_params() if p._module_info.module is module), None)
        if owner is None:
            return False
        states = owner._get_fsdp_state()._state_ctx.all_states
        root = next((m for other in states if other._is_root for m in other._modules
                     if hasattr(m, "reset_iter_state")), None)
        if root is not None:
            root.reset_iter_state()
        else:  # (a torch without it, 2.11, the GPU machine's: its steps, on that torch's fields; h10)
            _reset_iter_state_before_it(next(other for other in states if other._is_root))
        # the gradients FSDP2 holds unreduced (the refused backward's, and gradient accumulation's without sync),
        # which reset_iter_state leaves: the next reduce-scatter added them to the next step's, through zero_grad
        # (r46: 4.0 off)
        for p in (p for other in states for p in _state_params(other)):
            p.unsharded_accumulated_grad = None
            unsharded = getattr(p, "_unsharded_param", None)
            if unsharded is not None:
                unsharded.grad = None
        return True
    except Exception:
        return False


def _reset_iter_state_before_it(root) -> None:
    """torch's FSDPState._reset_iter_state for an FSDP2 without it (torch 2.11), on that torch's fields: without it
    the refused backward left its final callback marked queued (it never ran), so the next backward never reduced
    nor resharded, and the next step's gradients were the local unreduced ones (0.56 off a one-process reference on
    2 gloo ranks, the parameters left unsharded), with no error. Waits for the collectives in flight, drops their
    results, and puts every parameter group back sharded and idle."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState
    stream, comm = root._device_handle.current_stream(), root._comm_ctx
    for name in ("all_gather_state", "reduce_scatter_state"):
        pending = getattr(comm, name, None)
        if pending is not None and getattr(pending, "event", None) is not None:
            stream.wait_event(pending.event)
        setattr(comm, name, None)
    comm.post_forward_order.clear()
    for state in root._state_ctx.all_states:
        state._modules_to_run_forward.clear()
        state._training_state = TrainingState.IDLE
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:
            groups = [g for g in (getattr(state, "_fsdp_param_group", None),) if g is not None]
        for group in groups:
            group.finalize_backward()  # (waits for its reductions; waits for and drops an all-gather's result)
            event = getattr(group, "_reshard_after_forward_event", None)
            if event is not None:
                group._wait_all_gather_streams_on_event(event)
                group._reshard_after_forward_event = None
            if hasattr(group, "_partial_reduce_output"):  # (HSDP's partial reduction: the lost iteration's)
                group._partial_reduce_output = None
            group._training_state = TrainingState.IDLE
            group.reshard()
    root._state_ctx.iter_forward_root = None
    root._state_ctx.post_backward_final_callback_queued = False


# (the composable states it was found at, {id(module): {param name: weak reference to its FSDPParam}}: an FSDPParam
# holds its module, so strong ones kept a deleted model alive, M1)
_BY_MODULE = [None, {}]


def _fsdp_params_of(module) -> dict:
    """{parameter name: FSDPParam} of the parameters FSDP2 manages for `module` itself: one dict lookup, the map
    made again only when modules gain or lose a composable state (as fsdp2_owner's set; r12: a scan of every
    parameter for each layer of a switch took 2.0 s at 256 layers)."""
    if not _distributed():
        return {}
    try:
        from torch.distributed._composable_state import _module_state_mapping
    except ImportError:
        return {}
    entries = getattr(_module_state_mapping, "data", None)
    key = None if entries is None else (len(entries), next(reversed(entries), None))
    if key is None or _BY_MODULE[0] != key:
        found = {}
        for _, p in _fsdp_params():
            found.setdefault(id(p._module_info.module), {})[p._module_info.param_name] = weakref.ref(p)
        if key is None:
            _BY_MODULE[:] = [None, {}]
        else:
            _BY_MODULE[:] = [key, found]
    else:
        found = _BY_MODULE[1]
    params = {name: ref() for name, ref in found.get(id(module), {}).items()}
    return {name: p for name, p in params.items() if p is not None and p._module_info.module is module}


# {id(live factor Parameter): (weak references to it and its .grad, that gradient's version)} as an optimizer's step
# left it: a gradient a step consumed is not kept through a trainable switch (swap_grads). (Not a WeakKeyDictionary:
# it compares tensors with ==)
_STEPPED = {}


def _note_stepped(optimizer, args, kwargs) -> None:
    """After every optimizer's step (a global hook, registered at import): the sharded (DTensor) Parameters' gradients
    it consumed. Distributed runs only; one pass over the optimizer's parameters."""
    if not _distributed():
        return
    if len(_STEPPED) > 4096:  # (Parameters gone since: their entries)
        for key in [k for k, v in _STEPPED.items() if v[0]() is None]:
            del _STEPPED[key]
    for group in optimizer.param_groups:
        for p in group["params"]:
            g = p.grad
            if g is not None and is_dtensor(p):
                _STEPPED[id(p)] = (weakref.ref(p), weakref.ref(g), _grad_version(g))


def _register_step_hook() -> None:
    from torch.optim.optimizer import register_optimizer_step_post_hook  # (torch.optim deletes the name `optimizer`)
    register_optimizer_step_post_hook(_note_stepped)
    zero_grad = torch.optim.Optimizer.zero_grad
    if getattr(zero_grad, "_lora_ext", False):
        return

    @functools.wraps(zero_grad)
    def wrapped(self, *args, **kwargs):
        out = zero_grad(self, *args, **kwargs)
        if _KEPT_BY_PARAM:
            _forget_kept(self)
        return out
    wrapped._lora_ext = True
    torch.optim.Optimizer.zero_grad = wrapped


# {id(live factor Parameter): weak references to it and its layer} while the layer keeps other adapters' gradients
# (swap_grads): an optimizer's zero_grad over those factors forgets them too
_KEPT_BY_PARAM = {}


def _forget_kept(optimizer) -> None:
    """After `optimizer.zero_grad()`: the gradients swap_grads keeps for the other adapters of the layers whose live
    factors it holds are dropped as well, as the optimizer built over the live factors (each adapter's, in one
    process) would zero theirs (r13: zeroed while another adapter was live, a gradient never stepped, GradScaler's
    skipped step, came back at the switch and was added to, 0.0394 off)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            refs = _KEPT_BY_PARAM.pop(id(p), None)
            layer = refs[1]() if refs is not None and refs[0]() is p else None
            if layer is not None:
                layer.__dict__.get("_kept_grads", {}).clear()
                for t in (layer.__dict__["_parameters"].get("lora_A"), layer.__dict__["_parameters"].get("lora_B")):
                    if t is not None:
                        _KEPT_BY_PARAM.pop(id(t), None)


_register_step_hook()


def _grad_version(g):
    """g's version and its local shard's (FSDP2 accumulates with `grad._local_tensor += ...`, r13)."""
    return (g._version, g._local_tensor._version if is_dtensor(g) else None)


def _unstepped(t: Tensor) -> Optional[Tensor]:
    """t's gradient, or None where an optimizer's step consumed it as it is (not accumulated into since)."""
    g = t.grad
    if g is None:
        return None
    seen = _STEPPED.get(id(t))
    return None if seen is not None and seen[0]() is t and seen[1]() is g and seen[2] == _grad_version(g) else g


def swap_grads(layer, old: str, new: str) -> None:
    """A switch of FSDP2's (or tensor parallel's) live factors from adapter `old` to `new`, which writes `new`'s values
    into the same Parameters: their gradients stay with `old` (kept on the layer) and `new`'s kept ones (none, where
    it has none) take their place, as each adapter's own Parameters hold theirs in one process (F1: a backward of
    `old`, a switch, and the step gave `new` the gradient of `old`, 0.31 off, on every rank; across gradient
    accumulation without sync, FSDP2's unreduced gradient of `old` went into `new`'s, 1.35 off; r12: frozen for the
    switch, the same). Each gradient is FSDP2's sharded `.grad`, its unreduced accumulation and the gathered
    Parameter's `.grad`. A gradient an optimizer's step consumed since it was written is not kept (r12: zeroed
    through the next adapter's live factors, a stepped gradient came back and was added to, 0.157 off)."""
    live = [layer.lora_A, layer.lora_B]
    params = {n: p for n, p in _fsdp_params_of(layer).items() if n in ("lora_A", "lora_B")}

    def held(name):
        p = params[name]
        gathered = getattr(p, "_unsharded_param", None)
        return (getattr(p, "unsharded_accumulated_grad", None), gathered.grad if gathered is not None else None)
    kept = layer.__dict__.setdefault("_kept_grads", {})
    now = ([_unstepped(t) for t in live], {name: held(name) for name in params})
    if all(g is None for g in now[0]) and all(g is None for gs in now[1].values() for g in gs):
        kept.pop(old, None)
        if new not in kept:
            for t in live:
                t.grad = None  # (a stepped gradient: the next adapter's are none)
            return
    else:
        kept[old] = now
        for t in live:  # (an optimizer's zero_grad over them forgets what is kept: _forget_kept)
            _KEPT_BY_PARAM[id(t)] = (weakref.ref(t), weakref.ref(layer))
    grads, fsdp = kept.pop(new, ([None, None], {}))
    for t, g in zip(live, grads):
        t.grad = g
    for name, p in params.items():
        acc, gathered_grad = fsdp.get(name, (None, None))
        p.unsharded_accumulated_grad = acc
        gathered = getattr(p, "_unsharded_param", None)
        if gathered is not None:
            gathered.grad = gathered_grad


def fsdp_managed(module) -> bool:
    """Whether FSDP2 (fully_shard) manages parameters of `module` itself, sharded (DTensors) or all-gathered now
    (plain tensors: after a forward with reshard_after_forward=False, the root's after any forward, after unshard())."""
    return any(p._module_info.module is module for _, p in _fsdp_params())


def fsdp1_flat(t) -> bool:
    """Whether `t` lies in an FSDP1 flat parameter: an original Parameter FSDP1 marked (use_orig_params=True, whose
    memory it swaps between shard pieces and gathered views) or a view of a FlatParameter (use_orig_params=False)."""
    if not isinstance(t, Tensor):
        return False
    return bool(getattr(t, "_fsdp_flattened", False)
                or (t._base is not None and getattr(t._base, "_fsdp_flattened", False)))


def fsdp1_flattened(layer, names=("weight", "lora_A", "lora_B")) -> list:
    """Which of `names` (the weight and bias are looked up on the module holding the weight) FSDP1 flattened in
    `layer` (fsdp1_flat); none where torch.distributed is not initialised (FSDP1 needs it)."""
    if not _distributed():
        return []
    def attribute(module, name):  # (a Parameter, or with use_orig_params=False a plain tensor set as an attribute)
        d = getattr(module, "__dict__", {})  # (None: a layer that let go of its base module, layers.let_go)
        return d.get("_parameters", {}).get(name, d.get(name))
    owner = layer._weight_owner() if hasattr(layer, "_weight_owner") else layer
    return [n for n in names if fsdp1_flat(attribute(owner if n in ("weight", "bias") else layer, n))]


def fsdp1_refusal(layer, what: str, names=("weight", "lora_A", "lora_B"),
                  remedy: str = "or merge and switch before wrapping the model") -> Optional[str]:
    """Why `what` (a merge, unmerge or switch) cannot write `layer`: FSDP1 (FullyShardedDataParallel) flattened its
    weight or factors into a flat parameter, where a write lands in a 1-D shard piece between forwards, is dropped on
    leaving summon_full_params(writeback=False) (the layer would say merged over a weight never written), or gives a
    factor a new Parameter the flat parameter never sees. None when it did not. Only where torch.distributed is
    initialised (FSDP1 needs it)."""
    names = fsdp1_flattened(layer, names)
    if not names:
        return None
    describe = layer._describe() if hasattr(layer, "_describe") else type(layer).__name__
    return (f"{describe}: FSDP1 (FullyShardedDataParallel) holds its {' and '.join(names)} in a flat "
            f"parameter, which {what} cannot use (a 1-D shard piece between forwards; inside "
            f"summon_full_params(writeback=False) a copy that is dropped; a new factor Parameter FSDP1 never sees); "
            f"lora_ext merges and switches adapters under FSDP2 (torch.distributed.fsdp.fully_shard): under FSDP1 "
            f"serve the adapter unmerged (eval() leaves it so), {remedy}")


def reshard_fsdp(model) -> None:
    """FSDP2 (fully_shard) modules of the model back to their sharded parameters before a merge or a switch
    writes them (a write into all-gathered parameters, reshard_after_forward=False or after unshard(), would be
    lost at the next reshard), or a save reads them (gathered under a MixedPrecisionPolicy they are param_dtype's
    copies: bfloat16 factors). A reshard only frees the gathered copies."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def as_sharded(t: Tensor, owner, name: str) -> Tensor:
    """The sharded DTensor FSDP2 holds for `owner`'s parameter `name` while `t`, the parameter now, is its
    all-gathered plain copy (a refusal judges the placement a merge will write through, after resharding); else t."""
    # (a DTensor too: after a forward with reshard_after_forward=<int> the parameter is FSDP2's 2-D post-forward copy,
    # which a reshard replaces; judged as it was, a layer's eval() and merge() were refused as HSDP's 2-D mesh, F2)
    p = _fsdp_params_of(owner).get(name)
    return t if p is None else p.sharded_param


def reshard_if_gathered(layer) -> bool:
    """FSDP2 (fully_shard) swaps a module's parameters for all-gathered plain ones while it is unsharded (after
    a forward with reshard_after_forward=False, the root after any forward, after unshard()); a merge or a
    switch written into them would be dropped at the next reshard. Before a layer writes its parameters, this
    reshards the FSDP module whose parameters of this layer are gathered now, so the write goes to the local
    shards (lora_ext.serving's model-level calls reshard the whole model first). A layer's own train()/eval(),
    merge(), set_adapter() and add_adapter() call it. Costs a look over the process's FSDP states, only when
    torch.distributed is initialised. Returns whether it resharded anything."""
    if not _distributed():  # (first: every switch asks, and the walk below costs more than its kernels)
        return False
    mine = {id(m) for m in layer.modules()}
    gathered = {id(module): module for module, p in _fsdp_params()
                if id(p._module_info.module) in mine and p.sharded_state.name != "SHARDED"}
    for module in gathered.values():
        module.reshard()
    return bool(gathered)


class Part(NamedTuple):
    weight: Tensor  # a 2-D view into the local shard
    lora_A: Tensor
    lora_B: Tensor
    layout: dict


def mesh_refusal(weight: Tensor, where: str, update_rows: Optional[int] = None) -> Optional[str]:
    """Why a merge cannot write this DTensor weight, or None (a plain tensor too), before any layer is written
    (parts() would raise the same mid-way): a mesh of more than one dimension (HSDP's; the merges' parts and their
    agreement work on a 1-D mesh), a Shard of a dimension past 1, a weight of more than 2 dimensions sharded along
    dim 1, or one sharded along dim 0 whose update's `update_rows` rows (a grouped convolution's) do not fall whole
    into its output channels."""
    if not is_dtensor(weight):
        return None
    if weight.device_mesh.ndim != 1:
        return _placement_message(weight, where)
    placement = weight.placements[0]  # (other placements: lora_ext.parallel's, which its styles merge)
    d = placement.dim if type(placement) is Shard else None
    if d is not None and d not in (0, 1):
        return _placement_message(weight, where)
    if d == 1 and weight.dim() != 2:
        return (f"{where}: merging a {weight.dim()}-D weight sharded along dim 1 is not supported (along dim 0, "
                f"fully_shard's default, it is)")
    if d == 0 and weight.dim() > 2 and update_rows is not None and update_rows % weight.shape[0]:
        return _grouped_message(weight, where, update_rows)
    return None


def _grouped_message(weight: Tensor, where: str, rows: int) -> str:
    return (f"{where}: the weight is sharded along its {weight.shape[0]} output channels, but its LoRA update's {rows} "
            f"rows (a grouped convolution: kernel height over groups) do not fall whole into channels; merge it "
            f"unsharded, or shard it along another dimension")


def _placement_message(weight: Tensor, where: str) -> str:
    return (f"{where}: merging a DTensor weight sharded as {tuple(weight.placements)} on a "
            f"{weight.device_mesh.ndim}-D mesh is not supported (Shard(0), Shard(1) or Replicate on a 1-D mesh: "
            f"FSDP2's fully_shard, lora_ext.parallel's styles; HSDP's 2-D mesh is not)")


def _local_range(weight: Tensor, where: str):
    """(local shard, the dimension it is cut along (None: replicated), first index it holds, how many)."""
    placements = tuple(weight.placements)
    ok = weight.device_mesh.ndim == 1 and len(placements) == 1 and (
        isinstance(placements[0], Replicate) or (isinstance(placements[0], Shard) and placements[0].dim in (0, 1)))
    if not ok:
        raise ValueError(_placement_message(weight, where))
    if isinstance(placements[0], Replicate):
        return weight.to_local(), None, 0, weight.shape[0]
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    d = placements[0].dim
    shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, placements)
    return weight.to_local(), d, offset[d], shape[d]


def parts(weight: Tensor, lora_A: Tensor, lora_B: Tensor, num_blocks: int = 1, block_ids=(0,),
          transposed: bool = False, where: str = "merge") -> List[Part]:
    """The ops calls that apply (lora_A, lora_B) (whole tensors) to this rank's shard of `weight` (a DTensor
    holding the layer's weight in its own shape; its 2-D view has lora_A.shape[1] columns, or for transposed
    storage lora_B's rows). A shard cut along the input features is one call with those columns of lora_A; a
    shard cut along the output features is one call per enabled block it meets, with those rows of lora_B."""
    shard, d, off, n = _local_range(weight, where)
    block_ids = list(block_ids)
    layout = dict(num_blocks=num_blocks, block_ids=block_ids, transposed=transposed)
    if n == 0 or not block_ids:
        return []
    g = len(block_ids)
    r = lora_A.shape[0] // g
    k = lora_A.shape[1]
    if transposed:  # storage (k, num_blocks * nb): dim 0 the input features, dim 1 the output ones
        w2 = shard
        if d is None:
            return [Part(w2, lora_A, lora_B, layout)]
        if d == 0:
            return [Part(w2, lora_A[:, off:off + n].contiguous(), lora_B, layout)]
        nb = weight.shape[1] // num_blocks
        out = []
        for j, e in enumerate(block_ids):
            a, b = max(off, e * nb), min(off + n, (e + 1) * nb)
            if a < b:
                out.append(Part(w2[:, a - off:b - off], lora_A[j * r:(j + 1) * r],
                                lora_B[j * nb + a - e * nb:j * nb + b - e * nb].contiguous(),
                                dict(transposed=True)))
        return out
    rows2d = (lora_B.shape[0] // g) * num_blocks
    f = rows2d // weight.shape[0]  # rows of the 2-D view per dim-0 index (a convolution's kernel factor)
    if d is None:
        return [Part(shard.reshape(rows2d, k), lora_A, lora_B, layout)]
    if d == 1:
        if weight.dim() != 2:  # (mesh_refusal says so before a merge writes)
            raise ValueError(mesh_refusal(weight, where))
        return [Part(shard, lora_A[:, off:off + n].contiguous(), lora_B, layout)]
    if rows2d % weight.shape[0]:  # (a grouped convolution whose kernel rows per group do not split by channel)
        raise ValueError(_grouped_message(weight, where, rows2d))
    w2 = shard.view(n * f, k)
    r0, r1 = off * f, (off + n) * f
    nb = rows2d // num_blocks
    out = []
    for j, e in enumerate(block_ids):
        a, b = max(r0, e * nb), min(r1, (e + 1) * nb)
        if a < b:
            out.append(Part(w2[a - r0:b - r0], lora_A[j * r:(j + 1) * r],
                            lora_B[j * nb + a - e * nb:j * nb + b - e * nb].contiguous(), {}))
    return out


_OPS = {"merge": 1.0, "unmerge": 2.0, "switch": 3.0, "copy": 4.0, "merge_adapter": 5.0}
_WIDTH = 4  # numbers per fingerprint: every agreement below is one all-reduce of the same size and kind, so two
            # ranks that reach different ones pair up and see the difference (instead of mismatched collectives)


def _fingerprint(op: str, tensors, scales) -> Tensor:
    """A few float64 numbers that tell an op and the values it writes from another (with overwhelming odds): the
    op's code, two weighted sums of every element and the sizes and scales."""
    dev = local(tensors[0]).device if tensors else torch.device("cpu")
    acc = torch.zeros(_WIDTH, dtype=torch.float64, device=dev)
    acc[0] = _OPS[op]
    extra = 0.0
    for i, t in enumerate(tensors):
        v = local(t).detach().reshape(-1).to(dev, torch.float64)
        w = torch.arange(v.numel(), dtype=torch.float64, device=dev)
        acc[1] += v.sum()
        acc[2] += (v * torch.cos(w * 0.7071 + i)).sum()
        extra += v.numel() * (i + 1)
    for j, sc in enumerate(scales):
        extra += float(sc) * (j + 1) * 1.618034
    acc[3] = extra
    return acc.nan_to_num(0.0, 0.0, 0.0)


def _header(op: str, tensors, scales) -> Tensor:
    """What a write is, as every rank can say it without communicating: the op (coded apart from _fingerprint's
    codes, so that a header never agrees with another rank's fingerprint), the tensors' global shapes and dtypes,
    and the scales."""
    acc = torch.zeros(_WIDTH, dtype=torch.float64)
    acc[0] = 10.0 + _OPS[op]
    for i, t in enumerate(tensors):
        acc[1] += t.numel() * (i + 1)
        acc[2] += sum((d + 1.5) * n * 0.6180339 for d, n in enumerate(t.shape)) * (i + 1) + len(t.shape) * 7.0
        acc[3] += sum(map(ord, str(t.dtype))) * (i + 1)  # (not hash(): str hashes differ between processes)
    for j, sc in enumerate(scales):
        acc[3] += float(sc) * (j + 1) * 1.618034
    return acc.nan_to_num(0.0, 0.0, 0.0)


def any_rank(weight: Tensor, flag: bool) -> bool:
    """Whether `flag` holds on any rank of the DTensor `weight`'s mesh (one all-reduce per mesh dimension): a decision
    every rank must take alike, from facts one rank may see otherwise."""
    dev = weight.device if weight.device.type != "cpu" else torch.device("cpu")
    return bool(_max_over_mesh(torch.tensor([1.0 if flag else 0.0], device=dev), weight.device_mesh).item())


def _max_over_mesh(t: Tensor, mesh) -> Tensor:
    """`t` all-reduced in place to its maximum over every rank of `mesh`: one all-reduce per mesh dimension (HSDP's
    2-D mesh: each dimension in turn)."""
    import torch.distributed as dist
    for dim in range(mesh.ndim):
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
    return t


_OK, _REFUSED, _FAILED = 0, 1, 2  # a rank's outcome of its part of a write, agreed on as the worst (MAX)
_REFUSAL = torch.full((_WIDTH,), -3.0, dtype=torch.float64)  # tell_refused's fingerprint: agrees with no write's


def _all_agree(weight: Tensor, fingerprint: Tensor, outcome: int = _OK):
    """(whether every rank of the weight's mesh passed the same fingerprint, the worst of the ranks' outcomes): one
    all-reduce per mesh dimension (MAX of the fingerprint and of its negation, so the maximum and the minimum of
    each number)."""
    dev = weight.device if weight.device.type != "cpu" else torch.device("cpu")
    v = fingerprint.to(dev)
    t = torch.cat([v, -v, v.new_tensor([float(outcome)])])
    _max_over_mesh(t, weight.device_mesh)
    hi, lo, worst = t[:_WIDTH], -t[_WIDTH:2 * _WIDTH], t[-1]
    same = bool(((hi - lo).abs() <= 1e-9 * torch.maximum(hi.abs(), lo.abs()).clamp_min(1.0)).all())
    return same, int(worst)


def consensus(weight: Tensor, op: str, where: str, tensors, scales=()) -> list:
    """Refuses, on every rank of `weight`'s mesh and before anything is written, a write that not every rank makes
    with the same values: a merge, unmerge, switch or load called on one rank only, in another order, or with other
    adapters (tensor parallel: the replicated factors would differ between ranks, each rank computing its part of
    every output with its own adapter, silently; FSDP2: each rank's shard written from another adapter). Returns
    the tensors whole (gathered), for the write. A collective: a rank that calls it alone waits for the others'
    next collective (the process group's timeout).

    Sharded tensors (FSDP2's factors) must be gathered for their values to be compared, and gathers of different
    tensors on two ranks would pair up wrongly (a hang, or garbage): so what every rank knows without
    communicating (the op, the tensors' global shapes and dtypes, the scales) is agreed on first, and ranks at
    different writes refuse there, before any gather."""
    if not (weight is not None and is_dtensor(weight)):
        return [full(t) for t in tensors]
    if any(is_dtensor(t) for t in tensors):
        _agreed(weight, _header(op, tensors, scales), where, op)
    whole = [full(t) for t in tensors]
    _agreed(weight, _fingerprint(op, whole, scales), where, op)
    return whole


def _agreed(weight: Tensor, fingerprint: Tensor, where: str, op: str) -> None:
    """One agreement (consensus, agree): raises unless every rank passed the same fingerprint and no rank refused
    there (tell_refused: a check that rank failed alone)."""
    same, worst = _all_agree(weight, fingerprint)
    if worst != _OK:
        err = RuntimeError(f"{where}: refused on another rank of the weight's mesh (that rank's error says why); "
                           f"nothing was written on any rank")
        err.refused_elsewhere = True  # (eval() of a model warns and goes on, as the refusing rank does)
        raise err
    if not same:
        raise _disagree(where, op)


def agree(weight, op: str, where: str, tensors, scales=(), err: Optional[BaseException] = None) -> None:
    """The first collective of a write whose next ones gather the live factors (FSDP2's switch and merge): every rank
    agrees on the op and the shapes (_begin) and on whether its own checks passed (`err`: this rank's refusal, raised
    here on it after refuse_alike told the others, whose agreement raises "refused on another rank"). Every sharded
    write then begins with one agreement of the same size: two ranks at different writes (merges and switches called
    in another order) refuse there, before any gather, and so do the others when one rank refuses alone. Nothing
    without a DTensor `weight` (`err` raised)."""
    if err is not None:
        refuse_alike(weight, err, where)
    if weight is not None and is_dtensor(weight):
        _agreed(weight, _begin(op, tensors, scales), where, op)


def _begin(op: str, tensors, scales) -> Tensor:
    """agree's fingerprint: the write's header, coded apart from the header consensus agrees on later in the same
    write (a rank at one write's beginning and another at the middle of a write of the same op and layer refuse)."""
    header = _header(op, tensors, scales)
    header[0] += 100.0
    return header


def tell_refused(weight) -> Optional[Exception]:
    """This rank meets the other ranks' next agreement (every sharded write begins with one _all_agree of the same
    size: agree, consensus) marked refused: they refuse there, before writing, whatever they were at (the worst
    outcome wins over the fingerprints, so this one needs none of theirs). Returns the error of a process group
    that failed, else None; nothing without a DTensor `weight`."""
    if weight is not None and is_dtensor(weight):
        try:
            _all_agree(weight, _REFUSAL, _REFUSED)
        except Exception as e:
            return e
    return None


def refuse_alike(weight, err: Optional[BaseException], where: str) -> None:
    """Raises `err`, this rank's refusal of a write that the other ranks may have passed their own checks for (an
    adapter only some ranks hold, a NaN in one rank's copy): on a DTensor `weight`, first met with the agreement that
    begins every sharded write on the other ranks, marked refused (tell_refused), so that they refuse there, before
    writing, instead of waiting in it until the process group's timeout (F2). No collective when `err` is None: a
    rank that passed goes on into the write, whose first agreement tells it (an agreement of its own before every
    model-level switch met other ranks' merges, called in another order, as a mismatched collective)."""
    if err is None:
        return
    failed = tell_refused(weight)
    if failed is not None:  # (the process group failing: this rank's own refusal still says why)
        err.add_note(f"lora_ext {where}: telling the other ranks of this refusal failed ({failed!r})")
    raise err


def _disagree(where: str, op: str) -> RuntimeError:
    return RuntimeError(f"{where}: the ranks of its device mesh disagree on this {op} (another op, or other "
                        f"factors or scaling on another rank: set_adapter, merge/unmerge, eval()/train() or "
                        f"load_state_dict called on some ranks only, in another order, or with other adapters); "
                        f"refused on every rank, nothing was written. Call them on every rank, in the same order")


def _settle(weight: Tensor, err: Optional[BaseException], where: str) -> Optional[BaseException]:
    """After every rank of the weight's mesh tried its part of a write (`err`: this rank's error, or None), a
    collective: None when every rank succeeded; else the error this rank raises once it has put its parts back:
    its own, or one saying another rank refused (lossless.ExceptionOverflow) or failed (RuntimeError: out of
    memory, Ctrl-C). A refusal or failure on one rank is one on all, so that no rank goes on with another adapter
    than the others, and no rank waits in a collective that a failed rank never reaches. Paired with another
    rank's `consensus` (a rank that went on to another write), a refusal too."""
    outcome = _OK if err is None else _REFUSED if isinstance(err, lossless_module.ExceptionOverflow) else _FAILED
    same, worst = _all_agree(weight, torch.zeros(_WIDTH, dtype=torch.float64), outcome)
    if same and worst == _OK:
        return None
    settled = err if err is not None else RuntimeError(
        f"{where}: failed on another rank (its error is in that rank's output); the parts written here were put "
        f"back") if worst == _FAILED else _refused_elsewhere(where)
    # (the caller puts its parts back, or says what they hold: as ops' own errors, whatever the version counter
    # did; LoRALayer._writing)
    settled.weight_settled = True
    return settled


def _refused_elsewhere(where: str):
    return lossless_module.ExceptionOverflow(f"{where}: refused on another rank (a lossless merge there needs too many "
                                      f"exceptions); nothing was changed on any rank")


def _put_back(settled: BaseException, steps, where: str, last: bool = True) -> List[int]:
    """Runs every put-back step (callables, one per part) even when one fails; each failure is noted on the error
    being raised (`settled`). The indices of the steps that failed. When this is the last resort (`last`), or a
    step's own error says its part holds what no record describes, `settled.weight_written` is set: a layer then
    refuses to go on with this weight (LoRALayer._writing)."""
    failed = []
    for i, step in enumerate(steps):
        try:
            step()
        except BaseException as e:
            failed.append(i)
            settled.add_note(f"lora_ext {where}: part {i} of this rank's shard could not be put back ({e!r})")
            if last or getattr(e, "weight_written", False):
                settled.weight_written = True
    return failed


def merge_parts(weight: Tensor, ps: List[Part], scale: float, lossless: bool, where: str) -> list:
    """ops.merge_ of each part of this rank's shard of `weight`; their records (None each for a lossy merge). An
    error in any part on any rank (a refusal, out of memory, Ctrl-C) puts every merged part back on every rank
    (`_settle`) and raises (a part that cannot be put back is named in a note: it holds the merge)."""
    from . import ops
    records, err = [], None
    try:
        for p in ps:
            records.append(ops.merge_(p.weight, p.lora_A, p.lora_B, scale, lossless=lossless, **p.layout))
    except BaseException as e:  # (the failing part: as it was, ops.merge_'s promise)
        err = e
    err = _settle(weight, err, where)
    if err is not None:
        _put_back(err, [functools.partial(ops.unmerge_, p.weight, p.lora_A, p.lora_B, scale, record=rec, **p.layout)
                        for p, rec in zip(ps, records)], where)
        raise err
    return records


def unmerge_parts(weight: Tensor, ps: List[Part], scale: float, records: Optional[list], where: str) -> None:
    """ops.unmerge_ of each part of this rank's shard (`records`: the merge's lossless records, or None). An error in
    any part on any rank merges the unmerged parts again on every rank and raises, the records of the weight as it
    is now in the error's `record` (lossless): the layer stays merged everywhere."""
    from . import ops
    recs = list(records) if records is not None else [None] * len(ps)
    done, err = 0, None
    try:
        for p, rec in zip(ps, recs):
            ops.unmerge_(p.weight, p.lora_A, p.lora_B, scale, record=rec, **p.layout)
            done += 1
    except BaseException as e:  # (the failing part: as it was)
        err = e
    settled = _settle(weight, err, where)
    if settled is None:
        return

    def again(i, p):
        recs[i] = ops.merge_(p.weight, p.lora_A, p.lora_B, scale, lossless=records is not None, **p.layout)
    _put_back(settled, [functools.partial(again, i, p) for i, p in enumerate(ps[:done])], where)
    if records is not None:
        settled.record = recs
    raise settled


def swap_parts(weight: Tensor, old: List[Part], new: List[Part], old_scale: float, new_scale: float,
               records: Optional[list], where: str) -> list:
    """ops.swap_ of each part of this rank's shard from the old adapter (`records`: its lossless records, one per
    part, or None) to the new one; the new records. An error in any part on any rank puts every part back on every
    rank and raises, with the old adapter's records in the error's `record` (lossless); where some part anywhere
    could not be put back (ops.swap_'s `weight_is_base`, or a put-back that failed), every part on every rank is
    unmerged to the base instead and `weight_is_base` set (a second agreement, on this path only)."""
    from . import ops
    recs = list(records) if records is not None else [None] * len(old)
    out, err = [], None
    try:
        for po, pn, rec in zip(old, new, recs):
            out.append(ops.swap_(po.weight, po.lora_A, po.lora_B, old_scale, pn.lora_A, pn.lora_B, new_scale,
                                 check_values=False, record=rec, **po.layout))
    except BaseException as e:  # (the failing part: the old adapter merged back, ops.swap_'s promise)
        err = e
    settled = _settle(weight, err, where)
    if settled is None:
        return out
    # what each part holds: (0 the old adapter, 1 the new one or None the base; its record)
    held = [(1, rec) for rec in out]
    if len(out) < len(old):
        held.append((None, None) if getattr(err, "weight_is_base", False)
                    else (0, getattr(err, "record", recs[len(out)])))  # (no record on the error: as it was)
        held += [(0, rec) for rec in recs[len(held):]]
    pairs = list(zip(old, new))

    def back(i):
        po, pn = pairs[i]
        try:
            held[i] = (0, ops.swap_(pn.weight, pn.lora_A, pn.lora_B, new_scale, po.lora_A, po.lora_B, old_scale,
                                    check_values=False, record=held[i][1], **po.layout))
        except BaseException as e:  # ops.swap_'s promise: the new adapter merged back, or the base
            held[i] = (None, None) if getattr(e, "weight_is_base", False) else (1, getattr(e, "record", held[i][1]))
            raise
    _put_back(settled, [functools.partial(back, i) for i in range(len(out))], where, last=False)  # (else: to_base)
    stuck = any(k != 0 for k, _ in held)
    _, worst = _all_agree(weight, torch.zeros(_WIDTH, dtype=torch.float64), _FAILED if stuck else _OK)
    if worst != _FAILED:
        if records is not None:
            settled.record = [rec for _, rec in held]
        raise settled

    def to_base(i):
        k, rec = held[i]
        if k is not None:
            p, s = pairs[i][k], (old_scale, new_scale)[k]
            ops.unmerge_(p.weight, p.lora_A, p.lora_B, s, record=rec, **p.layout)
    # a part somewhere holds another than the old adapter: every part everywhere goes to the base
    _put_back(settled, [functools.partial(to_base, i) for i in range(len(held))], where)
    settled.weight_is_base = True
    raise settled


def _whole(weight: Tensor, op, where: str, record=None) -> object:
    """op(the whole weight) for a layer whose record was made before its weight was sharded (one record for the
    whole weight): every rank applies it to the gathered weight and keeps its shard (one weight-sized gather). An
    error on any rank (`_settle`) leaves every shard as it was: the error's `record` is `record` again (the one the
    shard still goes with), whatever the op said of the gathered copy."""
    whole = full(weight)
    result, err = None, None
    try:
        result = op(whole)
    except BaseException as e:
        err = e
    settled = _settle(weight, err, where)
    if settled is not None:
        settled.weight_is_base = False
        if record is not None:
            settled.record = record
        raise settled
    copy_into(weight, whole, check=False)
    return result


def merge_(weight, lora_A, lora_B, scale, *, lossless=False, where="merge", **layout) -> Optional[list]:
    """ops.merge_ on this rank's shard; the records of a lossless merge (one per part), else None. A refusal or
    failure on any rank is one on every rank, with nothing changed (merge_parts)."""
    if isinstance(weight, torch.nn.Parameter):  # the live weight (a state dict's copy is each rank's own business)
        A, B = consensus(weight, "merge", where, (lora_A, lora_B), (scale,))
    else:
        A, B = full(lora_A), full(lora_B)
    records = merge_parts(weight, parts(weight, A, B, where=where, **layout), scale, lossless, where)
    return records if lossless else None


def unmerge_(weight, lora_A, lora_B, scale, *, record=None, where="unmerge", **layout) -> None:
    from . import ops
    if isinstance(weight, torch.nn.Parameter):
        A, B = consensus(weight, "unmerge", where, (lora_A, lora_B), (scale,))
    else:
        A, B = full(lora_A), full(lora_B)
    if isinstance(record, lossless_module.MergeRecord):
        return _whole(weight, lambda w: ops.unmerge_(_view2d(w, A), A, B, scale, record=record, **layout), where,
                      record)
    ps = parts(weight, A, B, where=where, **layout)
    if isinstance(weight, torch.nn.Parameter):  # the live weight: every rank unmerges, or none does
        return unmerge_parts(weight, ps, scale, record, where)
    for p, rec in zip(ps, record if record is not None else [None] * len(ps)):
        ops.unmerge_(p.weight, p.lora_A, p.lora_B, scale, record=rec, **p.layout)


def _view2d(w: Tensor, lora_A: Tensor) -> Tensor:
    """The 2-D matrix the ops write: the weight itself, or a convolution's weight viewed (out * k0, in * k)."""
    return w if w.dim() == 2 else w.view(-1, lora_A.shape[1])


def swap_(weight, old_A, old_B, old_scale, new_A, new_B, new_scale, *, record=None, where="switch",
          **layout) -> Optional[list]:
    """Replaces the merged adapter on this rank's shard, part by part; a refusal or failure on any rank puts every
    part back on every rank (the old merge, bit for bit) and raises, with the old records in the error's `record`
    (swap_parts)."""
    from . import ops
    if isinstance(weight, torch.nn.Parameter):
        old_A, old_B, new_A, new_B = consensus(weight, "switch", where, (old_A, old_B, new_A, new_B),
                                               (old_scale, new_scale))
    else:
        old_A, old_B, new_A, new_B = (full(t) for t in (old_A, old_B, new_A, new_B))
    if isinstance(record, lossless_module.MergeRecord):
        return _whole(weight, lambda w: ops.swap_(_view2d(w, old_A), old_A, old_B, old_scale, new_A, new_B,
                                                  new_scale, check_values=False, record=record, **layout), where,
                      record)
    out = swap_parts(weight, parts(weight, old_A, old_B, where=where, **layout),
                     parts(weight, new_A, new_B, where=where, **layout), old_scale, new_scale, record, where)
    return out if record is not None else None


def copy_into(param: Tensor, value: Tensor, *, check: bool = True, where: Optional[str] = None,
              scales=()) -> None:
    """Writes the whole tensor `value` into the DTensor parameter `param`'s local shard. check (a switch writing
    the live factors): refused on every rank before writing unless every rank writes the same value (`consensus`:
    one small all-reduce; `scales`, the scaling that goes with the value, agreed on too)."""
    from torch.distributed.tensor import distribute_tensor
    if check:
        consensus(param, "copy", where or f"a switch writing a sharded LoRA factor of shape {tuple(param.shape)}",
                  (value,), scales)
    with torch.no_grad():
        param.to_local().copy_(distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements,
                                                 src_data_rank=None).to_local())
