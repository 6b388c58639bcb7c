"""Memory on the in-memory path (issue 17, "memory at real shapes"): what is freed and when, not how much.

Peak RSS and times are measured by ``benchmarks/memory.py``, never asserted here. Specified:

* a bfloat16 checkpoint loads in bfloat16 with the stored values;
* ``apply_plan(release_source=True)`` gives the very tensors of ``release_source=False`` and leaves the source's
  expert tensors on the meta device (freed), everything else in place;
* ``write_model_checkpoint`` lets go of the model it is handed before the written folder is reloaded.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import torch

from helpers import tiny_switch_model
from test_families_decoder import ZOO_TOKENIZER, plan_of, tiny_model
from uncurl_hf.families import get_family
from uncurl_hf.io import written
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
