"""Reading and writing checkpoints safely.

Loading accepts only local folders with ``config.json`` + safetensors weights (pickle ``.bin`` files can execute
code and are refused) and never runs remote code. Writing goes to a hidden temporary folder next to the output
(same filesystem), is reloaded and checked against the in-memory model, and only then renamed into place — a
crash or a kill never leaves a half-written output folder, and leftovers of killed runs are swept on the next
write. Output files are deterministic: same model + plan -> byte-identical folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from uncurl_hf.errors import CheckpointError, ModelNotFoundError, OutputExistsError, UnsupportedModelError
from uncurl_hf.families import get_family
from uncurl_hf.families.base import MoEFamily
from uncurl_hf.plan import PLAN_FILENAME, PruningPlan

logger = logging.getLogger(__name__)

TEMP_PREFIX = ".uncurl-tmp-"
OLD_PREFIX = ".uncurl-old-"
DEFAULT_MAX_SHARD_SIZE = "2GB"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors weight files of a checkpoint folder, sorted."""
    return sorted(Path(path).glob("*.safetensors"))


def weights_size(path: str | Path) -> int:
    """Bytes taken by the safetensors weights of a checkpoint folder."""
    return sum(f.stat().st_size for f in weight_files(path))


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


def inspect_checkpoint(path: str | Path) -> MoEFamily:
    """Cheap checks of a checkpoint folder without loading weights; returns its family.

    Raises :class:`ModelNotFoundError` (no folder / no config.json / no weights), :class:`UnsupportedModelError`
    (not an MoE family uncurl-hf supports) or :class:`CheckpointError` (pickle-only weights, corrupt files).
    """
    folder = Path(path)
    if not folder.exists():
        raise ModelNotFoundError(
            f"Model path {folder} does not exist. Give a local checkpoint folder holding config.json and "
            "*.safetensors (download Hub models first, e.g. with `hf download <repo> --local-dir DIR`)."
        )
    if not folder.is_dir():
        raise ModelNotFoundError(f"Model path {folder} is a file; give the checkpoint folder that contains it.")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(
            f"{folder} has no config.json, so it is not a transformers checkpoint folder; point at the folder "
            "written by save_pretrained."
        )
    try:
        config_dict = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"Cannot read {config_path}: {exc}. Restore a valid config.json.") from exc
    if not isinstance(config_dict, dict):
        raise CheckpointError(f"{config_path} is not a JSON object; restore a valid config.json.")
    family = get_family(config_dict)
    _check_weights(folder)
    return family


def load_model(path: str | Path, dtype: Any = None) -> nn.Module:
    """Load a local sparse-MoE checkpoint for pruning (eval mode, safetensors only, no remote code).

    Raises the errors of :func:`inspect_checkpoint`, and :class:`CheckpointError` when transformers cannot load it.
    """
    folder = Path(path)
    family = inspect_checkpoint(folder)
    try:
        model = family.auto_model_class().from_pretrained(
            str(folder),
            use_safetensors=True,
            local_files_only=True,
            trust_remote_code=False,
            **({"dtype": dtype} if dtype is not None else {}),
        )
    except Exception as exc:  # transformers raises many types (OSError, ValueError, SafetensorError, ...)
        raise CheckpointError(
            f"Could not load the checkpoint in {folder}: {type(exc).__name__}: {exc}. Check that the folder is a "
            "complete save_pretrained output."
        ) from exc
    model.eval()
    if not family.sparse_layers(model):
        raise UnsupportedModelError(f"{folder} has no sparse MoE layers (num_sparse_*_layers = 0); nothing to prune.")
    logger.info("loaded %s (%s, %d parameters)", folder, type(model).__name__, count_parameters(model))
    return model


def _check_weights(folder: Path) -> None:
    files = weight_files(folder)
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{folder} holds only pickle weights ({', '.join(pickles)}). uncurl-hf loads safetensors only, "
                "because unpickling can run arbitrary code. If you trust the file, convert it once: "
                "load it with transformers and call save_pretrained (which writes model.safetensors)."
            )
        raise ModelNotFoundError(f"{folder} has a config.json but no *.safetensors weights; copy the weights in.")
    from safetensors import SafetensorError, safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(
                f"Weight file {file} is corrupt or truncated ({exc}); re-download or re-save the checkpoint."
            ) from exc


