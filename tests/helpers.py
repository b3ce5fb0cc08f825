"""Shared test support: float64 oracles written independently of lora_ext, the relative-error measure and its
tolerances, the kernel cases, and the marker for tests that need lora_ext._sim. (conftest.py holds the fixtures
and hooks, among them `cuda`, the device of the tests marked `gpu`.)"""
import contextlib
import importlib.util
import json
import os
import sys
import threading

import pytest
import torch

# Compiled forwards inside an open mixed batch on torch before 2.14 (2.11 is the GPU machine's): its dynamo cannot trace
# ContextVar.get, so such a forward breaks its graph there (an error under fullgraph=True), as the README says. Found by
# scripts/rehearse_torch211.sh; 2.12 and 2.13 not checked.
DYNAMO_CONTEXTVAR = pytest.mark.xfail(
    tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 14), strict=False,
    reason="torch < 2.14's dynamo cannot trace ContextVar.get: a compiled forward breaks its graph in an open mixed batch")

# ||out - ref|| / ||ref|| bounds by dtype, against a float64 oracle.
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64 on the CPU (a CUDA result against a CPU oracle is fine)."""
    out = out.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    assert not torch.isnan(out).any(), "output holds NaN"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_close_rel(out, ref, dtype, factor=1.0):
    err = rel_err(out, ref)
    assert err < TOL[dtype] * factor, f"relative error {err:.3g} over {TOL[dtype] * factor:.3g} ({dtype})"


# ---------------------------------------------------------------------------------------------------
# float64 oracles


def fresh_generator(*label):
    """A generator for one case, seeded from the global RNG (which conftest seeds afresh per test); `label` only
    names the case for a reader."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))


def bits(t):
    """t's bits as integers of its size, for comparisons that tell -0.0 from 0.0 and NaN payloads apart."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def ulp(x, dtype):
    """The spacing of `dtype` values around float64 x."""
    info = torch.finfo(dtype)
    exp = torch.floor(torch.log2(x.abs().clamp_min(info.smallest_normal)))
    return torch.exp2(exp - {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}[dtype])


# float32 factors on a 16-bit W at rank >= 32 take tensor cores as bf16 pairs v = hi + lo (kernels/merge.cuh):
# each product x*y is summed as hi*hi + hi*lo + lo*hi; the dropped lo*lo and the roundings of the two lo parts
# are each at most 2^-16 |x y| (values under 2^-118 add an absolute 2^-134 (|x| + |y|), which normal-sized values
# never reach: tests/test_merge_hostile3.py checks it).
SPLIT_REL = 3 * 2.0**-16


def dense_delta64(lora_A, lora_B, num_blocks, block_ids, out_features):
    """scale-free delta-W in the layer's logical (out, in) layout, float64, zero outside enabled blocks."""
    return _block_delta(lora_A.detach().to(torch.float64), lora_B.detach().to(torch.float64), num_blocks, block_ids,
                        out_features)


def _block_delta(A, B, num_blocks, block_ids, out_features):
    """dense_delta64 of A and B as they are (differentiable: effective_weight64 takes gradients through it)."""
    n = len(block_ids)
    r, nb = A.shape[0] // n, out_features // num_blocks
    delta = torch.zeros(out_features, A.shape[1], dtype=A.dtype)
    for j, e in enumerate(block_ids):
        delta[e * nb:(e + 1) * nb] = B[j * nb:(j + 1) * nb] @ A[j * r:(j + 1) * r]
    return delta


