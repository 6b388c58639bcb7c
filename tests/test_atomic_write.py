"""Atomic outputs: SIGKILL the pruning CLI while it writes; the output is then absent or complete, never partial.

The CLI runs in forked children (real processes, see ``tests/forked.py``). A child reports when
``write_model_checkpoint`` starts and ends; a first, unkilled run measures that window, then each run is killed after a
seeded random delay inside it — some while the shards are written, some during validation, the card or the
manifest. No sleep hooks in the product code are needed: the window of the tiny model is short but measured.
Last, the atomic protocol's temporary files must not leak into the output's permissions (modes under two umasks).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest

import forked
from uncurl_hf.io.atomic import OLD_PREFIX, TEMP_PREFIX
from uncurl_hf.cli.main import main
from uncurl_hf.errors import OutputExistsError
from uncurl_hf.io.verify import verify_checkpoint

KILLS = 4
SEED = 20240611


def _argv(model: Path, calibration: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", str(model), "--calibration-file", str(calibration), "--factor", "2", "-o", str(out),
            "--no-progress", "--max-length", "16", *extra]


def _traced_prune(argv: list[str]) -> int:
    """Child: the CLI, with ``write_model_checkpoint`` announcing its start and end to the parent."""
    import uncurl_hf.pipeline.output as pruning  # the pipeline step that writes the output

    original = pruning.write_model_checkpoint

    def traced(*args, **kwargs):
        forked.send({"event": "write-start", "t": time.monotonic()})
        try:
            return original(*args, **kwargs)
        finally:
            forked.send({"event": "write-end", "t": time.monotonic()})

    pruning.write_model_checkpoint = traced
    return main(argv)


def _write_window(lines: list[str]) -> float:
    """Seconds between the child's write-start and write-end events."""
    times = [json.loads(line)["t"] for line in lines if '"event"' in line]
    return times[1] - times[0]


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((TEMP_PREFIX, OLD_PREFIX)))


def _assert_absent_or_complete(out: Path) -> str:
    if not out.exists():
        return "absent"
    report = verify_checkpoint(out)  # manifest hashes, counts, tensors, load + forward
    assert report.ok, report.format()
    return "complete"


def test_sigkill_during_write_leaves_no_partial_output(switch_dir, calibration_jsonl, tmp_path):
    out = tmp_path / "out"
    argv = _argv(switch_dir, calibration_jsonl, out, "--overwrite")
    code, lines = forked.start(_traced_prune, argv).join()
    assert code == 0, lines
    windows = [_write_window(lines)]
    assert _assert_absent_or_complete(out) == "complete"
    good = Path(shutil.copytree(out, tmp_path / "keep" / "out"))

    rng = random.Random(SEED)
    outcomes = []
    for i in range(KILLS):
        shutil.rmtree(out, ignore_errors=True)
        if i % 2:  # odd runs overwrite a complete output, even runs write a new folder
            shutil.copytree(good, out)
        child = forked.start(_traced_prune, argv)
        start = child.wait_for_line()
        assert start is not None
        time.sleep(rng.uniform(0.0, 0.9 * min(windows)))  # the shortest write seen so far: warm runs are faster
        child.kill()
        status, lines = child.join()
        if status == 0:  # finished before the kill: learn from its (shorter) write time
            windows.append(_write_window([start, *lines]))
        outcomes.append((status, _assert_absent_or_complete(out), len(_leftovers(tmp_path))))
    assert any(status == -signal.SIGKILL for status, _, _ in outcomes), outcomes
    # and at least one kill landed mid-write: it left a temporary folder behind, or no output at all
    assert any(leftovers or state == "absent" for _, state, leftovers in outcomes), outcomes
    print("kills (exit status, output, leftover folders):", outcomes)

    # the next run sweeps whatever the killed runs left and writes a complete folder
    assert forked.start(_traced_prune, argv).join()[0] == 0
    assert _leftovers(tmp_path) == [], outcomes
    assert _assert_absent_or_complete(out) == "complete"


def _die_between_renames(argv: list[str]) -> int:
    """Child: SIGKILL itself after an overwrite moved the old output aside, before the new one is renamed in."""
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        moved_aside = any(p.name.startswith(OLD_PREFIX) for p in Path(dst).parent.iterdir())
        if Path(src).name.startswith(TEMP_PREFIX) and moved_aside:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace
    return main(argv)


def test_kill_between_the_two_renames_of_an_overwrite_restores_the_old_output(
    switch_dir, calibration_jsonl, tmp_path, capsys
):
    out = tmp_path / "out"
    assert main(_argv(switch_dir, calibration_jsonl, out, "--seed", "1")) == 0
    first = verify_checkpoint(out, forward=False)
    assert first.ok

    status, _ = forked.start(_die_between_renames, _argv(switch_dir, calibration_jsonl, out, "--overwrite")).join()
    assert status == -signal.SIGKILL
    assert not out.exists()  # the one moment the output is absent: the old folder is aside, the new one not in
    assert {name.split("-")[1] for name in _leftovers(tmp_path)} == {"tmp", "old"}

    # the next run restores the old output first, so without --overwrite it refuses (and finds it complete)
    capsys.readouterr()
    assert main(_argv(switch_dir, calibration_jsonl, out)) == OutputExistsError.exit_code
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert _leftovers(tmp_path) == []
    assert verify_checkpoint(out).ok


def _modes_under_umask(umask: int, model: str, calibration: str, root: str) -> dict:
    """Child: set ``umask``, prune in memory and then streamed (the saved plan), and report every mode written,
    next to what a plain ``open()`` / ``mkdir()`` give under the same umask."""
    os.umask(umask)
    root_path = Path(root)
    memory, streamed = root_path / "memory", root_path / "streamed"
    assert main(_argv(Path(model), Path(calibration), memory)) == 0
    assert main(["prune", model, "--plan", str(memory / "uncurl_plan.json"), "-o", str(streamed), "--streaming",
                 "--no-progress"]) == 0
    (root_path / "plain.txt").write_text("x")
    (root_path / "plain-dir").mkdir()

    def modes(folder: Path) -> dict:
        return {"folder": folder.stat().st_mode & 0o777,
                **{p.name: p.stat().st_mode & 0o777 for p in sorted(folder.iterdir())}}

    return {"memory": modes(memory), "streamed": modes(streamed),
            "plain_file": (root_path / "plain.txt").stat().st_mode & 0o777,
            "plain_dir": (root_path / "plain-dir").stat().st_mode & 0o777}


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask-022", "umask-077"])
def test_every_written_file_gets_the_mode_a_plain_write_gives(switch_dir, calibration_jsonl, tmp_path, umask):
    """Issue 17: ``model.safetensors`` came out 0600 beside 0644 files (``safetensors``' ``save_file`` writes through
    a private temporary file, and the temporary folder is ``mkdtemp``'s 0700). Every file of an output folder, in
    memory or streamed, must get ``0666 & ~umask`` and the folder ``0777 & ~umask``, like any other file the user
    writes. Run in a forked child: the umask is process-wide."""
    got = forked.run(_modes_under_umask, umask, str(switch_dir), str(calibration_jsonl), str(tmp_path))
    assert got["plain_file"] == 0o666 & ~umask and got["plain_dir"] == 0o777 & ~umask
    for kind in ("memory", "streamed"):
        modes = got[kind]
        assert "model.safetensors" in modes and "uncurl_manifest.json" in modes, modes
        assert modes.pop("folder") == got["plain_dir"], (kind, modes)
        assert set(modes.values()) == {got["plain_file"]}, (kind, {k: oct(v) for k, v in modes.items()})
