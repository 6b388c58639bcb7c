"""Reusable builders for tests: a tiny word-level tokenizer and tiny random-init Switch Transformers checkpoints.

Import from tests as ``from helpers import make_tiny_switch`` (pytest puts ``tests/`` on ``sys.path``).
Models are real ``SwitchTransformersForConditionalGeneration`` instances from real configs, saved with
``save_pretrained`` (safetensors) next to a ``PreTrainedTokenizerFast``; no mocks.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 = Switch/T5 pad, eos, unk
WORDS = (
    "sentiment : the a an and or but not very really quite so too movie film story plot actor actress "
    "director scene music ending script cast role it this that is was are were be has have had good great "
    "fine fun funny moving smart clever charming lovely best better brilliant wonderful bad awful boring "
    "dull weak poor worst terrible silly slow mess flat long short dark light love loved hate hated like "
    "liked enjoy enjoyed watch watched feel felt make made with without of to in on for at by from as "
    "positive negative yes no summarize translate question answer i me , . acting"
).split()
VOCAB = SPECIAL_TOKENS + WORDS

CALIBRATION_TEXTS = [
    "sentiment : the movie was very good and the cast was great",
    "sentiment : a boring film with a weak plot",
    "sentiment : it is a charming and funny story",
    "sentiment : the worst script , the acting was awful",
    "sentiment : i loved the music but the ending was slow",
    "sentiment : not a good movie",
    "sentiment : brilliant director , wonderful actress and a moving scene",
    "sentiment : dull , long and flat",
    "sentiment : this film is fun to watch",
    "sentiment : the story felt like a mess",
    "sentiment : quite clever and really lovely",
    "sentiment : too silly for me",
]
CALIBRATION_TARGETS = ["positive", "negative"] * 6

# Experts made unreachable (router bias -1e4) in `unequal_banned_switch_dir`: unequal numbers per layer.
BANNED_UNEQUAL = {
    "encoder.block.1": [0, 3, 5],
    "encoder.block.3": [1, 2, 3, 4, 5, 6],
    "decoder.block.1": [2],
    "decoder.block.3": [],
}
# Exactly half of the experts of every layer unreachable: `frequency` at factor 2 must remove these.
BANNED_HALF = {
    "encoder.block.1": [1, 3, 5, 7],
    "encoder.block.3": [0, 1, 2, 3],
    "decoder.block.1": [4, 5, 6, 7],
    "decoder.block.3": [0, 2, 4, 6],
}


def tiny_tokenizer() -> Any:
    """A word-level ``PreTrainedTokenizerFast`` that appends ``</s>`` like T5 (pad 0, eos 1, unk 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_switch_config(**overrides: Any) -> Any:
    """A 4+4-layer Switch config (2 sparse encoder + 2 sparse decoder layers, 8 experts, d_model 32)."""
    from transformers import SwitchTransformersConfig

    values: dict[str, Any] = dict(
        vocab_size=len(VOCAB),
        d_model=32,
        d_kv=8,
        d_ff=32,
        num_heads=4,
        num_layers=4,
        num_sparse_encoder_layers=2,
        num_decoder_layers=4,
        num_sparse_decoder_layers=2,
        num_experts=8,
        expert_capacity=64,  # > any test sequence length: no token is ever dropped
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        router_jitter_noise=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    values.update(overrides)
    return SwitchTransformersConfig(**values)


def tiny_switch_model(seed: int = 0, **overrides: Any) -> Any:
    """A random-init (seeded) tiny ``SwitchTransformersForConditionalGeneration`` in eval mode."""
    from transformers import SwitchTransformersForConditionalGeneration

    torch.manual_seed(seed)
    return SwitchTransformersForConditionalGeneration(tiny_switch_config(**overrides)).eval()


def ban_experts(model: Any, banned: dict[str, list[int]]) -> None:
    """Make experts unreachable: router bias -1e4 (their softmax probability is exactly 0 in float32).

    ``banned`` maps layer names (``encoder.block.1``) to expert indices. Needs ``router_bias=True``.
    """
    from uncurl_hf.families import get_family

    layers = {layer.name: layer for layer in get_family(model).sparse_layers(model)}
    with torch.no_grad():
        for name, experts in banned.items():
            bias = layers[name].router.bias
            assert bias is not None, "build the model with router_bias=True to ban experts"
            bias.zero_()
            bias[list(experts)] = -1e4


def make_tiny_switch(
    tmp_path: Path,
    name: str = "switch",
    seed: int = 0,
    banned: dict[str, list[int]] | None = None,
    **overrides: Any,
) -> Path:
    """Save a tiny Switch model + tokenizer under ``tmp_path / name`` and return the folder.

    ``banned`` (layer -> expert indices) makes those experts never selected (see :func:`ban_experts`).
    Other keyword arguments override :func:`tiny_switch_config`.
    """
    if banned:
        overrides.setdefault("router_bias", True)
    model = tiny_switch_model(seed=seed, **overrides)
    if banned:
        ban_experts(model, banned)
    folder = Path(tmp_path) / name
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def make_tiny_t5(tmp_path: Path, name: str = "t5") -> Path:
    """A tiny dense T5 checkpoint (not an MoE model) with the same tokenizer."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=len(VOCAB), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    folder = Path(tmp_path) / name
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def write_calibration_file(
    path: Path, texts: list[str] = CALIBRATION_TEXTS, targets: list[str] | None = None
) -> Path:
    """``.txt`` (one text per line) or ``.jsonl`` (``text`` + optional ``target``) depending on the suffix."""
    path = Path(path)
    if path.suffix == ".jsonl":
        rows = [{"text": t, **({"target": targets[i]} if targets else {})} for i, t in enumerate(texts)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path


def hash_tree(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder``."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def calibrate_one_block_at_a_time(offloaded: Any, blocks: list[str], batches: list[Any]) -> None:
    """Calibrate an offloaded model and assert that exactly one block holds real weights whenever a block runs,
    and that every block was loaded and freed once per batch, in forward order."""
    from uncurl_hf import calibrate

    model = offloaded.model
    in_memory_seen: list[int] = []  # blocks holding real weights when each block starts its forward

    def count(_module: Any, _args: Any) -> None:
        in_memory_seen.append(sum(not next(model.get_submodule(b).parameters()).is_meta for b in blocks))

    handles = [model.get_submodule(b).register_forward_pre_hook(count) for b in blocks]
    try:
        calibrate(model, offloaded.family, batches, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    counters = offloaded.counters
    # our pre-hook runs after the offload hook has loaded the block: exactly that one block is in memory
    assert in_memory_seen == [1] * (len(blocks) * len(batches))
    assert counters.loads == counters.frees == len(blocks) * len(batches)
    assert counters.peak_blocks_in_memory == 1 and counters.blocks_in_memory == 0
    assert counters.loaded_blocks[: len(blocks)] == blocks  # forward order



# -- the recipe API in tests -------------------------------------------------------------------------------------
# Tests name settings flat (factor=2, task=..., streaming=True); these helpers route each name to the recipe, its
# calibration spec or the run options, so a test reads like the call it specifies. The public API is
# ``uncurl_hf.prune(model, PruneRecipe(...), output_dir, RunOptions(...))``; tests/test_recipe.py uses it directly.
_RENAMED = {"calibration_file": "file", "num_calibration_examples": "num_examples", "method_kwargs": "method_options"}


def _split_settings(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    from dataclasses import fields

    from uncurl_hf import CalibrationSpec, PruneRecipe, RunOptions

    names = [{f.name for f in fields(cls)} for cls in (PruneRecipe, CalibrationSpec, RunOptions)]
    parts: tuple[dict[str, Any], dict[str, Any], dict[str, Any]] = ({}, {}, {})
    for key, value in settings.items():
        key = _RENAMED.get(key, key)
        index = next((i for i, known in enumerate(names) if key in known and key != "calibration"), None)
        if index is None:
            raise TypeError(f"no recipe, calibration or run setting named {key!r}")
        parts[index][key] = value
    return parts


def make_recipe(**settings: Any) -> Any:
    """A :class:`PruneRecipe` from flat setting names (recipe and calibration fields)."""
    from uncurl_hf import CalibrationSpec, PruneRecipe

    recipe, calibration, options = _split_settings(settings)
    if options:
        raise TypeError(f"run options {sorted(options)} are not recipe settings")
    return PruneRecipe(**recipe, calibration=CalibrationSpec(**calibration))


def prune_flat(model: Any, output_dir: Any, **settings: Any) -> Any:
    """``uncurl_hf.prune(model, recipe, output_dir, options)`` with the settings routed by name."""
    import uncurl_hf
    from uncurl_hf import CalibrationSpec, PruneRecipe, RunOptions

    recipe, calibration, options = _split_settings(settings)
    return uncurl_hf.prune(model, PruneRecipe(**recipe, calibration=CalibrationSpec(**calibration)), output_dir,
                           RunOptions(**options))


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as the module ``<name>_benchmark`` (the scripts are not a package). It is
    registered in ``sys.modules`` first: dataclasses resolve their annotations through it."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
