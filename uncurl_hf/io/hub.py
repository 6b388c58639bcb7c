"""Push a pruned output folder to a Hugging Face Hub repository (``HfApi.create_repo`` + ``upload_folder``).

The endpoint is ``endpoint`` if given, else ``HF_ENDPOINT`` read *now* (huggingface_hub itself reads it once at
import), else huggingface_hub's default; the token is ``token`` if given, else huggingface_hub's lookup
(``HF_TOKEN``, then the token saved by ``hf auth login``). Every failure becomes a :class:`~uncurl_hf.errors.HubError`
whose message names the fix. Pushing only reads the local folder: a failed push never deletes or changes it.

Existing repositories: by default a push refuses to touch one (a typo in ``--repo-id`` must not overwrite someone's
model); ``exist_ok`` uploads into it (same-named files replaced, others kept), ``overwrite`` makes the remote
mirror the folder (remote files absent locally are deleted in the same commit, ``.gitattributes`` kept).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uncurl_hf.errors import (
    HubAuthError,
    HubConnectionError,
    HubError,
    ModelNotFoundError,
    RepoExistsError,
)
from uncurl_hf.plan import PLAN_FILENAME

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
# Never uploaded: leftovers of interrupted local writes and editor/OS noise.
IGNORE_PATTERNS = [".uncurl-*", ".README-*", "**/.DS_Store", "**/__pycache__/**", "*.pyc"]


@dataclass
class PushResult:
    """Where a push went."""

    repo_id: str
    repo_url: str
    commit_url: str
    commit_oid: str
    endpoint: str
    created: bool


def resolve_endpoint(endpoint: str | None = None) -> str:
    """``endpoint`` > ``$HF_ENDPOINT`` (read at call time) > huggingface_hub's configured endpoint."""
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def resolve_token(token: str | None = None) -> str:
    """``token`` > ``$HF_TOKEN`` > the saved login token; :class:`HubAuthError` when there is none."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise HubAuthError(
            "No Hugging Face token found. Pass --token hf_..., set HF_TOKEN, or run `hf auth login` "
            "(create a token with write access at https://huggingface.co/settings/tokens)."
        )
    return token


def is_repo_id(text: str | None) -> bool:
    """Whether ``text`` has the form of a Hub repo id, ``namespace/name`` (it says nothing about local paths)."""
    return bool(text) and bool(_REPO_ID.match(text)) and ".." not in text and not text.endswith((".git", "."))


def check_repo_id(repo_id: str | None) -> str:
    """``namespace/name`` or :class:`HubError` explaining the expected form."""
    if not is_repo_id(repo_id):
        raise HubError(
            f"Invalid repo id {repo_id!r}: give it as namespace/name (your user or organization, then the model "
            "name; letters, digits, '-', '_' and '.'), e.g. --repo-id alice/switch-base-8-sentiment-x4."
        )
    return repo_id


def commit_message(folder: str | Path) -> str:
    """``uncurl-hf: <method>, factor <f> (<E> -> <k> experts)`` from the folder's ``uncurl_plan.json``."""
    plan_path = Path(folder) / PLAN_FILENAME
    try:
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "Upload model with uncurl-hf"
    method = plan.get("method", "unknown method")
    factor = plan.get("factor")
    layers = plan.get("layers") or []
    before = sum(int(layer.get("num_experts", 0)) for layer in layers)
    after = sum(len(layer.get("groups", [])) for layer in layers)
    how = f"factor {factor:g}" if isinstance(factor, (int, float)) else "per-layer expert counts"
    return f"uncurl-hf: prune experts with {method}, {how} ({before} -> {after} experts)"


