"""Loading, inspecting and writing checkpoints safely.

Loading accepts only local folders with ``config.json`` + safetensors weights (:func:`uncurl_hf.io.resolve.resolve_model`
turns zoo names and Hub ids into such folders); pickle ``.bin`` files can execute code and are refused unless
``allow_pickle`` (then read with ``torch.load(weights_only=True)``), and code shipped with a checkpoint (``auto_map``)
runs only with ``trust_remote_code``. Writing goes through the atomic protocol of :mod:`uncurl_hf.io.atomic` (a
hidden temporary folder next to the output, renamed into place last): the written folder is reloaded and checked
against the in-memory model and gets an integrity manifest (:mod:`uncurl_hf.io.manifest`, checked by ``uncurl
verify``) first. Output files are deterministic: same model + plan -> byte-identical folder.

Two parameter counters, because they count different things: :func:`count_parameters` counts a model's distinct
parameters in memory (tied ones once, buffers not at all), :func:`stored_parameters` the values stored in a folder's
safetensors files (what is on disk, persistent buffers included, tied tensors stored once), read from the headers
without loading anything. For the checkpoints uncurl-hf handles the two agree; the streaming path, which never
builds the model, can only use the second.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from uncurl_hf.errors import (
    CheckpointError,
    ModelNotFoundError,
    RemoteCodeError,
    UnsupportedModelError,
)
from uncurl_hf.families import get_family
from uncurl_hf.families.base import MoEFamily
from uncurl_hf.io.access import check_readable_file, check_readable_folder
from uncurl_hf.io.atomic import write_atomically
from uncurl_hf.io.checks import check_model_finite, check_shapes_match_config, storage_state
from uncurl_hf.io.memory import release_memory, tensor_bytes
from uncurl_hf.io.placement import placement
from uncurl_hf.io.safetensors import SAFE_WEIGHTS_INDEX_NAME, stored_tensors, weight_files
from uncurl_hf.io.written import WrittenCheck
from uncurl_hf.plan import PLAN_FILENAME, PruningPlan

logger = logging.getLogger(__name__)

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
# Tokenizer files that hold a vocabulary; without one, AutoTokenizer silently builds an untrained tokenizer.
VOCABULARY_FILES = (
    "tokenizer.json",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "sentencepiece.bpe.model",
)


def weights_size(path: str | Path) -> int:
    """Bytes taken by the safetensors weights of a checkpoint folder (the files :func:`weight_files` lists)."""
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


def stored_parameters(folder: str | Path) -> int:
    """Number of values stored in a checkpoint's safetensors files, from their headers (tied tensors are stored, and
    counted, once); see the module docstring for how it differs from :func:`count_parameters`."""
    return sum(stored.numel for stored in stored_tensors(folder).values())


def read_config(folder: str | Path) -> dict[str, Any]:
    """A checkpoint folder's ``config.json`` as a dict; :class:`CheckpointError` when it is unreadable or not an object."""
    config_path = Path(folder) / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"Cannot read {config_path}: {exc}. Restore a valid config.json.") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} is not a JSON object; restore a valid config.json.")
    return config


def disk_layer_sizes(folder: str | Path, family: MoEFamily | None = None) -> dict[str, int]:
    """``{layer name: num_experts}`` of a checkpoint folder, from ``config.json`` and the tensor keys only."""
    config = read_config(folder)
    family = family or get_family(config)
    return {layer.name: layer.num_experts for layer in family.disk_layers(config, list(stored_tensors(folder)))}


