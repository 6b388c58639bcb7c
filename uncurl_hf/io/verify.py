"""``uncurl verify OUT``: is an output folder exactly what ``uncurl prune`` wrote, and does it still work?

Three independent checks, so a report says *what* is wrong rather than "does not load":

1. **hashes** — every file listed in ``uncurl_manifest.json`` (written inside the atomic write, see
   :mod:`uncurl_hf.io.manifest`) exists with its recorded size and sha256. Extra files that change what loads (weights,
   indexes, code, config) are failures; an edited model card (``README.md``) or other extra files are warnings,
   because cards are meant to be edited.
2. **agreement** — the per-layer expert counts of ``config.json``, of ``uncurl_plan.json`` and of the weight tensors
   agree, and every tensor in the safetensors files has the key and shape the config implies (read from the file
   headers and a model built on the meta device: no weights are loaded for this check).
3. **forward** — the folder loads with the same safe loader as pruning (safetensors only, no remote code, no
   missing/unexpected tensors) and one forward pass on a tiny deterministic batch gives finite logits.

A failed check never stops the others. :meth:`VerifyReport.raise_for_failures` turns failures into a
:class:`~uncurl_hf.errors.VerificationError` (CLI exit code 1).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uncurl_hf.errors import ModelNotFoundError, UncurlError, VerificationError
from uncurl_hf.io.manifest import MANIFEST_FILENAME, file_digest, manifest_files
from uncurl_hf.plan import PLAN_FILENAME, PruningPlan

# Extra files that would change what a loader reads or runs: an unlisted one is a failure, not a warning.
_LOAD_RELEVANT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".py", ".json", ".model")
# Files whose edits after writing are expected (the model card).
_EDITABLE = ("README.md",)


@dataclass
class Check:
    """One verification result. ``level`` is ``"pass"``, ``"warn"`` (not a failure) or ``"fail"``."""

    name: str
    level: str
    detail: str

    @property
    def failed(self) -> bool:
        return self.level == "fail"


@dataclass
class VerifyReport:
    """Every check run on ``folder``; :attr:`ok` when none failed."""

    folder: Path
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(check.failed for check in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if check.failed]

    def add(self, name: str, level: str, detail: str) -> None:
        self.checks.append(Check(name, level, detail))

    def format(self) -> str:
        """One line per check (``PASS``/``WARN``/``FAIL``) and a verdict."""
        lines = [f"{check.level.upper():<4}  {check.name}: {check.detail}" for check in self.checks]
        verdict = "OK" if self.ok else f"FAILED ({len(self.failures)} problem(s))"
        lines.append(f"{self.folder}: {verdict}")
        return "\n".join(lines)

    def raise_for_failures(self) -> None:
        """Raise :class:`VerificationError` summarising the failures (no-op when :attr:`ok`)."""
        if self.ok:
            return
        first = self.failures[0]
        raise VerificationError(
            f"{self.folder} failed verification ({len(self.failures)} problem(s); first: {first.name}: "
            f"{first.detail}). Do not use or publish it: re-create it with `uncurl prune` (its uncurl_plan.json can "
            "be re-applied with --plan) or restore it from a good copy."
        )


def verify_checkpoint(folder: str | Path, forward: bool = True) -> VerifyReport:
    """Run the hash, agreement and (unless ``forward=False``) load + forward checks on an output folder.

    Raises :class:`ModelNotFoundError` only when ``folder`` is not a directory; every other problem is a failed
    check in the returned :class:`VerifyReport`.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ModelNotFoundError(f"{root} is not a folder; give the output folder written by `uncurl prune`.")
    report = VerifyReport(root.resolve())
    _check_hashes(root, report)
    _check_agreement(root, report)
    if forward:
        _check_forward(root, report)
    return report


def _check_hashes(root: Path, report: VerifyReport) -> None:
    manifest_path = root / MANIFEST_FILENAME
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        listed = manifest["files"]
        if manifest.get("algorithm") != "sha256" or not isinstance(listed, dict):
            raise ValueError("unknown algorithm or no file table")
        expected = {str(name): (str(entry["sha256"]), int(entry["size"])) for name, entry in listed.items()}
    except FileNotFoundError:
        report.add("hashes", "fail", f"no {MANIFEST_FILENAME}, so nothing can be checked against the write")
        return
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        report.add("hashes", "fail", f"{MANIFEST_FILENAME} is unreadable ({type(exc).__name__}: {exc})")
        return

    present = set(manifest_files(root))
    problems: list[str] = []
    warnings: list[str] = []
    for name, (digest, size) in sorted(expected.items()):
        path = root / name
        editable = name in _EDITABLE
        if name not in present:
            (warnings if editable else problems).append(f"{name} is missing")
        elif path.stat().st_size != size or file_digest(path) != digest:
            (warnings if editable else problems).append(f"{name} changed since it was written")
    for name in sorted(present - set(expected)):
        message = f"{name} was added after writing"
        (problems if name.endswith(_LOAD_RELEVANT_SUFFIXES) else warnings).append(message)
    if problems:
        report.add("hashes", "fail", "; ".join(problems))
    else:
        report.add("hashes", "pass", f"{len(expected)} files match {MANIFEST_FILENAME}")
    if warnings:
        report.add("hashes", "warn", "; ".join(warnings))


