"""Writing a pruned model: the card's facts, the surgery + atomic write (in memory or streamed), the recipe file,
the dry run's plan-only output, and the Hub push.
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any

from uncurl_hf.cards.model_card import CardFacts, finalize_output, is_hub_id
from uncurl_hf.errors import HubError
from uncurl_hf.io.atomic import write_atomically
from uncurl_hf.io.checkpoint import count_parameters, stored_parameters, weights_size, write_model_checkpoint
from uncurl_hf.io.memory import release_memory, tensor_bytes
from uncurl_hf.options import RunOptions
from uncurl_hf.pipeline.source import Source
from uncurl_hf.plan import PLAN_FILENAME, PruningPlan
from uncurl_hf.recipe import RECIPE_FILENAME, PruneRecipe
from uncurl_hf.surgery.apply import apply_plan
from uncurl_hf.surgery.export import refuse_expert_maps, to_stock, uniform_count
from uncurl_hf.surgery.streaming import stream_apply_plan

logger = logging.getLogger(__name__)


def source_display(model: str | Path) -> str:
    """How a card names the source: a Hub id as is, else the folder's last component (no local paths)."""
    text = str(model)
    if is_hub_id(text):
        return text
    return Path(model).expanduser().resolve().name or text


def recipe_command(model: str | Path, options: RunOptions) -> str:
    """The command that reruns a recipe: ``uncurl prune SRC --recipe uncurl_recipe.yaml -o OUTPUT_DIR`` (+ the
    options that shape the card). Paths are shown by name: absolute paths would leak the author's file-system
    layout into a public card and make two otherwise identical runs differ."""
    args = ["uncurl", "prune", source_display(model), "--recipe", RECIPE_FILENAME, "-o", "OUTPUT_DIR"]
    if options.evaluate:
        args.append("--evaluate")
        if options.eval_limit is not None:
            args += ["--eval-limit", str(options.eval_limit)]
    return shlex.join(args)


def card_facts(model: str | Path, loaded: Source, plan: PruningPlan, recipe: PruneRecipe, options: RunOptions, *,
               saved_plan: bool, num_examples: int, base_model_id: str | None) -> CardFacts:
    """What the model card records, known before writing (parameter counts and sizes are filled in later)."""
    spec = recipe.calibration
    if not saved_plan:
        calibration = dict(
            task=spec.task,
            calibration_file=_data_name(spec),
            calibration_size=num_examples,
            max_length=spec.max_length,
        )
    else:
        calibration = _plan_calibration_facts(plan, spec.task)
    return CardFacts(
        plan=plan,
        experts_before=loaded.sizes,
        experts_after=plan.counts,
        params_before=0,  # counted by write_output
        params_after=0,
        disk_bytes_before=weights_size(loaded.path),
        disk_bytes_after=0,  # measured on the written files by finalize_output
        command=recipe_command(model, options),
        recipe_yaml=recipe_text(recipe, names_only=True),
        source_name=loaded.path.expanduser().resolve().name,
        **calibration,
        export=recipe.export,
        base_model_id=base_model_id,
        repo_id=options.repo_id if options.push_to_hub else None,
    )


def recipe_text(recipe: PruneRecipe, names_only: bool = False) -> str:
    """The recipe as written into the output (``uncurl_recipe.yaml``: paths as given, like ``uncurl_plan.json``),
    or as the card quotes it (``names_only``: file paths shown by name, no local layout in a public card)."""
    from uncurl_hf.recipe import dump_yaml

    data = recipe.to_dict()
    if names_only:
        calibration = data["calibration"]
        if calibration.get("file") and recipe.calibration.data is None:
            calibration["file"] = Path(calibration["file"]).name
        if data.get("plan"):
            data["plan"] = Path(data["plan"]).name
    return dump_yaml(data)


