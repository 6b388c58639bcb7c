"""Routing health of a zoo model on its task: the share of tokens each expert receives, per sparse layer.

A model worth pruning routes the task's tokens over all its experts (the zoo's quality bar is >= 2% of the
tokens for every expert of every layer); the normalized entropy (1.0 = uniform) summarizes each layer.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from uncurl_hf.calibration.data import build_batches
from uncurl_hf.calibration.run import calibrate
from uncurl_hf.io.checkpoint import load_model, load_tokenizer
from uncurl_hf.families import get_family
from uncurl_hf.evaluation.tasks import get_task


def routing_report(
    folder: str | Path, task: str, num_examples: int = 512, split: str = "dev", seed: int = 0
) -> dict[str, Any]:
    """Per layer: token share of each expert, its minimum, and the normalized routing entropy."""
    model = load_model(folder)
    tokenizer = load_tokenizer(folder)
    family = get_family(model)
    examples = get_task(task).calibration_examples(num_examples, seed=seed, split=split)
    stats = calibrate(model, family, build_batches(examples, tokenizer), seed=seed, progress=False)
    layers = {}
    for name, layer in stats.items():
        shares = [float(x) for x in layer.frequency.tolist()]
        entropy = -sum(p * math.log(p) for p in shares if p > 0)
        layers[name] = {
            "tokens": int(layer.num_tokens),
            "share": [round(p, 4) for p in shares],
            "min_share": round(min(shares), 4),
            # a one-expert (dense) layer has nothing to balance: its routing is perfectly even by definition
            "entropy_normalized": round(entropy / math.log(len(shares)), 4) if len(shares) > 1 else 1.0,
        }
    return {"task": task, "split": split, "num_examples": len(examples), "layers": layers}
