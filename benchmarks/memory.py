"""Peak memory and wall time of the in-memory prune at real decoder shapes (issue 17, "memory at real shapes").

The model: a bfloat16 Qwen3-MoE with Qwen3-30B-A3B layer shapes (128 experts, top-8, hidden 2048,
moe_intermediate 768, 32 query / 4 key-value heads of 128), ``--layers`` decoder layers (default 2), random weights,
and the vocabulary of the zoo's ``tiny-qwen3moe-64`` tokenizer (4096), whose tokenizer files it carries so
``--task sentiment`` runs: 2.53 GB of weights at 2 layers. It is built once, on the meta device and filled tensor by
tensor from a seeded generator (never more than the model in memory), and saved with ``save_pretrained`` into
``--workdir`` (kept for reuse).

Each method runs ``uncurl prune SRC --task sentiment --factor 2 --num-calibration 128 --method M -o OUT`` in its own
process; the peak RSS is that process's ``ru_maxrss`` (taken by a bare wrapper process: :func:`run_measured`),
the wall time the process's. The table prints each peak in GB and as a multiple of the model's weight bytes, side by
side with the time of a ``cp`` of the same bytes. Target: peak <= 1.3 x the model's bytes (the model plus one
layer's work).

    python benchmarks/memory.py                         # frequency and uncurl, 2 layers (~2.5 GB model)
    python benchmarks/memory.py --methods frequency --layers 1
    python benchmarks/memory.py --profile frequency     # RSS checkpoints at each pipeline stage (one process)

``--workdir`` (default ``$TMPDIR/uncurl-memory-bench``) keeps the generated model for reuse.

``--profile`` runs one prune in-process with the stage functions wrapped, printing the RSS and the stage's own peak
(``VmHWM``, reset before each stage through ``/proc/self/clear_refs``) after load, calibration + plan, surgery,
save, written-tensor check, reload check and card.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import sys
import time
from pathlib import Path
from typing import Any

ZOO_TOKENIZER = Path(__file__).resolve().parents[1] / "uncurl_hf" / "zoo" / "checkpoints" / "tiny-qwen3moe-64"
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
QWEN3_30B_A3B = dict(
    hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_experts=128, num_experts_per_tok=8,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, norm_topk_prob=True, decoder_sparse_step=1,
    mlp_only_layers=[], max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
)
TARGET = 1.3


def build_model(
    folder: Path, layers: int = 2, dtype: str = "bfloat16", seed: int = 0, shape: dict[str, Any] | None = None,
    router_std: float = 0.02,
) -> Path:
    """Write the random-weight model to ``folder`` (skipped when a complete one is there); ``shape`` overrides
    entries of the Qwen3-30B-A3B layer shapes and ``router_std`` the routers' init scale (``benchmarks/peer.py``
    builds a 32-expert model with decisive routing with them)."""
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    vocab = len(AutoTokenizer.from_pretrained(str(ZOO_TOKENIZER), local_files_only=True))
    zoo = json.loads((ZOO_TOKENIZER / "config.json").read_text())
    config = Qwen3MoeConfig(
        **{**QWEN3_30B_A3B, **(shape or {})}, num_hidden_layers=layers, vocab_size=max(vocab, zoo["vocab_size"]),
        dtype=dtype,
        bos_token_id=zoo["bos_token_id"], eos_token_id=zoo["eos_token_id"], pad_token_id=zoo["pad_token_id"],
    )
    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        value = torch.empty(tensor.shape, dtype=torch_dtype)
        if name.endswith("norm.weight"):
            value.fill_(1.0)
        elif name.endswith("mlp.gate.weight"):
            value.normal_(0.0, router_std, generator=generator)
        else:
            value.normal_(0.0, 0.02, generator=generator)
        state[name] = value
    model.load_state_dict(state, strict=True, assign=True)
    del state
    model.tie_weights()
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(str(partial))
    for name in SIDE_FILES:
        shutil.copyfile(ZOO_TOKENIZER / name, partial / name)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# Runs argv[1:], passes its output through, then prints one JSON line: the child's wall time, peak RSS, exit code.
FRESH_WRAPPER = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "p = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)\n"
    "wall = time.perf_counter() - t\n"
    "sys.stdout.write(p.stdout)\n"
    "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
    "print(json.dumps({'wall': wall, 'rss': rss, 'rc': p.returncode}))\n"
)


def run_measured(command: list[str]) -> tuple[str, dict[str, Any]]:
    """Run ``command`` as the only child of a fresh wrapper process: ``(its output, {"wall", "rss", "rc"})``.

    Why a wrapper: on Linux a child's ``ru_maxrss`` starts from the high-water mark of the process it was forked
    from (``exec`` carries the old address space's peak over), so a child of this script, after it built a 5 GB
    model in-process, reported 8.72 GB for every method whatever it used. The wrapper is a bare interpreter.
    """
    wrapped = [sys.executable, "-c", FRESH_WRAPPER, *command]
    done = subprocess.run(wrapped, stdout=subprocess.PIPE, text=True, check=True)
    output, _, last = done.stdout.rstrip("\n").rpartition("\n")
    return output, json.loads(last)


def measure(command: list[str]) -> dict[str, Any]:
    """Run ``command``; its wall time and peak RSS (:func:`run_measured`)."""
    output, outer = run_measured(command)
    if outer["rc"] != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({outer['rc']}):\n{output[-4000:]}")
    return {"wall_s": outer["wall"], "peak_rss": int(outer["rss"])}


def prune_command(source: Path, output: Path, method: str, num_calibration: int) -> list[str]:
    return [
        sys.executable, "-m", "uncurl_hf.cli", "prune", str(source), "--task", "sentiment", "--factor", "2",
        "--num-calibration", str(num_calibration), "--method", method, "-o", str(output), "--overwrite",
    ]


def run(source: Path, workdir: Path, methods: list[str], num_calibration: int) -> list[dict[str, Any]]:
    size = weight_bytes(source)
    subprocess.run(["cat", *map(str, source.glob("*.safetensors"))], stdout=subprocess.DEVNULL, check=True)  # warm
    copy = workdir / "cp-copy"
    shutil.rmtree(copy, ignore_errors=True)
    cp = measure(["cp", "-r", str(source), str(copy)])
    shutil.rmtree(copy, ignore_errors=True)
    rows = []
    for method in methods:
        output = workdir / f"out-{method}"
        measured = measure(prune_command(source, output, method, num_calibration))
        rows.append({"method": method, "model_bytes": size, "cp_s": cp["wall_s"], **measured,
                     "ratio": measured["peak_rss"] / size})
        shutil.rmtree(output, ignore_errors=True)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'method':<10} {'model GB':>9} {'peak RSS GB':>12} {'x model':>8} {'target':>7} {'wall s':>8} "
             f"{'x cp':>6}"]
    for row in rows:
        lines.append(
            f"{row['method']:<10} {row['model_bytes'] / 1e9:>9.2f} {row['peak_rss'] / 1e9:>12.2f} "
            f"{row['ratio']:>8.2f} {TARGET:>7.1f} {row['wall_s']:>8.1f} {row['wall_s'] / max(row['cp_s'], 1e-9):>6.1f}"
        )
    return "\n".join(lines)


# ---- --profile: RSS checkpoints around the stages, in one process -------------------------------------------------


def _rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


# (module, function, label) of every stage --profile reports; functions a version lacks are skipped
PROFILE_STAGES = (
    ("uncurl_hf.pipeline.prune", "load_source", "load"),
    ("uncurl_hf.pipeline.prune", "_calibrate_and_plan", "calibrate + plan"),
    ("uncurl_hf.pipeline.output", "apply_plan", "surgery"),
    ("uncurl_hf.io.checks", "storage_state", "storage state"),
    ("uncurl_hf.io.checkpoint", "compare_written_tensors", "compare written"),
    ("uncurl_hf.io.checkpoint", "_validate_written", "validate (reload)"),
    ("uncurl_hf.io.checkpoint", "_WrittenCheck.run", "reload check"),
    ("uncurl_hf.pipeline.output", "finalize_output", "card"),
    ("uncurl_hf.pipeline.output", "write_checkpoint", "write (all)"),
    ("uncurl_hf.pipeline.output", "write_model_checkpoint", "write (all)"),
)


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def profile(source: Path, workdir: Path, method: str, num_calibration: int) -> None:
    from timing import instrument  # the sibling benchmark's stage wrapper (timing imports this module: lazily)

    from uncurl_hf.cli import main as cli_main

    size = weight_bytes(source)
    start = time.perf_counter()

    def report(label: str, seconds: float) -> None:
        rss, hwm = _rss()
        print(f"  {label:<22} {seconds:7.1f} s   rss {rss / 1e9:6.2f} GB ({rss / size:4.2f}x)   "
              f"stage peak {hwm / 1e9:6.2f} GB ({hwm / size:4.2f}x)", flush=True)

    instrument(report, PROFILE_STAGES, before=lambda _: _reset_peak())
    print(f"profile: {method} on {source} ({size / 1e9:.2f} GB of weights)")
    code = cli_main(prune_command(source, workdir / f"out-{method}", method, num_calibration)[3:])
    rss, hwm = _rss()
    print(f"  total {time.perf_counter() - start:.1f} s, process peak {hwm / 1e9:.2f} GB ({hwm / size:.2f}x), rc {code}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "uncurl-memory-bench")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--methods", default="frequency,uncurl")
    parser.add_argument("--num-calibration", type=int, default=128)
    parser.add_argument("--profile", metavar="METHOD", default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    source = build_model(args.workdir / f"qwen3-30b-a3b-shapes-{args.layers}l-bf16", layers=args.layers)
    if args.profile:
        profile(source, args.workdir, args.profile, args.num_calibration)
        return 0
    rows = run(source, args.workdir, [m for m in args.methods.split(",") if m], args.num_calibration)
    print(format_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
