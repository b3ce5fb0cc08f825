"""An adapter given by its Hugging Face Hub id ("owner/name"), as peft's from_pretrained / load_adapter take one: its
adapter_config.json and weights file (adapter_model.safetensors, else adapter_model.bin) fetched into the Hub cache
(huggingface_hub, which transformers brings; HF_TOKEN, HF_HUB_OFFLINE and the cache settings apply), and the local
directory that holds them returned. A path that exists is used as it is; nothing is fetched for it."""
import functools
import os
import re
from typing import Optional

# a Hub repo id: "name" or "owner/name", letters, digits, '-', '_', '.' (not starting with '.' or '-', no '..')
_REPO_ID = re.compile(r"^(?!\.)(?!.*\.\.)[\w][\w.-]{0,95}(/[\w][\w.-]{0,95})?$")


def fetched_first(fn):
    """fn(model, path, ..., revision=, subfolder=) with a Hub repo id fetched before fn runs, and its local directory
    given instead (load_peft_adapter: a load holds the model's changes from its first check to its last write, and a
    download must not keep switches on other threads waiting)."""
    @functools.wraps(fn)
    def run(model, path, *args, revision=None, subfolder=None, **kwargs):
        if isinstance(path, (str, os.PathLike)) and not os.path.exists(path) and _REPO_ID.match(os.fspath(path)):
            path, revision, subfolder = resolve(path, revision, subfolder), None, None
        return fn(model, path, *args, revision=revision, subfolder=subfolder, **kwargs)
    return run


def looks_like_repo_id(path) -> bool:
    """Whether `path` reads as a Hub repo id ('owner/name')."""
    return bool(_REPO_ID.match(os.fspath(path)))


def resolve(path, revision: Optional[str] = None, subfolder: Optional[str] = None, option: str = "path") -> str:
    """The local adapter directory for `path`: an existing path (its `subfolder`), or a Hub repo id whose files are
    fetched. FileNotFoundError naming the path and why it is neither (the Hub's own reason)."""
    path = os.fspath(path)
    if subfolder is not None and (not isinstance(subfolder, str) or os.path.isabs(subfolder)
                                  or ".." in subfolder.replace("\\", "/").split("/")):
        raise ValueError(f"subfolder: expected a relative folder name, got {subfolder!r}")
    if revision is not None and not isinstance(revision, str):
        raise ValueError(f"revision: expected a branch, tag or commit name, got {revision!r}")
    if os.path.exists(path):
        if revision is not None:
            raise ValueError(f"revision: {revision!r} was given for {path!r}, a local path (revisions are the Hub's)")
        return os.path.join(path, subfolder) if subfolder else path
    if not _REPO_ID.match(path):
        raise FileNotFoundError(f"{option}: {path!r} does not exist (and is not a Hub repo id: 'owner/name')")
    from .peft_io import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
    try:
        from huggingface_hub import errors, hf_hub_download
    except ImportError:  # pragma: no cover - transformers brings huggingface_hub
        raise FileNotFoundError(f"{option}: {path!r} does not exist locally, and huggingface_hub (to fetch it from "
                                f"the Hub) is not installed") from None
    where = f"{path!r}" + (f" (revision {revision!r})" if revision else "") + (f", subfolder {subfolder!r}"
                                                                             if subfolder else "")
    fetch = lambda name: hf_hub_download(path, name, subfolder=subfolder, revision=revision)  # noqa: E731
    config = None
    try:
        config = fetch(CONFIG_NAME)
        try:
            fetch(WEIGHTS_NAME)
        except Exception as e:  # no safetensors file: peft's legacy .bin (offline, "not cached" is all one learns)
            try:
                fetch(LEGACY_WEIGHTS_NAME)
            except Exception:
                raise e from None
    except Exception as e:
        missing = getattr(errors, "RemoteEntryNotFoundError", None)
        if isinstance(e, errors.LocalEntryNotFoundError) and config is not None:  # (h9: was "not in the cache")
            why = (f"its {CONFIG_NAME} is in the Hub cache but neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME} is, "
                   f"and the Hub is not reachable (offline, or no network; a download cut short?)")
        elif isinstance(e, errors.LocalEntryNotFoundError):  # (huggingface_hub 1.x: also an EntryNotFoundError)
            why = "it is neither in the Hub cache nor reachable on the Hub (offline, or no network)"
        elif isinstance(e, missing or errors.EntryNotFoundError):
            why = "the repo holds no peft adapter files there"
        else:  # no such repo, revision, a gated repo, a network error
            why = "fetching it from the Hub failed"
        raise FileNotFoundError(f"{option}: {where} is not a local path, and {why}: {type(e).__name__}: "
                                f"{_reason(e)}") from None
    return os.path.dirname(config)


def _reason(e: Exception) -> str:
    return " ".join(str(e).split())[:300]