def randomize_(module, std=0.5):
    """Every parameter of `module` given fresh normal values (lora_B starts at zero: the update gets a value)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * std)
    return module


def delta64(a, b, scale, num_blocks, ids, nb, transposed):
    """float64 scale * B_j @ A_j in block ids[j], zero elsewhere, in W's storage layout (the ops' arguments)."""
    k = a.shape[1]
    r = a.shape[0] // len(ids) if ids else 0
    delta = torch.zeros(num_blocks * nb, k, dtype=torch.float64)
    for j, e in enumerate(ids):
        delta[e * nb : (e + 1) * nb] = scale * (b[j * nb : (j + 1) * nb].double() @ a[j * r : (j + 1) * r].double())
    return delta.t() if transposed else delta


def linear64(x, x_lora, w, bias, A, B, scale, num_blocks, ids, fan):
    """F.linear(x, W, bias) + scale * (x_lora A_j^T) B_j^T in block ids[j], in float64 on the CPU."""
    wl = (w.t() if fan else w).double().cpu()
    n_out, k = wl.shape
    y = x.double().cpu().reshape(-1, k) @ wl.t() + (0 if bias is None else bias.double().cpu())
    delta = dense_delta64(A.cpu(), B.cpu(), num_blocks, ids, n_out)
    y = y + scale * x_lora.double().cpu().reshape(-1, k) @ delta.t()
    return y.reshape(*x.shape[:-1], n_out)


def linear_grads64(layer, x, grad, x_lora=None):
    """Float64 gradients of an unmerged lora_ext Linear / MergedLinear on the CPU, through an explicit formula
    (x W^T + b + scaling * x_lora (B_j A_j)^T in the enabled blocks, autograd of plain float64 torch ops):
    {"x", "lora_A", "lora_B", "weight" (in its storage layout), and "x_lora" where it is given}."""
    cpu = lambda t: t.detach().to("cpu", torch.float64)
    w = cpu(layer.weight).requires_grad_()
    A, B = cpu(layer.lora_A).requires_grad_(), cpu(layer.lora_B).requires_grad_()
    x64 = cpu(x).requires_grad_()
    xl64 = x64 if x_lora is None else cpu(x_lora).requires_grad_()
    layout = layer.layout()
    wl = w.t() if layout["transposed"] else w
    delta = _block_delta(A, B, layout["num_blocks"], layout["block_ids"], wl.shape[0])
    y = x64 @ wl.t() + cpu(layer.bias) + layer.scaling * (xl64 @ delta.t())
    y.backward(cpu(grad))
    out = {"x": x64.grad, "lora_A": A.grad, "lora_B": B.grad, "weight": w.grad}
    if x_lora is not None:
        out["x_lora"] = xl64.grad
    return out


def embedding64(ids, w, A, B, scale):
    """W[ids] + scale * A^T[ids] B^T in float64, on the tensors' device."""
    return w.double()[ids] + scale * A.double().t()[ids] @ B.double().t()


def effective_weight64(layer, p, scale):
    """A lora_ext layer's effective weight W + scale * B A as its forward uses it (Linear/MergedLinear: (out, in);
    Embedding: (num, dim); a conv: the conv weight's shape), from float64 tensors `p` named as the layer's
    parameters. Differentiable: p's tensors may require grad."""
    import lora_ext as lora
    A, B = p["lora_A"], p["lora_B"]
    if isinstance(layer, lora.MergedLinear):
        w = p["weight"].t() if layer.fan_in_fan_out else p["weight"]
        enabled = [e for e, on in enumerate(layer.enable_lora) if on]
        return w + scale * _block_delta(A, B, len(layer.enable_lora), enabled, w.shape[0])
    if isinstance(layer, lora.Linear):
        return (p["weight"].t() if layer.fan_in_fan_out else p["weight"]) + scale * (B @ A)
    if isinstance(layer, lora.Embedding):
        return p["weight"] + scale * (B @ A).t()
    return p["conv.weight"] + scale * (B @ A).view(p["conv.weight"].shape)  # ConvLoRA


def layer_forward64(layer, p, x, scale):
    """The layer's output for input x in float64, from its effective weight (see effective_weight64)."""
    import lora_ext as lora
    w = effective_weight64(layer, p, scale)
    if isinstance(layer, lora.Embedding):
        return torch.nn.functional.embedding(x, w)
    if isinstance(layer, lora.ConvLoRA):
        c = layer.conv
        conv = getattr(torch.nn.functional, f"conv{w.dim() - 2}d")
        return conv(x, w, p.get("conv.bias"), c.stride, c.padding, c.dilation, c.groups)
    return torch.nn.functional.linear(x, w, p.get("bias"))


