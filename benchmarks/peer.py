"""uncurl-hf side by side with llm-compressor's REAPPruningModifier (issue 17: "peak RSS <= the peer's").

Both prune the same saved model with REAP to half its experts, on the same text, each in its own process; the
table prints each run's peak RSS (``ru_maxrss`` of that very child, taken by a bare wrapper:
``memory.run_measured``) and wall time, and the ratio of uncurl's to the peer's. It also checks that each run keeps
the experts llm-compressor's ``basic`` pipeline keeps (REAP scores of the unpruned model) in every layer: REAP is a
score, so two correct implementations given the same tokens must agree (uncurl uses the gate the model applies,
the top-k renormalized weight on Qwen3-MoE, as llm-compressor does). Sequential runs calibrate each layer on the
already pruned layers' output, so they may differ.

The model: a bfloat16 Qwen3-MoE with 32 experts, top-8 (``--layers`` decoder layers, default 8; hidden 1024,
moe_intermediate 512), random weights with decisive routers (``PEER_ROUTER_STD``), the zoo decoder's tokenizer
(built once with ``memory.build_model`` into ``--workdir``). The text: ``--num-calibration`` prompted sentiment
examples (prompt + label, the task's seeded train sample), written to a ``.jsonl`` that uncurl reads with
``--calibration-file`` and the peer tokenizes with the same tokenizer and ``--max-length``.

llm-compressor pins an older transformers than uncurl-hf needs, so it lives in its own virtualenv, named by
``--peer-python``:

    python -m venv /tmp/peer && /tmp/peer/bin/pip install "torch==2.13.0" "llmcompressor==0.14.*"
    python benchmarks/peer.py --peer-python /tmp/peer/bin/python             # uncurl, uncurl --sequential, peer
    python benchmarks/peer.py --skip-peer                                     # uncurl's side only

The peer runs ``oneshot(..., pipeline=P, moe_calibrate_all_experts=False)`` (its REAP needs only routed tokens)
for each of ``--peer-pipelines`` and saves the pruned model to its output folder, as uncurl does. Each uncurl run is
compared with its like: the in-memory prune with ``basic`` (both calibrate the unpruned model), ``--sequential``
with ``sequential`` (each layer calibrated on the output of the layers already pruned).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import build_model, measure, weight_bytes  # noqa: E402

PEER_SHAPE = dict(
    hidden_size=1024, moe_intermediate_size=512, intermediate_size=2048, num_experts=32, num_experts_per_tok=8,
    num_attention_heads=16, num_key_value_heads=4, head_dim=64,
)
# Routers drawn 10x wider than the other weights: with the default 0.02 the router logits are nearly uniform, the
# last bits of bf16 hidden states (which transformers 5.17, the peer's, and this project's version compute
# differently) flip top-k choices already in the first layer, and REAP scores fall within 1-3% of the cut.
PEER_ROUTER_STD = 0.2

# Run by the peer's interpreter: argv = source, output, texts.jsonl, pipeline, sparsity, max_length, report.json.
PEER_SCRIPT = r"""
import json, sys
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning.reap import REAPPruningModifier

source, output, texts, pipeline, sparsity, max_length, report = sys.argv[1:8]
tokenizer = AutoTokenizer.from_pretrained(source)
model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
rows = [json.loads(line)["text"] for line in open(texts, encoding="utf-8") if line.strip()]
data = Dataset.from_dict({"text": rows}).map(
    lambda batch: tokenizer(batch["text"], truncation=True, max_length=int(max_length)),
    batched=True, remove_columns=["text"])
oneshot(model=model, dataset=data, recipe=REAPPruningModifier(sparsity=float(sparsity), report_path=report),
        num_calibration_samples=len(rows), max_seq_length=int(max_length), pipeline=pipeline,
        shuffle_calibration_samples=False, moe_calibrate_all_experts=False, output_dir=output)
