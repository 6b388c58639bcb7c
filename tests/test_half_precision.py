"""bfloat16 / float16 sources: every method prunes them, and the output stays in the source dtype (issue 17).

What is specified here:

* every method x {float32, bfloat16, float16} x {Switch, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss} prunes end to
  end in memory; every written tensor has the source dtype (Switch's router, upcast in place by its own forward
  during calibration, included), the folder reloads with the Auto classes in that dtype and passes
  ``verify_checkpoint``;
* a merging method applied streamed writes the very bytes of the in-memory path in bfloat16 (Switch and Mixtral) and
  in float16 (gpt-oss, whose norms transformers loads in float32: written back in float16, losslessly);
* the post-write check compares tensors bit for bit and the forward pass within a dtype-derived tolerance.

Models are tiny (8 experts, hidden 16-32) and built once per (family, dtype) for the module; calibration is six short
examples, so the matrix stays fast on two cores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import prune_flat, tiny_switch_model, tiny_tokenizer, write_calibration_file
from test_families_decoder import FAMILIES, ZOO_TOKENIZER, tiny_model
from uncurl_hf.errors import CheckpointError
from uncurl_hf.io.checks import compare_outputs, compare_written_tensors, forward_tolerance
from uncurl_hf.io.safetensors import safetensors_dtype, stored_tensors
from uncurl_hf.io.verify import verify_checkpoint

SOURCES = ("switch", *FAMILIES)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
METHODS = ("frequency", "random", "reap", "msmoe", "uncurl", "hcsmoe")
TEXTS = [
    "sentiment : the movie was very good and the cast was great",
    "sentiment : a boring film with a weak plot",
    "sentiment : it is a charming and funny story",
    "sentiment : the worst script , the acting was awful",
    "sentiment : i loved the music but the ending was slow",
    "sentiment : brilliant director , wonderful actress and a moving scene",
]
TARGETS = ["positive", "negative", "positive", "negative", "positive", "positive"]


def save_source(folder: Path, family: str, dtype: torch.dtype) -> Path:
    """A tiny seeded ``family`` checkpoint converted to ``dtype`` (stored as a bf16/fp16 Hub checkpoint is), with a
    tokenizer."""
    if family == "switch":
        tiny_switch_model(seed=0).to(dtype).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        return folder
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ZOO_TOKENIZER)
    model = tiny_model(family, vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=None, eos_token_id=1)
    model.to(dtype).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(ZOO_TOKENIZER / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_calibration_file(tmp_path_factory.mktemp("data") / "six.jsonl", TEXTS, TARGETS)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``source(family, dtype_name)`` -> a checkpoint folder, built once per pair for the whole module."""
    root = tmp_path_factory.mktemp("sources")
    built: dict[tuple[str, str], Path] = {}

    def get(family: str, dtype_name: str) -> Path:
        if (family, dtype_name) not in built:
            built[family, dtype_name] = save_source(root / f"{family}-{dtype_name}", family, DTYPES[dtype_name])
        return built[family, dtype_name]

    return get


def prune(source_dir: Path, out: Path, calibration: Path, **settings: Any) -> Any:
    return prune_flat(str(source_dir), out, factor=2, calibration_file=str(calibration), num_calibration_examples=6,
                      progress=False, card=False, **settings)