# ---------------------------------------------------------------------------------------------------
# kernel cases, shared by the merge and forward kernel tests on the simulator and on CUDA

KERNEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (num_blocks, enabled block ids, transposed): plain Linear/Conv; transposed storage (fan_in_fan_out,
# Embedding); MergedLinear's enable_lora patterns
PATTERNS = {
    "plain": (1, [0], False),
    "transposed": (1, [0], True),
    "merged_TFT": (3, [0, 2], False),
    "merged_FT": (2, [1], False),
    "merged_TTT": (3, [0, 1, 2], False),
    "merged_TFT_transposed": (3, [0, 2], True),
}


# ---------------------------------------------------------------------------------------------------
# what a test needs built: the simulator (lora_ext._sim) or the CUDA kernels (lora_ext._C). Tests that need
# a CUDA device carry the `gpu` marker and take the `cuda` fixture (conftest.py): it gives them CUDA and
# lora_ext._C, or with --sim-as-cuda the CPU and lora_ext._sim, and skips when those kernels were not built.

# Skip only when the module was not built; one that is built but fails to load is an error (load_sim raises).
SIM_BUILT = importlib.util.find_spec("lora_ext._sim") is not None
requires_sim = pytest.mark.skipif(
    not SIM_BUILT, reason="lora_ext._sim is not built; build it with `pip install --no-build-isolation -e .`"
)


def load_sim():
    """lora_ext._sim, or None when it was not built."""
    if not SIM_BUILT:
        return None
    from lora_ext import _sim
    return _sim


def same_bits(a, b) -> bool:
    """Whether two float tensors are the same bit for bit: dtype, shape and every bit pattern (NaN payloads, -0.0)."""
    def bits(t):
        return t.view(torch.int16 if t.element_size() == 2 else torch.int32)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def weight_with_infs(rows, cols, infs, dtype=torch.bfloat16, seed=0):
    """A (rows, cols) weight of +-(0.2 +- 0.02) with `infs` +-inf at random places: under an update of ~1% of |W|
    each inf needs a lossless exception and the finite values none, so the exception count is known."""
    gen = torch.Generator().manual_seed(seed)
    w = ((torch.randn(rows, cols, generator=gen) * 0.02 + 0.2)
         * (torch.randint(0, 2, (rows, cols), generator=gen) * 2 - 1))
    pick = torch.randperm(w.numel(), generator=gen)[:infs]
    w.view(-1)[pick[::2]] = float("inf")
    w.view(-1)[pick[1::2]] = float("-inf")
    return w.to(dtype)


def small_adapter(rows, cols, seed, r=4, mag=0.05):
    """(lora_A (r, cols), lora_B (rows, r)) of float32 values ~ mag: updates ~1% of weight_with_infs' values."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(r, cols, generator=gen) * mag, torch.randn(rows, r, generator=gen) * mag


class FailingRecord:
    """Stands in for lossless.MergeRecord (patched in lossless, or in ops, which imports it): its `fail_at`-th
    construction raises `exc`; the others make real records (the class as it was when the stand-in was made, so
    that it never calls itself)."""

    def __init__(self, exc, fail_at=1):
        from lora_ext import lossless
        real = lossless.MergeRecord
        self.real = real.real if isinstance(real, FailingRecord) else real
        self.exc, self.fail_at, self.made = exc, fail_at, 0

    def __call__(self, *args):
        self.made += 1
        if self.made == self.fail_at:
            raise self.exc
        return self.real(*args)


class CalledNames:
    """Stands in for a kernels module (ops.use_kernels), recording the names of the functions looked up on it."""

    def __init__(self, module):
        self.module, self.names = module, []

    def __getattr__(self, name):
        self.names.append(name)
        return getattr(self.module, name)


class RecordingKernels:
    """lora_ext._sim for ops.use_kernels, recording each call's name (calls), the exception list's room of each
    lossless merge or swap (rooms) and `weight` after each call (after); failing with `exc` at call number
    `fail_at` (an int, or a set of them)."""

    def __init__(self, weight=None, fail_at=None, exc=None):
        self.calls, self.rooms, self.after = [], [], []
        self.weight, self.exc = weight, exc
        self.fail_at = fail_at if isinstance(fail_at, (set, frozenset)) else {fail_at}

    def __getattr__(self, name):
        fn = getattr(load_sim(), name)

        def call(*args):
            self.calls.append(name)
            if len(self.calls) in self.fail_at:
                raise self.exc
            if name in ("merge_lossless_", "swap_lossless_"):
                self.rooms.append(args[-3].numel())  # exc_index
            out = fn(*args)
            if self.weight is not None:
                self.after.append(self.weight.clone())
            return out
        return call


# ---------------------------------------------------------------------------------------------------
# models for the multi-process tests (DDP, FSDP2, tensor parallel)


def lora_layers_of(net):
    import lora_ext
    return [m for m in net.modules() if isinstance(m, lora_ext.LoRALayer)]


def seed_adapters(net, name, gen, std=0.2, scaling=0.7):
    """Gives every lora_ext layer of net a random live lora_B (std) and a random adapter `name` of its rank."""
    for m in lora_layers_of(net):
        torch.nn.init.normal_(m.lora_B, std=std)
        (ra, ca), (rb, cb) = m.factor_shapes(m.r)
        m.add_adapter(name, torch.randn(ra, ca, generator=gen) * std, torch.randn(rb, cb, generator=gen) * std,
                      scaling)


def hf_model(kind):
    """GPT-2 (fused c_attn as MergedLinear) or Llama from a small config, with lora_ext injected (lossless merges),
    a random live adapter and a second one, "b"; only the LoRA factors trainable."""
    import transformers

    import lora_ext
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=40, n_positions=16,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(cfg)
        lora_ext.inject(model, ["c_proj", "c_fc"], r=2, lora_alpha=4, fused={"c_attn": [True, False, True]},
                        lossless=True)
    else:
        cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48,
                                       num_attention_heads=2, num_key_value_heads=1, vocab_size=40,
                                       max_position_embeddings=16)
        model = transformers.LlamaForCausalLM(cfg)
        lora_ext.inject(model, ["q_proj", "v_proj", "down_proj"], r=2, lora_alpha=4, lossless=True)
    seed_adapters(model, "b", torch.Generator().manual_seed(3), std=0.1)
    lora_ext.mark_only_lora_as_trainable(model)
    return model


def edit_adapter_config(adapter_dir, **changes):
    """Rewrites adapter_dir/adapter_config.json with `changes` applied (a peft adapter made malformed on purpose)."""
    file = os.path.join(adapter_dir, "adapter_config.json")
    with open(file) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(file, "w") as f:
        json.dump(cfg, f)


@contextlib.contextmanager
def ddp_guard_off():
    """lora_ext's DDP forward check switched off in this process (the control runs that show what DDP itself
    does without it)."""
    from lora_ext import ddp_guard
    saved = ddp_guard.check
    ddp_guard.check = lambda layer, ddp: None
    try:
        yield
    finally:
        ddp_guard.check = saved


@contextlib.contextmanager
def batch_open_on_another_thread(model, names, timeout=60):
    """A mixed batch of `model` held open on another thread for the block (under no_grad there); closed after."""
    import threading

    import lora_ext
    opened, release = threading.Event(), threading.Event()

    def hold():
        with torch.no_grad(), lora_ext.batch_adapters(model, names):
            opened.set()
            release.wait(timeout)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert opened.wait(timeout), "the other thread's batch did not open"
        yield
    finally:
        release.set()
        t.join(timeout)
    assert not t.is_alive(), "the other thread's batch did not close"


# ---------------------------------------------------------------------------------------------------
# bench/crash_safe.sh in a throwaway project (tests/test_crash_safe.py, tests/test_session_hostile4.py)


def crash_project(tmp_path, body, prelude="", markers=False):
    """A project in tmp_path whose tests/conftest.py is this suite's and whose tests/test_a.py is prelude + body."""
    import shutil
    import textwrap
    from pathlib import Path
    tests = tmp_path / "tests"
    tests.mkdir()
    shutil.copy(Path(__file__).with_name("conftest.py"), tests / "conftest.py")
    (tests / "test_a.py").write_text(prelude + textwrap.dedent(body))
    if markers:
        (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: g\n    hardware(why): h\n")
    return tmp_path


def run_crash_safe(project, *pytest_args, cap=120, budget=600, min_rerun=None):
    """crash_safe_pytest sourced as bench/gpu_check.sh does, over project's tests, with a `capped` that cuts a cap
    to what is left of `budget`: (stdout, the log, the exit status). min_rerun: CRASH_SAFE_MIN_RERUN_S."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    script = f"""
        PY={sys.executable}; BUDGET={budget}; SECONDS=0
        capped() {{ local left=$((BUDGET - SECONDS)); echo $(($1 < left ? $1 : left)); }}
        source {root / "bench" / "crash_safe.sh"}
        crash_safe_pytest out.log {cap} -q -p no:cacheprovider {" ".join(pytest_args)} tests
        echo "rc=$?"
    """
    env = {**os.environ, "PYTHONPATH": str(root)}
    if min_rerun is not None:
        env["CRASH_SAFE_MIN_RERUN_S"] = str(min_rerun)
    done = subprocess.run(["bash", "-c", script], cwd=project, capture_output=True, text=True, timeout=300, env=env)
    rc = int(done.stdout.strip().splitlines()[-1].removeprefix("rc="))
    return done.stdout, (project / "out.log").read_text(), rc


def peft_with_adapters(base, configs):
    """A peft model of `base` (a model) holding one LoRA adapter per {name: LoraConfig kwargs} entry, in order (the
    first made by get_peft_model, the others added), with peft's initial values."""
    from peft import LoraConfig, get_peft_model
    peft_model = None
    for name, kwargs in configs.items():
        if peft_model is None:
            peft_model = get_peft_model(base, LoraConfig(**kwargs), adapter_name=name)
        else:
            peft_model.add_adapter(name, LoraConfig(**kwargs))
    return peft_model


def save_random_peft(peft_model, path, seed, std, parts=("lora_",)):
    """Fills the peft model's parameters whose names hold one of `parts` with N(0, std) values of a generator seeded
    `seed` (in named_parameters order), saves it at `path` (peft's save_pretrained) and returns the path."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if any(part in n for part in parts):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    peft_model.save_pretrained(str(path))
    return str(path)


@contextlib.contextmanager
def racing(loop, interval=1e-5):
    """Runs loop(stop) on a thread while the block runs (stop: a threading.Event set at the block's end), the
    interpreter switching threads every `interval` seconds meanwhile."""
    stop = threading.Event()
    before = sys.getswitchinterval()
    sys.setswitchinterval(interval)
    thread = threading.Thread(target=loop, args=(stop,))
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(60)
        sys.setswitchinterval(before)
    assert not thread.is_alive()


def two_adapter_linear(in_features, out_features, lora_alpha, b_scaling, seed=0):
    """A seeded Linear (r=2) with a random lora_B, and a second adapter "b" of random factors at `b_scaling`."""
    import lora_ext as lora
    torch.manual_seed(seed)
    layer = lora.Linear(in_features, out_features, r=2, lora_alpha=lora_alpha)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.add_adapter("b", torch.randn(2, in_features), torch.randn(out_features, 2), b_scaling)
    return layer
