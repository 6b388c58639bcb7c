"""The check every in-memory write ends with (:func:`uncurl_hf.io.checkpoint.write_model_checkpoint`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from uncurl_hf.errors import CheckpointError
from uncurl_hf.families import get_family
from uncurl_hf.io.checks import compare_outputs, compare_written_tensors, compute_dtype, storage_state
from uncurl_hf.io.memory import release_memory, tensor_bytes


class WrittenCheck:
    """The written folder is the in-memory model: its tensors bit for bit, then a reload's forward pass.

    Bits first, because they are exact in every dtype and name the tensor that differs; the forward pass then checks
    what bits cannot (config.json and the classes it loads compute like the in-memory model), within a tolerance
    derived from the dtype (:func:`uncurl_hf.io.checks.forward_tolerance`): tight in float32, a few ulps in
    bfloat16/float16, where kernels may round a differently aligned copy of the same bytes differently. In two
    steps: everything that needs the in-memory model runs in the constructor (bits, the expected logits), so the
    model can be freed before :meth:`run` reloads the written folder.
    """

    @torch.no_grad()
    def __init__(self, model: nn.Module, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        self.folder = folder
        self.size = tensor_bytes(model)
        self.family = get_family(model)
        compare_written_tensors(model, folder, storage_state(model) if state is None else state)
        self.inputs = {k: v.to(next(model.parameters()).device) for k, v in self.family.dummy_inputs(model).items()}
        was_training = model.training
        model.eval()
        try:
            self.expected = model(**self.inputs).logits
        finally:
            model.train(was_training)
        self.dtype = compute_dtype(model)

    @torch.no_grad()
    def run(self) -> None:
        folder = self.folder
        release_memory(self.size)  # whatever the caller freed (the in-memory model) leaves before the reload
        reloaded = self._reload()
        reloaded.eval()
        actual = reloaded(**{k: v.to(next(reloaded.parameters()).device) for k, v in self.inputs.items()}).logits
        del reloaded
        compare_outputs(self.expected, actual, self.dtype, folder)
        release_memory(self.size)

    def _reload(self) -> nn.Module:
        """The written folder loaded as a user's Auto class would load it, read block by block.

        Why not ``from_pretrained``: at Qwen3-30B-A3B shapes its load of the written 1.3 GB folder peaked at 3.15 GB
        (the file's pages resident beside its own copies), the highest point of a whole prune once the surgery
        stopped being one (``benchmarks/memory.py``). The block reader builds the same class from config.json and
        places the same tensors through the model's own weight converters (tests/test_blockwise_load.py): the load
        path of ``load_model(..., blockwise=True)``. Where its map does not apply, the folder is loaded with
        ``from_pretrained`` and its loading report.
        """
        from uncurl_hf.io.checkpoint import _load_blockwise  # lazy: checkpoint imports this module

        try:
            reloaded = _load_blockwise(self.folder, self.family)  # None where the block map does not apply
        except Exception as exc:
            raise self._unloadable(exc) from exc
        if reloaded is not None:
            return reloaded
        try:
            reloaded, info = self.family.auto_model_class().from_pretrained(
                str(self.folder), use_safetensors=True, local_files_only=True, output_loading_info=True
            )
        except Exception as exc:
            raise self._unloadable(exc) from exc
        problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
        if problems or info.get("error_msgs"):
            raise CheckpointError(
                f"The written checkpoint loads with problems: {problems or info['error_msgs']}. Nothing was written; "
                "this is a bug in uncurl-hf's writer: please report it with the plan (--dry-run writes it)."
            )
        return reloaded

    @staticmethod
    def _unloadable(exc: Exception) -> CheckpointError:
        return CheckpointError(
            f"The written checkpoint does not load back: {type(exc).__name__}: {exc}. Nothing was written; this is "
            "a bug in uncurl-hf's writer for this model family: please report it with the plan (--dry-run writes it)."
        )
