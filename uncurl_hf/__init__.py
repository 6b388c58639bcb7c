"""uncurl-hf: task-specific expert pruning and merging for sparse mixture-of-experts models.

Importing the package registers the pruned model classes (``pruned_switch_transformers``) with the
transformers Auto classes, so ``AutoModelForSeq2SeqLM.from_pretrained(pruned_dir)`` works after ``import uncurl_hf``.
"""

from __future__ import annotations

from uncurl_hf import modeling as _modeling  # noqa: F401  (registers the pruned model types)
from uncurl_hf._version import __version__
from uncurl_hf.surgery.apply import apply_plan
from uncurl_hf.calibration.data import build_batches, load_calibration_file
from uncurl_hf.calibration.run import calibrate
from uncurl_hf.calibration.stats import CalibrationStats, ExpertStats
from uncurl_hf.io.checkpoint import load_model, write_checkpoint
from uncurl_hf.options import RunOptions
from uncurl_hf.recipe import CalibrationSpec, PruneRecipe
from uncurl_hf.families import available_families, get_family
from uncurl_hf.methods import available_methods, get_method
from uncurl_hf.plan import LayerPlan, PruningPlan
from uncurl_hf.pipeline.prune import PruneResult, prune

__all__ = [
    "CalibrationSpec",
    "CalibrationStats",
    "ExpertStats",
    "LayerPlan",
    "PruneResult",
    "PruneRecipe",
    "RunOptions",
    "PruningPlan",
    "__version__",
    "apply_plan",
    "available_families",
    "available_methods",
    "build_batches",
    "calibrate",
    "get_family",
    "get_method",
    "load_calibration_file",
    "load_model",
    "prune",
    "write_checkpoint",
]
