"""Out-of-core surgery at scale: prune time vs ``cp`` of the same bytes, and peak memory vs the largest layer.

For each requested size this script

1. generates a synthetic Switch Transformers checkpoint of about that many GB: a real architecture (the
   ``google/switch-base-*`` shapes: d_model 768, d_ff 3072, 12+12 blocks, 6+6 sparse, vocab 32128) with the number
   of experts chosen to reach the size, random weights, written shard by shard straight from the config's tensor
   shapes (the model is only ever built on the meta device, which holds no memory). Sizes too small for the base
   shapes with >= 4 experts use proportionally smaller dims (the table's d_model column says which);
2. writes a plan from the config alone (method ``random``, factor 2: no calibration, no model);
3. times, each in its own process, with the peak RSS of that process (``ru_maxrss`` of the child):
   ``cp -r`` of the folder, ``cp -r`` plus ``fsync`` of every copied file (the pruner fsyncs its output),
   ``uncurl prune --plan --streaming --no-fsync`` and ``uncurl prune --plan --streaming`` (the Python API,
   :func:`uncurl_hf.prune`), and the in-memory prune with the same plan when it fits in RAM (load, apply, save,
   reload + one forward pass to validate);
4. prints the ratios side by side and writes them to a JSON file.

Targets (issue 8): streaming prune <= 1.5 x ``cp`` of the same bytes, peak RSS <= 2 x largest layer + 1 GiB. The
time ratios are like for like: ``--no-fsync`` against ``cp`` (neither waits for the disk) and the default, durable
prune against ``cp`` + ``fsync``; ``stream/cp`` mixes the two and is printed for reference.
The prune figures are the time of the ``prune()`` call inside the child; the child's whole wall time (interpreter
start and ``import torch, transformers`` included) is in the JSON as ``*_process_s``. The source is read once before
timing, so every run reads from the page cache (like a second ``cp``); nothing drops caches.

    python benchmarks/scale.py --sizes 0.05                # smoke run, seconds
    python benchmarks/scale.py                             # --sizes 1,4,16: needs ~35 GB of free disk
    python benchmarks/scale.py --sizes 30 --in-memory never   # larger than RAM: by hand, not in CI

``--workdir`` (default ``./scale-bench``) keeps the generated checkpoints for reuse (``--keep``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import run_measured  # noqa: E402  (the sibling benchmark: one bare wrapper measures every child)

logger = logging.getLogger("uncurl_hf.benchmarks.scale")

GIB = 1 << 30
# google/switch-base-8 .. switch-base-256 share these shapes; only num_experts differs.
SWITCH_BASE = dict(
    d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12,
    num_sparse_encoder_layers=6, num_sparse_decoder_layers=6, vocab_size=32128, expert_capacity=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128,
)
# Smaller shapes for sizes the base shapes cannot reach with >= MIN_EXPERTS experts (smoke runs, tests).
SMALLER = [
    dict(d_model=512, d_ff=2048, d_kv=64, num_heads=8, num_layers=8, num_decoder_layers=8,
         num_sparse_encoder_layers=4, num_sparse_decoder_layers=4, vocab_size=32128),
    dict(d_model=256, d_ff=1024, d_kv=32, num_heads=8, num_layers=4, num_decoder_layers=4,
         num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, vocab_size=8192),
    dict(d_model=64, d_ff=256, d_kv=16, num_heads=4, num_layers=4, num_decoder_layers=4,
         num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, vocab_size=1024),
]
MIN_EXPERTS = 4


# ---- synthetic checkpoints ----------------------------------------------------------------------------------


def synthetic_config(size_gb: float, dtype: str = "bfloat16") -> Any:
    """A ``SwitchTransformersConfig`` whose checkpoint takes about ``size_gb`` GB (1e9 bytes) in ``dtype``."""
    import torch

    itemsize = getattr(torch, dtype).itemsize
    for shapes in [SWITCH_BASE, *SMALLER]:
        fixed = stored_parameters(shapes, 0) * itemsize
        per_expert = (stored_parameters(shapes, 1) - stored_parameters(shapes, 0)) * itemsize
        experts = round((size_gb * 1e9 - fixed) / per_expert)
        if experts >= MIN_EXPERTS or shapes is SMALLER[-1]:
            return _switch_config(shapes, max(2, experts + experts % 2), dtype)  # even: factor 2 halves exactly
    raise AssertionError("unreachable")


def stored_parameters(shapes: dict[str, int], num_experts: int) -> int:
    """Values ``save_pretrained`` stores for a Switch model of these shapes (tied LM head once), computed from the
    config alone; equal to the meta model's count (checked by the smoke test), linear in ``num_experts``."""
    from uncurl_hf.modeling.pruned_switch_transformers import sparse_block_indices

    v = {**SWITCH_BASE, **shapes}
    d, ff, inner, vocab = v["d_model"], v["d_ff"], v["num_heads"] * v["d_kv"], v["vocab_size"]
    bias = v["relative_attention_num_buckets"] * v["num_heads"]  # block 0's relative attention bias
    total = vocab * d  # shared embeddings = encoder/decoder embed_tokens = lm_head
    for blocks, sparse, attentions in (
        (v["num_layers"], v["num_sparse_encoder_layers"], 1),
        (v["num_decoder_layers"], v["num_sparse_decoder_layers"], 2),
    ):
        n_sparse = len(sparse_block_indices(blocks, blocks // sparse if sparse else blocks))
        total += blocks * attentions * (4 * d * inner + d) + blocks * d + bias + d  # attention + norms, final norm
        total += (blocks - n_sparse) * 2 * d * ff + n_sparse * num_experts * (2 * d * ff + d)  # FFs, routers
    return total


def _switch_config(shapes: dict[str, int], num_experts: int, dtype: str) -> Any:
    from transformers import SwitchTransformersConfig

    values = {**SWITCH_BASE, **shapes}
    return SwitchTransformersConfig(
        **values, num_experts=num_experts, dtype=dtype, router_jitter_noise=0.0, dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )


def stored_tensors(config: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
    """``{key: (shape, dtype)}`` that ``save_pretrained`` would store (tied weights once), from a meta-device model."""
    import torch
    from transformers import SwitchTransformersForConditionalGeneration

    with torch.device("meta"):
        model = SwitchTransformersForConditionalGeneration(config)
    dtype = getattr(torch, str(config.dtype).removeprefix("torch."))
    # named_parameters() lists each tied parameter once, under its first name (``shared.weight``), as saved
    return {name: (tuple(p.shape), dtype) for name, p in model.named_parameters()}


def generate_checkpoint(
    folder: Path, size_gb: float, *, dtype: str = "bfloat16", max_shard_size: str = "2GB", seed: int = 0
) -> Path:
    """Write a random-weight Switch checkpoint of about ``size_gb`` GB to ``folder``, one tensor in memory at a time.

    Shards and index follow ``save_pretrained``'s conventions (the streaming writer's :class:`ShardWriter`). The
    weights are N(0, 0.02) from a seeded generator, so the same arguments give the same files.
    """
    import torch
    from tqdm.auto import tqdm

    from uncurl_hf.io.safetensors import SAFE_WEIGHTS_INDEX_NAME, safetensors_dtype
    from uncurl_hf.io.shards import OutputTensor, ShardWriter, shard_layout, shard_names

    config = synthetic_config(size_gb, dtype)
    tensors = stored_tensors(config)
    specs = [OutputTensor(key, safetensors_dtype(dt), shape) for key, (shape, dt) in sorted(tensors.items())]
    shards = shard_layout(specs, max_shard_size)
    names = shard_names(len(shards))
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    total = sum(spec.nbytes for spec in specs)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"generating {folder.name}", disable=None) as bar:
        for name, shard in zip(names, shards):
            writer = ShardWriter(partial / name, shard, {"format": "pt"}, sync=False)
            for spec in writer.order:
                shape, dt = tensors[spec.key]
                writer.write(spec.key, torch.empty(shape, dtype=dt).normal_(0.0, 0.02, generator=generator))
                bar.update(spec.nbytes)
            writer.close()
    if len(shards) > 1:
        index = {
            "metadata": {"total_parameters": sum(math.prod(s.shape) for s in specs), "total_size": total},
            "weight_map": {spec.key: name for name, shard in zip(names, shards) for spec in shard},
        }
        (partial / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config.architectures = ["SwitchTransformersForConditionalGeneration"]
    config.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return folder


def config_plan(folder: Path, factor: float = 2.0, seed: int = 0) -> Any:
    """A ``random`` plan from ``config.json`` and the tensor keys alone (no model, no calibration)."""
    from uncurl_hf.surgery.budget import experts_to_keep
    from uncurl_hf.recipe import CalibrationSpec, PruneRecipe
    from uncurl_hf.families import get_family
    from uncurl_hf.methods import get_method
    from uncurl_hf.plan import PruningPlan
    from uncurl_hf.io.checkpoint import disk_layer_sizes

    config = json.loads((folder / "config.json").read_text())
    family = get_family(config)
    method = get_method("random")
    settings = PruneRecipe(method="random", factor=factor, calibration=CalibrationSpec(seed=seed))
    layers = [
        method.plan_layer(name, count, None, experts_to_keep(count, factor), None, family, settings)
        for name, count in disk_layer_sizes(folder, family).items()
    ]
    return PruningPlan(model_type=config["model_type"], family=family.name, method="random", layers=layers,
                       factor=factor, seed=seed, base_model=None)


def largest_layer_bytes(folder: Path) -> int:
    """Bytes stored for the largest sparse layer (its experts and router)."""
    from uncurl_hf.families import get_family
    from uncurl_hf.io.safetensors import SafetensorsReader

    config = json.loads((folder / "config.json").read_text())
    with SafetensorsReader(folder) as reader:
        layers = get_family(config).disk_layers(config, reader.keys())
        return max(sum(reader.info(key).nbytes for key in layer.keys) for layer in layers)


# ---- measurements ---------------------------------------------------------------------------------------------


@dataclass
class Measure:
    """One timed run in a fresh process: wall time of the process, the in-process time when reported, peak RSS."""

    seconds: float
    process_seconds: float
    peak_rss_bytes: int


def measure(command: list[str]) -> Measure:
    """Run ``command`` in a child of a fresh wrapper process; its wall time and peak RSS (``ru_maxrss``).

    A separate wrapper per run keeps ``RUSAGE_CHILDREN`` to this one command. A command that prints a JSON line
    with ``"seconds"`` last reports its own in-process time (the prune call, without interpreter start).
    """
    output, outer = run_measured(command)
    if outer["rc"] != 0:
        raise RuntimeError(f"{command} failed with exit code {outer['rc']}")
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    inner = [line for line in lines if "seconds" in line]
    seconds = inner[-1]["seconds"] if inner else outer["wall"]
    return Measure(seconds=seconds, process_seconds=outer["wall"], peak_rss_bytes=int(outer["rss"]))


def _child_prune(source: str, plan: str, output: str, streaming: bool, fsync: bool = True) -> None:
    """Child process: one prune with a saved plan; prints its in-process time as JSON."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    import uncurl_hf

    start = time.perf_counter()
    uncurl_hf.prune(source, uncurl_hf.PruneRecipe(plan=plan), output,
                    uncurl_hf.RunOptions(overwrite=True, streaming=streaming, progress=False, fsync=fsync))
    print(json.dumps({"seconds": time.perf_counter() - start}))


def _child_copy_fsync(source: str, target: str) -> None:
    """Child process: ``cp -r`` then fsync every copied file (what the pruner's manifest step does to its output)."""
    start = time.perf_counter()
    subprocess.run(["cp", "-r", source, target], check=True)
    for path in sorted(Path(target).rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    print(json.dumps({"seconds": time.perf_counter() - start}))


def _warm(folder: Path) -> None:
    """Read every file once, so each timed run starts from the same (warm) page cache."""
    for path in sorted(folder.iterdir()):
        with open(path, "rb") as handle:
            while handle.read(64 << 20):
                pass


def _mem_available() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run_size(size_gb: float, workdir: Path, *, dtype: str, in_memory: str, keep: bool) -> dict[str, Any]:
    """Generate (or reuse) one checkpoint, then time cp, cp+fsync, streaming and (maybe) in-memory prune."""
    source = workdir / f"switch-{size_gb:g}GB-{dtype}"
    if not (source / "config.json").is_file():
        generate_checkpoint(source, size_gb, dtype=dtype)
    config = json.loads((source / "config.json").read_text())
    plan_path = workdir / f"plan-{size_gb:g}GB.json"
    config_plan(source).save(plan_path)
    size = sum(p.stat().st_size for p in source.iterdir())
    layer = largest_layer_bytes(source)
    row: dict[str, Any] = {
        "size_gb": size / 1e9, "requested_gb": size_gb, "dtype": dtype, "num_experts": config["num_experts"],
        "d_model": config["d_model"], "largest_layer_gb": layer / 1e9,
        "rss_target_gb": (2 * layer + GIB) / 1e9,
    }
    script = str(Path(__file__).resolve())
    copy, out_stream, out_memory = (workdir / f"{name}-{size_gb:g}GB" for name in ("copy", "stream", "memory"))
    _warm(source)
    try:
        for label, command in (
            ("cp", ["cp", "-r", str(source), str(copy)]),
            ("cp_fsync", [sys.executable, script, "_copy_fsync", str(source), str(copy)]),
            ("stream_nofsync", [sys.executable, script, "_prune", str(source), str(plan_path), str(copy), "1", "0"]),
            ("stream", [sys.executable, script, "_prune", str(source), str(plan_path), str(out_stream), "1"]),
        ):
            result = measure(command)
            shutil.rmtree(copy, ignore_errors=True)  # disk: at most source + one copy (or two halves) at a time
            row[f"{label}_s"], row[f"{label}_process_s"] = result.seconds, result.process_seconds
            row[f"{label}_rss_gb"] = result.peak_rss_bytes / 1e9
        row["output_gb"] = sum(p.stat().st_size for p in out_stream.iterdir()) / 1e9
        fits = 3.2 * size < _mem_available()  # model + pruned copy + reloaded copy for validation
        if in_memory == "always" or (in_memory == "auto" and fits):
            result = measure([sys.executable, script, "_prune", str(source), str(plan_path), str(out_memory), "0"])
            row["memory_s"], row["memory_process_s"] = result.seconds, result.process_seconds
            row["memory_rss_gb"] = result.peak_rss_bytes / 1e9
            row["identical_weights"] = _same_weights(out_stream, out_memory)
    finally:
        for folder in (copy, out_stream, out_memory):
            shutil.rmtree(folder, ignore_errors=True)
        if not keep:
            shutil.rmtree(source, ignore_errors=True)
    row["stream_vs_cp"] = row["stream_s"] / row["cp_s"]
    row["stream_vs_cp_fsync"] = row["stream_s"] / row["cp_fsync_s"]
    row["stream_nofsync_vs_cp"] = row["stream_nofsync_s"] / row["cp_s"]
    row["stream_rss_vs_target"] = row["stream_rss_gb"] / row["rss_target_gb"]
    return row


def _same_weights(a: Path, b: Path) -> bool:
    """Streaming and in-memory outputs hold bit-identical tensors (and, single-shard, identical files)."""
    from safetensors import safe_open

    from uncurl_hf.io.safetensors import weight_files

    def tensors(folder: Path) -> dict[str, Any]:
        found = {}
        for file in weight_files(folder):
            with safe_open(str(file), "pt") as handle:
                found.update({key: handle.get_tensor(key) for key in handle.keys()})
        return found

    left, right = tensors(a), tensors(b)
    return left.keys() == right.keys() and all(left[k].equal(right[k]) for k in left)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Sizes down, measurements across: times, ratios to cp, peak RSS and its ratio to the target."""
    headers = ["size GB", "d_model", "E", "layer GB", "cp s", "cp+fsync s", "stream s", "stream/(cp+fsync)",
               "no-fsync s", "no-fsync/cp", "stream/cp", "stream RSS GB", "RSS target GB", "RSS/target", "in-mem s", "in-mem RSS GB",
               "in-mem/stream"]
    lines = []
    for r in rows:
        memory = r.get("memory_s")
        lines.append([
            f"{r['size_gb']:.2f}", str(r["d_model"]), str(r["num_experts"]), f"{r['largest_layer_gb']:.3f}",
            f"{r['cp_s']:.2f}", f"{r['cp_fsync_s']:.2f}", f"{r['stream_s']:.2f}", f"{r['stream_vs_cp_fsync']:.2f}",
            f"{r['stream_nofsync_s']:.2f}", f"{r['stream_nofsync_vs_cp']:.2f}", f"{r['stream_vs_cp']:.2f}",
            f"{r['stream_rss_gb']:.2f}", f"{r['rss_target_gb']:.2f}",
            f"{r['stream_rss_vs_target']:.2f}",
            f"{memory:.2f}" if memory is not None else "skipped",
            f"{r['memory_rss_gb']:.2f}" if memory is not None else "-",
            f"{memory / r['stream_s']:.2f}" if memory is not None else "-",
        ])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    out = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    out += ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        grow = last["size_gb"] / first["size_gb"]
        out.append(
            f"growth from {first['size_gb']:.2f} to {last['size_gb']:.2f} GB (x{grow:.1f}): cp time "
            f"x{last['cp_s'] / first['cp_s']:.1f}, stream time x{last['stream_s'] / first['stream_s']:.1f}, "
            f"stream RSS x{last['stream_rss_gb'] / first['stream_rss_gb']:.1f} "
            f"(largest layer x{last['largest_layer_gb'] / first['largest_layer_gb']:.1f})"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_prune":
        _child_prune(argv[1], argv[2], argv[3], argv[4] == "1", fsync=argv[5:6] != ["0"])
        return 0
    if argv and argv[0] == "_copy_fsync":
        _child_copy_fsync(argv[1], argv[2])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,4,16", help="checkpoint sizes in GB, comma-separated (default 1,4,16)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--workdir", default="scale-bench", help="where checkpoints and outputs go")
    parser.add_argument("--json", default=None, help="write the rows here (default WORKDIR/scale.json)")
    parser.add_argument("--in-memory", choices=["auto", "always", "never"], default="auto",
                        help="also time the in-memory prune (auto: when 3.2 x the size fits in MemAvailable)")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints for the next run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    rows = []
    for size in sizes:
        rows.append(run_size(size, workdir, dtype=args.dtype, in_memory=args.in_memory, keep=args.keep))
        print(format_table(rows[-1:]), flush=True)
    print()
    print(f"{os.cpu_count()} CPUs, {_mem_available() / 1e9:.1f} GB available; times from a warm page cache")
    print(format_table(rows))
    json_path = Path(args.json) if args.json else workdir / "scale.json"
    json_path.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
