"""``uncurl verify``: a fresh output passes; tampered weights, config, plan or manifest fail with a clear report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import uncurl_hf
from uncurl_hf.cli.main import main
from uncurl_hf.errors import ModelNotFoundError, VerificationError
from uncurl_hf.io.manifest import MANIFEST_FILENAME, write_manifest
from uncurl_hf.io.verify import verify_checkpoint
from helpers import prune_flat


@pytest.fixture(scope="module")
def pruned_dir(switch_dir, calibration_jsonl, tmp_path_factory) -> Path:
    """A pruned output (frequency, factor 2). Tests copy it before tampering."""
    out = tmp_path_factory.mktemp("verify") / "pruned"
    prune_flat(switch_dir, output_dir=out, factor=2, calibration_file=calibration_jsonl, max_length=16,
                    progress=False)
    return out


@pytest.fixture
def copy(pruned_dir, tmp_path) -> Path:
    return Path(shutil.copytree(pruned_dir, tmp_path / "copy"))


def _levels(report) -> dict[str, str]:
    return {check.name: check.level for check in report.checks if check.level != "warn"}


def test_fresh_output_passes_every_check(pruned_dir, capsys):
    manifest = json.loads((pruned_dir / MANIFEST_FILENAME).read_text())
    assert {"model.safetensors", "config.json", "uncurl_plan.json", "README.md"} <= set(manifest["files"])
    assert main(["verify", str(pruned_dir)]) == 0
    out = capsys.readouterr().out
    for line in ("PASS  hashes:", "PASS  counts: config == weights == plan", "PASS  tensors:", "PASS  forward:"):
        assert line in out, out
    assert out.rstrip().endswith(": OK")


def test_flipped_weight_byte_fails_the_hash_check(copy, capsys):
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # one bit of one tensor value; the header and shapes are intact
    weights.write_bytes(bytes(data))
    assert main(["verify", str(copy)]) == VerificationError.exit_code == 1
    captured = capsys.readouterr()
    assert "FAIL  hashes: model.safetensors changed since it was written" in captured.out
    assert captured.err.startswith("error: ") and "failed verification" in captured.err
    assert "Traceback" not in captured.err
    expected = {"hashes": "fail", "counts": "pass", "tensors": "pass", "forward": "pass"}
    assert _levels(verify_checkpoint(copy)) == expected


def test_edited_config_counts_fail_hashes_agreement_and_load(copy):
    config = json.loads((copy / "config.json").read_text())
    config["num_experts_per_encoder_layer"][0] -= 1
    (copy / "config.json").write_text(json.dumps(config))
    report = verify_checkpoint(copy)
    assert _levels(report) == {"hashes": "fail", "counts": "fail", "tensors": "fail", "forward": "fail"}
    assert "encoder.block.1: config 3, weights 4, plan 4" in report.format()


def test_agreement_is_checked_even_when_the_manifest_was_rewritten(copy):
    """Someone "fixes" the hashes after editing the plan: the counts check still catches it."""
    plan = json.loads((copy / "uncurl_plan.json").read_text())
    layer = plan["layers"][-1]
    layer["groups"], layer["weights"] = layer["groups"][:-1], layer["weights"][:-1]
    (copy / "uncurl_plan.json").write_text(json.dumps(plan))
    write_manifest(copy)
    report = verify_checkpoint(copy, forward=False)
    assert _levels(report) == {"hashes": "pass", "counts": "fail", "tensors": "pass"}
    assert "decoder.block.3: config 4, weights 4, plan 3" in report.format()


def test_malformed_plan_and_missing_manifest(copy):
    (copy / "uncurl_plan.json").write_text("{")
    (copy / MANIFEST_FILENAME).unlink()
    report = verify_checkpoint(copy, forward=False)
    assert _levels(report) == {"hashes": "fail", "plan": "fail", "counts": "pass", "tensors": "pass"}
    assert "no uncurl_manifest.json" in report.format() and "not valid JSON" in report.format()


def test_added_files_and_edited_card(copy):
    (copy / "README.md").write_text("my own card")
    (copy / "notes.txt").write_text("hello")
    report = verify_checkpoint(copy, forward=False)
    assert report.ok, report.format()
    warning = next(check for check in report.checks if check.level == "warn")
    assert "README.md changed" in warning.detail and "notes.txt was added" in warning.detail
    (copy / "pytorch_model.bin").write_bytes(b"\x80\x04")
    report = verify_checkpoint(copy, forward=False)
    assert not report.ok and "pytorch_model.bin was added after writing" in report.format()


def test_not_a_folder(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a folder"):
        verify_checkpoint(tmp_path / "nope")
