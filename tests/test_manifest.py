"""The integrity manifest: digests hashed while a file is written equal a re-read, and ``fsync`` is the caller's choice.

The streaming writer hashes every shard with a background :class:`FollowingDigest` as it appends to it, so the
manifest never reads the weights a second time; these tests pin that the digest it hands over is the file's real
sha256, that a stale one is never trusted, and that ``fsync=False`` writes the same bytes without a single sync.
"""

from __future__ import annotations

import hashlib
import os

import pytest
from helpers import hash_tree

import uncurl_hf
from uncurl_hf.io.manifest import (
    MANIFEST_FILENAME,
    FileDigest,
    FollowingDigest,
    build_manifest,
    file_digest,
)
from uncurl_hf.io.verify import verify_checkpoint
from helpers import prune_flat


@pytest.mark.parametrize("sync", [False, True])
def test_a_following_digest_equals_the_sha256_of_the_finished_file(tmp_path, sync):
    """Appends of odd sizes, one larger than the thread's 8 MiB read and one of zero bytes, announced as they land."""
    path = tmp_path / "shard.bin"
    pieces = [os.urandom(n) for n in (8, 1, 0, (8 << 20) + 3, 4097, 12345)]
    with open(path, "wb", buffering=0) as handle:
        digest = FollowingDigest(path, sync=sync)
        written = 0
        for piece in pieces:
            handle.write(piece)
            written += len(piece)
            digest.advance(written)
        result = digest.finish()
    expected = hashlib.sha256(b"".join(pieces)).hexdigest()
    assert result == FileDigest(expected, written, synced=sync)
    assert file_digest(path) == expected


def test_a_file_shorter_than_announced_raises_from_finish(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(b"x" * 10)
    digest = FollowingDigest(path)
    digest.advance(20)  # the writer claims 20 bytes; only 10 exist
    digest.advance(30)  # later notices after the error are consumed, not waited on
    with pytest.raises(OSError, match="shorter than the 20 bytes"):
        digest.finish()


def test_cancel_stops_the_thread_without_raising(tmp_path):
    path = tmp_path / "abandoned.bin"
    path.write_bytes(b"")
    digest = FollowingDigest(path)
    digest.advance(5)  # would fail: the file is empty
    digest.cancel()


def test_known_digests_are_used_only_while_they_still_describe_the_file(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"alpha")
    (tmp_path / "b.bin").write_bytes(b"beta")
    fake = "0" * 64
    known = {
        "a.bin": FileDigest(fake, 5, synced=True),  # same size: trusted as handed over (it was hashed while written)
        "b.bin": FileDigest(fake, 3, synced=True),  # wrong size: the file changed since, so it is re-read
    }
    files = build_manifest(tmp_path, known=known)["files"]
    assert files["a.bin"] == {"sha256": fake, "size": 5}
    assert files["b.bin"] == {"sha256": hashlib.sha256(b"beta").hexdigest(), "size": 4}
    # a digest that was not synced is re-read (and synced) when the manifest must sync
    unsynced = {"a.bin": FileDigest(fake, 5, synced=False)}
    assert build_manifest(tmp_path, sync=True, known=unsynced)["files"]["a.bin"]["sha256"] != fake


@pytest.mark.parametrize("streaming", [True, False])
def test_no_fsync_writes_the_same_folder_and_never_syncs(switch_dir, calibration_jsonl, tmp_path, monkeypatch, streaming):
    """``fsync=False`` changes durability only: same bytes (manifest included), zero fsync/fdatasync calls."""
    common = dict(
        factor=2, method="frequency", calibration_file=calibration_jsonl, num_calibration_examples=8,
        streaming=streaming, progress=False,
    )
    synced = prune_flat(switch_dir, output_dir=tmp_path / "synced", **common).output_dir
    calls: list[str] = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def counting(name, real):
        def wrapper(fd):
            calls.append(name)
            return real(fd)
        return wrapper

    monkeypatch.setattr(os, "fsync", counting("fsync", real_fsync))
    monkeypatch.setattr(os, "fdatasync", counting("fdatasync", real_fdatasync))
    unsynced = prune_flat(switch_dir, output_dir=tmp_path / "unsynced", fsync=False, **common).output_dir
    assert calls == []
    assert hash_tree(unsynced) == hash_tree(synced)
    assert (unsynced / MANIFEST_FILENAME).is_file()
    report = verify_checkpoint(unsynced)
    assert report.ok, report.format()
    # and the default does sync: the same run with fsync=True calls it
    prune_flat(switch_dir, output_dir=tmp_path / "synced-again", **common)
    assert "fsync" in calls
