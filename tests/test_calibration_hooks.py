"""How calibration reads the model: expert output norms come from the model's own forward (or, when they cannot,
from running the expert again) and always equal a direct recomputation; the token sample depends on the data only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import CALIBRATION_TARGETS, CALIBRATION_TEXTS, tiny_switch_model, tiny_tokenizer

from uncurl_hf import build_batches, calibrate
from uncurl_hf.calibration import hooks, sampling
from uncurl_hf.calibration.sampling import token_keys
from uncurl_hf.evaluation.tasks import Example
from uncurl_hf.families import get_family
from uncurl_hf.seeding import stable_seed

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


# ---- what the fast paths must not change ---------------------------------------------------------------------------

FIELDS = ("num_tokens", "counts", "gate_mass", "output_norm_sum", "weighted_output_norm_sum", "logit_sample",
          "hidden_sample", "sample_tokens")


def assert_same_stats(actual, expected) -> None:
    """Every statistic of every layer identical, bit for bit."""
    assert list(actual) == list(expected) and actual.num_sequences == expected.num_sequences
    for name in expected:
        for field in FIELDS:
            got, want = getattr(actual[name], field), getattr(expected[name], field)
            assert got == want if isinstance(want, int) else torch.equal(got, want), (name, field)


@pytest.fixture()
def count_router_recomputations(monkeypatch):
    """Counts calls of ``family.router_logits`` (calibration's check of the router output, or its fallback)."""
    calls: list[str] = []
    family_class = type(get_family(tiny_switch_model()))
    original = family_class.router_logits

    def counting(self, layer, hidden):
        calls.append(layer.name)
        return original(self, layer, hidden)

    monkeypatch.setattr(family_class, "router_logits", counting)
    return calls


def test_router_logits_are_recomputed_once_per_layer_not_per_batch(count_router_recomputations):
    """The router's output is checked against a recomputation on the first batch only; the check's own call of the
    router must not be taken for the next batch's forward (which made every later batch recompute)."""
    model = tiny_switch_model(seed=3)
    family = get_family(model)
    batches = build_batches(EXAMPLES, tiny_tokenizer(), batch_size=2)
    assert len(batches) == 6
    calibrate(model, family, batches, progress=False)
    assert sorted(count_router_recomputations) == sorted(layer.name for layer in family.sparse_layers(model))


def test_a_re_run_batch_does_not_make_later_batches_re_run(count_expert_reruns):
    """Capacity 2 drops tokens of long sequences only: the long batch re-runs its experts, the short batches after it
    read the forward's outputs (the re-run's own expert calls are not taken for theirs), and the norms still equal a
    direct recomputation."""
    model = tiny_switch_model(seed=2, expert_capacity=2)
    family = get_family(model)
    tokenizer = tiny_tokenizer()
    long = build_batches(EXAMPLES[:4], tokenizer, batch_size=4)
    short = build_batches([Example(w, "good") for w in ("fun", "dull", "lovely", "boring")], tokenizer, batch_size=2)

    def reruns(batches) -> int:
        count_expert_reruns.clear()
        stats = calibrate(model, family, batches, max_logit_samples=10_000, progress=False)
        return len(count_expert_reruns), stats

    long_alone, _ = reruns(long)
    short_alone, _ = reruns(short)
    assert long_alone > 0 and short_alone == 0  # the premise: only long sequences overflow capacity 2
    together, stats = reruns(long + short)
    assert together == long_alone
    for name, (plain, weighted) in expected_norm_sums(family, model, stats).items():
        torch.testing.assert_close(stats[name].output_norm_sum, plain, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(stats[name].weighted_output_norm_sum, weighted, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("max_samples", [1, 6, 10_000])
def test_sample_is_the_smallest_keys_in_token_order_for_lists_and_streams(max_samples):
    """A list of batches has each layer's sample chosen before the forward; batches that can only be iterated once
    are sampled on the fly (buffered, cut back to the smallest keys). Both give exactly the ``max_samples`` tokens
    with the smallest keys (brute force over every real token), listed in (sequence, position) order, with the
    logits and inputs those tokens have in a run that samples everything."""
    model = tiny_switch_model(seed=5)
    family = get_family(model)
    batches = build_batches(EXAMPLES, tiny_tokenizer(), batch_size=1)  # 12 batches: the stream is cut many times
    everything = calibrate(model, family, batches, max_logit_samples=10_000, seed=7, progress=False)
    listed = calibrate(model, family, batches, max_logit_samples=max_samples, seed=7, progress=False)
    streamed = calibrate(model, family, iter(batches), max_logit_samples=max_samples, seed=7, progress=False)
    assert_same_stats(streamed, listed)
    for name, full in everything.items():
        assert full.sample_tokens.shape[0] == full.num_tokens  # every real token, in token order
        sequence, position = full.sample_tokens[:, 0], full.sample_tokens[:, 1]
        keys = token_keys(stable_seed(7, "calibration-sample", name), sequence, position)
        winners = torch.argsort(keys)[:max_samples].sort().values  # distinct 63-bit keys: no ties here
        assert torch.equal(listed[name].sample_tokens, full.sample_tokens[winners]), name
        assert torch.equal(listed[name].logit_sample, full.logit_sample[winners]), name
        assert torch.equal(listed[name].hidden_sample, full.hidden_sample[winners]), name


@pytest.mark.parametrize("capacity", [64, 3])
def test_bookkeeping_for_many_batches_at_once_equals_batch_by_batch(capacity, monkeypatch):
    """Counts and float64 sums wait until many batches are routed and are then computed together; flushing after
    every batch gives the same statistics bit for bit (capacity 3 mixes re-run batches with forward-read ones)."""
    model = tiny_switch_model(seed=2, expert_capacity=capacity)
    family = get_family(model)
    batches = build_batches(EXAMPLES, tiny_tokenizer(), batch_size=3)
    together = calibrate(model, family, batches, max_logit_samples=9, progress=False)
    monkeypatch.setattr(hooks, "_FLUSH_BYTES", 1)
    one_by_one = calibrate(model, family, batches, max_logit_samples=9, progress=False)
    assert_same_stats(together, one_by_one)


def test_a_model_in_training_mode_is_calibrated_in_eval_mode_and_left_training():
    """Dropout and router jitter are off while calibrating (the statistics equal those of the model in eval
    mode), and the model is handed back in training mode."""
    model = tiny_switch_model(seed=6, dropout_rate=0.3, router_jitter_noise=0.3)
    family = get_family(model)
    batches = build_batches(EXAMPLES, tiny_tokenizer(), batch_size=4)
    in_eval = calibrate(model, family, batches, progress=False)
    model.train()
    in_train = calibrate(model, family, batches, progress=False)
    assert model.training and all(module.training for module in model.modules())
    assert_same_stats(in_train, in_eval)


def test_ties_at_the_cut_are_broken_by_sequence_then_position():
    keys = np.array([5, 1, 5, 5])
    sequence = np.array([0, 0, 1, 0])
    position = np.array([2, 0, 0, 1])
    # key 1 first, then of the three keys 5 the token (sequence 0, position 1)
    assert sampling._smallest(keys, sequence, position, 2).tolist() == [1, 3]
    assert sampling._smallest(keys, sequence, position, 3).tolist() == [0, 1, 3]
    assert sampling._smallest(keys, sequence, position, 9).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("family_name", ["qwen3_moe", "mixtral", "olmoe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_top_k_routers_own_logits_are_reused_and_give_the_same_statistics(family_name, dtype, monkeypatch):
    """Decoder top-k routers return (logits, scores, indices); their logits are what router_logits computes, so
    calibration recomputes them only to check the first batch of each layer, and the statistics are bit for bit
    those of always recomputing."""
    from test_families_decoder import tiny_model

    model = tiny_model(family_name).to(dtype)
    family = get_family(model)
    ids = torch.randint(3, model.config.vocab_size, (12, 10), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in ids.split(4)]
    calls = []
    original = type(family).router_logits
    monkeypatch.setattr(type(family), "router_logits",
                        lambda self, layer, hidden: calls.append(layer.name) or original(self, layer, hidden))
    reused = calibrate(model, family, batches, progress=False)
    layers = [layer.name for layer in family.sparse_layers(model)]
    assert sorted(calls) == sorted(layers)  # one check per layer, on the first batch

    monkeypatch.setattr(hooks.LayerCollector, "_capture_router", lambda self, module, args, output: None)
    recomputed = calibrate(model, family, batches, progress=False)
    assert len(calls) == len(layers) * (1 + len(batches))
    for name in layers:
        assert torch.equal(reused[name].counts, recomputed[name].counts), name
        assert torch.equal(reused[name].mean_applied_output_norm, recomputed[name].mean_applied_output_norm), name
        assert torch.equal(reused[name].gate_mass, recomputed[name].gate_mass), name
