"""Out-of-core surgery: apply a :class:`PruningPlan` to a checkpoint folder without loading the model.

:func:`stream_apply_plan` reads the source safetensors lazily and writes the reduced checkpoint shard by shard:

* a dry run on the **meta device** (no memory) computes every output tensor's key, dtype and shape: the family's
  on-disk methods and the shared surgery (:func:`uncurl_hf.surgery.apply.reduce_tensors`) run on meta tensors, so the shard
  layout and every shard's safetensors header are known before a byte is written;
* tensors no sparse layer owns (embeddings, attention, norms, dense FFs) are **copied as raw bytes** from the source
  file to the output file (``copy_file_range``): they are never decoded, never held in memory, and their dtype and
  bits are the source's by construction;
* each sparse layer is read, reduced and written while it is the only layer in memory: experts are read one at a
  time, and experts the plan drops are never read at all; every expert and router the output is made of is checked
  finite as it is read (a kept expert, copied as bytes, is read once for that check just before its copy), because
  the model is never loaded and so never scanned. Tensors outside the sparse layers are not decoded, so not checked:
  ``uncurl verify``'s forward pass catches non-finite values there;
* shards are written straight to their files (header first, then the tensors in the order ``safetensors`` itself
  lays them out), so no output shard is buffered: peak memory is about one layer's surviving experts plus the
  reduced layer.

The output is what the in-memory path (:func:`uncurl_hf.surgery.apply.apply_plan` + :func:`uncurl_hf.io.checkpoint
.write_checkpoint`) writes: the same tensors bit for bit (same merging code), the same ``config.json`` (the family's
:meth:`~uncurl_hf.families.base.MoEFamily.reduced_config_dict`), the modeling code and ``auto_map``, the plan, the
tokenizer and generation config of the source, a manifest, and the same atomic temp-folder-then-rename protocol
(:func:`uncurl_hf.io.atomic.write_atomically`). Shards follow the transformers conventions (``model.safetensors``,
or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``) but group tensors in key order, so a
multi-shard output splits differently from ``save_pretrained``'s module order (same tensors, other files); a
single-shard output folder is byte-identical to the in-memory one, card and manifest included.

Reading goes through :class:`uncurl_hf.io.safetensors.SafetensorsReader` (exact byte ranges into fresh tensors, see
there why not ``safe_open``), writing through :class:`uncurl_hf.io.shards.ShardWriter`; this module plans the output
tensors and runs the surgery layer by layer between the two.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from uncurl_hf.errors import CheckpointError
from uncurl_hf.families.base import DiskLayer, MoEFamily, ReducedLayer
from uncurl_hf.io.atomic import write_atomically
from uncurl_hf.io.checkpoint import (
    DEFAULT_MAX_SHARD_SIZE,
    copy_side_files,
    inspect_checkpoint,
    read_config,
    weights_size,
)
from uncurl_hf.io.checks import check_stored_finite
from uncurl_hf.io.manifest import FileDigest
from uncurl_hf.io.safetensors import MetaReader, SafetensorsReader, StoredTensor, safetensors_dtype, stored_tensors
from uncurl_hf.io.shards import OutputTensor, ShardWriter, shard_layout, shard_names, write_shard_index
from uncurl_hf.plan import PLAN_FILENAME, PruningPlan
from uncurl_hf.surgery.apply import reduce_tensors

logger = logging.getLogger(__name__)


class _SkippingReader:
    """The real reader, except that the keys in ``skip`` come back as meta tensors: outputs that are stored tensors
    unchanged are copied as bytes by the writer, so reading them would be wasted I/O."""

    def __init__(self, reader: SafetensorsReader, skip: set[str]) -> None:
        self._reader, self._skip = reader, skip
        self._meta = MetaReader(reader)

    def keys(self) -> list[str]:
        return self._reader.keys()

    def get(self, key: str) -> torch.Tensor:
        return self._meta.get(key) if key in self._skip else self._reader.get(key)

    def get_rows(self, key: str, index: int) -> torch.Tensor:
        return self._meta.get_rows(key, index) if key in self._skip else self._reader.get_rows(key, index)


def stream_apply_plan(
    source_dir: str | Path,
    plan: PruningPlan,
    output_dir: str | Path,
    *,
    family: MoEFamily | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    scale_expert_capacity: bool = True,
    base_model: str | None = None,
    trust_remote_code: bool = False,
    validate: bool = True,
    finalize: Callable[[Path], None] | None = None,
    progress: bool = False,
    sync: bool = True,
) -> Path:
    """Write ``source_dir`` reduced by ``plan`` to ``output_dir``, never holding more than one layer in memory.

    Same result as ``write_checkpoint(apply_plan(load_model(source_dir), family, plan), output_dir, plan,
    source_dir)`` (see the module docstring for what is identical), same atomic protocol and errors:
    :class:`InvalidPlanError` when the plan does not fit the checkpoint's layers, :class:`OutputExistsError`,
    :class:`CheckpointError`. ``validate`` re-reads the written headers (exactly the planned tensors) and checks
    that the layers the new ``config.json`` describes have the plan's counts, without building a model or reading
    weights (``uncurl verify`` does the full check). ``finalize(temp_folder)`` runs before the manifest (the model
    card), as in :func:`~uncurl_hf.io.checkpoint.write_checkpoint`. Shards are hashed (and with ``sync``, synced) while
    they are written, so the manifest does not read the weights again; ``sync=False`` skips every fsync (see
    :func:`~uncurl_hf.io.atomic.write_atomically`).
    """
    source = Path(source_dir).expanduser().resolve()
    checked = inspect_checkpoint(source, trust_remote_code=trust_remote_code)
    family = family or checked
    config = read_config(source)
    with SafetensorsReader(source) as reader:
        layers = family.disk_layers(config, reader.keys())
        if not layers:
            raise CheckpointError(f"{source} has no sparse MoE layers (config.json and tensors); nothing to prune.")
        plan.validate({layer.name: layer.num_experts for layer in layers})
        layer_plans = {layer.name: plan.layer(layer.name) for layer in layers}

        def reduce(layer: DiskLayer, tensors: Any) -> ReducedLayer:
            return reduce_tensors(
                layer_plans[layer.name],
                lambda index: family.read_disk_expert(layer, index, tensors),
                family.read_disk_router(layer, tensors),
                family.neuron_axes,
                num_experts=layer.num_experts,
                capacity=layer.expert_capacity,
                scale_expert_capacity=scale_expert_capacity,
                copy=False,  # the reader returns fresh tensors: a kept expert needs no second copy
                output_keys=family.output_keys,
            )

        outputs, reduced_meta = _plan_outputs(reader, family, layers, reduce)
        new_config = family.reduced_config_dict(config, reduced_meta, base_model=base_model or plan.base_model)
        shards = shard_layout(outputs, max_shard_size)

        def fill(temp: Path) -> dict[str, FileDigest]:
            digests = _write_shards(
                temp, shards, reader, family, {layer.name: layer for layer in layers}, reduce, progress, sync
            )
            model_class = _write_config_and_code(temp, new_config, family)
            plan.save(temp / PLAN_FILENAME)
            copy_side_files(source, temp)
            _write_generation_config(temp, model_class)
            if validate:
                _validate_written(temp, family, plan, [t.key for shard in shards for t in shard])
            return digests

        output = write_atomically(
            output_dir, fill, source_dir=source, overwrite=overwrite, finalize=finalize, sync=sync
        )
    logger.info("streamed %s -> %s (%.2f MB of weights)", source, output, weights_size(output) / 1e6)
    return output


def _plan_outputs(
    reader: SafetensorsReader,
    family: MoEFamily,
    layers: list[DiskLayer],
    reduce: Callable[[DiskLayer, Any], ReducedLayer],
) -> tuple[list[OutputTensor], dict[str, ReducedLayer]]:
    """Every output tensor, in key order (a layer's outputs where its first stored key was), and the meta
    :class:`ReducedLayer` of each layer (counts and capacities for the config).

    The surgery runs on meta tensors; a family whose methods cannot (an op without a meta kernel) gets a real run of
    that layer instead, which costs one extra read of it but still holds one layer at a time.
    """
    owner = {key: layer for layer in layers for key in layer.keys}
    meta = MetaReader(reader)
    reduced_meta: dict[str, ReducedLayer] = {}
    outputs: list[OutputTensor] = []
    for key in reader.keys():
        layer = owner.get(key)
        if layer is None:
            stored = reader.info(key)
            outputs.append(OutputTensor(key, stored.dtype, stored.shape, source=stored))
            continue
        if layer.name in reduced_meta:
            continue
        sources: dict[str, StoredTensor] = {}
        try:
            reduced = reduce(layer, meta)
            written = family.write_disk_layer(layer, reduced)
            for out_key, tensor in written.items():
                stored = meta.verbatim_source(tensor)
                if stored is not None and stored.dtype == safetensors_dtype(tensor.dtype) \
                        and stored.shape == tuple(tensor.shape):
                    sources[out_key] = stored
        except (NotImplementedError, RuntimeError) as exc:
            logger.debug("%s: meta dry run failed (%s); measuring the layer on real tensors", layer.name, exc)
            reduced = reduce(layer, reader)
            written = family.write_disk_layer(layer, reduced)
            reduced = _to_meta(reduced)
        meta.forget()
        reduced_meta[layer.name] = reduced
        for out_key in sorted(written):
            tensor = written[out_key]
            dtype = safetensors_dtype(tensor.dtype)
            # an output that is a stored tensor unchanged (a kept expert) is copied as bytes, like non-layer tensors
            outputs.append(OutputTensor(out_key, dtype, tuple(tensor.shape), source=sources.get(out_key),
                                        layer=layer.name))
        del written
    keys = [t.key for t in outputs]
    if len(set(keys)) != len(keys):
        clashes = sorted({key for key in keys if keys.count(key) > 1})
        raise CheckpointError(f"Output tensor names collide ({clashes[:3]}): a bug in the {family.name} family.")
    return outputs, reduced_meta


def _write_shards(
    folder: Path,
    shards: list[list[OutputTensor]],
    reader: SafetensorsReader,
    family: MoEFamily,
    layers: Mapping[str, DiskLayer],
    reduce: Callable[[DiskLayer, Any], ReducedLayer],
    progress: bool,
    sync: bool = True,
) -> dict[str, FileDigest]:
    """Write every shard (and the index when there are several), computing one layer's tensors at a time; return
    the shards' digests (hashed while written).

    A layer's outputs are cached only until they are all written; if a shard's layout interleaves two layers (mixed
    dtypes), the cache is dropped and the later layer recomputed when needed again, so memory stays one layer.
    Outputs that are stored tensors unchanged (``source`` set: kept experts) are copied as bytes; a kept expert is
    read once just before (so the copy comes from the page cache) to check its values are finite, because a NaN in it
    would otherwise reach the output unseen (:func:`~uncurl_hf.surgery.apply.reduce_tensors` checks what it reads).
    """
    from tqdm.auto import tqdm

    copied = {t.source.key for shard in shards for t in shard if t.layer is not None and t.source is not None}
    skipping = _SkippingReader(reader, copied)

    names = shard_names(len(shards))
    total = sum(t.nbytes for shard in shards for t in shard)
    cache_name: str | None = None
    cache: dict[str, torch.Tensor] = {}
    digests: dict[str, FileDigest] = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing shards", disable=not progress) as bar:
        for name, shard in zip(names, shards):
            writer = ShardWriter(folder / name, shard, {"format": "pt"}, sync=sync)
            try:
                for tensor in writer.order:
                    if tensor.source is not None:
                        if tensor.layer is not None:  # a kept expert: the surgery never decodes it, so check it here
                            check_stored_finite(reader, [tensor.source.key])
                        writer.copy(tensor.key, reader.handle(tensor.source.file))
                    else:
                        assert tensor.layer is not None
                        if cache_name != tensor.layer or tensor.key not in cache:
                            cache, cache_name = {}, None  # free the previous layer before computing the next
                            layer = layers[tensor.layer]
                            with torch.no_grad():
                                cache = dict(family.write_disk_layer(layer, reduce(layer, skipping)))
                            cache_name = tensor.layer
                            logger.debug("%s: reduced to %d tensors", tensor.layer, len(cache))
                        writer.write(tensor.key, cache.pop(tensor.key))
                    bar.update(tensor.nbytes)
            except BaseException:
                writer.abort()
                raise
            digests[name] = writer.close()
    if len(shards) > 1:
        write_shard_index(folder, names, shards)
    return digests


def _write_config_and_code(folder: Path, config_dict: Mapping[str, Any], family: MoEFamily) -> type | None:
    """``config.json`` as the family computed it, plus the modeling code its ``auto_map`` names; returns the model
    class ``config.json`` loads as (``None`` when transformers does not know it).

    The code files are the ones ``save_pretrained`` copies (``custom_object_save`` of the config and model classes,
    found through the Auto registries). No model is built: a meta-device model of a large MoE takes seconds per
    thousand experts to construct.
    """
    from transformers.dynamic_module_utils import custom_object_save
    from transformers.models.auto.auto_factory import _get_model_class
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    (folder / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n", "utf-8")
    model_type = config_dict.get("model_type")
    if model_type not in CONFIG_MAPPING:
        return None
    config_class = CONFIG_MAPPING[model_type]
    try:
        config = config_class.from_dict(dict(config_dict))
        model_class = _get_model_class(config, family.auto_model_class()._model_mapping)
    except (KeyError, ValueError):
        model_class = None
    auto_map = config_dict.get("auto_map") or {}
    for cls in (config_class, model_class):
        if cls is not None and getattr(cls, "_auto_class", None) is not None and cls._auto_class in auto_map:
            custom_object_save(cls, folder)
    return model_class


def _write_generation_config(folder: Path, model_class: type | None) -> None:
    """The source's ``generation_config.json`` (copied with the side files) or, for a generative model without one,
    the one transformers derives from the config, as ``save_pretrained`` writes it."""
    if (folder / "generation_config.json").exists() or model_class is None or not model_class.can_generate():
        return
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    GenerationConfig.from_model_config(config).save_pretrained(str(folder))


def _validate_written(folder: Path, family: MoEFamily, plan: PruningPlan, planned: list[str]) -> None:
    """The written folder, re-read from disk, holds exactly the planned tensors, and the layers its ``config.json``
    describes (family's view) have the plan's counts. No model is built, no weight read; ``uncurl verify`` adds
    the meta-model shape check and a forward pass."""
    written = list(stored_tensors(folder))
    if sorted(written) != sorted(planned):
        raise CheckpointError(f"The streamed shards in {folder} do not hold the planned tensors.")
    counts = {layer.name: layer.num_experts for layer in family.disk_layers(read_config(folder), written)}
    if counts != plan.counts:
        raise CheckpointError(f"The streamed checkpoint has expert counts {counts}, the plan says {plan.counts}.")


def _to_meta(reduced: ReducedLayer) -> ReducedLayer:
    return ReducedLayer(
        experts=[{k: torch.empty_like(v, device="meta") for k, v in e.items()} for e in reduced.experts],
        router={k: torch.empty_like(v, device="meta") for k, v in reduced.router.items()},
        expert_capacity=reduced.expert_capacity,
    )


__all__ = ["stream_apply_plan"]