def preflight(
    repo_id: str, token: str | None = None, endpoint: str | None = None, exist_ok: bool = False
) -> str:
    """Checks before a long pruning run that will push: repo id, offline mode, token, existing repo; returns the user.

    Contacts the endpoint (``whoami``, ``repo_exists``), so a bad token, an unreachable Hub or a taken repo id fails
    in a second instead of after the pruning.
    """
    check_repo_id(repo_id)
    _check_online()
    api, token = _api(token, endpoint)
    user = _whoami(api, token)
    try:
        exists = api.repo_exists(repo_id, repo_type="model", token=token)
    except Exception as exc:  # noqa: BLE001
        raise _hub_error(exc, api.endpoint, f"checking whether {repo_id} exists") from exc
    if exists and not exist_ok:
        raise RepoExistsError(
            f"The repo {repo_id} already exists on {api.endpoint}. Pass exist_ok (CLI: --hub-exist-ok) to upload "
            "into it, or choose another repo id."
        )
    return user


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    exist_ok: bool = False,
    overwrite: bool = False,
    endpoint: str | None = None,
    message: str | None = None,
) -> PushResult:
    """Upload the output folder ``folder`` to the model repo ``repo_id``; see the module docstring for the rules."""
    folder = Path(folder).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"{folder} is not a checkpoint folder (no config.json); push the folder written by `uncurl prune -o`."
        )
    check_repo_id(repo_id)
    _check_online()
    api, token = _api(token, endpoint)
    _whoami(api, token)
    message = message or commit_message(folder)
    from huggingface_hub.errors import HfHubHTTPError

    created = True
    try:
        repo_url = str(api.create_repo(repo_id, private=private, exist_ok=False, repo_type="model"))
    except HfHubHTTPError as exc:
        if _status(exc) != 409:
            raise _hub_error(exc, api.endpoint, f"creating {repo_id}") from exc
        if not (exist_ok or overwrite):
            raise RepoExistsError(
                f"The repo {repo_id} already exists on {api.endpoint}. Pass --exist-ok to upload into it (same-named "
                "files are replaced, others kept), --overwrite to make it mirror this folder exactly, or choose "
                "another --repo-id."
            ) from exc
        created = False
        repo_url = f"{api.endpoint}/{repo_id}"
    except Exception as exc:  # noqa: BLE001 - connection errors come as several httpx/OS types
        raise _hub_error(exc, api.endpoint, f"creating {repo_id}") from exc
    logger.info("%s %s; uploading %s", "created" if created else "reusing", repo_url, folder)
    try:
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            commit_message=message,
            commit_description=_commit_description(folder),
            ignore_patterns=list(IGNORE_PATTERNS),
            delete_patterns=["*"] if overwrite else None,
        )
    except Exception as exc:  # noqa: BLE001 - mapped to HubError below; the local folder was only read
        raise _hub_error(exc, api.endpoint, f"uploading {folder} to {repo_id}") from exc
    result = PushResult(
        repo_id=repo_id,
        repo_url=repo_url,
        commit_url=str(getattr(info, "commit_url", "")),
        commit_oid=str(getattr(info, "oid", "")),
        endpoint=api.endpoint,
        created=created,
    )
    logger.info("pushed %s -> %s", folder, result.commit_url)
    return result


def _api(token: str | None, endpoint: str | None) -> tuple[Any, str]:
    from huggingface_hub import HfApi

    token = resolve_token(token)
    return HfApi(endpoint=resolve_endpoint(endpoint), token=token), token


def _check_online() -> None:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise HubConnectionError(
            "Hugging Face offline mode is on (HF_HUB_OFFLINE=1), so nothing can be pushed. Unset HF_HUB_OFFLINE "
            "for this command; the pruned folder stays on disk."
        )


def _whoami(api: Any, token: str) -> str:
    try:
        return str(api.whoami(token=token).get("name", ""))
    except Exception as exc:  # noqa: BLE001
        if _status(exc) == 401:
            raise HubAuthError(
                f"{api.endpoint} rejected the token (401). Check HF_TOKEN / --token, or run `hf auth login` again; "
                "the token needs write access."
            ) from exc
        raise _hub_error(exc, api.endpoint, "checking the token") from exc


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _hub_error(exc: BaseException, endpoint: str, doing: str) -> HubError:
    """Map a huggingface_hub / httpx exception to the :class:`HubError` that names the fix."""
    if isinstance(exc, HubError):
        return exc
    chain = _chain(exc)
    if any(_is_connection_error(e) for e in chain):
        return HubConnectionError(
            f"Could not reach the Hub at {endpoint} while {doing} ({_short(chain)}). Check the network, a proxy, "
            "or HF_ENDPOINT; the pruned folder is unchanged, retry with `uncurl push`."
        )
    status = _status(exc)
    server = _server_message(exc)
    if status == 401:
        return HubAuthError(f"{endpoint} refused the token while {doing} (401{server}). Check HF_TOKEN / --token.")
    if status == 403:
        return HubAuthError(
            f"The token may not write there while {doing} (403{server}). Use a token with write access to that "
            "namespace, or push to your own namespace (--repo-id YOUR_USER/NAME)."
        )
    return HubError(f"The Hub at {endpoint} failed while {doing}: {_short(chain)}. The pruned folder is unchanged.")


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    name = type(exc).__name__
    return name in {"ConnectError", "ConnectTimeout", "ReadTimeout", "NetworkError", "OfflineModeIsEnabled"}


def _server_message(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    message = getattr(response, "headers", {}).get("X-Error-Message") if response is not None else None
    return f": {message}" if message else ""


def _short(chain: list[BaseException]) -> str:
    first = chain[0]
    text = str(first).strip().splitlines()
    return f"{type(first).__name__}: {text[0] if text else ''}"


def _commit_description(folder: Path) -> str:
    """The commit body: a pointer to the plan and the card (the commit title already names method and factor)."""
    parts = [f"Pruned checkpoint written by uncurl-hf. The pruning plan is in {PLAN_FILENAME}"]
    if (folder / "README.md").is_file():
        parts.append("the model card (README.md) lists the per-layer expert counts and measurements")
    return "; ".join(parts) + "."


__all__ = [
    "PushResult", "check_repo_id", "commit_message", "is_repo_id", "preflight", "push_folder", "resolve_endpoint",
]