def write_checkpoint(
    model: nn.Module,
    output_dir: str | Path,
    plan: PruningPlan,
    source_dir: str | Path | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    validate: bool = True,
) -> Path:
    """Write ``model`` + ``plan`` (+ the source's tokenizer files) to ``output_dir`` atomically; return its path.

    The folder is assembled under a ``.uncurl-tmp-*`` sibling, reloaded with the family's Auto class and run on a
    dummy batch (must reproduce the in-memory logits, with no missing/unexpected keys), then renamed into place.
    Raises :class:`OutputExistsError` when the output is the source (or contains it, or is inside it) or exists
    without ``overwrite``; :class:`CheckpointError` when writing or validation fails.
    """
    output = Path(output_dir).expanduser().resolve()
    source = Path(source_dir).expanduser().resolve() if source_dir is not None else None
    check_output_dir(output, source, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temp_dirs(output)
    temp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{output.name}-{os.getpid()}-", dir=output.parent))
    os.chmod(temp, 0o777 & ~_current_umask())  # mkdtemp makes it 0700; the final folder should look normal
    try:
        model.save_pretrained(str(temp), max_shard_size=max_shard_size)
        plan.save(temp / PLAN_FILENAME)
        if source is not None:
            _copy_side_files(source, temp)
        if validate:
            _validate_written(model, temp)
        _move_into_place(temp, output)
    except BaseException as exc:
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(exc, (OutputExistsError, CheckpointError)) or not isinstance(exc, Exception):
            raise
        raise CheckpointError(f"Writing the checkpoint to {output} failed: {type(exc).__name__}: {exc}") from exc
    logger.info("wrote %s (%.2f MB of weights)", output, weights_size(output) / 1e6)
    return output


def check_output_dir(output: Path, source: Path | None, overwrite: bool) -> None:
    """Refuse an output that is (inside) the source, contains it, or exists without ``overwrite``."""
    if source is not None:
        if output == source:
            raise OutputExistsError(f"The output folder {output} is the input model folder; choose another -o.")
        if source.is_relative_to(output):
            raise OutputExistsError(f"The output folder {output} contains the input model {source}; choose another -o.")
        if output.is_relative_to(source):
            raise OutputExistsError(f"The output folder {output} is inside the input model folder; choose another -o.")
    if not output.exists():
        return
    if not overwrite:
        raise OutputExistsError(f"Output folder {output} already exists; pass --overwrite or choose another -o.")
    if not output.is_dir():
        raise OutputExistsError(f"Output path {output} exists and is a file; remove it or choose another -o.")
    if any(output.iterdir()) and not (output / "config.json").exists():
        raise OutputExistsError(
            f"Output folder {output} is not empty and is not a model folder; refusing to replace it. "
            "Choose another -o."
        )


def sweep_stale_temp_dirs(output: Path) -> list[Path]:
    """Remove ``.uncurl-tmp-<name>-<pid>-*`` / ``.uncurl-old-*`` siblings left by runs that no longer exist."""
    removed = []
    if not output.parent.is_dir():
        return removed
    pattern = re.compile(rf"^(?:{re.escape(TEMP_PREFIX)}|{re.escape(OLD_PREFIX)}){re.escape(output.name)}-(\d+)-")
    for entry in output.parent.iterdir():
        match = pattern.match(entry.name)
        if match and entry.is_dir() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
            logger.info("removed leftover temporary folder %s", entry)
    return removed


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _copy_side_files(source: Path, target: Path) -> None:
    """Tokenizer files (and the generation config if the model did not write one) from the source folder."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
    if (source / "generation_config.json").is_file() and not (target / "generation_config.json").exists():
        shutil.copyfile(source / "generation_config.json", target / "generation_config.json")


@torch.no_grad()
def _validate_written(model: nn.Module, folder: Path) -> None:
    family = get_family(model)
    try:
        reloaded, info = family.auto_model_class().from_pretrained(
            str(folder), use_safetensors=True, local_files_only=True, output_loading_info=True
        )
    except Exception as exc:
        raise CheckpointError(f"The written checkpoint does not load back: {type(exc).__name__}: {exc}") from exc
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise CheckpointError(f"The written checkpoint loads with problems: {problems or info['error_msgs']}")
    reloaded.eval()
    inputs = {k: v.to(next(model.parameters()).device) for k, v in family.dummy_inputs(model).items()}
    was_training = model.training
    model.eval()
    try:
        expected = model(**inputs).logits
    finally:
        model.train(was_training)
    actual = reloaded(**{k: v.to(next(reloaded.parameters()).device) for k, v in inputs.items()}).logits
    if not torch.allclose(expected.float().cpu(), actual.float().cpu(), atol=1e-5, rtol=1e-4):
        raise CheckpointError("The written checkpoint does not reproduce the pruned model's outputs.")


def _move_into_place(temp: Path, output: Path) -> None:
    if not output.exists():
        os.replace(temp, output)
        return
    old = Path(tempfile.mkdtemp(prefix=f"{OLD_PREFIX}{output.name}-{os.getpid()}-", dir=output.parent))
    old.rmdir()
    os.replace(output, old)
    try:
        os.replace(temp, output)
    except OSError:
        os.replace(old, output)
        raise
    shutil.rmtree(old, ignore_errors=True)


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved in a checkpoint folder (local files only, never remote code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise CheckpointError(
            f"Cannot load a tokenizer from {path} ({type(exc).__name__}: {exc}). "
            "Copy the model's tokenizer files (tokenizer.json, tokenizer_config.json, ...) into the folder."
        ) from exc
