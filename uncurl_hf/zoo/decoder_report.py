"""Measured bars of the embedded decoder (``tiny-qwen3moe-64``), reusable so the documented numbers regenerate.

- **Perplexity per domain** on held-out documents (never trained on), cut into the pretraining's 128-token
  windows: the model predicts tokens 2..128 of each window; an interpolated bigram (absolute discounting,
  d = 0.75, backing off to an add-one unigram) fitted on the same train-side token streams the model was
  pretrained on predicts exactly the same tokens from the previous one.
- **Prompted accuracy** on the tasks' test splits (:mod:`uncurl_hf.zoo.prompts`: the label continuation with the
  highest log-likelihood), beside the TF-IDF + logistic-regression floor of :mod:`uncurl_hf.zoo.baselines`.
- **Routing** on the held-out windows of every domain, counted as integer top-k selections per (domain, expert):
  the least-used expert's share of all selections per layer (dead-expert bar: >= 0.2%; uniform is 1/64 = 1.56%),
  the share of a domain's selections held by its 16 most-used experts (uniform: 25%), and the mutual information
  between domain and expert (domains weighted equally; at most log2(6) = 2.58 bits).

``python -m uncurl_hf.zoo.decoder_report FOLDER`` prints the report as json.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uncurl_hf.zoo import domains, sources
from uncurl_hf.zoo.prompts import prompted_accuracy

CHUNK_TOKENS = 128
MAX_WINDOWS = 64  # per domain: 8192 held-out tokens at most
TOP_EXPERTS = 16
TASK_SPLITS = {"sentiment": sources.sentiment_splits, "topic": sources.topic_splits, "hedge": sources.hedge_splits}


def heldout_windows(tokenizer, domain: str, max_windows: int = MAX_WINDOWS) -> np.ndarray:
    from uncurl_hf.zoo.decoder_recipe import domain_chunks

    return domain_chunks(tokenizer, domain, "heldout", CHUNK_TOKENS)[:max_windows]


class BigramLM:
    """Interpolated absolute-discounting bigram over token ids (Ney et al. 1994), add-one unigram below it."""

    def __init__(self, vocab_size: int, discount: float = 0.75):
        self.vocab_size, self.discount = vocab_size, discount
        self.pair = np.zeros((vocab_size, vocab_size), dtype=np.float64)

    def fit(self, rows: np.ndarray) -> "BigramLM":
        rows = np.asarray(rows)
        np.add.at(self.pair, (rows[:, :-1].ravel(), rows[:, 1:].ravel()), 1.0)
        uni = np.bincount(rows.ravel(), minlength=self.vocab_size).astype(np.float64) + 1.0
        self.unigram = uni / uni.sum()
        self.context = self.pair.sum(1)
        self.types = (self.pair > 0).sum(1)
        return self

    def logprob(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        c = self.context[prev]
        seen = np.maximum(self.pair[prev, nxt] - self.discount, 0.0) / np.maximum(c, 1.0)
        backoff = np.where(c > 0, self.discount * self.types[prev] / np.maximum(c, 1.0), 1.0)
        return np.log(seen + backoff * self.unigram[nxt])

    def nll(self, windows: np.ndarray) -> float:
        """Mean negative log-likelihood (nats) of tokens 2..T of each window."""
        return float(-self.logprob(windows[:, :-1].ravel(), windows[:, 1:].ravel()).mean())


@torch.no_grad()
def model_nll(model, windows: np.ndarray, batch_size: int = 32) -> float:
    """Mean negative log-likelihood (nats) of tokens 2..T of each window under the model."""
    total, count = 0.0, 0
    model.eval()
    for start in range(0, len(windows), batch_size):
        ids = torch.from_numpy(windows[start : start + batch_size])
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)
        total += float(-logp.gather(-1, ids[:, 1:, None]).sum())
        count += ids[:, 1:].numel()
    return total / count


@torch.no_grad()
def routing_counts(model, windows_by_domain: dict[str, np.ndarray], batch_size: int = 32) -> np.ndarray:
    """Integer top-k selections, ``[layer, domain, expert]``, over the given windows (no padding)."""
    layers = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    num_experts = model.config.num_experts
    counts = np.zeros((len(layers), len(windows_by_domain), num_experts), dtype=np.int64)
    current = {"d": 0}

    def hook(index):
        def fn(_module, _inputs, output):
            counts[index, current["d"]] += np.bincount(output[2].reshape(-1).numpy(), minlength=num_experts)

        return fn

    handles = [mlp.gate.register_forward_hook(hook(i)) for i, mlp in enumerate(layers)]
    model.eval()
    try:
        for d, windows in enumerate(windows_by_domain.values()):
            current["d"] = d
            for start in range(0, len(windows), batch_size):
                model(input_ids=torch.from_numpy(windows[start : start + batch_size]))
    finally:
        for h in handles:
            h.remove()
    return counts


def specialization(counts: np.ndarray, domain_names: list[str], top: int = TOP_EXPERTS) -> dict[str, Any]:
    """Per layer: least-used expert share, per-domain top-``top`` share, MI(domain; expert) in bits."""
    out = {}
    for layer, c in enumerate(counts.astype(np.float64)):
        share = c.sum(0) / c.sum()
        per_domain = c / c.sum(1, keepdims=True)
        top_share = {d: float(np.sort(p)[::-1][:top].sum()) for d, p in zip(domain_names, per_domain)}
        joint = per_domain / len(domain_names)  # domains weighted equally
        pe = joint.sum(0, keepdims=True)
        ratio = np.divide(joint, pe / len(domain_names), out=np.ones_like(joint), where=joint > 0)
        mi = float((joint * np.log2(ratio)).sum())
        out[f"model.layers.{layer}.mlp"] = {
            "min_expert_share": round(float(share.min()), 5),
            "max_expert_share": round(float(share.max()), 5),
            "experts_below_0.2%": int((share < 0.002).sum()),
            "top16_share": {d: round(v, 4) for d, v in top_share.items()},
            "top16_share_mean": round(float(np.mean(list(top_share.values()))), 4),
            "mutual_information_bits": round(mi, 4),
            "mutual_information_normalized": round(mi / math.log2(len(domain_names)), 4),
        }
    return out


def tfidf_floor(task: str, split: str = "test") -> float:
    """:func:`uncurl_hf.zoo.baselines.tfidf_logreg_score` (same inputs: ``"<task>: " + text``), computed from
    :mod:`uncurl_hf.zoo.sources` directly so it does not depend on where the task registry lives."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    splits = TASK_SPLITS[task]()
    train, evalset = splits["train"], splits[split]
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    x_train = vec.fit_transform([f"{task}: {t}" for t, _ in train])
    clf = LogisticRegression(C=3.0, max_iter=2000).fit(x_train, [y for _, y in train])
    return float(clf.score(vec.transform([f"{task}: {t}" for t, _ in evalset]), [y for _, y in evalset]))


