"""``resolve_model``: local folders, zoo names and Hub ids, the last over real HTTP against the test Hub server.

The test pushes tiny model repos to ``tests/hub_server.py`` and resolves them through huggingface_hub's
``snapshot_download`` (never the real Hub): by id, then offline from the cache, and the error cases (missing repo or
revision, pickle-only repo, offline or unreachable and not cached). huggingface_hub read ``HF_ENDPOINT`` and
``HF_HUB_OFFLINE`` at import; the resolver reads ``HF_ENDPOINT`` (and ``HF_HUB_OFFLINE``) at call time, so ``hub``
sets the environment variables and only turns off the import-time offline flag, Xet and the agent registry.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, constants

from uncurl_hf.errors import CheckpointError, HubConnectionError, ModelNotFoundError
from uncurl_hf.io.checkpoint import load_model
from uncurl_hf.io.resolve import resolve_model

TOKEN = "hf_test_token"
EXTRA_FILES = {"notes.md": b"# not needed\n", "logo.png": b"\x89PNG not needed", "pytorch_model.bin": b"pickle"}


def _push(hub, folder: Path, name: str, extra: dict[str, bytes] | None = None, skip: tuple[str, ...] = ()) -> str:
    """Upload ``folder`` (minus ``skip``, plus ``extra`` files) as ``tester/<name>``; returns the repo id."""
    repo_id = f"tester/{name}"
    api = HfApi(endpoint=hub.url, token=TOKEN)
    if ("model", repo_id) not in hub.state.repos:
        api.create_repo(repo_id)
    staged = folder.parent / f"{name}-staged"
    shutil.copytree(folder, staged, ignore=shutil.ignore_patterns(*skip))
    for file_name, data in (extra or {}).items():
        (staged / file_name).write_bytes(data)
    api.upload_folder(repo_id=repo_id, folder_path=str(staged), commit_message="add model")
    return repo_id


@pytest.fixture
def tiny_repo(hub, switch_dir, tmp_path) -> str:
    """The tiny Switch checkpoint on the server, with files a checkpoint folder does not need."""
    return _push(hub, shutil.copytree(switch_dir, tmp_path / "tiny"), "tiny-switch", EXTRA_FILES)


def _downloads(hub, repo_id: str) -> list[str]:
    """File downloads (``GET .../resolve/...``) of ``repo_id`` so far (the server is shared by the session)."""
    return [path for method, path in hub.requests if path.startswith(f"/{repo_id}/resolve/") and method == "GET"]


def test_local_folders_and_zoo_names_resolve_without_the_hub(switch_dir, tmp_path):
    assert resolve_model(switch_dir) == switch_dir
    assert resolve_model(f"  {switch_dir}  ") == switch_dir
    with pytest.raises(ModelNotFoundError, match="is a file; give the checkpoint folder"):
        resolve_model(switch_dir / "config.json")
    with pytest.raises(ModelNotFoundError, match="No model given"):
        resolve_model("  ")
    with pytest.raises(ModelNotFoundError, match="neither an existing folder .*does not exist.*local checkpoint"):
        resolve_model(tmp_path / "missing")
    from uncurl_hf.zoo import registry

    shipped = registry.SHIPPED_DIR / "tiny-switch-8"
    if (shipped / "config.json").is_file():
        assert resolve_model("tiny-switch-8") == shipped


def test_a_hub_id_downloads_only_what_loading_needs_and_loads(hub, tiny_repo, switch_dir):
    folder = resolve_model(tiny_repo, progress=False)
    head = hub.head(tiny_repo).oid
    assert folder == Path(constants.HF_HUB_CACHE).resolve() / "models--tester--tiny-switch" / "snapshots" / head
    local = {p.name for p in switch_dir.iterdir()}
    assert {p.name for p in folder.iterdir()} == local  # weights, configs, tokenizer: not the .md, .png or .bin
    assert hub.unhandled == []
    model = load_model(folder)
    reference = load_model(switch_dir)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    # a second resolve online checks the repo again but downloads nothing new
    downloads = len(_downloads(hub, tiny_repo))
    assert resolve_model(tiny_repo, progress=False) == folder
    assert len(_downloads(hub, tiny_repo)) == downloads


def test_offline_resolves_from_the_cache_without_any_request(hub, tiny_repo, monkeypatch):
    folder = resolve_model(tiny_repo, progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at call time, not only at import
    requests = len(hub.requests)
    assert resolve_model(tiny_repo, progress=False) == folder
    assert len(hub.requests) == requests
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache.*HF_HUB_OFFLINE=1"):
        resolve_model("tester/never-downloaded")
    (folder / "model.safetensors").unlink()  # as an interrupted download leaves it
    with pytest.raises(ModelNotFoundError, match="cached copy of tester/tiny-switch is incomplete"):
        resolve_model(tiny_repo)


def test_missing_repo_or_revision_is_a_clear_error(hub, tiny_repo):
    with pytest.raises(ModelNotFoundError, match="no model repo tester/nope on http://127.0.0.1.*private or gated"):
        resolve_model("tester/nope")
    with pytest.raises(ModelNotFoundError, match="has no revision 'v9'"):
        resolve_model(tiny_repo, revision="v9")
    head = hub.head(tiny_repo).oid
    assert resolve_model(tiny_repo, revision=head, progress=False).name == head


def test_a_pickle_only_repo_is_refused_before_downloading_unless_allowed(hub, switch_dir, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(switch_dir / "config.json", pickled)
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
    repo_id = _push(hub, pickled, "pickle-only")
    with pytest.raises(CheckpointError, match="no safetensors weights, only pickle files .*pytorch_model.bin.*"
                                              "--allow-pickle"):
        resolve_model(repo_id)
    assert _downloads(hub, repo_id) == []  # refused from the file list: nothing was downloaded
    folder = resolve_model(repo_id, allow_pickle=True, progress=False)
    assert (folder / "pytorch_model.bin").read_bytes() == (pickled / "pytorch_model.bin").read_bytes()

    empty = tmp_path / "configs-only"
    empty.mkdir()
    shutil.copy(switch_dir / "config.json", empty)
    with pytest.raises(CheckpointError, match="has no model weights"):
        resolve_model(_push(hub, empty, "configs-only"), allow_pickle=True)


def test_an_unreachable_hub_falls_back_to_the_cache(hub, tiny_repo, monkeypatch):
    folder = resolve_model(tiny_repo, progress=False)
    with socket.socket() as sock:  # a port nobody listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", dead)
    assert resolve_model(tiny_repo, progress=False) == folder
    with pytest.raises(HubConnectionError, match=f"Could not reach the Hub at {dead}.*nor in the local Hugging Face cache"):
        resolve_model("tester/never-downloaded")
