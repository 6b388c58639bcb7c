"""Out-of-core surgery (``uncurl_hf.surgery.streaming``): the same output as the in-memory path, one layer in memory at a time.

The reference is always the in-memory path on the same inputs (``prune`` / ``apply_plan`` + ``write_checkpoint``):
the streamed folder must hold bit-identical tensors, and for single-shard outputs be byte-identical file by file
(config, card, manifest included).
"""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import forked
import pytest
import torch
from helpers import hash_tree, tiny_switch_model, tiny_tokenizer
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForSeq2SeqLM

import uncurl_hf
from uncurl_hf import LayerPlan, PruningPlan, apply_plan, load_model
from uncurl_hf.io.atomic import OLD_PREFIX, TEMP_PREFIX
from uncurl_hf.io.checkpoint import stored_parameters, write_checkpoint
from uncurl_hf.cli.main import main
from uncurl_hf.errors import CheckpointError, InvalidPlanError
from uncurl_hf.families import get_family
from uncurl_hf.io.safetensors import SafetensorsReader, safetensors_dtype
from uncurl_hf.io.shards import OutputTensor, ShardWriter
from uncurl_hf.surgery.streaming import stream_apply_plan
from uncurl_hf.io.verify import verify_checkpoint
from helpers import load_benchmark, prune_flat


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    """Every stored tensor of a checkpoint folder (all shards)."""
    found: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            found.update({key: handle.get_tensor(key) for key in handle.keys()})
    return found


def assert_same_tensors(left: Path, right: Path) -> None:
    a, b = tensors_of(left), tensors_of(right)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((TEMP_PREFIX, OLD_PREFIX)))


