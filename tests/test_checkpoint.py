"""Checkpoint I/O: deterministic output, atomic overwrite rules, stale temp cleanup, sharding, load errors."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from helpers import hash_tree
from safetensors import safe_open
from transformers import AutoModelForSeq2SeqLM

import uncurl_hf
from uncurl_hf import LayerPlan, PruningPlan, load_model, write_checkpoint
from uncurl_hf.io.atomic import TEMP_PREFIX, sweep_stale_temp_dirs
from uncurl_hf.errors import CheckpointError, ModelNotFoundError, OutputExistsError, UnsupportedModelError
from uncurl_hf.families import get_family
from helpers import prune_flat


def half_plan(model) -> PruningPlan:
    family = get_family(model)
    layers = [LayerPlan.keep(l.name, l.num_experts, range(0, l.num_experts, 2)) for l in family.sparse_layers(model)]
    return PruningPlan(model.config.model_type, family.name, "manual", layers)


def test_pruning_twice_gives_byte_identical_folders(switch_dir, calibration_jsonl, tmp_path):
    before = hash_tree(switch_dir)
    kwargs = dict(factor=2, method="frequency", calibration_file=calibration_jsonl, seed=5, progress=False)
    a = prune_flat(switch_dir, output_dir=tmp_path / "a", **kwargs)
    b = prune_flat(switch_dir, output_dir=tmp_path / "b", **kwargs)
    assert hash_tree(a.output_dir) == hash_tree(b.output_dir)
    assert hash_tree(switch_dir) == before
    names = set(hash_tree(a.output_dir))
    assert {"config.json", "model.safetensors", "uncurl_plan.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "generation_config.json" in names
    with safe_open(str(a.output_dir / "model.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}  # no timestamps or paths in the header
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".uncurl-")]
    assert oct(a.output_dir.stat().st_mode & 0o777) != oct(0o700)


def test_sharded_write_has_index_and_reloads(switch_dir, tmp_path):
    model = load_model(switch_dir)
    pruned = uncurl_hf.apply_plan(model, get_family(model), half_plan(model))
    out = write_checkpoint(
        pruned, tmp_path / "sharded", half_plan(model), source_dir=switch_dir, max_shard_size="100KB"
    )
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(out)
    ids = torch.tensor([[4, 5, 6, 1]])
    inputs = {"input_ids": ids, "decoder_input_ids": ids}
    torch.testing.assert_close(reloaded(**inputs).logits, pruned(**inputs).logits)


def test_output_rules(switch_dir, tmp_path):
    model = load_model(switch_dir)
    plan = half_plan(model)
    pruned = uncurl_hf.apply_plan(model, get_family(model), plan)
    with pytest.raises(OutputExistsError, match="is the input model folder"):
        write_checkpoint(pruned, switch_dir, plan, source_dir=switch_dir)
    with pytest.raises(OutputExistsError, match="inside the input model folder"):
        write_checkpoint(pruned, switch_dir / "sub", plan, source_dir=switch_dir)
    with pytest.raises(OutputExistsError, match="contains the input model"):
        write_checkpoint(pruned, switch_dir.parent, plan, source_dir=switch_dir, overwrite=True)

    out = write_checkpoint(pruned, tmp_path / "out", plan)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_checkpoint(pruned, out, plan)
    (out / "stale.txt").write_text("old")
    write_checkpoint(pruned, out, plan, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not a model folder"):
        write_checkpoint(pruned, precious, plan, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_stale_temp_dirs_of_dead_processes_are_swept(tmp_path):
    dead_pid = 2**22 + 12345  # above the default pid_max: never alive
    stale = tmp_path / f"{TEMP_PREFIX}out-{dead_pid}-abc"
    live = tmp_path / f"{TEMP_PREFIX}out-{os.getpid()}-def"
    other = tmp_path / f"{TEMP_PREFIX}other-{dead_pid}-ghi"
    for folder in (stale, live, other):
        folder.mkdir()
    assert sweep_stale_temp_dirs(tmp_path / "out") == [stale]
    assert live.exists() and other.exists() and not stale.exists()


def test_load_model_errors(switch_dir, t5_dir, tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(UnsupportedModelError, match="'t5'.*Supported families: .*switch_transformers"):
        load_model(t5_dir)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(switch_dir / "config.json", pickled)
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only pickle weights.*safetensors"):
        load_model(pickled)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(switch_dir, corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(corrupt)

    broken = tmp_path / "broken"
    shutil.copytree(switch_dir, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(broken)


def test_plan_file_matches_config(switch_dir, calibration_txt, tmp_path):
    result = prune_flat(
        switch_dir, output_dir=tmp_path / "o", factor=4, calibration_file=calibration_txt, progress=False
    )
    plan = PruningPlan.load(result.output_dir)
    config = json.loads((result.output_dir / "config.json").read_text())
    assert config["model_type"] == "pruned_switch_transformers"
    assert config["num_experts_per_encoder_layer"] == [plan.counts["encoder.block.1"], plan.counts["encoder.block.3"]]
    assert plan.metadata["calibration"]["num_examples"] == 12
    assert plan.metadata["stats"]["encoder.block.1"]["num_tokens"] > 0


@pytest.mark.parametrize("dtype, expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                             ("float16", torch.float16), (torch.bfloat16, torch.bfloat16)])
def test_load_model_dtypes(switch_dir, dtype, expected):
    model = load_model(switch_dir, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {expected}
    reference = load_model(switch_dir)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b.to(a.dtype)), name


def test_load_model_auto_dtype_is_the_stored_dtype_as_before(switch_dir, tmp_path):
    bf16 = tmp_path / "bf16"
    load_model(switch_dir, dtype="bfloat16").save_pretrained(bf16)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(switch_dir / name, bf16)
    assert {p.dtype for p in load_model(bf16).parameters()} == {torch.bfloat16}  # "auto", the default
    plain = AutoModelForSeq2SeqLM.from_pretrained(bf16)  # what the loader passed before: no dtype at all
    assert {p.dtype for p in load_model(bf16, dtype="auto").parameters()} == {p.dtype for p in plain.parameters()}


def test_load_model_devices_are_checked_before_loading(switch_dir, tmp_path, monkeypatch):
    from uncurl_hf.errors import DeviceError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this CPU-only machine
    with pytest.raises(DeviceError, match="'cuda' asked for, but CUDA is not available.*--device cpu"):
        load_model(tmp_path / "nope", device="cuda")  # the device fails first, before the missing folder
    with pytest.raises(DeviceError, match="Unknown device 'gpu0'"):
        load_model(switch_dir, device="gpu0")
    with pytest.raises(DeviceError, match="Unknown dtype 'int8'"):
        load_model(switch_dir, dtype="int8")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="MPS is not available"):
        load_model(switch_dir, device="mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match="has 1 CUDA device"):
        load_model(switch_dir, device="cuda:3")
    assert next(load_model(switch_dir, device="cpu").parameters()).device.type == "cpu"


def test_load_model_device_auto_uses_accelerate(switch_dir, monkeypatch):
    import sys

    from uncurl_hf.errors import DeviceError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = load_model(switch_dir, device="auto")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    reference = load_model(switch_dir)
    ids = torch.tensor([[4, 5, 6, 1]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=ids).logits,
                                   reference(input_ids=ids, decoder_input_ids=ids).logits)
    monkeypatch.setitem(sys.modules, "accelerate", None)  # makes `import accelerate` fail
    with pytest.raises(DeviceError, match="accelerate is not importable.*pip install accelerate"):
        load_model(switch_dir, device="auto")