def inspect_checkpoint(path: str | Path, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> MoEFamily:
    """Cheap checks of a checkpoint folder without loading weights; returns its family.

    Raises :class:`ModelNotFoundError` (no folder / no config.json / no weights), :class:`RemoteCodeError`
    (``auto_map`` to code shipped with the checkpoint, without ``trust_remote_code``), :class:`UnsupportedModelError`
    (not an MoE family uncurl-hf supports) or :class:`CheckpointError` (pickle-only weights without
    ``allow_pickle``, corrupt files, an index naming a missing shard; its subclasses :class:`AccessDeniedError` for
    a folder or file this user cannot read and :class:`BrokenSymlinkError` for a symlink loop or a dangling symlink).
    """
    folder = Path(path)
    if not folder.exists():
        raise ModelNotFoundError(
            f"Model path {folder} does not exist. Give a local checkpoint folder holding config.json and "
            "*.safetensors (download Hub models first, e.g. with `hf download <repo> --local-dir DIR`)."
        )
    if not folder.is_dir():
        raise ModelNotFoundError(f"Model path {folder} is a file; give the checkpoint folder that contains it.")
    check_readable_folder(folder)  # permissions and broken symlinks: named here, not as an unexpected OSError later
    config_path = folder / "config.json"
    for name in ("config.json", SAFE_WEIGHTS_INDEX_NAME, "generation_config.json", *TOKENIZER_FILES):
        check_readable_file(folder / name, "checkpoint file")
    if not config_path.is_file():
        raise ModelNotFoundError(
            f"{folder} has no config.json, so it is not a transformers checkpoint folder; point at the folder "
            "written by save_pretrained."
        )
    config_dict = read_config(folder)
    if not trust_remote_code:
        _refuse_remote_code(config_dict, config_path)
    family = get_family(config_dict)
    _check_config_values(folder, trust_remote_code)
    _check_weights(folder, allow_pickle)
    return family


def _check_config_values(folder: Path, trust_remote_code: bool) -> None:
    """Build the config object (cheap): wrong field types or values fail here, named, before anything is loaded."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises ValueError, TypeError, strict-dataclass errors, ...
        raise CheckpointError(
            f"{folder / 'config.json'} has invalid values ({type(exc).__name__}: {exc}). Restore the config.json "
            "that came with the weights."
        ) from exc


def load_model(
    path: str | Path,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    device: str = "cpu",
    dtype: str | torch.dtype = "auto",
    blockwise: bool = False,
) -> nn.Module:
    """Load a local sparse-MoE checkpoint for pruning (eval mode).

    Safetensors weights are preferred. Pickle weights (``pytorch_model*.bin``) are read only with ``allow_pickle``,
    and then through ``torch.load(weights_only=True)``, which rebuilds tensors and containers but refuses to call
    arbitrary functions. Code shipped with the checkpoint runs only with ``trust_remote_code``. A checkpoint that
    loads with missing, unexpected or mis-shaped tensors is refused (transformers would silently random-init them).

    ``dtype``: ``"auto"`` (the checkpoint's dtype, as transformers decides it), ``"float32"``, ``"bfloat16"`` or
    ``"float16"``. ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` (the loaded model is moved there), or
    ``"auto"`` (accelerate's ``device_map="auto"``); see :mod:`uncurl_hf.io.placement`. Both are checked before
    anything is read: :class:`~uncurl_hf.errors.DeviceError` when the device is not available here.
    Raises the errors of :func:`inspect_checkpoint`, and :class:`CheckpointError` when transformers cannot load it,
    when a stored tensor's shape is not the one config.json implies (read from the headers before loading, so the
    message names the tensor and both shapes), or when a sparse layer's router or expert weights hold NaN/Inf
    (checked after loading, before any calibration; :mod:`uncurl_hf.io.checks`).

    ``blockwise``: read a dense safetensors checkpoint block by block with the project's reader
    (:func:`uncurl_hf.io.tensor_map.load_resident`): the same tensors, at about 1x the weights' bytes where
    ``from_pretrained`` peaks at ~2.4x, with parameters that do not require grad (for pruning, not training). Where
    that map does not apply (pickle weights, quantized or remote-code checkpoints, another device or dtype, keys the
    map cannot place) the checkpoint loads through ``from_pretrained`` as without it.
    """
    where = placement(device, dtype)
    folder = Path(path)
    family = inspect_checkpoint(folder, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    use_safetensors = bool(weight_files(folder))
    if use_safetensors:
        check_shapes_match_config(folder)  # a config that disagrees with the weights, named before loading
    model = None
    if blockwise and use_safetensors and not trust_remote_code and where.move_to is None and not where.load_kwargs \
            and "quantization_config" not in read_config(folder):
        model = _load_blockwise(folder, family)
    if model is None:
        model = _from_pretrained(folder, family, use_safetensors, trust_remote_code, where.load_kwargs)
    if not family.sparse_layers(model):
        raise UnsupportedModelError(f"{folder} has no sparse MoE layers (num_sparse_*_layers = 0); nothing to prune.")
    check_model_finite(model, family, folder)  # NaN/Inf in a router or expert: named now, before calibration
    if where.move_to is not None:
        model.to(where.move_to)
    logger.info("loaded %s (%s, %d parameters)", folder, type(model).__name__, count_parameters(model))
    return model


def _load_blockwise(folder: Path, family: MoEFamily) -> nn.Module | None:
    """The model read block by block (:func:`uncurl_hf.io.tensor_map.load_resident`), or ``None`` where the map
    does not place every stored tensor (``from_pretrained`` then loads it and names what is wrong)."""
    from uncurl_hf.io.tensor_map import TensorMapError, load_resident

    try:
        return load_resident(folder, family.auto_model_class())
    except TensorMapError as exc:
        logger.info("block-by-block load not possible (%s); loading with from_pretrained", exc)
        return None


def _from_pretrained(folder: Path, family: MoEFamily, use_safetensors: bool, trust_remote_code: bool,
                     load_kwargs: dict[str, Any]) -> nn.Module:
    """transformers' loader, with its failures turned into messages that name the fix."""
    try:
        model, info = family.auto_model_class().from_pretrained(
            str(folder),
            use_safetensors=use_safetensors,
            weights_only=True,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
            **load_kwargs,
        )
    except pickle.UnpicklingError as exc:  # weights_only=True met something that is not a tensor or a container
        lines = str(exc).splitlines() or [type(exc).__name__]
        first_line = next((line for line in lines if "GLOBAL" in line), lines[0])
        raise CheckpointError(
            f"The pickle weights in {folder} hold more than tensors, and torch.load(weights_only=True) refused them "
            f"({first_line.strip()}). Such a file can run code when unpickled: do not load it with other tools "
            "either; get safetensors weights from a source you trust."
        ) from exc
    except Exception as exc:  # transformers raises many types (OSError, ValueError, SafetensorError, ...)
        if "mismatched" in str(exc) or "size mismatch" in str(exc):  # shapes the header check could not compare
            raise CheckpointError(
                f"The tensor shapes in {folder} do not match its config.json ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0]}). Check config.json against the checkpoint (expert counts, hidden and "
                "intermediate sizes): restore the config.json that came with the weights, or re-download the "
                "checkpoint."
            ) from exc
        raise CheckpointError(
            f"Could not load the checkpoint in {folder}: {type(exc).__name__}: {exc}. Check that the folder is a "
            "complete save_pretrained output."
        ) from exc
    problems = {k: sorted(v)[:5] for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise CheckpointError(
            f"The weights in {folder} do not match its config.json ({problems or info['error_msgs']}); transformers "
            "would fill the gaps with random values. Re-download or re-save the checkpoint."
        )
    return model.eval()


def _refuse_remote_code(config_dict: dict[str, Any], config_path: Path) -> None:
    """Refuse a config whose model type exists only as code shipped with the checkpoint (``auto_map``).

    A model type known to transformers (or registered by uncurl-hf) loads with the installed code even when the
    config also carries an ``auto_map`` (our own pruned outputs do), so only unknown types need remote code.
    """
    auto_map = config_dict.get("auto_map")
    if not auto_map:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config_dict.get("model_type")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        return
    modules = sorted({str(v).split(".", 1)[0] for v in auto_map.values()}) if isinstance(auto_map, dict) else []
    raise RemoteCodeError(
        f"{config_path} needs Python code shipped with the checkpoint (model_type {model_type!r} is unknown to "
        f"transformers; auto_map points at {', '.join(f'{m}.py' for m in modules) or auto_map!r}). uncurl-hf does not "
        "run code from a checkpoint unless you pass --trust-remote-code (trust_remote_code=True) after reviewing it."
    )


def _check_weights(folder: Path, allow_pickle: bool = False) -> None:
    files = weight_files(folder)
    for file in files:
        check_readable_file(file, "weight file")
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles and not allow_pickle:
            raise CheckpointError(
                f"{folder} holds only pickle weights ({', '.join(pickles)}). uncurl-hf loads safetensors by default, "
                "because unpickling can run arbitrary code. If you trust the file, pass --allow-pickle "
                "(allow_pickle=True: loaded with torch.load(weights_only=True)), or convert it once with "
                "transformers' save_pretrained (which writes model.safetensors)."
            )
        if pickles:
            _check_index(folder, "pytorch_model.bin.index.json")
            return
        raise ModelNotFoundError(f"{folder} has a config.json but no *.safetensors weights; copy the weights in.")
    _check_index(folder, SAFE_WEIGHTS_INDEX_NAME)
    from safetensors import SafetensorError, safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(
                f"Weight file {file} is corrupt or truncated ({exc}); re-download or re-save the checkpoint."
            ) from exc


def _check_index(folder: Path, name: str) -> None:
    """A sharded checkpoint's index must parse and every shard it names must exist in the folder."""
    index = folder / name
    if not index.exists():
        return
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            f"The shard index {index} is unreadable ({type(exc).__name__}: {exc}); re-download or re-save the "
            "checkpoint."
        ) from exc
    missing = [shard for shard in shards if not (folder / str(shard)).is_file()]
    if missing:
        raise CheckpointError(
            f"The shard index {index} names {len(missing)} missing shard(s) ({', '.join(map(str, missing[:3]))}); "
            "the download or copy is incomplete. Re-download the checkpoint."
        )


def write_checkpoint(
    model: nn.Module,
    output_dir: str | Path,
    plan: PruningPlan,
    source_dir: str | Path | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    validate: bool = True,
    finalize: Callable[[Path], None] | None = None,
    sync: bool = True,
) -> Path:
    """Write ``model`` + ``plan`` (+ the source's tokenizer files) to ``output_dir`` atomically; return its path.

    The folder is assembled under a ``.uncurl-tmp-*`` sibling, reloaded with the family's Auto class and run on a
    dummy batch (must reproduce the in-memory logits, with no missing/unexpected keys), then renamed into place.
    ``finalize(temp_folder)``, if given, runs after validation and before the rename: what it adds (the model card,
    evaluated on the written files) is part of the atomic output, and if it fails nothing is written. Last,
    ``uncurl_manifest.json`` records the sha256 of every file (all fsynced unless ``sync=False``) for ``uncurl verify``.
    Raises :class:`OutputExistsError` when the output is the source (or contains it, or is inside it) or exists
    without ``overwrite``; :class:`CheckpointError` when writing or validation fails.
    """
    return write_model_checkpoint(
        [model], output_dir, plan, source_dir=source_dir, overwrite=overwrite, max_shard_size=max_shard_size,
        validate=validate, finalize=finalize, sync=sync,
    )


def write_model_checkpoint(
    held: list[nn.Module],
    output_dir: str | Path,
    plan: PruningPlan,
    source_dir: str | Path | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    validate: bool = True,
    finalize: Callable[[Path], None] | None = None,
    sync: bool = True,
) -> Path:
    """:func:`write_checkpoint` of ``held[0]``, emptying ``held`` once the model's logits for the reload check are
    computed, so a caller that holds no other reference frees the model before the written folder is reloaded (the
    pipeline: the in-memory model and its reload are never both alive). Same files, same checks."""

    size = tensor_bytes(held[0])

    def fill(temp: Path) -> None:
        model = held[0]
        state = storage_state(model)
        model.save_pretrained(str(temp), max_shard_size=max_shard_size, state_dict=dict(state))  # it pops entries
        plan.save(temp / PLAN_FILENAME)
        if source_dir is not None:
            copy_side_files(Path(source_dir).expanduser().resolve(), temp)
        release_memory(size)  # the writer's buffers
        if validate:
            check = WrittenCheck(model, temp, state)
            del model, state
            held.clear()
            check.run()
        else:
            held.clear()

    output = write_atomically(
        output_dir, fill, source_dir=source_dir, overwrite=overwrite, finalize=finalize, sync=sync
    )
    logger.info("wrote %s (%.2f MB of weights)", output, weights_size(output) / 1e6)
    return output


def copy_side_files(source: Path, target: Path) -> None:
    """Tokenizer files (and the generation config if the model did not write one) from the source folder."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
    if (source / "generation_config.json").is_file() and not (target / "generation_config.json").exists():
        shutil.copyfile(source / "generation_config.json", target / "generation_config.json")


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved in a checkpoint folder (local files only; remote code only with ``trust_remote_code``)."""
    from transformers import AutoTokenizer

    if not any((Path(path) / name).is_file() for name in VOCABULARY_FILES):
        raise CheckpointError(
            f"{path} has no tokenizer vocabulary ({', '.join(VOCABULARY_FILES[:3])}, ...): transformers would build "
            "an untrained tokenizer that maps every word to <unk>, and calibration would see only that. Copy the "
            "model's tokenizer files (tokenizer.json, tokenizer_config.json, ...) into the folder."
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise CheckpointError(
            f"Cannot load a tokenizer from {path} ({type(exc).__name__}: {exc}). "
            "Copy the model's tokenizer files (tokenizer.json, tokenizer_config.json, ...) into the folder."
        ) from exc
