"""Memory on the in-memory path (issue 17, "memory at real shapes"): what is freed and when, not how much.

Peak RSS and times are measured by ``benchmarks/memory.py``, never asserted here. Specified:

* a bfloat16 checkpoint loads in bfloat16 with the stored values;
* ``apply_plan(release_source=True)`` gives the very tensors of ``release_source=False`` and leaves the source's
  expert tensors on the meta device (freed), everything else in place;
* ``write_model_checkpoint`` lets go of the model it is handed before the written folder is reloaded, and reloads it
  block by block (``from_pretrained`` only where the block reader's map does not apply);
* a large read of the block-by-block load lives in its own anonymous mapping, gone when the tensor is;
* the CLI turns oneDNN's primitive cache off unless the user sized it;
* ``apply_plan(only=...)`` refuses to skip a layer its plan changes.
"""

from __future__ import annotations

import gc
import os
import weakref
from pathlib import Path

import pytest
import torch

from helpers import tiny_switch_model
from test_families_decoder import ZOO_TOKENIZER, plan_of, tiny_model
from uncurl_hf.families import get_family
from uncurl_hf.io import written
from uncurl_hf.io import tensor_map
from uncurl_hf.io.safetensors import SafetensorsReader
from uncurl_hf.io.checkpoint import load_model, write_model_checkpoint
from uncurl_hf.surgery.apply import apply_plan


def _groups(model):
    return {layer.name: [[e] for e in range(0, layer.num_experts, 2)] for layer in get_family(model).sparse_layers(model)}


def test_bf16_source_loads_in_bf16(tmp_path: Path) -> None:
    model = tiny_model("qwen3_moe").to(torch.bfloat16)
    model.save_pretrained(str(tmp_path / "src"))
    loaded = load_model(tmp_path / "src")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_release_source_frees_experts_and_keeps_the_output() -> None:
    for model in (tiny_model("qwen3_moe").to(torch.bfloat16), tiny_switch_model()):
        family = get_family(model)
        plan = plan_of(model, _groups(model))
        kept = apply_plan(model, family, plan)
        released = apply_plan(model, family, plan, release_source=True)
        assert kept.state_dict().keys() == released.state_dict().keys()
        for name, tensor in kept.state_dict().items():
            assert torch.equal(released.state_dict()[name], tensor), name
        for name, tensor in model.state_dict().items():
            assert tensor.is_meta == (".experts." in name), name
        assert not any(t.is_meta for t in released.state_dict().values())


def test_written_model_is_let_go_before_the_reload(tmp_path: Path, monkeypatch) -> None:
    model = tiny_model("qwen3_moe").to(torch.bfloat16)
    family = get_family(model)
    pruned = apply_plan(model, family, plan_of(model, _groups(model)))
    plan = plan_of(model, _groups(model))
    alive = weakref.ref(pruned)
    seen: list[bool] = []
    original = written.WrittenCheck.run

    def run(self) -> None:
        gc.collect()
        seen.append(alive() is not None)
        original(self)

    monkeypatch.setattr(written.WrittenCheck, "run", run)
    held = [pruned]
    del pruned
    write_model_checkpoint(held, tmp_path / "out", plan, source_dir=ZOO_TOKENIZER, sync=False)
    assert seen == [False] and held == []


def _write_checked(tmp_path: Path, model: torch.nn.Module) -> Path:
    plan = plan_of(model, _groups(model))
    pruned = apply_plan(model, get_family(model), plan)
    return write_model_checkpoint([pruned], tmp_path / "out", plan, source_dir=ZOO_TOKENIZER, sync=False)


def test_written_folder_is_reloaded_block_by_block(tmp_path: Path, monkeypatch) -> None:
    """from_pretrained's load of the written folder peaked at 2.4x its bytes; the check reads it block by block."""
    model = tiny_model("qwen3_moe").to(torch.bfloat16)

    def refuse(*args, **kwargs):
        raise AssertionError("the written check called from_pretrained")

    monkeypatch.setattr(get_family(model).auto_model_class(), "from_pretrained", refuse)
    assert (_write_checked(tmp_path, model) / "model.safetensors").is_file()


