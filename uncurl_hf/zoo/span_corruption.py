"""T5-style span corruption (Raffel et al. 2020, sec. 3.1.4): the pretraining objective of the zoo.

About 15% of the tokens of a chunk, in spans of mean length 3, are replaced in the input by one sentinel
each; the target lists every sentinel followed by the tokens it hid. Masks come from a seeded numpy
generator so a recipe re-run sees the same corruption.
"""

from __future__ import annotations

import numpy as np


def _segment(rng: np.random.Generator, total: int, parts: int) -> np.ndarray:
    """Split ``total`` items into ``parts`` non-empty segments uniformly at random; return their lengths."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False)) if parts > 1 else np.array([], int)
    bounds = np.concatenate([[0], cuts, [total]])
    return np.diff(bounds)


def noise_mask(rng: np.random.Generator, length: int, density: float = 0.15, mean_span: float = 3.0) -> np.ndarray:
    """Boolean mask over ``length`` tokens with ~``density`` of them in spans of mean ``mean_span``."""
    num_noise = int(round(length * density))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = max(1, int(round(num_noise / mean_span)))
    num_spans = min(num_spans, num_noise, length - num_noise)
    noise_lengths = _segment(rng, num_noise, num_spans)
    keep_lengths = _segment(rng, length - num_noise, num_spans)
    mask = np.zeros(length, dtype=bool)
    pos = 0
    for keep, noise in zip(keep_lengths, noise_lengths):
        pos += keep
        mask[pos : pos + noise] = True
        pos += noise
    return mask


def corrupt(
    tokens: np.ndarray, rng: np.random.Generator, sentinel_ids: list[int], eos_id: int
) -> tuple[list[int], list[int]]:
    """Return (input_ids, labels) for one chunk of token ids (without eos)."""
    mask = noise_mask(rng, len(tokens))
    inputs: list[int] = []
    targets: list[int] = []
    span = -1
    prev = False
    for tok, is_noise in zip(tokens.tolist(), mask.tolist()):
        if is_noise:
            if not prev:
                span += 1
                sentinel = sentinel_ids[min(span, len(sentinel_ids) - 1)]
                inputs.append(sentinel)
                targets.append(sentinel)
            targets.append(tok)
        else:
            inputs.append(tok)
        prev = is_noise
    inputs.append(eos_id)
    targets.append(eos_id)
    return inputs, targets