def _check_agreement(root: Path, report: VerifyReport) -> None:
    """Config vs plan vs weight tensors: counts per layer, then every tensor's key and shape."""
    try:
        plan = PruningPlan.load(root / PLAN_FILENAME)
    except UncurlError as exc:
        report.add("plan", "fail", str(exc))
        plan = None
    try:
        model, family = _meta_model(root)
    except Exception as exc:  # noqa: BLE001 - any config problem is a verification failure, reported as such
        report.add("config", "fail", f"config.json does not build a supported model ({type(exc).__name__}: {exc})")
        return
    config_counts = family.layer_sizes(model)
    try:
        shapes = _file_shapes(root)
    except Exception as exc:  # noqa: BLE001 - unreadable headers, missing shards, ...
        report.add("weights", "fail", f"cannot read the safetensors headers ({type(exc).__name__}: {exc})")
        return

    module_names = {id(module): name for name, module in model.named_modules()}
    weight_counts: dict[str, int | None] = {}
    for layer in family.sparse_layers(model):
        key = _stored_key(model, f"{module_names[id(layer.router)]}.weight", layer.router.weight)
        rows = shapes[key][0] if key in shapes else None
        if layer.expert_map is not None and rows == len(layer.expert_map):  # a logical merge: a row per original
            rows = layer.num_experts  # expert (the tensors check below compares every expert tensor's shape)
        weight_counts[layer.name] = rows
    sources: dict[str, Mapping[str, int | None]] = {"config": config_counts, "weights": weight_counts}
    if plan is not None:
        sources["plan"] = plan.counts
    disagree = sorted(
        name
        for name in set().union(*sources.values())
        if len({source.get(name) for source in sources.values()}) > 1
    )
    if disagree:
        detail = "; ".join(
            f"{name}: " + ", ".join(f"{label} {counts.get(name, 'absent')}" for label, counts in sources.items())
            for name in disagree
        )
        report.add("counts", "fail", f"per-layer expert counts disagree ({detail})")
    else:
        report.add("counts", "pass", f"{' == '.join(sources)}: {dict(config_counts)}")

    problems = _shape_problems(model, shapes)
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        report.add("tensors", "fail", "; ".join(problems[:5]) + more)
    else:
        report.add("tensors", "pass", f"{len(shapes)} tensors have the keys and shapes config.json implies")


def _meta_model(root: Path) -> tuple[Any, Any]:
    """The model ``config.json`` describes, built on the meta device (no memory, no weights, no remote code)."""
    import torch
    from transformers import AutoConfig

    import uncurl_hf  # noqa: F401  (registers the pruned model types)
    from uncurl_hf.io.checkpoint import _refuse_remote_code
    from uncurl_hf.families import get_family

    config_dict = json.loads((root / "config.json").read_text(encoding="utf-8"))
    if not isinstance(config_dict, dict):
        raise ValueError("config.json is not a JSON object")
    _refuse_remote_code(config_dict, root / "config.json")
    family = get_family(config_dict)
    config = AutoConfig.from_pretrained(str(root), local_files_only=True, trust_remote_code=False)
    with torch.device("meta"):
        model = family.auto_model_class().from_config(config, trust_remote_code=False)
    return model, family


def _file_shapes(root: Path) -> dict[str, tuple[int, ...]]:
    """``{tensor key: shape}`` from the safetensors headers (the index's shards when the folder is sharded)."""
    from uncurl_hf.io.safetensors import stored_tensors, weight_files

    if not weight_files(root):
        raise FileNotFoundError("no *.safetensors files")
    return {key: stored.shape for key, stored in stored_tensors(root).items()}


def _shape_problems(model: Any, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Keys missing from / unexpected in the files, and shape mismatches, against the config-built model.

    A key absent from the files is fine when it is tied to one that is present (``save_pretrained`` writes shared
    tensors such as the embeddings and the LM head once).
    """
    expected = {key: tuple(tensor.shape) for key, tensor in _stored_state(model).items()}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    identity = {name: id(tensor) for name, tensor in named}
    stored_ids = {identity.get(key) for key in shapes}
    problems = [f"unexpected tensor {key}" for key in sorted(set(shapes) - set(expected))]
    problems += [
        f"missing tensor {key}"
        for key in sorted(set(expected) - set(shapes))
        if identity.get(key) is None or identity[key] not in stored_ids
    ]
    problems += [
        f"{key} has shape {list(shapes[key])}, config implies {list(expected[key])}"
        for key in sorted(set(shapes) & set(expected))
        if shapes[key] != expected[key]
    ]
    return problems


def _stored_state(model: Any, state: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``state`` (default: the model's state dict) under the keys and shapes ``save_pretrained`` writes.

    transformers 5 converts some layouts on save (``conversion_mapping``: e.g. Mixtral/Qwen-MoE fused experts are
    stored one tensor per expert), so the files' keys are the reverted ones; meta tensors are enough to get them.
    """
    from transformers.core_model_loading import revert_weight_conversion

    return dict(revert_weight_conversion(model, dict(model.state_dict() if state is None else state)))


def _stored_key(model: Any, key: str, tensor: Any) -> str:
    """The key under which ``save_pretrained`` stores the tensor that the loaded model holds at ``key``."""
    (stored,) = _stored_state(model, {key: tensor})
    return stored


def _check_forward(root: Path, report: VerifyReport) -> None:
    import torch

    from uncurl_hf.io.checkpoint import load_model
    from uncurl_hf.families import get_family

    try:
        model = load_model(root)
        family = get_family(model)
        with torch.no_grad():
            logits = model(**family.dummy_inputs(model)).logits
    except Exception as exc:  # noqa: BLE001 - a folder that does not load or run is exactly what verify reports
        message = str(exc) if isinstance(exc, UncurlError) else f"{type(exc).__name__}: {exc}"
        report.add("forward", "fail", f"the model does not load and run: {message}")
        return
    if not torch.isfinite(logits).all():
        report.add("forward", "fail", "the forward pass gives NaN or infinite logits")
        return
    report.add("forward", "pass", f"loads and runs one forward pass (logits {list(logits.shape)}, finite)")