"""


def write_texts(path: Path, num_examples: int, seed: int = 0) -> Path:
    """The prompted sentiment sample, one ``{"text": prompt + label}`` per line."""
    from uncurl_hf.calibration.data import calibration_examples
    from uncurl_hf.recipe import CalibrationSpec

    spec = CalibrationSpec(task="sentiment", num_examples=num_examples, seed=seed)
    examples = calibration_examples(spec, causal=True)
    with path.open("w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps({"text": example.source + (example.target or "")}) + "\n")
    return path


def uncurl_command(source: Path, output: Path, texts: Path, args: argparse.Namespace, sequential: bool) -> list[str]:
    command = [
        sys.executable, "-m", "uncurl_hf.cli", "prune", str(source), "--calibration-file", str(texts),
        "--num-calibration", str(args.num_calibration), "--max-length", str(args.max_length),
        "--method", "reap", "--factor", "2", "-o", str(output), "--overwrite",
    ]
    return command + (["--sequential"] if sequential else [])


def uncurl_kept(output: Path) -> dict[str, list[int]]:
    """Per MoE layer, the original experts a pruning plan keeps (each group's one member)."""
    plan = json.loads((output / "uncurl_plan.json").read_text())
    return {layer["name"]: sorted(member for group in layer["groups"] for member in group) for layer in plan["layers"]}


def peer_kept(report: Path) -> dict[str, list[int]]:
    """llm-compressor's ``report_path`` JSON, keyed as uncurl keys layers: the peer names a layer by its sparse
    block (``model.layers.3.mlp``), uncurl by its decoder layer (``model.layers.3``)."""
    return {name.removesuffix(".mlp"): sorted(experts) for name, experts in json.loads(report.read_text()).items()}


def agreement(ours: dict[str, list[int]], theirs: dict[str, list[int]]) -> tuple[int, int, float]:
    """(layers with the same kept set, layers compared, mean share of kept experts in common)."""
    names = sorted(set(ours) & set(theirs))
    same = sum(set(ours[name]) == set(theirs[name]) for name in names)
    shared = [len(set(ours[n]) & set(theirs[n])) / max(len(ours[n]), 1) for n in names]
    return same, len(names), sum(shared) / max(len(shared), 1)


def compare(rows: list[dict[str, Any]], kept: dict[str, dict[str, list[int]]]) -> list[dict[str, Any]]:
    """Each row's ratios to its like among the peer's runs, and its kept experts against the peer's ``basic``.

    Like against like: the in-memory prune against ``basic`` (both calibrate the unpruned model), ``--sequential``
    against ``sequential`` (each layer calibrated on the output of the layers already pruned). The kept sets are
    compared with ``basic`` only: REAP's scores of the unpruned model, which any correct implementation reproduces.
    """
    peers = {row["run"].split()[-1]: row for row in rows if row["run"].startswith("llm-compressor")}
    for row in rows:
        wanted = "sequential" if row["run"].endswith("sequential") else "basic"
        reference = peers.get(wanted, next(iter(peers.values()), None))
        row["peer"] = reference["run"] if reference else None
        row["rss_vs_peer"] = row["peak_rss"] / reference["peak_rss"] if reference else None
        row["wall_vs_peer"] = row["wall_s"] / reference["wall_s"] if reference else None
        if "basic" in peers:
            row["same_layers"], row["layers"], row["shared"] = agreement(kept[row["run"]], kept[peers["basic"]["run"]])
    return rows


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    source = build_model(workdir / f"qwen3moe-32e-{args.layers}l-router{PEER_ROUTER_STD:g}", layers=args.layers,
                         shape=PEER_SHAPE, router_std=PEER_ROUTER_STD)
    texts = write_texts(workdir / "texts.jsonl", args.num_calibration)
    size = weight_bytes(source)
    subprocess.run(["cat", *map(str, source.glob("*.safetensors"))], stdout=subprocess.DEVNULL, check=True)  # warm
    rows: list[dict[str, Any]] = []
    kept: dict[str, dict[str, list[int]]] = {}
    for sequential in (False, True):
        name = "uncurl --sequential" if sequential else "uncurl"
        output = workdir / ("out-uncurl-seq" if sequential else "out-uncurl")
        measured = measure(uncurl_command(source, output, texts, args, sequential))
        kept[name] = uncurl_kept(output)
        rows.append({"run": name, "model_bytes": size, **measured})
        shutil.rmtree(output, ignore_errors=True)
    for pipeline in args.peer_pipelines.split(",") if args.peer_python else []:
        name, output = f"llm-compressor {pipeline}", workdir / f"out-peer-{pipeline}"
        report = workdir / f"peer-{pipeline}.json"
        shutil.rmtree(output, ignore_errors=True)
        measured = measure([str(args.peer_python), "-c", PEER_SCRIPT, str(source), str(output), str(texts), pipeline,
                            "0.5", str(args.max_length), str(report)])
        kept[name] = peer_kept(report)
        rows.append({"run": name, "model_bytes": size, **measured})
        shutil.rmtree(output, ignore_errors=True)
    return compare(rows, kept)


def format_table(rows: list[dict[str, Any]]) -> str:
    from uncurl_hf.experiments.tables import text_table

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    table = [["run", "model GB", "peak RSS GB", "x model", "x peer", "wall s", "x peer", "peer",
              "same kept as basic"]]
    for row in rows:
        same = f"{row['same_layers']}/{row['layers']} ({100 * row['shared']:.1f}%)" if "layers" in row else "-"
        table.append([row["run"], f"{row['model_bytes'] / 1e9:.2f}", f"{row['peak_rss'] / 1e9:.2f}",
                      f"{row['peak_rss'] / row['model_bytes']:.2f}", ratio(row["rss_vs_peer"]),
                      f"{row['wall_s']:.1f}", ratio(row["wall_vs_peer"]), row["peer"] or "-", same])
    return text_table(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", type=Path, default=None, help="python of a venv with llmcompressor")
    parser.add_argument("--skip-peer", action="store_true", help="run uncurl's side only")
    parser.add_argument("--peer-pipelines", default="basic,sequential", help="comma-separated oneshot pipelines")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "uncurl-peer-bench")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--num-calibration", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.skip_peer:
        args.peer_python = None
    elif args.peer_python is None:
        parser.error("give --peer-python (a venv with llmcompressor) or --skip-peer")
    rows = run(args)
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
