"""The model being pruned: where it is, the cheap checks before any weight is read, and loading what a run needs.

Cheap checks (export format, model folder, plan family, output folder, evaluability) run before the model is
loaded, so a typo fails in a second rather than after calibration.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from uncurl_hf.calibration import distributed
from uncurl_hf.errors import InvalidPlanError, UncurlError, UnsupportedModelError
from uncurl_hf.evaluation.tasks import get_task
from uncurl_hf.families import get_family
from uncurl_hf.io.access import check_writable_parent
from uncurl_hf.io.atomic import check_output_dir, sweep_stale_temp_dirs
from uncurl_hf.io.checkpoint import disk_layer_sizes, inspect_checkpoint, load_model, read_config
from uncurl_hf.options import RunOptions
from uncurl_hf.plan import PruningPlan
from uncurl_hf.recipe import PruneRecipe
from uncurl_hf.surgery.export import check_export_format, refuse_expert_maps

logger = logging.getLogger(__name__)


@dataclass
class Source:
    """The model as the pipeline holds it: its folder, family and expert counts per layer, and the module when it
    was loaded (``None`` for a streamed saved plan; meta-device while ``offloaded``)."""

    path: Path
    family: Any
    sizes: dict[str, int]
    model: Any = None
    offloaded: Any = None  # uncurl_hf.calibration.offload.OffloadedModel while calibration reads weights from disk
    tokenizer: Any = None

    def close(self) -> None:
        """Release an offloaded model's hooks and open weight files now, not at garbage collection."""
        if self.offloaded is not None:
            self.offloaded.close()
            self.offloaded = None


def resolve_source(model: str | Path, options: RunOptions) -> Path:
    """The local folder of ``model``: a folder, a zoo name or a Hub id (see :mod:`uncurl_hf.io.resolve`)."""
    from uncurl_hf.io.resolve import resolve_model

    return resolve_model(model, revision=options.revision, token=options.hub_token,
                         allow_pickle=options.allow_pickle, progress=options.progress)


def load_saved_plan(recipe: PruneRecipe) -> PruningPlan | None:
    """The plan to apply instead of running a method (loaded and checked layer by layer), or ``None``."""
    if recipe.plan is None:
        return None
    loaded = PruningPlan.load(recipe.plan)
    if not loaded.layers:
        raise InvalidPlanError("The plan lists no layers; recompute it with `uncurl prune --plan-out PLAN ...`.")
    for layer in loaded.layers:
        layer.validate()
    return replace(loaded)


def preflight(source: Path, saved_plan: PruningPlan | None, recipe: PruneRecipe, options: RunOptions,
              output_dir: str | Path) -> Any:
    """The cheap checks that need no weights; returns the source's family.

    Includes what the run needs from the filesystem: a readable model folder (:func:`inspect_checkpoint`) and an
    output folder that can be created (its parent probed with a real file), so a permission problem fails in a
    second rather than after minutes of calibration.
    """
    check_export_format(recipe.export)
    if options.streaming and recipe.export == "stock":
        raise UncurlError("--export stock is not available with --streaming; drop one of them.")
    if recipe.max_drop is not None and options.offload:
        from uncurl_hf.errors import MaxDropError

        raise MaxDropError(
            "--max-drop scores every candidate on the pruned model in memory, so it cannot run with --offload; "
            "drop one of the two."
        )
    if recipe.max_drop is not None:
        from uncurl_hf.pipeline.search import check_search_split

        check_search_split(recipe.calibration.task)
    if options.dry_run and saved_plan is not None:
        raise UncurlError("--dry-run computes a plan, but --plan already gives one; drop one of them.")
    if recipe.export == "stock" and recipe.method is not None:
        refuse_expert_maps(getattr(recipe.options(), "router", None) == "map")
    family = inspect_checkpoint(source, allow_pickle=options.allow_pickle, trust_remote_code=options.trust_remote_code)
    refuse_logical_merge(source)
    if saved_plan is not None and saved_plan.family != family.name:
        raise InvalidPlanError(
            f"The plan was made for a {saved_plan.family!r} model ({saved_plan.model_type!r}), but {source} is a "
            f"{family.name!r} model; compute a plan on this model (uncurl prune --plan-out PLAN ...)."
        )
    output = Path(output_dir).expanduser().resolve()
    if distributed.process_rank() == 0:  # one process cleans up leftovers of killed runs, before the check
        sweep_stale_temp_dirs(output)
    check_output_dir(output, source.expanduser().resolve(), options.overwrite)
    if distributed.process_rank() == 0:  # the writer: a parent it cannot write fails now, not after calibration
        check_writable_parent(output)
    if options.evaluate:
        check_evaluable(recipe.calibration.task)
        check_evaluable_family(family)
    return family


