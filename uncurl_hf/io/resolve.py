"""The one model resolver: a local folder, a zoo name or a Hub id becomes a local checkpoint folder.

Everything that takes a model (``uncurl prune``/``sweep``, the Space, the benchmarks) calls :func:`resolve_model`
first and then works on a folder, so the loaders (:mod:`uncurl_hf.io.checkpoint`) stay local-only and every way of
naming a model behaves the same:

1. an existing path is used as given (``~`` expanded; a file is refused);
2. a zoo name (``tiny-switch-8``) is the folder of the built zoo model (:func:`uncurl_hf.zoo.registry.zoo_path`; never
   trained here: that is ``uncurl zoo build``);
3. ``namespace/name`` is a Hub repo, fetched into (or found in) the Hugging Face cache by ``snapshot_download``, which
   honours the cache (``HF_HOME``/``HF_HUB_CACHE``), ``HF_TOKEN`` and ``HF_HUB_OFFLINE``; the endpoint is
   ``HF_ENDPOINT`` read at call time (:func:`uncurl_hf.io.hub.resolve_endpoint`). The folder returned is the cache
   snapshot, whose path keeps the repo id (a card can name its base model from it).

Only what loading and pruning read is downloaded: safetensors weights (+ index), JSON configs, tokenizer files, and
``*.py`` files (they only ever run with ``trust_remote_code``). Pickle weights (``*.bin``) are fetched only with
``allow_pickle`` and only when the repo has no safetensors weights. The repo's file list is checked before anything
is downloaded, so a pickle-only repo fails in a second with the fix, not after a multi-GB download.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from uncurl_hf.errors import CheckpointError, HubConnectionError, ModelNotFoundError
from uncurl_hf.io.hub import is_repo_id, resolve_endpoint

logger = logging.getLogger(__name__)

# What a checkpoint folder needs, as snapshot_download allow_patterns; JSON covers configs, shard indexes and the
# JSON tokenizer files (tokenizer.json, tokenizer_config.json, vocab.json, ...).
# README.md and LICENSE files: the pruned card carries the base model's licence (cards/provenance.py)
DOWNLOAD_PATTERNS = ("*.safetensors", "*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py", "README.md", "LICEN[CS]E*")
PICKLE_PATTERNS = ("*.bin",)
_TRUE = {"1", "on", "yes", "true"}


def resolve_model(
    ref: str | Path,
    *,
    revision: str | None = None,
    token: str | None = None,
    allow_pickle: bool = False,
    progress: bool = True,
) -> Path:
    """The local checkpoint folder for ``ref`` (see the module docstring for the three kinds of reference).

    ``revision`` (branch, tag or commit) and ``token`` apply to Hub ids only; ``token=None`` uses huggingface_hub's
    lookup (``HF_TOKEN``, then the saved login). Raises :class:`ModelNotFoundError` (empty reference, missing folder,
    unknown name, no such repo or revision, offline and not cached), :class:`HubConnectionError` (the endpoint
    cannot be reached and the repo is not cached) or :class:`CheckpointError` (the repo has no safetensors
    weights and ``allow_pickle`` is off, or no weights at all).
    """
    text = str(ref).strip()
    if not text:
        raise ModelNotFoundError("No model given: give a local checkpoint folder, a zoo model name or a Hub id.")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{path} is a file; give the checkpoint folder that contains it.")
        return path
    from uncurl_hf.zoo import registry

    if text in registry.available_models():
        return registry.zoo_path(text, build_if_missing=False)
    if is_repo_id(text):
        return _from_hub(text, revision=revision, token=token, allow_pickle=allow_pickle, progress=progress)
    raise ModelNotFoundError(
        f"Model {text!r} is neither an existing folder (the path {path} does not exist), a zoo model "
        f"({', '.join(registry.available_models())}) nor a Hub id (namespace/name); give a local checkpoint folder "
        "holding config.json and *.safetensors."
    )


def _from_hub(repo_id: str, *, revision: str | None, token: str | None, allow_pickle: bool, progress: bool) -> Path:
    """The cache snapshot of ``repo_id`` at ``revision``: checked remotely first when online, downloaded, checked."""
    endpoint = resolve_endpoint()
    patterns, unreachable = list(DOWNLOAD_PATTERNS), None
    offline = _offline()
    if not offline:
        try:
            patterns += _pickle_patterns(repo_id, _remote_files(repo_id, revision, token, endpoint), allow_pickle)
        except _Unreachable as exc:
            unreachable = exc.__cause__
    folder = _snapshot(repo_id, revision, token, endpoint, patterns, offline or unreachable is not None,
                       unreachable, progress)
    _check_snapshot(folder, repo_id, allow_pickle)
    logger.info("resolved %s%s -> %s", repo_id, f"@{revision}" if revision else "", folder)
    return folder


class _Unreachable(Exception):
    """The repo could not be listed (no connection, a Hub outage): fall back to the cache. The cause is the reason."""


def _snapshot(repo_id: str, revision: str | None, token: str | None, endpoint: str, patterns: list[str],
              local_only: bool, unreachable: BaseException | None, progress: bool) -> Path:
    """``snapshot_download`` with its failures turned into errors that name the fix."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            endpoint=endpoint,
            allow_patterns=patterns,
            local_files_only=local_only,
            tqdm_class=None if progress else _quiet_tqdm(),
        ))
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise _not_found(exc, repo_id, revision, token, endpoint) from exc
    except IncompleteSnapshotError as exc:
        raise ModelNotFoundError(
            f"The cached copy of {repo_id} is incomplete (an interrupted download) and the Hub is not used "
            f"({exc}). Rerun where {endpoint} is reachable to complete it, or give a local folder."
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise _not_cached(repo_id, revision, endpoint, unreachable) from exc
    except Exception as exc:  # noqa: BLE001 - a download that breaks off (network, disk) comes as many types
        raise HubConnectionError(
            f"Downloading {repo_id} from {endpoint} failed ({type(exc).__name__}: {exc}). Check the network and free "
            "space in the Hugging Face cache, then rerun: files already downloaded are kept."
        ) from exc


def _offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub read it at import, or as set now (the stricter of the two)."""
    from huggingface_hub import constants

    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _remote_files(repo_id: str, revision: str | None, token: str | None, endpoint: str) -> list[str]:
    """The file names of the repo at ``revision``, from the Hub's model info (one request).

    Raises :class:`ModelNotFoundError` for a missing repo or revision, :class:`_Unreachable` for anything else
    (connection errors and Hub outages come as many types; the cache may still have the repo).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise _not_found(exc, repo_id, revision, token, endpoint) from exc
    except Exception as exc:  # noqa: BLE001
        logger.info("cannot list %s on %s (%s: %s); looking in the local cache", repo_id, endpoint,
                    type(exc).__name__, exc)
        raise _Unreachable() from exc
    return sorted(sibling.rfilename for sibling in info.siblings or [])


def _pickle_patterns(repo_id: str, files: list[str], allow_pickle: bool) -> list[str]:
    """Extra download patterns for the repo's weights: none with safetensors, ``*.bin`` for a pickle-only repo with
    ``allow_pickle``; :class:`CheckpointError` (before any download) otherwise."""
    if any(name.endswith(".safetensors") for name in files):
        return []
    pickles = [name for name in files if name.endswith(".bin")]
    if pickles and allow_pickle:
        return list(PICKLE_PATTERNS)
    if pickles:
        raise CheckpointError(
            f"The Hub repo {repo_id} has no safetensors weights, only pickle files ({', '.join(pickles[:3])}). "
            "uncurl-hf does not unpickle by default, because unpickling can run arbitrary code: pass --allow-pickle "
            "(allow_pickle=True) if you trust the repo, or use a revision with safetensors weights (many repos have "
            "a refs/pr/N safetensors conversion)."
        )
    raise CheckpointError(
        f"The Hub repo {repo_id} has no model weights (no *.safetensors, no *.bin; files: "
        f"{', '.join(files[:5]) or 'none'}); it is not a transformers checkpoint. Check the repo id."
    )


def _check_snapshot(folder: Path, repo_id: str, allow_pickle: bool) -> None:
    """The snapshot (possibly from the cache alone) holds weights the loader will accept."""
    from uncurl_hf.io.safetensors import weight_files

    if weight_files(folder) or (allow_pickle and any(folder.glob("*.bin"))):
        return
    raise CheckpointError(
        f"The cached snapshot of {repo_id} ({folder}) has no safetensors weights"
        + (" or pickle weights" if allow_pickle else "")
        + "; uncurl-hf reads safetensors (pickle .bin files only with --allow-pickle). Download it again with network "
        "access, or give a local checkpoint folder."
    )


def _not_found(exc: BaseException, repo_id: str, revision: str | None, token: str | None, endpoint: str) -> Exception:
    from huggingface_hub.errors import RevisionNotFoundError

    if isinstance(exc, RevisionNotFoundError):
        return ModelNotFoundError(
            f"The Hub repo {repo_id} on {endpoint} has no revision {revision!r}; give an existing branch, tag or "
            "commit (--revision), or leave it out for main."
        )
    who = "the given token" if token else "your token (HF_TOKEN or `hf auth login`)"
    return ModelNotFoundError(
        f"There is no model repo {repo_id} on {endpoint}, and no local folder of that name. Check the id (or the "
        f"path); if the repo is private or gated, make sure {who} has access to it."
    )


def _not_cached(repo_id: str, revision: str | None, endpoint: str, unreachable: BaseException | None) -> Exception:
    at = f" at revision {revision!r}" if revision else ""
    if unreachable is None:
        return ModelNotFoundError(
            f"{repo_id}{at} is not a local folder and not in the local Hugging Face cache, and Hub access is off "
            f"(HF_HUB_OFFLINE=1). Download it first where the Hub is reachable (`hf download {repo_id}`), unset "
            "HF_HUB_OFFLINE, or give a local folder."
        )
    return HubConnectionError(
        f"Could not reach the Hub at {endpoint} for {repo_id} ({type(unreachable).__name__}: {unreachable}), and "
        f"{repo_id}{at} is neither a local folder nor in the local Hugging Face cache. Check the network, a proxy or "
        "HF_ENDPOINT, or give a local folder."
    )


def _quiet_tqdm() -> Any:
    """A huggingface_hub progress-bar class that never shows (``progress=False``), without the library's global
    ``disable_progress_bars`` switch."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class QuietTqdm(hf_tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return QuietTqdm


__all__ = ["DOWNLOAD_PATTERNS", "PICKLE_PATTERNS", "resolve_model"]