def perplexity_report(model, tokenizer, max_windows: int = MAX_WINDOWS) -> tuple[dict, dict[str, np.ndarray]]:
    from uncurl_hf.zoo.decoder_recipe import domain_chunks

    train = np.concatenate([domain_chunks(tokenizer, d, "train", CHUNK_TOKENS) for d in domains.DOMAINS])
    bigram = BigramLM(len(tokenizer)).fit(train)
    windows = {d: heldout_windows(tokenizer, d, max_windows) for d in domains.DOMAINS}
    out = {}
    for d, w in windows.items():
        m, b = model_nll(model, w), bigram.nll(w)
        out[d] = {"tokens": int(w[:, 1:].size), "model_ppl": round(math.exp(m), 2), "bigram_ppl": round(math.exp(b), 2),
                  "ratio": round(math.exp(m - b), 3)}
    return out, windows


def decoder_report(folder: str | Path, split: str = "test", num_threads: int | None = 2) -> dict[str, Any]:
    """Every bar of ``docs/zoo_decoder.md`` for the model in ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if num_threads:
        torch.set_num_threads(num_threads)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ppl, windows = perplexity_report(model, tokenizer)
    tasks = {}
    for task, splits in TASK_SPLITS.items():
        rows = splits()[split]
        tasks[task] = {"split": split, "examples": len(rows), "accuracy": round(prompted_accuracy(model, tokenizer, task, rows), 4),
                       "tfidf_floor": round(tfidf_floor(task, split), 4)}
    counts = routing_counts(model, windows)
    return {
        "perplexity_heldout": ppl,
        "prompted_accuracy": tasks,
        "routing_heldout": specialization(counts, list(windows)),
        "routing_counts": counts.tolist(),
    }


def markdown_tables(report: dict[str, Any]) -> str:
    """The report as the markdown tables of ``docs/zoo_decoder.md``."""
    lines = ["| domain | held-out tokens | model ppl | bigram ppl | ratio |", "|---|---|---|---|---|"]
    for d, r in report["perplexity_heldout"].items():
        lines.append(f"| {d} | {r['tokens']} | {r['model_ppl']} | {r['bigram_ppl']} | {r['ratio']} |")
    lines += ["", "| task (test) | examples | prompted accuracy | TF-IDF floor |", "|---|---|---|---|"]
    for t, r in report["prompted_accuracy"].items():
        lines.append(f"| {t} | {r['examples']} | {100 * r['accuracy']:.2f}% | {100 * r['tfidf_floor']:.2f}% |")
    lines += ["", "| layer | least-used expert | experts < 0.2% | top-16 share (mean over domains) | MI (bits) | MI / log2(6) |",
              "|---|---|---|---|---|---|"]
    for name, r in report["routing_heldout"].items():
        lines.append(f"| `{name}` | {100 * r['min_expert_share']:.2f}% | {r['experts_below_0.2%']} | "
                     f"{100 * r['top16_share_mean']:.1f}% | {r['mutual_information_bits']:.3f} | "
                     f"{r['mutual_information_normalized']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    rep = decoder_report(sys.argv[1])
    rep.pop("routing_counts")
    print(json.dumps(rep, indent=2))
    print(markdown_tables(rep))