# config.json fields of a logical merge (router=map), declared by the pruned config classes.
_EXPERT_MAP_KEYS = ("expert_map_per_layer", "expert_map_per_encoder_layer", "expert_map_per_decoder_layer")


def refuse_logical_merge(source: Path) -> None:
    """A logical merge's routers choose among the original experts, so its layers have no expert-per-row statistics
    to prune again: say so, and point at the base model, before anything is loaded."""
    config = read_config(source)
    if any(config.get(key) for key in _EXPERT_MAP_KEYS):
        base = config.get("uncurl_base_model")
        raise UnsupportedModelError(
            f"{source} is a logical merge (router=map): its routers still choose among the original experts, "
            "so it cannot be pruned again. Prune its base model"
            f"{f' ({base})' if base else ''} with the larger factor instead."
        )


def load_source(source: Path, family: Any, saved_plan: PruningPlan | None, options: RunOptions,
                tokenizer: Any = None) -> Source:
    """Load what the run needs: nothing but the layer sizes for a streamed saved plan, a meta-device model for
    offloaded calibration, else the model (on ``options.device`` in ``options.dtype``)."""
    if options.streaming and saved_plan is not None:  # out of core: the model is never loaded
        return Source(source, family, disk_layer_sizes(source, family))
    if options.offload and saved_plan is None:  # calibration reads one transformer block at a time from disk
        from uncurl_hf.calibration.offload import load_offloaded

        offloaded = load_offloaded(source, trust_remote_code=options.trust_remote_code)
        sizes = offloaded.family.layer_sizes(offloaded.model)
        return Source(source, offloaded.family, sizes, offloaded.model, offloaded, tokenizer)
    model = load_source_model(source, options, calibrating=saved_plan is None)
    family = get_family(model)
    return Source(source, family, family.layer_sizes(model), model, None, tokenizer)


def load_source_model(source: Path, options: RunOptions, calibrating: bool = True) -> Any:
    """The model for calibration (on the options' device and dtype) or for the surgery (as stored, on CPU: read
    block by block, so the load peaks at about the weights' bytes rather than from_pretrained's ~2.4x)."""
    if calibrating and (options.device != "cpu" or options.dtype != "auto"):
        return load_model(source, allow_pickle=options.allow_pickle, trust_remote_code=options.trust_remote_code,
                          device=options.device, dtype=options.dtype)
    return load_model(source, allow_pickle=options.allow_pickle, trust_remote_code=options.trust_remote_code,
                      blockwise=True)


def check_evaluable(task: str | None) -> None:
    """Evaluation scores a registered classification task; say so before any heavy work."""
    if task is None:
        raise UncurlError(
            "--evaluate needs --task: a calibration file has no test split to score. Evaluate the output "
            "afterwards with `uncurl eval OUT --task TASK`, or drop --evaluate."
        )
    if not get_task(task).labels:
        raise UncurlError(
            f"--evaluate is only implemented for classification tasks; {task!r} is a generation task. "
            "Drop --evaluate."
        )


def check_evaluable_family(family: Any) -> None:
    """Task evaluation scores encoder-decoders (label sequences) and causal LMs (label continuations of the task's
    prompt, perplexity, KL); refuse a family loaded by any other Auto class before any weight is read."""
    kind = family.auto_model_class().__name__
    if kind not in ("AutoModelForSeq2SeqLM", "AutoModelForCausalLM"):
        raise UncurlError(
            f"Task evaluation (`uncurl eval`, `prune --evaluate`) scores encoder-decoder and causal LMs; {family.name} "
            f"loads with {kind}. Score it with your own harness; with `uncurl prune`, drop --evaluate."
        )
