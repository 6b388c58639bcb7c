"""Model cards for pruned checkpoints, rendered with ``huggingface_hub.ModelCard`` from ``model_cards/``.

A card is built from :class:`CardFacts` only — the plan, the sizes measured on the in-memory models and the written
files, and (optionally) the :class:`~uncurl_hf.evaluation.scoring.EvalResult` of the original and the pruned checkpoint from
the same run — so every number in it is a measurement, never a copy of a claim. Without evaluation the card says so
instead of showing scores.

Metadata choices (the Hub's model-card spec):

* ``base_model`` is written only when a Hub model id is known (``base_model_id``, or a source folder inside the
  Hugging Face cache). A local path is not a valid ``base_model`` and the Hub rejects the card on push.
* ``base_model_relation: finetune``. The Hub documents four values: ``adapter`` (a PEFT adapter on top of the base),
  ``merge`` (weights combined from *several* models), ``quantized`` (the same weights at lower precision) and
  ``finetune`` (a full model derived from *one* base model by changing its weights). An expert-pruned / -merged
  model is a full checkpoint derived from one base whose weights and architecture changed: ``quantized`` would tell
  users that only the precision changed (and put the model among GGUF/AWQ builds), ``merge`` means combining models,
  not experts inside one model, and ``adapter`` needs the base weights at load time. ``finetune`` is the closest
  honest value — the Hub's generic "derived from this base" relation; the card body says what was done.
* ``license`` (and ``license_name`` / ``license_link``) is the base model's, read from the source folder, else
  ``unknown``; the body closes with the licence and the papers to cite (:mod:`uncurl_hf.cards.provenance`).
* ``model-index`` holds the pruned model's own score only. The original's score on the same split goes into the
  body's comparison table: listed in ``model-index`` it would read, on the Hub, as a result of *this* model.
* ``pipeline_tag``, tags, the format row and the usage code follow the checkpoint actually written: its
  ``config.json`` (``model_type``, ``auto_map``) and the modeling files in the folder, read by
  :func:`finalize_output`. A decoder family is ``text-generation`` loaded by ``AutoModelForCausalLM``; Switch is
  ``text2text-generation`` loaded by ``AutoModelForSeq2SeqLM``. ``custom_code`` is tagged only when ``auto_map``
  is written (a stock-format output has none), and the family's own model type is a tag (``mixtral``, ...).

Determinism: without evaluation the card depends only on the run's inputs (no timestamps, no absolute paths), so
pruning twice still gives byte-identical folders.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult as HubEvalResult
from huggingface_hub import ModelCard, ModelCardData

from uncurl_hf._version import __version__
from uncurl_hf.cards.provenance import (
    SourceLicense,
    copy_license_files,
    hub_model_id,
    is_hub_id,
    provenance_markdown,
    read_source_license,
)
from uncurl_hf.cards.usage import (
    CheckpointFormat,
    checkpoint_format,
    example_input,
    prompt_display,
    usage_code,
    written_format,
)
from uncurl_hf.plan import PruningPlan

if TYPE_CHECKING:
    from uncurl_hf.evaluation.scoring import EvalResult

logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).parent / "templates" / "pruned_model_card.md"
CARD_FILENAME = "README.md"
BASE_MODEL_RELATION = "finetune"  # see the module docstring for why
PIPELINE_TAG = "text2text-generation"  # encoder-decoder (Switch) outputs
CAUSAL_PIPELINE_TAG = "text-generation"  # decoder-family outputs
ORIGINAL_SUFFIX = " (original, before pruning)"  # the label older cards gave the original in model-index
# Hub dataset ids of the registered tasks' data, for ``datasets:`` and ``model-index``. The sentiment task is a
# sample of Pang & Lee's sentence polarity v1.0, which the Hub hosts as rotten_tomatoes.
TASK_HUB_DATASETS = {"sentiment": "cornell-movie-review-data/rotten_tomatoes"}


@dataclass
class CardFacts:
    """Everything a card states, all measured or decided in one pruning run."""

    plan: PruningPlan
    experts_before: dict[str, int]
    experts_after: dict[str, int]
    params_before: int
    params_after: int
    disk_bytes_before: int
    disk_bytes_after: int
    command: str
    source_name: str
    recipe_yaml: str = ""  # uncurl_recipe.yaml, quoted by the card
    task: str | None = None
    calibration_file: str | None = None
    calibration_size: int | None = None
    max_length: int | None = None
    export: str = "pruned"
    base_model_id: str | None = None
    repo_id: str | None = None
    eval_original: EvalResult | None = None
    eval_pruned: EvalResult | None = None
    model_type: str | None = None  # of the written config.json (finalize_output); else derived from the plan
    remote_code_files: tuple[str, ...] | None = None  # the .py files config.json's auto_map names, in the folder
    source_license: SourceLicense | None = None  # read from the source folder by finalize_output; None: unknown

    @property
    def evaluated(self) -> bool:
        return self.eval_original is not None and self.eval_pruned is not None

    @property
    def model_name(self) -> str:
        """A stable name for ``model-index``: the repo name when pushing, else source-task-method-factor."""
        if self.repo_id:
            return self.repo_id.split("/")[-1]
        factor = f"x{self.plan.factor:g}" if self.plan.factor is not None else "custom"
        return "-".join(p for p in (self.source_name, self.task, self.plan.method, factor) if p)


def build_card(facts: CardFacts, template_path: str | Path = TEMPLATE_PATH) -> ModelCard:
    """Render the card of a pruned checkpoint (metadata + body) from ``facts``."""
    from uncurl_hf.methods import get_method
    from uncurl_hf.evaluation.tasks import get_task

    plan = facts.plan
    task_obj = None
    if facts.task is not None:
        try:
            task_obj = get_task(facts.task)
        except Exception:  # noqa: BLE001 - an unregistered task still gets a card, just a plainer one
            task_obj = None
    dataset_id = getattr(task_obj, "hub_dataset", None) or TASK_HUB_DATASETS.get(facts.task or "")
    fmt = checkpoint_format(facts)
    card_data = ModelCardData(
        base_model=facts.base_model_id,
        library_name="transformers",
        pipeline_tag=fmt.pipeline_tag,
        tags=_tags(facts, fmt),
        datasets=[dataset_id] if dataset_id else None,
        **(facts.source_license or SourceLicense()).metadata(),
        model_name=facts.model_name if facts.evaluated else None,
        eval_results=_eval_results(facts, task_obj, dataset_id, fmt) if facts.evaluated else None,
        **({"base_model_relation": BASE_MODEL_RELATION} if facts.base_model_id else {}),
    )
    try:
        method_description = get_method(plan.method).description
    except Exception:  # noqa: BLE001 - a plan from a method that is not installed here
        method_description = ""
    counts_after = list(facts.experts_after.values())
    base_display = (f"[`{facts.base_model_id}`](https://huggingface.co/{facts.base_model_id})" if facts.base_model_id
                    else f"`{facts.source_name}` (a local checkpoint)")
    variables: dict[str, Any] = {
        "title": f"{facts.source_name} pruned for {facts.task or 'custom data'} "
        f"({plan.method}, {'x' + format(plan.factor, 'g') if plan.factor is not None else 'per-layer counts'})",
        "base_display": base_display,
        "task": facts.task,
        "task_display": f"`{facts.task}`" + (f" ({task_obj.description})" if task_obj else "")
        if facts.task
        else f"the calibration file `{facts.calibration_file}`",
        "calibration_display": (f"task `{facts.task}`, train split" + (f" ({dataset_id})" if dataset_id else ""))
        if facts.task
        else f"`{facts.calibration_file}`",
        "calibration_size": facts.calibration_size,
        "max_length": facts.max_length,
        "method": plan.method,
        "method_description": method_description,
        "method_params": ", ".join(f"`{k}={_json_value(v)}`" for k, v in sorted(_method_params(plan).items()))
        or "defaults",
        "factor": plan.factor,
        "factor_display": format(plan.factor, "g") if plan.factor is not None else None,
        "seed": plan.seed,
        "merged": any(not layer.is_pure_pruning for layer in plan.layers),
        "format_display": f"stock `{fmt.stock_type}` (no custom code)" if fmt.stock
        else f"`{fmt.model_type}` (per-layer expert counts"
        + ("; routers keep every original expert's row, with an expert map (router=map)"
           if plan.has_expert_maps else "")
        + ("; modeling code included)" if fmt.remote_files else "; needs `import uncurl_hf`)"),
        "uncurl_version": __version__,
        "layers": [
            {
                "name": layer.name,
                "before": facts.experts_before.get(layer.name, layer.num_experts),
                "after": facts.experts_after.get(layer.name, layer.num_output_experts),
                "groups": " ".join("+".join(str(i) for i in group) for group in layer.groups),
            }
            for layer in plan.layers
        ],
        "experts_before_total": sum(facts.experts_before.values()),
        "experts_after_total": sum(counts_after),
        "params_before": f"{facts.params_before:,}",
        "params_after": f"{facts.params_after:,}",
        "params_ratio": _ratio(facts.params_after, facts.params_before),
        "disk_before": f"{facts.disk_bytes_before / 1e6:.2f}",
        "disk_after": f"{facts.disk_bytes_after / 1e6:.2f}",
        "disk_ratio": _ratio(facts.disk_bytes_after, facts.disk_bytes_before),
        "evaluated": facts.evaluated,
        "stock": fmt.stock,
        "causal": fmt.causal,
        "model_type": fmt.model_type,
        "stock_type": fmt.stock_type,
        "remote_files": list(fmt.remote_files),
        "remote_files_display": ", ".join(f"`{name}`" for name in fmt.remote_files),
        "usage_code": usage_code(fmt, facts.repo_id or "path/to/this/folder", example_input(fmt, task_obj)),
        "remote_usage_code": usage_code(fmt, facts.repo_id or "path/to/this/folder", example_input(fmt, task_obj),
                                        remote=True),
        "prompt_display": prompt_display(fmt, task_obj),
        "experts_per_layer": counts_after[0] if counts_after else None,
        "uniform": len(set(counts_after)) == 1,
        "model_id": facts.repo_id or "path/to/this/folder",
        "command": facts.command,
        "recipe_yaml": facts.recipe_yaml.rstrip("\n"),
        "provenance": provenance_markdown(facts.source_license, base_display, plan.method, _method_params(plan)),
    }
    if facts.evaluated:
        original, pruned = facts.eval_original, facts.eval_pruned
        assert original is not None and pruned is not None
        variables.update(
            metric=pruned.metric,
            eval_split=pruned.split,
            eval_examples=pruned.num_examples,
            batch_size=pruned.batch_size,
            score_original=format_score(original.score),
            score_pruned=format_score(pruned.score),
            latency1_original=format_ms(original.ms_per_example_batch1),
            latency1_pruned=format_ms(pruned.ms_per_example_batch1),
            latencyb_original=format_ms(original.ms_per_example_batched),
            latencyb_pruned=format_ms(pruned.ms_per_example_batched),
            perplexity_original=_maybe(original.perplexity, "{:.2f}"),
            perplexity_pruned=_maybe(pruned.perplexity, "{:.2f}"),
            agreement=_maybe(pruned.agreement, "{:.2f}"),
            kl_labels=_maybe(pruned.kl_labels, "{:.3g}"),
            kl_tokens=_maybe(pruned.kl_tokens, "{:.3g}"),
        )
    else:
        variables.update(perplexity_pruned=None, agreement=None, kl_tokens=None)
    template = Path(template_path).read_text(encoding="utf-8")
    return ModelCard.from_template(card_data, template_str=template, **variables)


def write_card(folder: str | Path, facts: CardFacts) -> Path:
    """Render the card into ``folder/README.md`` atomically (temporary file + rename); return its path."""
    folder = Path(folder)
    text = str(build_card(facts))
    if not text.endswith("\n"):
        text += "\n"
    handle, temp = tempfile.mkstemp(prefix=".README-", suffix=".md", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, folder / CARD_FILENAME)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    logger.info("wrote the model card %s", folder / CARD_FILENAME)
    return folder / CARD_FILENAME


def format_score(value: float) -> str:
    """How scores appear in the card body (the metadata keeps the exact float)."""
    return f"{value:.4f}"


def format_ms(value: float) -> str:
    return f"{value:.2f}"


def _eval_results(facts: CardFacts, task_obj: Any, dataset_id: str | None, fmt: CheckpointFormat,
                  ) -> list[HubEvalResult]:
    """``model-index`` entries: the pruned model's own score (the original's is in the body's comparison)."""
    assert facts.eval_pruned is not None
    task_type = "text-classification" if getattr(task_obj, "labels", None) else fmt.pipeline_tag
    return [
        HubEvalResult(
            task_type=task_type,
            task_name=facts.task,
            dataset_type=dataset_id or facts.eval_pruned.task,
            dataset_name=getattr(task_obj, "description", None) or facts.eval_pruned.task,
            dataset_split=facts.eval_pruned.split,
            metric_type=facts.eval_pruned.metric,
            metric_value=float(facts.eval_pruned.score),
            metric_name=facts.eval_pruned.metric,
        )
    ]


