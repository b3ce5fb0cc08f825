"""`lora-ext demo`: the serving path end to end on a small GPT-2-style model built from a config in code.

Injects lora_ext into the model, trains two adapters on two synthetic tasks (next token = previous + 1,
and previous + 3, modulo the vocabulary), saves them in peft's format, loads them into a fresh copy of the
model, merges in place, switches to the second adapter and back (one pass per weight each), checks merged
against unmerged outputs, and prints the timings.
"""
import copy
import os
import tempfile
import time

import torch

from . import adapters, injection, peft_io
from .files import Progress

VOCAB, SEQ, BATCH = 64, 32, 16
TARGETS = ["c_attn", "c_proj", "c_fc"]


def _model(device):
    try:
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise SystemExit("lora-ext demo needs transformers (pip install transformers)") from None
    transformers.logging.set_verbosity_error()
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=SEQ, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).to(device)


def _batch(step, device, gen):
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=gen)
    seq = (start + step * torch.arange(SEQ)) % VOCAB
    return seq.to(device)


def _train(model, step, steps, device, quiet, desc):
    gen = torch.Generator().manual_seed(step)
    params = [p for _, m in adapters.lora_layers(model) for p in (m.lora_A, m.lora_B)]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    bar = Progress(steps, desc=desc, enabled=not quiet)
    first = last = None
    for i in range(steps):
        x = _batch(step, device, gen)
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item() if i % 10 == 0 or i == steps - 1 else last
        bar.update(extra=f"loss {last:.3f}")
    bar.close()
    return first, last


def _timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _accuracy(model, step, device):
    x = _batch(step, device, torch.Generator().manual_seed(1000 + step))
    pred = model(x).logits[:, :-1].argmax(-1)
    return (pred == x[:, 1:]).float().mean().item()


ADAPTERS = {"plus1": 1, "plus3": 3}  # the demo's adapters: each learns to add its number to the token


def run(device="cpu", steps=200, out=None, quiet=False):
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    if steps < 1:
        raise SystemExit(f"--steps must be positive, got {steps}")
    if out is not None:  # before the training: the adapters are saved there after it
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"--out: cannot create the directory {out!r} ({e.strerror or e})") from None
        if not os.access(out, os.W_OK | os.X_OK):
            raise SystemExit(f"--out: the directory {out!r} is not writable")
        for name in ADAPTERS:  # (each saved into a directory of its name there)
            where = os.path.join(out, name)
            if os.path.lexists(where) and not os.path.isdir(where):
                raise SystemExit(f"--out: {where!r} is there and is not a directory: the demo saves its adapter "
                                 f"{name} into a directory of that name")
    threads = torch.get_num_threads()
    # The model is tiny: its ops are too small to share out, and on a busy machine every parallel region
    # waits for a core.
    torch.set_num_threads(1)
    try:
        return _run(device, steps, out, quiet)
    finally:
        torch.set_num_threads(threads)


def _run(device, steps, out, quiet):
    torch.manual_seed(0)
    tol = 1e-5 if device == "cpu" else 1e-4
    failures = []
    timings = {}

    model = _model(device)
    base_state = copy.deepcopy(model.state_dict())
    timings["inject"] = _timed(lambda: injection.inject(model, TARGETS, r=8, lora_alpha=16), device)
    print(f"injected lora_ext into {len(adapters.lora_layers(model))} modules of a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter GPT-2 ({device})")

    workdir = out or tempfile.mkdtemp(prefix="lora-ext-demo-")
    dirs = {}
    for name, step in ADAPTERS.items():
        for _, m in adapters.lora_layers(model):
            m.reset_lora_parameters()
        t0 = time.perf_counter()
        first, last = _train(model, step, steps, device, quiet, desc=f"train {name}")
        timings[f"train {name} ({steps} steps)"] = (time.perf_counter() - t0) * 1e3
        print(f"adapter {name}: loss {first:.3f} -> {last:.3f}")
        if not last < first:
            failures.append(f"adapter {name}: the loss did not fall ({first:.3f} -> {last:.3f})")
        dirs[name] = os.path.join(workdir, name)
        timings[f"save {name} (peft format)"] = _timed(lambda: peft_io.save_peft_adapter(model, dirs[name]), device)

    serve = _model(device)
    serve.load_state_dict(base_state)
    serve.eval()
    timings["load plus1"] = _timed(lambda: peft_io.load_peft_adapter(serve, dirs["plus1"], "plus1"), device)
    timings["load plus3 (inactive)"] = _timed(
        lambda: peft_io.load_peft_adapter(serve, dirs["plus3"], "plus3", activate=False), device)

    x = torch.randint(0, VOCAB, (4, SEQ), device=device)
    with torch.no_grad():
        unmerged = {}
        for name in ("plus3", "plus1"):
            adapters.set_adapter(serve, name)
            unmerged[name] = serve(x).logits
        model.eval()
        if _rel(unmerged["plus3"], model(x).logits) > tol:
            failures.append("the reloaded adapter plus3 does not give the trained model's outputs")
        timings["merge plus1 in place"] = _timed(lambda: adapters.merge_adapter(serve), device)
        checks = [("plus1", _rel(serve(x).logits, unmerged["plus1"]))]
        timings["swap plus1 -> plus3 (merged, one pass)"] = _timed(lambda: adapters.set_adapter(serve, "plus3"), device)
        checks.append(("plus3", _rel(serve(x).logits, unmerged["plus3"])))
        timings["swap plus3 -> plus1 (merged, one pass)"] = _timed(lambda: adapters.set_adapter(serve, "plus1"), device)
        checks.append(("plus1 again", _rel(serve(x).logits, unmerged["plus1"])))
        acc = {n: _accuracy(serve, s, device) for n, s in (("plus1", 1),)}
        adapters.set_adapter(serve, "plus3")
        acc["plus3"] = _accuracy(serve, 3, device)
        timings["unmerge"] = _timed(lambda: adapters.unmerge_adapter(serve), device)
    for name, err in checks:
        print(f"merged vs unmerged, {name}: relative error {err:.2e}")
        if not err < tol:
            failures.append(f"merged vs unmerged outputs differ for {name} ({err:.2e} >= {tol:g})")
    print("next-token accuracy on its own task: " + ", ".join(f"{n} {a:.0%}" for n, a in acc.items()))
    print(f"adapters saved in {workdir}")
    print("\n| step | ms |\n|---|---:|")
    for k, v in timings.items():
        print(f"| {k} | {v:.1f} |")
    for f in failures:
        print("FAILED: " + f)
    print("demo: " + ("FAILED" if failures else "all checks passed"))
    return 1 if failures else 0