def test_written_check_falls_back_to_from_pretrained_where_the_map_does_not_apply(tmp_path: Path, monkeypatch) -> None:
    calls: list[str] = []

    def no_map(folder, auto_class, **kwargs):
        calls.append("map")
        raise tensor_map.TensorMapError("no map here")

    monkeypatch.setattr(tensor_map, "load_resident", no_map)
    assert (_write_checked(tmp_path, tiny_model("qwen3_moe")) / "model.safetensors").is_file()
    assert calls == ["map"]


def _mapped(address: int) -> bool:
    for line in Path("/proc/self/maps").read_text().splitlines():
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        if start <= address < end:
            return True
    return False


def test_a_large_read_has_its_own_mapping_and_gives_it_back(tmp_path: Path) -> None:
    if not Path("/proc/self/maps").is_file():
        pytest.skip("needs /proc/self/maps (Linux)")
    from safetensors.torch import save_file

    big = torch.arange(2**20, dtype=torch.float32).reshape(1024, 1024)  # 4 MiB
    save_file({"big": big, "small": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    with SafetensorsReader(tmp_path, own_mappings=True) as reader:  # as the block-by-block load reads
        read = reader.get("big")
        assert torch.equal(read, big)
        address = read.data_ptr()
        stored = reader.info("big")
        assert address % 64 == stored.offset % 64  # the alignment a memory-mapped file would give it
        assert _mapped(address)
        del read
        gc.collect()
        assert not _mapped(address)  # unmapped, not kept in the heap
        assert torch.equal(reader.get("small"), torch.ones(3))
    with SafetensorsReader(tmp_path) as reader:  # the default (streaming, offload): glibc's heap, no fresh faults
        read = reader.get("big")
        assert torch.equal(read, big) and read.data_ptr() % 64 == reader.info("big").offset % 64


def test_the_cli_turns_the_onednn_primitive_cache_off_unless_the_user_sized_it(monkeypatch) -> None:
    """Each expert's bf16 matmul has a new shape; oneDNN cached a primitive for each (0.3-0.4 GB on a 0.86 GB model)."""
    from uncurl_hf.cli import main
    from uncurl_hf.io.memory import ONEDNN_CACHE_VARIABLE

    monkeypatch.setenv(ONEDNN_CACHE_VARIABLE, "unset")  # recorded, so the variable main() sets is undone
    monkeypatch.delenv(ONEDNN_CACHE_VARIABLE)
    assert main(["methods"]) == 0
    assert os.environ[ONEDNN_CACHE_VARIABLE] == "0"
    monkeypatch.setenv(ONEDNN_CACHE_VARIABLE, "64")
    assert main(["methods"]) == 0
    assert os.environ[ONEDNN_CACHE_VARIABLE] == "64"


def test_apply_plan_only_refuses_to_skip_a_layer_its_plan_changes() -> None:
    """Sequential planning's intermediate models reduce only the planned layers; the rest must be kept whole."""
    from uncurl_hf.errors import InvalidPlanError
    from uncurl_hf.plan import LayerPlan

    model = tiny_model("qwen3_moe")
    family = get_family(model)
    plan = plan_of(model, _groups(model))
    names = [layer.name for layer in family.sparse_layers(model)]
    assert len(names) > 1
    first = names[0]
    with pytest.raises(InvalidPlanError, match=r"keeps .* as they are, but the plan changes them"):
        apply_plan(model, family, plan, only={first}, share=True)
    whole = [LayerPlan.keep(layer.name, layer.num_experts, list(range(layer.num_experts))) for layer in plan.layers]
    assert all(layer.is_identity for layer in whole)
    partial = plan_of(model, {layer.name: layer.groups for layer in [plan.layers[0], *whole[1:]]})
    apply_plan(model, family, partial, only={first}, share=True)  # the others are identity: accepted