def _tags(facts: CardFacts, fmt: CheckpointFormat) -> list[str]:
    tags = ["moe", "pruning", "uncurl", fmt.stock_type, facts.plan.method]
    if any(not layer.is_pure_pruning for layer in facts.plan.layers):
        tags.append("expert-merging")
    if facts.task:
        tags.append(facts.task)
    if fmt.remote_files:
        tags.append("custom_code")
    return tags


def _maybe(value: float | None, spec: str) -> str | None:
    return None if value is None else spec.format(value)


def _method_params(plan: PruningPlan) -> Mapping[str, Any]:
    """Method options recorded in the plan (``metadata['method_kwargs']`` when the method stored them)."""
    params = plan.metadata.get("method_kwargs") or {}
    return params if isinstance(params, Mapping) else {}


def _json_value(value: Any) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value)


def _ratio(after: int, before: int) -> str:
    return f"{after / before:.3f}" if before else "n/a"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask




def finalize_output(
    folder: str | Path,
    facts: CardFacts,
    *,
    source: str | Path,
    evaluate: bool = False,
    eval_limit: int | None = None,
    write: bool = True,
    progress: bool = False,
) -> CardFacts:
    """Measure what only the written files tell, then write the card into ``folder``; return the completed facts.

    Runs on the not-yet-renamed output folder (``write_checkpoint(finalize=...)``): the pruned model's disk size and,
    with ``evaluate``, the scores and latencies of the original (``source``) and of exactly these written files on
    the task's test split (first ``eval_limit`` examples) come from this run.
    """
    from dataclasses import replace

    from uncurl_hf.io.checkpoint import weights_size

    folder = Path(folder)
    found = read_source_license(source, facts.base_model_id)
    copy_license_files(source, folder, found)  # a derivative carries its base's licence text
    facts = replace(facts, disk_bytes_after=weights_size(folder), source_license=found, **written_format(folder))
    if evaluate:
        from uncurl_hf.evaluation.scoring import evaluate_pair

        if facts.task is None:
            raise ValueError("evaluation needs a task")
        logger.info("evaluating the original and the pruned checkpoint on %s (test split)", facts.task)
        original, pruned = evaluate_pair(source, folder, facts.task, split="test", limit=eval_limit,
                                         progress=progress)
        original.model, pruned.model = facts.source_name, "pruned"  # not the temporary folder's path
        pruned.reference = facts.source_name
        facts = replace(facts, eval_original=original, eval_pruned=pruned)
    if write:
        write_card(folder, facts)
    return facts


__all__ = [
    "BASE_MODEL_RELATION",
    "CARD_FILENAME",
    "CardFacts",
    "build_card",
    "finalize_output",
    "format_score",
    "hub_model_id",
    "is_hub_id",
    "write_card",
]
