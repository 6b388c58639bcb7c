"""The embedded default's data: real offline sources, fixed splits, honest pretraining corpus."""

from __future__ import annotations

import numpy as np
from transformers import AutoTokenizer

from uncurl_hf.evaluation.tasks import get_task
from uncurl_hf.zoo import sources
from uncurl_hf.zoo.span_corruption import corrupt, noise_mask
from uncurl_hf.zoo.tokenizer import SPECIAL_TOKENS, train_tokenizer


def test_sentiment_splits_are_fixed_disjoint_and_balanced():
    splits = sources.sentiment_splits()
    assert {k: len(v) for k, v in splits.items()} == {"train": 2800, "dev": 400, "test": 800}
    texts = {k: {t for t, _ in v} for k, v in splits.items()}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["dev"]
    labels = [label for _, label in splits["train"]]
    assert set(labels) == {"positive", "negative"}
    assert 0.45 < labels.count("positive") / len(labels) < 0.55


def test_fixed_splits_are_the_same_recomputed_or_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("UNCURL_HF_CACHE", str(tmp_path))
    sizes = {"train": 10, "dev": 5, "test": 5}
    first = sources._fixed_splits("check", list(range(20)), sizes)
    assert (tmp_path / "splits" / "check-1234.json").exists()
    assert sources._fixed_splits("check", list(range(20)), sizes) == first
    assert sorted(first["train"] + first["dev"] + first["test"]) == list(range(20))


def test_pretraining_corpus_never_contains_dev_or_test_text():
    corpus = set(sources.pretraining_corpus())
    for split in ("dev", "test"):
        assert not corpus & {t for t, _ in sources.sentiment_splits()[split]}


def test_study_tasks_have_fixed_disjoint_splits_outside_the_multi_corpus():
    """topic and hedge (the study's extra tasks): fixed sizes, every label in every split, no text shared between
    splits, and the study's multi-domain pretraining corpus holds their train text but never dev/test text."""
    multi = set(sources.pretraining_corpus("multi"))
    for name, splits, labels in (
        ("topic", sources.topic_splits(), {"business", "entertainment", "politics", "sports", "tech"}),
        ("hedge", sources.hedge_splits(), {"certain", "uncertain"}),
    ):
        task = get_task(name)
        assert set(task.labels) == labels
        sizes = {"topic": {"train": 1425, "dev": 282, "test": 455}, "hedge": {"train": 2000, "dev": 391, "test": 586}}
        assert {k: len(v) for k, v in splits.items()} == sizes[name]  # nominal sizes minus repeated texts
        texts = {k: {t for t, _ in v} for k, v in splits.items()}
        assert not texts["train"] & (texts["dev"] | texts["test"]) and not texts["dev"] & texts["test"]
        assert len(texts["dev"]) == len(splits["dev"]) and len(texts["test"]) == len(splits["test"])
        assert all({label for _, label in rows} == labels for rows in splits.values())
        assert texts["train"] <= multi and not multi & (texts["dev"] | texts["test"])
        example = task.load_split("test")[0]
        assert example.source.startswith(f"{name}: ") and example.target in labels and "&quot;" not in example.source


def test_other_offline_sources_parse():
    assert len(sources.conll_hedge_sentences()) == 3000
    bbc = sources.bbc_articles()
    assert len(bbc) == 2225
    assert {topic for topic, _, _ in bbc} == {"business", "entertainment", "politics", "sports", "tech"}


def test_task_formats_examples_text_to_text():
    task = get_task("sentiment")
    ex = task.load_split("test")[0]
    assert ex.source.startswith("sentiment: ") and ex.target in task.labels
    calib = task.calibration_examples(16, seed=3)
    assert calib == task.calibration_examples(16, seed=3) and len(calib) == 16
    train_sources = {e.source for e in task.load_split("train")}
    assert all(e.source in train_sources for e in calib)


def test_noise_mask_density_and_spans():
    rng = np.random.default_rng(0)
    masks = [noise_mask(rng, 112) for _ in range(50)]
    density = np.mean([m.mean() for m in masks])
    assert 0.13 < density < 0.17
    spans = [np.sum(np.diff(m.astype(int)) == 1) + int(m[0]) for m in masks]
    assert 4 <= np.mean(spans) <= 7


def test_span_corruption_is_invertible():
    tokens = np.arange(100, 160)
    sentinels = list(range(10, 42))
    inputs, targets = corrupt(tokens, np.random.default_rng(1), sentinels, eos_id=1)
    assert inputs[-1] == 1 and targets[-1] == 1
    # put every hidden span back in place of its sentinel: the original sequence comes back
    spans: dict[int, list[int]] = {}
    current = None
    for tok in targets[:-1]:
        if tok in sentinels:
            current = tok
            spans[current] = []
        else:
            spans[current].append(tok)
    rebuilt = [t for tok in inputs[:-1] for t in (spans[tok] if tok in sentinels else [tok])]
    assert rebuilt == tokens.tolist()


def test_tokenizer_trains_saves_and_loads_with_auto(tmp_path):
    corpus = ["the movie was great", "the movie was awful", "a dull , lifeless film"] * 50
    tok = train_tokenizer(corpus, vocab_size=400)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    ids = loaded("The movie was GREAT").input_ids
    assert ids[-1] == loaded.eos_token_id == 1 and loaded.pad_token_id == 0
    assert loaded.decode(ids, skip_special_tokens=True).strip() == "the movie was great"
    assert loaded.convert_tokens_to_ids(SPECIAL_TOKENS[3]) == 3