def write_output(loaded: Source, plan: PruningPlan, recipe: PruneRecipe, facts: CardFacts, output_dir: str | Path,
                 options: RunOptions) -> tuple[Path, CardFacts, CardFacts | None]:
    """Apply ``plan`` and write the output folder atomically (recipe, card and evaluation inside the atomic write):
    ``(output, facts with parameter counts, facts as measured by the card step or None)``."""
    measured: list[CardFacts] = []

    def finalize(folder: Path) -> None:
        (folder / RECIPE_FILENAME).write_text(recipe_text(recipe), encoding="utf-8")
        written = replace(facts, params_after=stored_parameters(folder)) if options.streaming else facts
        measured.append(
            finalize_output(
                folder, written, source=loaded.path, evaluate=options.evaluate, eval_limit=options.eval_limit,
                write=options.card, progress=options.progress,
            )
        )

    if options.streaming:
        if loaded.model is not None:  # free the calibrated model: the streaming writer holds one layer at a time
            params_before, freed = count_parameters(loaded.model), tensor_bytes(loaded.model)
            loaded.model = None
            release_memory(freed)
        else:
            params_before = stored_parameters(loaded.path)
        facts = replace(facts, params_before=params_before)
        output = stream_apply_plan(
            loaded.path, plan, output_dir, family=loaded.family, max_shard_size=options.max_shard_size,
            overwrite=options.overwrite, scale_expert_capacity=recipe.scale_expert_capacity,
            trust_remote_code=options.trust_remote_code, finalize=finalize, progress=options.progress,
            sync=options.fsync,
        )
        facts = replace(facts, params_after=stored_parameters(output))
    else:
        logger.info("applying the plan")
        # The source is consumed: each layer's experts are freed as soon as its output experts exist, the rest of
        # the source when the reduced model is built, and the reduced model (only referenced by ``held``) before
        # the written folder is reloaded for validation; never two models in full (issue 17).
        if recipe.export == "stock":  # before the surgery: both are facts of the plan
            refuse_expert_maps(plan.has_expert_maps)
            uniform_count(plan.counts, loaded.family)
        params_before, freed = count_parameters(loaded.model), tensor_bytes(loaded.model)
        source_model, loaded.model = loaded.model, None
        pruned = apply_plan(source_model, loaded.family, plan, scale_expert_capacity=recipe.scale_expert_capacity,
                            release_source=True)
        del source_model
        release_memory(freed)
        if recipe.export == "stock":
            pruned = to_stock(pruned)
        facts = replace(facts, params_before=params_before, params_after=count_parameters(pruned))
        held = [pruned]
        del pruned
        output = write_model_checkpoint(
            held, output_dir, plan, source_dir=loaded.path, overwrite=options.overwrite,
            max_shard_size=options.max_shard_size, finalize=finalize, sync=options.fsync,
        )
    return output, facts, measured[0] if measured else None


def write_plan_only(plan: PruningPlan, recipe: PruneRecipe, output_dir: str | Path, source: Path,
                    options: RunOptions) -> Path:
    """The dry run's output: a folder holding only ``uncurl_plan.json`` and ``uncurl_recipe.yaml`` (atomically,
    with a manifest), which ``uncurl prune SRC --plan OUT/uncurl_plan.json`` applies later."""

    def fill(temp: Path) -> None:
        plan.save(temp / PLAN_FILENAME)
        (temp / RECIPE_FILENAME).write_text(recipe_text(recipe), encoding="utf-8")

    return write_atomically(output_dir, fill, source_dir=source, overwrite=options.overwrite, sync=options.fsync)


def push(output: Path, options: RunOptions) -> Any:
    """Upload the written folder; a failed push keeps it and says how to push it later."""
    from uncurl_hf.io.hub import push_folder

    assert options.repo_id is not None
    try:
        return push_folder(output, options.repo_id, token=options.hub_token, private=options.private,
                           exist_ok=options.hub_exist_ok)
    except HubError as exc:
        raise type(exc)(
            f"{exc} The pruned model is saved in {output}; push it later with "
            f"`uncurl push {output} --repo-id {options.repo_id}`."
        ) from exc


def _data_name(spec: Any) -> str | None:
    if spec.file is not None:
        return Path(spec.file).name
    if spec.data is not None:
        return "in-memory data (Python)"
    return None


def _plan_calibration_facts(plan: PruningPlan, task: str | None) -> dict[str, Any]:
    """Card facts about the data a saved plan was calibrated on, from its metadata (only well-typed values)."""
    calibration = plan.metadata.get("calibration") if isinstance(plan.metadata, dict) else None
    calibration = calibration if isinstance(calibration, dict) else {}

    def typed(key: str, kind: type) -> Any:
        value = calibration.get(key)
        return value if isinstance(value, kind) and not isinstance(value, bool) else None

    task = task or typed("task", str)
    file = typed("calibration_file", str)
    return {
        "task": task,
        "calibration_file": Path(file).name if file else None if task else "unknown (saved plan)",
        "calibration_size": typed("num_examples", int),
        "max_length": typed("max_length", int),
    }
