"""Offloaded calibration: weights stay on disk, one transformer block is materialised at a time, and the statistics,
plans and written checkpoints are exactly those of the in-memory model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import (
    CALIBRATION_TARGETS,
    CALIBRATION_TEXTS,
    calibrate_one_block_at_a_time,
    hash_tree,
    tiny_switch_model,
    tiny_tokenizer,
)
from safetensors.torch import load_file, save_file

from uncurl_hf import build_batches, calibrate, load_model

from helpers import prune_flat
from uncurl_hf.errors import CheckpointError, UncurlError
from uncurl_hf.families import get_family
from uncurl_hf.calibration.offload import find_blocks, load_offloaded
from uncurl_hf.evaluation.tasks import Example

EXAMPLES = [Example(s, t) for s, t in zip(CALIBRATION_TEXTS, CALIBRATION_TARGETS)]
BLOCKS = [f"{side}.block.{i}" for side in ("encoder", "decoder") for i in range(4)]


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory) -> Path:
    """The tiny Switch model saved in many small safetensors shards (with an index)."""
    folder = tmp_path_factory.mktemp("models") / "sharded"
    tiny_switch_model(seed=1).save_pretrained(folder, max_shard_size="60KB")
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def batches(sharded_dir) -> list[dict]:
    return build_batches(EXAMPLES, tiny_tokenizer(), batch_size=5, max_length=16)


def test_fixture_is_sharded(sharded_dir):
    assert len(list(sharded_dir.glob("model-*.safetensors"))) > 3
    assert (sharded_dir / "model.safetensors.index.json").is_file()


def test_offloaded_stats_equal_in_memory_stats_exactly(sharded_dir, batches):
    model = load_model(sharded_dir)
    expected = calibrate(model, get_family(model), batches, max_logit_samples=30, seed=2, progress=False)
    with load_offloaded(sharded_dir) as offloaded:
        got = calibrate(offloaded.model, offloaded.family, batches, max_logit_samples=30, seed=2, progress=False)
    assert got.num_sequences == expected.num_sequences
    for name, stats in expected.items():
        for field in ("counts", "gate_mass", "output_norm_sum", "weighted_output_norm_sum", "logit_sample",
                      "hidden_sample", "sample_tokens"):
            assert torch.equal(getattr(got[name], field), getattr(stats, field)), f"{name}: {field}"


def test_one_block_in_memory_at_a_time(sharded_dir, batches):
    with load_offloaded(sharded_dir) as offloaded:
        model = offloaded.model
        assert find_blocks(model) == BLOCKS
        assert all(p.is_meta for block in BLOCKS for p in model.get_submodule(block).parameters())
        assert not model.shared.weight.is_meta and model.lm_head.weight is model.shared.weight  # resident, tied

        calibrate_one_block_at_a_time(offloaded, BLOCKS, batches)
        counters = offloaded.counters
        block_bytes = max(sum(p.numel() * 4 for p in load_model(sharded_dir).get_submodule(b).parameters())
                          for b in BLOCKS)
        assert counters.peak_bytes == counters.resident_bytes + block_bytes
        assert all(p.is_meta for block in BLOCKS for p in model.get_submodule(block).parameters())


@pytest.mark.parametrize("method", ["frequency", "uncurl"])
def test_prune_offload_writes_the_same_bytes(method, sharded_dir, calibration_jsonl, tmp_path):
    kwargs = dict(calibration_file=calibration_jsonl, factor=2, method=method, seed=3, num_calibration_examples=12,
                  batch_size=5, max_length=16, progress=False)
    prune_flat(sharded_dir, output_dir=tmp_path / "memory", **kwargs)
    prune_flat(sharded_dir, output_dir=tmp_path / "offload", offload=True, **kwargs)
    assert hash_tree(tmp_path / "offload") == hash_tree(tmp_path / "memory")


def test_checkpoint_keys_must_be_module_names(sharded_dir, tmp_path):
    folder = tmp_path / "renamed"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((sharded_dir / name).read_bytes())
    state = {}
    for shard in sorted(sharded_dir.glob("model-*.safetensors")):
        state.update(load_file(shard))
    state["encoder.final_layer_norm.scale"] = state.pop("encoder.final_layer_norm.weight")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing: \['encoder.final_layer_norm.weight'\].*drop --offload"):
        load_offloaded(folder)


def test_sequential_needs_the_model_in_memory(sharded_dir, calibration_jsonl, tmp_path):
    with pytest.raises(UncurlError, match="cannot run with --offload"):
        prune_flat(sharded_dir, output_dir=tmp_path / "out", calibration_file=calibration_jsonl, factor=2,
              offload=True, sequential=True, progress=False)
    assert not (tmp_path / "out").exists()
