"""Adapters given by a Hugging Face Hub repo id (load_peft_adapter, lora-ext merge --adapter), as peft's
from_pretrained takes one: resolved through huggingface_hub from a Hub cache written here in its own layout
(refs/<branch> -> snapshots/<commit>/...), offline (conftest sets HF_HUB_OFFLINE; nothing reaches the network).
Local paths win; revision and subfolder; a repo without adapter files and an id in no cache are refused naming it."""
import os
import shutil

import pytest
import torch
from huggingface_hub import constants
from peft import LoraConfig, PeftModel, get_peft_model

import lora_ext as lora
from lora_ext.cli import main
from lora_ext.serving import hub, merge_cli
from tiny_models import VOCAB, llama, randomize_lora

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A Hub cache holding owner/lora (main: adapter seed 1; branch v2 and its commit: seed 2; subfolder sub/: seed
    3) and owner/empty (no adapter files); (cache dir, {seed: local adapter dir})."""
    root = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    made = {}
    for seed in (1, 2, 3):
        pm = get_peft_model(llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        torch.manual_seed(seed)
        randomize_lora(pm)
        made[seed] = str(tmp_path / f"local{seed}")
        pm.save_pretrained(made[seed])
    repo = root / "models--owner--lora"
    for commit, seed, sub in ((COMMIT, 1, ""), (OTHER, 2, ""), (COMMIT, 3, "sub")):
        shutil.copytree(made[seed], repo / "snapshots" / commit / sub, dirs_exist_ok=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "v2").write_text(OTHER)
    binonly = root / "models--owner--binonly" / "snapshots" / COMMIT  # peft's legacy weights file only
    binonly.mkdir(parents=True)
    shutil.copy(os.path.join(made[1], "adapter_config.json"), binonly)
    from safetensors.torch import load_file
    torch.save(load_file(os.path.join(made[1], "adapter_model.safetensors")), binonly / "adapter_model.bin")
    (binonly.parent.parent / "refs").mkdir()
    (binonly.parent.parent / "refs" / "main").write_text(COMMIT)
    empty = root / "models--owner--empty"
    (empty / "snapshots" / COMMIT).mkdir(parents=True)
    (empty / "snapshots" / COMMIT / "README.md").write_text("no adapter here")
    (empty / "refs").mkdir()
    (empty / "refs" / "main").write_text(COMMIT)
    return root, made


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x).logits


def _peft(local, x):
    return _logits(PeftModel.from_pretrained(llama(), local), x)


@pytest.mark.parametrize("repo,kwargs,seed", [
    ("owner/lora", {}, 1), ("owner/lora", dict(revision="v2"), 2), ("owner/lora", dict(revision=OTHER), 2),
    ("owner/lora", dict(subfolder="sub"), 3),
    ("owner/binonly", {}, 1),  # adapter_model.bin only (offline, the missing safetensors file is only "not cached")
], ids=["main", "branch", "commit", "subfolder", "bin-only"])
def test_a_hub_id_loads_the_adapter_from_the_cache(cache, repo, kwargs, seed):
    _, made = cache
    x = torch.randint(0, VOCAB, (2, 5))
    model = llama()
    lora.load_peft_adapter(model, repo, "hub", **kwargs)
    ours = _logits(model, x)
    assert (ours - _peft(made[seed], x)).norm() <= 1e-5 * ours.norm()
    other = 3 if seed != 3 else 1  # the revision / subfolder matters
    assert (ours - _peft(made[other], x)).norm() > 1e-3 * ours.norm()


def test_a_local_path_wins_over_a_hub_id(cache, tmp_path, monkeypatch):
    _, made = cache
    monkeypatch.chdir(tmp_path)
    os.makedirs("owner")
    shutil.copytree(made[2], "owner/lora")  # a local folder spelled as the repo id
    x = torch.randint(0, VOCAB, (2, 5))
    model = llama()
    lora.load_peft_adapter(model, "owner/lora", "local")
    assert (_logits(model, x) - _peft(made[2], x)).norm() <= 1e-5 * _peft(made[2], x).norm()
    with pytest.raises(ValueError, match="revision: 'v2' was given for 'owner/lora', a local path"):
        lora.load_peft_adapter(llama(), "owner/lora", "x", revision="v2")


@pytest.mark.parametrize("path,match", [
    ("owner/empty", r"path: 'owner/empty' is not a local path, and (it is neither in the Hub cache nor reachable|the "
                    r"repo holds no peft adapter files)"),
    ("owner/missing", r"path: 'owner/missing' is not a local path, and it is neither in the Hub cache nor reachable"),
    ("./no/such/dir", r"path: './no/such/dir' does not exist \(and is not a Hub repo id"),
])
def test_what_is_neither_a_path_nor_an_adapter_on_the_hub_is_refused_naming_it(cache, path, match):
    model = llama()
    with pytest.raises(FileNotFoundError, match=match):
        lora.load_peft_adapter(model, path, "x")
    assert not any(isinstance(m, lora.LoRALayer) for m in model.modules())


@pytest.mark.parametrize("subfolder", ["/abs", "../up", 3])
def test_a_bad_subfolder_is_refused(cache, subfolder):
    with pytest.raises(ValueError, match="subfolder: expected a relative folder name"):
        hub.resolve("owner/lora", subfolder=subfolder)


def test_lora_ext_merge_takes_a_hub_id(cache, tmp_path):
    _, made = cache
    base = str(tmp_path / "base")
    llama().save_pretrained(base)
    out_hub, out_local = str(tmp_path / "merged_hub"), str(tmp_path / "merged_local")
    assert main(["merge", "--base", base, "--adapter", "owner/lora", "--revision", "v2", "--out", out_hub,
                 "--quiet"]) == 0
    assert main(["merge", "--base", base, "--adapter", made[2], "--out", out_local, "--quiet"]) == 0
    from safetensors.torch import load_file
    a, b = load_file(os.path.join(out_hub, "model.safetensors")), load_file(os.path.join(out_local, "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(merge_cli.MergeError, match=r"^--adapter: 'owner/empty' is not a local path, and "):
        merge_cli.merge_checkpoint(base, "owner/empty", str(tmp_path / "x"), progress=False)


def test_a_switch_does_not_wait_for_a_loads_download(cache, monkeypatch):
    """A load holds the model's changes from its first check to its last write; the Hub fetch comes before that, so a
    switch on another thread goes through while a download stalls."""
    import threading
    _, made = cache
    model = llama()
    lora.load_peft_adapter(model, made[2], "a")
    lora.load_peft_adapter(model, made[3], "b", activate=False)
    fetching, release = threading.Event(), threading.Event()
    real = hub.resolve

    def slow(path, *args, **kwargs):
        if not os.path.exists(path):  # the Hub id: a stalled network
            fetching.set()
            assert release.wait(60)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(hub, "resolve", slow)
    loader = threading.Thread(target=lora.load_peft_adapter, args=(model, "owner/lora", "c"),
                              kwargs={"activate": False})
    loader.start()
    assert fetching.wait(60)
    switched = threading.Thread(target=lora.set_adapter, args=(model, "b"))
    switched.start()
    switched.join(timeout=20)
    done = not switched.is_alive()
    release.set()
    loader.join(timeout=120)
    switched.join(timeout=60)
    assert done  # before: the switch waited for the whole download
    assert lora.active_adapter(model) == "b" and sorted(lora.adapter_names(model)) == ["a", "b", "c"]