@pytest.fixture(scope="module")
def sharded_bf16_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bfloat16 tiny Switch with router biases, saved in 60 KB shards (index + 8 files). Do not modify."""
    folder = tmp_path_factory.mktemp("models") / "switch-bf16-sharded"
    model = tiny_switch_model(seed=3, router_bias=True).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="60KB")
    tiny_tokenizer().save_pretrained(folder)
    return folder


def merge_plan(model) -> PruningPlan:
    """Merged groups with neuron permutations, both router rules, a kept-all layer and a dropped expert."""
    family = get_family(model)
    names = [layer.name for layer in family.sparse_layers(model)]
    perm = list(reversed(range(model.config.d_ff)))
    layers = [
        LayerPlan(names[0], 8, [[0, 3], [1], [5, 6, 7]], [[0.25, 0.75], [1.0], [0.5, 0.25, 0.25]], router="weighted",
                  extras={"permutations": [[None, perm], None, [None, None, perm]]}),
        LayerPlan(names[1], 8, [[2, 4], [6]], [[0.5, 0.5], [1.0]], router="anchor"),
        LayerPlan.keep(names[2], 8, list(range(8))),
        LayerPlan.keep(names[3], 8, [7, 0, 3]),
    ]
    return PruningPlan(model.config.model_type, family.name, "manual", layers, base_model="tiny")


@pytest.mark.parametrize("method", ["random", "msmoe", "uncurl"])
def test_streaming_prune_writes_the_in_memory_folder_byte_for_byte(method, switch_dir, calibration_jsonl, tmp_path):
    """Calibrate in memory, free the model, stream: config, weights, card, plan and manifest are the same bytes."""
    kwargs = dict(calibration_file=calibration_jsonl, method=method, factor=2, max_length=16, progress=False)
    in_memory = prune_flat(switch_dir, output_dir=tmp_path / "memory", **kwargs)
    streamed = prune_flat(switch_dir, output_dir=tmp_path / "streamed", streaming=True, **kwargs)
    if method != "random":  # the merge methods must actually merge, or this would not test merging
        assert any(len(group) > 1 for layer in in_memory.plan.layers for group in layer.groups)
    assert hash_tree(streamed.output_dir) == hash_tree(in_memory.output_dir)
    assert (streamed.params_after, streamed.disk_bytes_after) == (in_memory.params_after, in_memory.disk_bytes_after)
    assert verify_checkpoint(streamed.output_dir).ok


def test_sharded_bf16_merge_plan_matches_apply_plan_and_loads_with_identical_logits(sharded_bf16_dir, tmp_path):
    before = hash_tree(sharded_bf16_dir)
    model = load_model(sharded_bf16_dir)
    plan = merge_plan(model)
    reference = apply_plan(model, get_family(model), plan)
    expected_dir = write_checkpoint(reference, tmp_path / "memory", plan, source_dir=sharded_bf16_dir)

    out = stream_apply_plan(sharded_bf16_dir, plan, tmp_path / "streamed", max_shard_size="50KB")

    assert hash_tree(sharded_bf16_dir) == before  # the input folder is never modified
    assert_same_tensors(out, expected_dir)
    assert {t.dtype for t in tensors_of(out).values()} == {torch.bfloat16}
    assert (out / "config.json").read_bytes() == (expected_dir / "config.json").read_bytes()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards == sorted(set(index["weight_map"].values()))
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors_of(out).values())
    for shard in shards:  # under the limit unless one tensor alone exceeds it (save_pretrained's rule)
        with safe_open(str(out / shard), framework="pt") as handle:
            sizes = [handle.get_slice(k).get_shape() for k in handle.keys()]
        assert sum(torch.Size(s).numel() * 2 for s in sizes) <= 50_000 or len(sizes) == 1

    loaded = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    assert loaded.config.num_experts_per_encoder_layer == [3, 2]
    assert loaded.config.num_experts_per_decoder_layer == [8, 3]
    inputs = get_family(reference).dummy_inputs(reference)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, reference.eval()(**inputs).logits)
    report = verify_checkpoint(out)
    assert report.ok, report.format()


def test_repruning_a_pruned_checkpoint_streams_the_same_config(switch_dir, calibration_jsonl, tmp_path):
    """A pruned source (per-layer counts and capacities, auto_map) gives the same second-generation config."""
    first = prune_flat(switch_dir, output_dir=tmp_path / "first", calibration_file=calibration_jsonl,
                            method="msmoe", factor=2, max_length=16, progress=False).output_dir
    model = load_model(first)
    family = get_family(model)
    layers = [LayerPlan.keep(l.name, l.num_experts, list(range(0, l.num_experts, 2)))
              for l in family.sparse_layers(model)]
    plan = PruningPlan(model.config.model_type, family.name, "manual", layers)
    expected = write_checkpoint(apply_plan(model, family, plan), tmp_path / "memory", plan, source_dir=first)
    out = stream_apply_plan(first, plan, tmp_path / "streamed")
    assert hash_tree(out) == hash_tree(expected)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "pruned_switch_transformers" and config["auto_map"]
    assert config["uncurl_base_model"] == str(switch_dir)


def test_dropped_experts_are_never_read_and_layers_are_read_one_after_another(switch_dir, tmp_path, monkeypatch):
    model = load_model(switch_dir)
    plan = merge_plan(model)
    reads: list[str] = []
    original_get = SafetensorsReader.get
    monkeypatch.setattr(SafetensorsReader, "get", lambda self, key: reads.append(key) or original_get(self, key))
    stream_apply_plan(switch_dir, plan, tmp_path / "out")

    family = get_family(model)
    prefixes = {l.name: l.prefix for l in family.sparse_layers(model)}
    expected = []
    for layer in plan.layers:
        prefix = prefixes[layer.name]
        expected += [f"{prefix}.router.classifier.weight"]
        used = [j for group in layer.groups for j in group]  # merged or permuted: computed; kept: checked finite
        expected += [f"{prefix}.experts.expert_{j}.{p}.weight" for j in used for p in ("wi", "wo")]
    # every expert the output is made of and every router read exactly once (a kept expert for its finite check,
    # then copied as bytes), dropped experts never, nothing else decoded: other tensors are copied as bytes
    assert sorted(reads) == sorted(expected)
    kept_layer = prefixes[plan.layers[2].name]  # LayerPlan.keep of all 8 experts: checked, copied, router decoded
    assert sorted(key for key in reads if key.startswith(kept_layer)) == sorted(
        [f"{kept_layer}.router.classifier.weight"]
        + [f"{kept_layer}.experts.expert_{j}.{p}.weight" for j in range(8) for p in ("wi", "wo")]
    )
    order = [next(name for name, prefix in prefixes.items() if key.startswith(prefix)) for key in reads]
    runs = [name for i, name in enumerate(order) if i == 0 or name != order[i - 1]]
    assert len(runs) == len(set(runs)) == 4  # one contiguous run of reads per layer: never two layers at once


def test_a_failed_write_leaves_the_previous_output_and_no_temporary_folder(switch_dir, tmp_path, monkeypatch):
    model = load_model(switch_dir)
    plan = merge_plan(model)
    out = stream_apply_plan(switch_dir, plan, tmp_path / "out")
    good = hash_tree(out)
    calls = []
    original_write = ShardWriter.write

    def failing_write(self, key, tensor):
        calls.append(key)
        if len(calls) >= 5:  # the disk fills up during the first run's 5th computed tensor, and stays full
            raise OSError(errno.ENOSPC, "No space left on device")
        return original_write(self, key, tensor)

    monkeypatch.setattr(ShardWriter, "write", failing_write)
    with pytest.raises(CheckpointError, match="No space left on device.*check free disk space"):
        stream_apply_plan(switch_dir, plan, tmp_path / "out", overwrite=True)
    assert len(calls) == 5
    assert hash_tree(out) == good
    with pytest.raises(CheckpointError, match="Nothing was written"):
        stream_apply_plan(switch_dir, plan, tmp_path / "new")
    assert len(calls) == 6 and not (tmp_path / "new").exists()
    assert leftovers(tmp_path) == []


def _killed_mid_stream(source: str, plan_path: str, out: str) -> None:
    """Child: SIGKILL itself while writing the third computed tensor of the shard."""
    calls = []
    original_write = ShardWriter.write

    def write(self, key, tensor):
        calls.append(key)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return original_write(self, key, tensor)

    ShardWriter.write = write
    stream_apply_plan(source, PruningPlan.load(plan_path), out)


def test_sigkill_mid_stream_leaves_no_output_and_the_next_run_completes(switch_dir, tmp_path):
    plan_path = merge_plan(load_model(switch_dir)).save(tmp_path / "plan.json")
    out = tmp_path / "out"
    status, _ = forked.start(_killed_mid_stream, str(switch_dir), str(plan_path), str(out)).join()
    assert status == -signal.SIGKILL
    assert not out.exists()
    assert len(leftovers(tmp_path)) == 1  # the killed run's temporary folder, swept by the next run
    stream_apply_plan(switch_dir, PruningPlan.load(plan_path), out)
    assert leftovers(tmp_path) == []
    assert verify_checkpoint(out).ok


def test_a_plan_for_other_expert_counts_is_refused_before_anything_is_written(switch_dir, tmp_path):
    model = load_model(switch_dir)
    plan = merge_plan(model)
    plan.layers[0] = LayerPlan.keep(plan.layers[0].name, 16, [0, 1])
    with pytest.raises(InvalidPlanError, match="made for 16 experts but the model layer has 8"):
        stream_apply_plan(switch_dir, plan, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == []


def test_cli_streaming_with_a_plan_never_loads_the_model(switch_dir, tmp_path, monkeypatch):
    plan_path = merge_plan(load_model(switch_dir)).save(tmp_path / "plan.json")

    def no_loading(*args, **kwargs):
        raise AssertionError("the streaming path with --plan must not load the model")

    monkeypatch.setattr(uncurl_hf.pipeline.source, "load_model", no_loading)  # where the pipeline loads models
    out = tmp_path / "out"
    code = main(["prune", str(switch_dir), "--plan", str(plan_path), "--streaming", "-o", str(out), "--no-progress"])
    assert code == 0
    monkeypatch.undo()
    report = verify_checkpoint(out)
    assert report.ok, report.format()
    assert json.loads((out / "config.json").read_text())["num_experts_per_decoder_layer"] == [8, 3]


def test_shard_writer_writes_the_bytes_safetensors_writes(tmp_path):
    """Header order, JSON and padding, data layout: identical to safetensors.torch.save_file for mixed dtypes."""
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "z.f32": torch.randn(3, 5, generator=gen),
        "a.bf16": torch.randn(7, generator=gen).to(torch.bfloat16),
        "m.i64": torch.arange(5),
        "b.bool": torch.tensor([True, False, True]),
        "c.f16": torch.randn(2, 2, generator=gen).half(),
        "d.u8": torch.arange(9, dtype=torch.uint8),
        "e.scalar": torch.tensor(1.5),
        "f.empty": torch.zeros(0, 4),
        "g.i32": torch.arange(4, dtype=torch.int32),
        "h.f64": torch.randn(3, generator=gen).double(),
    }
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    specs = [OutputTensor(k, safetensors_dtype(t.dtype), tuple(t.shape)) for k, t in tensors.items()]
    writer = ShardWriter(tmp_path / "streamed.safetensors", specs, {"format": "pt"})
    for spec in writer.order:
        writer.write(spec.key, tensors[spec.key])
    writer.close()
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_reader_reads_single_rows_of_a_stored_tensor(tmp_path):
    fused = torch.randn(6, 4, 3).to(torch.bfloat16)
    save_file({"experts.w": fused, "other": torch.ones(2)}, tmp_path / "model.safetensors")
    with SafetensorsReader(tmp_path) as reader:
        assert reader.keys() == ["experts.w", "other"]
        for i in range(6):
            assert torch.equal(reader.get_rows("experts.w", i), fused[i])
        assert torch.equal(reader.get("experts.w"), fused)
        with pytest.raises(IndexError):
            reader.get_rows("experts.w", 6)
        with pytest.raises(CheckpointError, match="no tensor 'missing'"):
            reader.get("missing")


def test_corrupt_header_is_a_checkpoint_error_naming_the_file(switch_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (bad / name).write_bytes((switch_dir / name).read_bytes())
    data = (switch_dir / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated: offsets point past the end
    with pytest.raises(CheckpointError, match=r"bad/model.safetensors: tensor .* the file is corrupt"):
        SafetensorsReader(bad)


def test_scale_benchmark_generator_and_streaming_prune_smoke(tmp_path):
    """The benchmark's synthetic checkpoint (a few MB, never instantiated) prunes out of core and verifies."""
    scale = load_benchmark("scale")
    source = scale.generate_checkpoint(tmp_path / "synthetic", 0.004, max_shard_size="1MB")
    size = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    assert 0.5 * 4e6 < size < 2 * 4e6
    assert len(list(source.glob("*.safetensors"))) > 1
    config = json.loads((source / "config.json").read_text())
    shapes = {key: config[key] for key in scale.SWITCH_BASE}  # the analytic size model = what was generated
    assert scale.stored_parameters(shapes, config["num_experts"]) == stored_parameters(source)
    plan = scale.config_plan(source)
    assert all(layer.num_output_experts == layer.num_experts // 2 for layer in plan.layers)
    out = stream_apply_plan(source, plan, tmp_path / "pruned")
    report = verify_checkpoint(out)  # hashes, counts, shapes, load + forward pass
    assert report.ok, report.format()
    assert 0 < scale.largest_layer_bytes(source) < size


def test_a_fused_decoder_family_streams_the_in_memory_folder_too(tmp_path):
    """Only the family's on-disk methods differ: Mixtral (fused in memory, per-expert on disk) gives the same bytes."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from uncurl_hf.families import available_families

    if "mixtral" not in available_families():
        pytest.skip("the Mixtral family is not registered")
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2)
    MixtralForCausalLM(config).save_pretrained(tmp_path / "mixtral")
    model = load_model(tmp_path / "mixtral")
    family = get_family(model)
    perm = list(reversed(range(48)))
    layers = [LayerPlan(l.name, 6, [[0, 3], [1], [5]], [[0.5, 0.5], [1.0], [1.0]],
                        extras={"permutations": [[None, perm], None, None]}) for l in family.sparse_layers(model)]
    plan = PruningPlan(model.config.model_type, family.name, "manual", layers)
    expected = write_checkpoint(apply_plan(model, family, plan), tmp_path / "memory", plan,
                                source_dir=tmp_path / "mixtral")
    out = stream_apply_plan(tmp_path / "mixtral", plan, tmp_path / "streamed")
    assert hash_tree(out) == hash_tree(expected)
