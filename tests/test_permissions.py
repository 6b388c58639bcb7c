"""Permissions and links around a run (issue 17), beyond the CLI rows of ``test_bad_inputs.py``.

Permission bits are tested for real: the suite runs as root here, and root ignores them, so each such test runs in
a forked child that first gives up CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (``tests/unprivileged.py``) and is then
refused a mode-000 file like any user. What a child cannot show (``os.access`` saying yes where creating a file
still fails: read-only mounts, ACLs, quotas) is simulated at the one call that creates the probe file, and said so.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

import unprivileged
from uncurl_hf.errors import AccessDeniedError, BrokenSymlinkError
from uncurl_hf.io import access
from uncurl_hf.io.access import PROBE_PREFIX, check_writable_parent
from uncurl_hf.io.checkpoint import inspect_checkpoint

needs_unprivileged = pytest.mark.skipif(not unprivileged.available(),
                                        reason="this runner cannot give a child ordinary file permissions (capset)")


def _prune_until_loading(model: str, calibration: str, out: str) -> dict:
    """Child: ``uncurl prune`` with the model loader replaced by a tripwire; which error stopped it, and where."""
    import io
    from contextlib import redirect_stderr

    import uncurl_hf.pipeline.prune as pipeline
    from uncurl_hf.cli.main import main

    def tripwire(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    pipeline.load_source = tripwire
    try:
        main(["--debug", "prune", model, "--calibration-file", calibration, "--factor", "2", "-o", out,
              "--no-progress"])
    except Exception as exc:  # noqa: BLE001 - the class is what the test checks
        return {"type": type(exc).__name__, "message": str(exc)}
    return {"type": None}


@needs_unprivileged
def test_an_unwritable_output_parent_fails_before_the_model_is_loaded(switch_dir, calibration_jsonl, tmp_path):
    """It used to fail only when the output was written, after calibration (minutes on a real model)."""
    parent = tmp_path / "locked"
    parent.mkdir()
    os.chmod(parent, 0o555)
    got = unprivileged.run(_prune_until_loading, str(switch_dir), str(calibration_jsonl), str(parent / "out"))
    assert got["type"] == "AccessDeniedError", got
    assert f"the folder {parent} is not writable for this user" in got["message"]
    assert "Choose an -o in a folder you can write to" in got["message"]
    assert list(parent.iterdir()) == []


def test_the_probe_catches_what_os_access_misses(tmp_path, monkeypatch):
    """``os.access`` says yes on a read-only bind mount with stale bits, an ACL or a full quota; the real probe file
    does not. Simulated: ``mkstemp`` (the call creating the probe) fails as it does on a read-only filesystem."""

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(access.tempfile, "mkstemp", read_only)
    with pytest.raises(AccessDeniedError, match=r"folder .* is not writable for this user \(Read-only file system"):
        check_writable_parent(tmp_path / "out")


def test_a_creatable_output_parent_passes_and_the_probe_leaves_nothing(tmp_path):
    assert check_writable_parent(tmp_path / "new" / "deeper" / "out") == tmp_path
    assert list(tmp_path.iterdir()) == []
    assert not any(p.name.startswith(PROBE_PREFIX) for p in tmp_path.rglob("*"))


def test_a_checkpoint_made_of_good_symlinks_is_fine(switch_dir, tmp_path):
    """A Hugging Face cache snapshot is all symlinks into ``blobs/``: the link checks must not flag those."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    shutil.copytree(switch_dir, blobs)
    snapshot.mkdir()
    for blob in blobs.iterdir():
        os.symlink(os.path.relpath(blob, snapshot), snapshot / blob.name)
    assert inspect_checkpoint(snapshot).name == "switch_transformers"


def _sharded(switch_dir: Path, folder: Path) -> list[Path]:
    from transformers import AutoModelForSeq2SeqLM

    AutoModelForSeq2SeqLM.from_pretrained(switch_dir).save_pretrained(folder, max_shard_size="150KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(switch_dir / name, folder / name)
    return sorted(folder.glob("model-*.safetensors"))


def test_a_looping_shard_of_a_sharded_checkpoint_is_named(switch_dir, tmp_path):
    shards = _sharded(switch_dir, tmp_path / "sharded")
    shards[-1].unlink()
    os.symlink(shards[-1].name, shards[-1])
    with pytest.raises(BrokenSymlinkError, match=rf"weight file .*{shards[-1].name} is a symlink loop"):
        inspect_checkpoint(tmp_path / "sharded")


def _inspect(folder: str) -> dict:
    try:
        inspect_checkpoint(folder)
    except Exception as exc:  # noqa: BLE001
        return {"type": type(exc).__name__, "message": str(exc)}
    return {"type": None}


@needs_unprivileged
def test_an_unreadable_shard_or_index_is_named(switch_dir, tmp_path):
    shards = _sharded(switch_dir, tmp_path / "sharded")
    os.chmod(shards[0], 0)
    got = unprivileged.run(_inspect, str(tmp_path / "sharded"))
    assert got["type"] == "AccessDeniedError" and f"weight file {shards[0]}: permission denied" in got["message"]
    os.chmod(shards[0], 0o644)
    os.chmod(tmp_path / "sharded" / "model.safetensors.index.json", 0)
    got = unprivileged.run(_inspect, str(tmp_path / "sharded"))
    assert got["type"] == "AccessDeniedError" and "model.safetensors.index.json: permission denied" in got["message"]


@needs_unprivileged
def test_a_folder_that_can_be_listed_but_not_entered_is_named(switch_dir, tmp_path):
    """Mode 0444 on a folder: ``ls`` works, opening anything inside does not (no search bit)."""
    model = Path(shutil.copytree(switch_dir, tmp_path / "model"))
    os.chmod(model, 0o444)
    got = unprivileged.run(_inspect, str(model))
    assert got["type"] == "AccessDeniedError", got
    assert f"Cannot read the model folder {model}: permission denied (mode dr--r--r--" in got["message"]
