"""How calibration reads the model: expert output norms come from the model's own forward (or, when they cannot,
from running the expert again) and always equal a direct recomputation; the token sample depends on the data only."""

from __future__ import annotations

import pytest
import torch
from helpers import CALIBRATION_TARGETS, CALIBRATION_TEXTS, tiny_switch_model, tiny_tokenizer

from uncurl_hf import build_batches, calibrate
from uncurl_hf.families import get_family
from uncurl_hf.tasks import Example

EXAMPLES = [Example(s, t) for s, t in zip(CALIBRATION_TEXTS, CALIBRATION_TARGETS)]


def expected_norm_sums(family, model, stats) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, from the sampled inputs (every real token: the sample is larger than the data): sum over tokens of
    ``||expert(x)||`` and ``gate * ||expert(x)||`` for the router's top-1 expert, computed directly."""
    sums = {}
    with torch.no_grad():
        for layer in family.sparse_layers(model):
            s = stats[layer.name]
            assert s.hidden_sample.shape[0] == s.num_tokens  # the sample holds every token
            probs = torch.softmax(family.router_logits(layer, s.hidden_sample), dim=-1)
            gate, chosen = probs.max(dim=-1)
            norms = torch.stack([layer.experts[int(e)](x[None])[0].norm() for x, e in zip(s.hidden_sample, chosen)])
            plain = torch.zeros(layer.num_experts, dtype=torch.float64).index_add_(0, chosen, norms.double())
            weighted = torch.zeros(layer.num_experts, dtype=torch.float64).index_add_(
                0, chosen, (norms * gate).double()
            )
            sums[layer.name] = (plain, weighted)
    return sums


@pytest.fixture()
def count_expert_reruns(monkeypatch):
    """Counts calls of ``family.run_expert`` (calibration's fallback when the forward's outputs are not usable)."""
    calls: list[int] = []
    family_class = type(get_family(tiny_switch_model()))
    original = family_class.run_expert

    def counting(self, layer, index, hidden):
        calls.append(index)
        return original(self, layer, index, hidden)

    monkeypatch.setattr(family_class, "run_expert", counting)
    return calls


@pytest.mark.parametrize("capacity, reruns", [(64, False), (1, True)])
def test_expert_norms_equal_a_direct_recomputation(capacity, reruns, count_expert_reruns):
    """capacity 64 never drops a token: norms are read off the forward (no expert runs twice). Capacity 1 drops
    tokens, so the forward's outputs miss some routed tokens: calibration re-runs the experts, and the statistics
    still cover every routed token (counts are the router's choice, before the capacity drop)."""
    model = tiny_switch_model(seed=2, expert_capacity=capacity)
    family = get_family(model)
    batches = build_batches(EXAMPLES, tiny_tokenizer(), batch_size=5, max_length=16)
    stats = calibrate(model, family, batches, max_logit_samples=10_000, progress=False)
    assert bool(count_expert_reruns) is reruns
    for name, (plain, weighted) in expected_norm_sums(family, model, stats).items():
        assert int(stats[name].counts.sum()) == stats[name].num_tokens
        torch.testing.assert_close(stats[name].output_norm_sum, plain, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(stats[name].weighted_output_norm_sum, weighted, rtol=1e-5, atol=1e-4)


def test_router_logits_come_from_the_model_and_match_the_family():
    model = tiny_switch_model(seed=3)
    family = get_family(model)
    stats = calibrate(model, family, build_batches(EXAMPLES, tiny_tokenizer(), batch_size=4), progress=False)
    for layer in family.sparse_layers(model):
        recomputed = family.router_logits(layer, stats[layer.name].hidden_sample)
        torch.testing.assert_close(stats[layer.name].logit_sample, recomputed, rtol=1e-5, atol=1e-6)


def test_sample_depends_on_the_data_not_on_batching_or_padding():
    """Sampling keys hash (seed, layer, sequence index, position among real tokens): batch size and extra padding
    do not change which tokens are sampled."""
    model = tiny_switch_model(seed=4)
    family = get_family(model)
    tokenizer = tiny_tokenizer()

    def sample(batches):
        stats = calibrate(model, family, batches, max_logit_samples=15, seed=9, progress=False)
        return {name: s.sample_tokens for name, s in stats.items()}

    reference = sample(build_batches(EXAMPLES, tokenizer, batch_size=1))
    padded = build_batches(EXAMPLES, tokenizer, batch_size=5, max_length=32)
    for batch in padded:  # 4 more padding positions on both sides
        for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", -100), ("decoder_attention_mask", 0)):
            batch[key] = torch.cat([batch[key], torch.full((batch[key].shape[0], 4), fill)], dim=1)
    for batches in (build_batches(EXAMPLES, tokenizer, batch_size=12), padded):
        got = sample(batches)
        for name, tokens in reference.items():
            assert tokens.shape == (15, 2)
            assert torch.equal(got[name], tokens), name
