"""The embedded decoder tiny-qwen3moe-64: stock Qwen3MoeForCausalLM, 64 experts top-8, solves the tasks by prompting;
and the small pieces of its recipe (domain splits, prompt templates, deterministic batches)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from uncurl_hf.zoo import decoder_recipe as dr
from uncurl_hf.zoo import domains, sources
from uncurl_hf.evaluation.prompts import PROMPTS, continuation_ids, get_prompt, prompt_ids
from uncurl_hf.zoo.prompts import label_logprobs
from uncurl_hf.zoo.registry import RECIPES, SHIPPED_DIR, zoo_path

NAME = "tiny-qwen3moe-64"
FOLDER = SHIPPED_DIR / NAME


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(FOLDER, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(FOLDER)


def test_registered_and_shipped():
    assert isinstance(RECIPES[NAME], dr.DecoderRecipe)
    assert zoo_path(NAME, build_if_missing=False) == FOLDER
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "zoo_manifest.json"):
        assert (FOLDER / name).is_file(), name
    assert (FOLDER / "model.safetensors").stat().st_size <= 16_000_000


def test_shipped_model_is_stock_qwen3moe_64_experts_top8(shipped):
    model, tokenizer = shipped
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert type(model).__module__.startswith("transformers.models.qwen3_moe")
    cfg = model.config
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob) == (64, 8, True)
    assert cfg.mlp_only_layers == [] and cfg.decoder_sparse_step == 1  # every layer is sparse
    for layer in model.model.layers:
        assert layer.mlp.experts.gate_up_proj.shape[0] == 64
    assert len(tokenizer) == cfg.vocab_size


def test_manifest_records_threads_and_bars():
    manifest = json.loads((FOLDER / "zoo_manifest.json").read_text())
    assert manifest["torch_num_threads"] == manifest["recipe"]["num_threads"]
    assert set(manifest["perplexity_heldout"]) == set(domains.DOMAINS)
    for r in manifest["perplexity_heldout"].values():
        assert r["model_ppl"] < 0.8 * r["bigram_ppl"]  # below the interpolated bigram on every domain
    assert len(manifest["routing_heldout"]) == 4
    for task, r in manifest["prompted_accuracy"].items():  # the bars on the whole test split
        margin = 0.05 if task == "topic" else 0.0
        assert r["split"] == "test" and r["accuracy"] >= r["tfidf_floor"] - margin, (task, r)
    for r in manifest["routing_heldout"].values():
        assert r["experts_below_0.2%"] == 0  # no dead experts in any layer
        assert r["top16_share_mean"] > 0.25  # more concentrated than uniform routing (16/64)
        assert 0.0 <= r["mutual_information_normalized"] <= 1.0


def _splits(task: str):
    return {"sentiment": sources.sentiment_splits, "topic": sources.topic_splits, "hedge": sources.hedge_splits}[task]()


@pytest.mark.parametrize("task", ["sentiment", "hedge", "topic"])
def test_prompted_accuracy_meets_the_tfidf_bar_on_the_test_split(shipped, task):
    """The bar of docs/zoo_decoder.md, recomputed on the shipped weights over the whole test split (a subset is too
    small: 120 rows move either score by several points)."""
    from uncurl_hf.zoo.baselines import tfidf_logreg_score

    model, tokenizer = shipped
    rows = _splits(task)["test"]
    labels, scores = label_logprobs(model, tokenizer, task, [t for t, _ in rows])
    accuracy = float(np.mean([labels[p] == y for p, (_, y) in zip(scores.argmax(1).tolist(), rows)]))
    floor = tfidf_logreg_score(task)
    margin = 0.05 if task == "topic" else 0.0  # the bar: topic within 5 points of TF-IDF, the others at least it
    assert accuracy > 1.0 / len(labels) + 0.1, (task, accuracy)  # well above chance in any case
    assert accuracy >= floor - margin, (task, accuracy, floor)
    recorded = json.loads((FOLDER / "zoo_manifest.json").read_text())["prompted_accuracy"][task]
    assert (round(accuracy, 4), round(floor, 4)) == (recorded["accuracy"], recorded["tfidf_floor"])


def test_balance_loss_per_layer_is_the_mean_of_each_layers_own():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    spec = dr.DecoderModelSpec(num_experts=8, top_k=2)
    g = torch.Generator().manual_seed(0)
    skewed = torch.randn(12, 8, generator=g) + torch.tensor([4.0, 4.0] + [0.0] * 6)  # a layer using experts 0, 1
    spread = torch.randn(12, 8, generator=g)
    mean = dr.balance_loss((skewed, spread), spec, per_layer=True)
    singles = [load_balancing_loss_func((x,), 8, 2) for x in (skewed, spread)]
    assert torch.allclose(mean, (singles[0] + singles[1]) / 2)
    union = dr.balance_loss((skewed, spread), spec, per_layer=False)
    assert torch.allclose(union, load_balancing_loss_func((skewed, spread), 8, 2))
    # two layers that over-use complementary experts look balanced as a union, not per layer
    left = torch.zeros(16, 8)
    left[:, :2] = 5.0
    right = left.roll(4, dims=1)
    per_layer = dr.balance_loss((left, right), spec, per_layer=True)
    assert per_layer > 1.5 * dr.balance_loss((left, right), spec, per_layer=False)
    with pytest.raises(ValueError, match="balance"):
        dr.DecoderPretrainSpec(balance="layers")


def test_domain_splits_disjoint_and_free_of_task_eval_text():
    eval_text = {t for task in ("sentiment", "topic", "hedge") for s in ("dev", "test") for t, _ in _splits(task)[s]}
    for domain in domains.DOMAINS:
        splits = domains.domain_splits(domain)
        assert splits["train"] and splits["heldout"], domain
        assert len(set(splits["train"])) == len(splits["train"]), domain  # repeated documents kept once
        assert not set(splits["train"]) & set(splits["heldout"]), domain
        assert not (set(splits["train"]) | set(splits["heldout"])) & eval_text, domain
    topic_eval = {t for s in ("dev", "test") for t, _ in _splits("topic")[s]}
    bbc_eval = {f"{h}. {b}" for _, h, b in sources.bbc_articles() if sources.topic_text(h, b) in topic_eval}
    news = set(domains.domain_splits("news")["train"]) | set(domains.domain_splits("news")["heldout"])
    assert bbc_eval and not news & bbc_eval


def test_instruction_rows_skip_heldout_domain_text():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(FOLDER)
    held = domains.heldout_news_keys()
    assert held
    train_topic = [t for t, _ in sources.topic_splits()["train"] if t not in held]
    rows = dr.instruction_rows(tokenizer)
    assert len(rows["topic"]) == len(train_topic)
    assert rows["topic"][0][0] == prompt_ids(tokenizer, "topic", train_topic[0])
    held_hedge = domains.heldout_hedge_texts()  # the train split repeats some sentences: every copy is dropped
    assert len(rows["hedge"]) == sum(t not in held_hedge for t, _ in sources.hedge_splits()["train"])


def test_prompt_templates():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(FOLDER)
    assert set(PROMPTS) == {"sentiment", "topic", "hedge"}
    assert PROMPTS["topic"].labels == ("business", "entertainment", "politics", "sports", "tech")
    assert get_prompt("sentiment").render("A fine film.", "positive") == "Review: A fine film.\nSentiment: positive"
    ids = prompt_ids(tokenizer, "sentiment", "word " * 500)
    assert ids[0] == tokenizer.eos_token_id and len(ids) <= get_prompt("sentiment").max_text_tokens + 10
    for task in PROMPTS:
        conts = continuation_ids(tokenizer, task)
        assert len({tuple(c) for c in conts.values()}) == len(conts)  # distinct continuations
    with pytest.raises(ValueError):
        get_prompt("nope")


def test_pretrain_batches_are_deterministic_and_stratified():
    spec = replace(dr.DecoderPretrainSpec(), rows=(("a", 2), ("b", 3)))
    chunks = {"a": np.arange(40).reshape(10, 4), "b": np.arange(100, 160).reshape(15, 4)}
    first = dr.pretrain_batch(chunks, spec, 7)
    assert torch.equal(first, dr.pretrain_batch(chunks, spec, 7))
    assert first.shape == (5, 4)
    assert (first[:2] < 100).all() and (first[2:] >= 100).all()  # rows per domain, in order
    assert not torch.equal(first, dr.pretrain_batch(chunks, spec, 8))
    seen = {int(r[0]) for s in range(5) for r in dr.pretrain_batch(chunks, spec, s)[:2]}
    assert len(seen) == 10  # one epoch of domain "a" visits every chunk once


def test_instruction_schedule_deterministic_and_complete():
    spec = dr.InstructSpec(epochs=2, batch_size=4, imdb_chunks_per_epoch=5)
    pools = {"sentiment": list(range(10)), "imdb": list(range(30)), "hedge": list(range(7))}
    sched = dr.instruction_schedule(pools, spec)
    assert sched == dr.instruction_schedule(pools, spec)
    per_epoch = 3 + 2 + 2  # ceil(10/4) + ceil(5/4) + ceil(7/4)
    assert len(sched) == 2 * per_epoch
    first = [i for pool, idx in sched[:per_epoch] if pool == "sentiment" for i in idx]
    assert sorted(first) == list(range(10))
    assert sum(len(idx) for pool, idx in sched[:per_epoch] if pool == "imdb") == 5