def header_dtypes(folder: Path) -> set[str]:
    return {stored.dtype for stored in stored_tensors(folder).values()}


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("family", SOURCES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_prunes_every_family_in_its_dtype(method, family, dtype_name, source, calibration, tmp_path):
    from uncurl_hf.families import get_family

    src = source(family, dtype_name)
    result = prune(src, tmp_path / "out", calibration, method=method)
    out = result.output_dir

    dtype = DTYPES[dtype_name]
    assert header_dtypes(out) == {safetensors_dtype(dtype)}, f"{method} wrote {header_dtypes(out)} from {dtype_name}"
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype_name
    report = verify_checkpoint(out, forward=False)  # hashes, config == plan == tensor shapes
    assert report.ok, report.format()
    reloaded = get_family(src).auto_model_class().from_pretrained(str(out)).eval()  # the Auto classes, dtype "auto"
    assert {p.dtype for p in reloaded.parameters()} <= {dtype, torch.float32}  # float32: modules kept in float32
    assert reloaded.dtype == dtype
    layers = get_family(reloaded).sparse_layers(reloaded)
    assert [layer.num_experts for layer in layers] == list(result.plan.counts.values())
    with torch.no_grad():
        logits = reloaded(**get_family(reloaded).dummy_inputs(reloaded)).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(("family", "dtype_name"), [("switch", "bfloat16"), ("mixtral", "bfloat16"),
                                                     ("gpt_oss", "float16")])  # its norms load as float32
def test_a_streamed_merge_writes_the_in_memory_bytes_in_half_precision(family, dtype_name, source, calibration,
                                                                      tmp_path):
    src = source(family, dtype_name)
    planned = prune(src, tmp_path / "plan", calibration, method="uncurl", dry_run=True)
    plan_file = planned.output_dir / "uncurl_plan.json"
    assert any(len(group) > 1 for layer in planned.plan.layers for group in layer.groups)  # something is merged

    in_memory = prune_flat(str(src), tmp_path / "memory", plan=str(plan_file), progress=False, card=False)
    streamed = prune_flat(str(src), tmp_path / "streamed", plan=str(plan_file), streaming=True, progress=False,
                          card=False)

    assert header_dtypes(in_memory.output_dir) == {safetensors_dtype(DTYPES[dtype_name])}
    for name in ("model.safetensors", "config.json"):
        assert (in_memory.output_dir / name).read_bytes() == (streamed.output_dir / name).read_bytes(), name


def test_the_written_check_names_a_tensor_whose_bits_differ(source, tmp_path):
    from uncurl_hf.io.checkpoint import load_model

    src = source("switch", "bfloat16")
    model = load_model(src)
    folder = tmp_path / "copy"
    model.save_pretrained(folder)
    assert compare_written_tensors(model, folder) > 0  # bit-identical
    key = "encoder.block.1.layer.1.mlp.experts.expert_0.wi.weight"
    with torch.no_grad():
        model.get_parameter(key).view(torch.int16)[0, 0] += 1  # one bfloat16 ulp
    with pytest.raises(CheckpointError, match=rf"{key} \(BF16\) differs"):
        compare_written_tensors(model, folder)


def test_the_forward_tolerance_follows_the_dtype(tmp_path):
    assert forward_tolerance(torch.float32) == (1e-5, 1e-4)
    bf16_atol, _ = forward_tolerance(torch.bfloat16)
    fp16_atol, _ = forward_tolerance(torch.float16)
    assert bf16_atol == 8 * torch.finfo(torch.bfloat16).eps and fp16_atol == 8 * torch.finfo(torch.float16).eps
    logits = torch.linspace(-4, 4, 24).reshape(2, 3, 4)
    compare_outputs(logits, logits + 0.01, torch.bfloat16, tmp_path)  # within a few bf16 ulps
    with pytest.raises(CheckpointError, match=r"largest logit difference is 0\.01 .*float32 tolerance"):
        compare_outputs(logits, logits + 0.01, torch.float32, tmp_path)
    with pytest.raises(CheckpointError, match=r"largest logit difference is 0\.5 .*bfloat16 tolerance"):
        compare_outputs(logits, logits + 0.5, torch.bfloat16, tmp_path)


def test_merged_router_rows_are_stored_in_the_experts_dtype_after_switchs_in_place_upcast(source):
    """Switch's router converts its classifier to float32 on every forward; the surgery stores rows as the checkpoint
    does (bfloat16), merged rows computed in float32 from the same values on both paths."""
    from uncurl_hf.families import get_family
    from uncurl_hf.io.checkpoint import load_model
    from uncurl_hf.plan import LayerPlan, PruningPlan
    from uncurl_hf.surgery.apply import apply_plan

    model = load_model(source("switch", "bfloat16"))
    family = get_family(model)
    with torch.no_grad():
        model(**family.dummy_inputs(model))  # what calibration does
    layers = family.sparse_layers(model)
    assert {layer.router.weight.dtype for layer in layers} == {torch.float32}  # upstream's in-place upcast
    groups = [[0, 1], [2, 3], [4], [5], [6, 7]]
    plan = PruningPlan(model.config.model_type, family.name, "manual", [
        LayerPlan(name=layer.name, num_experts=8, groups=groups, weights=[[0.3, 0.7], [0.5, 0.5], [1.0], [1.0],
                                                                          [0.9, 0.1]])
        for layer in layers
    ])
    pruned = apply_plan(model, family, plan)

    assert {p.dtype for p in pruned.parameters()} == {torch.bfloat16}
    row = family.router_tensors(family.sparse_layers(pruned)[0])["weight"][0]
    source_rows = family.router_tensors(layers[0])["weight"][[0, 1]].float()
    assert torch.equal(row, (0.3 * source_rows[0] + 0.7 * source_rows[1]).to(torch.bfloat16))
