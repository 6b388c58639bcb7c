"""Recipes of the tiny Switch SMoE zoo: tokenizer -> span-corruption pretraining -> task fine-tuning.

Why these choices (measured, see README "The embedded model"):
- the router load-balancing loss (coef 0.01) is on in both stages: without it the routers collapse onto
  one or two experts and there is nothing left to prune;
- router jitter is off and expert capacity is large enough never to drop a token, so a model's routing is
  a deterministic function of its input (pruning statistics then describe what inference really does);
- Adafactor with parameter-scaled updates (T5's and Switch's optimizer): T5-style init draws embeddings
  with std 1.0, and AdamW's absolute steps of ~lr leave them almost frozen, so a tiny model trained with
  AdamW sat on the unigram plateau (span loss ~5.2, sentiment at chance) where Adafactor learns;
- pretraining is a T5-style multi-task mixture: span corruption on the review corpus plus, in a quarter of
  every batch, document-level polarity of 112-token chunks of the IMDb reviews (``review: ...`` ->
  positive/negative). That is a different data set from the task (rotten-tomatoes sentences) and never
  touches the task's dev/test text, but it teaches the encoder the sentiment-bearing words: with span
  corruption alone, 500-1000 CPU steps left sentiment fine-tuning at 56-58% dev accuracy;
- the learning rates are high (1e-2, relative to each parameter's RMS): at 1e-3 neither the review
  polarity stage nor sentiment fine-tuning left chance level within this budget;
- fine-tuning keeps the best dev-accuracy epoch.
Every stage is seeded and runs with the recipe's pinned thread count and deterministic algorithms
(:mod:`uncurl_hf.zoo.runtime`: seeds alone do not fix the bytes); checkpoints let an interrupted pretraining resume.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

from uncurl_hf.zoo import sources
from uncurl_hf.zoo.runtime import pinned_stage, runtime_record
from uncurl_hf.zoo.span_corruption import corrupt
from uncurl_hf.zoo.tokenizer import NUM_SENTINELS, train_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a zoo model. Same d_model/d_ff per expert across the zoo: same active params per token."""

    vocab_size: int = 4096
    d_model: int = 128
    d_kv: int = 32
    num_heads: int = 4
    d_ff: int = 256
    num_layers: int = 4
    num_sparse_encoder_layers: int = 2
    num_decoder_layers: int = 2
    num_sparse_decoder_layers: int = 1
    num_experts: int = 8
    expert_capacity: int = 1024
    embedding_init: str = "ppmi-svd"  # or "random" (T5's std-1.0 normal init)

    def config(self, dropout: float) -> SwitchTransformersConfig:
        return SwitchTransformersConfig(
            vocab_size=self.vocab_size,
            d_model=self.d_model,
            d_kv=self.d_kv,
            num_heads=self.num_heads,
            d_ff=self.d_ff,
            num_layers=self.num_layers,
            num_sparse_encoder_layers=self.num_sparse_encoder_layers,
            num_decoder_layers=self.num_decoder_layers,
            num_sparse_decoder_layers=self.num_sparse_decoder_layers,
            num_experts=self.num_experts,
            expert_capacity=self.expert_capacity,
            router_jitter_noise=0.0,
            router_aux_loss_coef=0.01,
            router_z_loss_coef=0.001,
            dropout_rate=dropout,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
            tie_word_embeddings=True,
        )


@dataclass(frozen=True)
class PretrainSpec:
    steps: int = 800
    batch_size: int = 32
    chunk_tokens: int = 112
    lr: float = 5e-3
    warmup: int = 100
    dropout: float = 0.0
    seed: int = 0
    checkpoint_every: int = 250
    polarity_rows: int = 8  # rows of each batch given to the IMDb review-polarity task (rest: span corruption)
    corpus: str = "reviews"  # sources.pretraining_corpus(name): "reviews" (tiny-switch-8) or "multi" (the study zoo)


@dataclass(frozen=True)
class IntermediateSpec:
    """Stage 2: review polarity on IMDb review chunks (a different data set from every task's eval data)."""

    steps: int = 400
    batch_size: int = 32
    chunk_tokens: int = 112
    lr: float = 1e-2
    warmup: int = 50
    dropout: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class FinetuneSpec:
    task: str = "sentiment"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-2
    warmup: int = 50
    dropout: float = 0.1
    seed: int = 0
    train_limit: int | None = None  # first N training examples only (tests and quick checks)


@dataclass(frozen=True)
class ZooRecipe:
    """A named zoo model. Recipes with the same ``pretrain_key`` share one pretraining run (its work folder),
    so fine-tuning one pretrained SMoE on several tasks pays for pretraining once."""

    name: str
    model: ModelSpec = field(default_factory=ModelSpec)
    pretrain: PretrainSpec = field(default_factory=PretrainSpec)
    intermediate: IntermediateSpec | None = field(default_factory=IntermediateSpec)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    pretrain_key: str | None = None
    num_threads: int = 1  # torch + BLAS threads of every stage, whatever the caller uses: the study zoo's setting
    deterministic_algorithms: bool = True

    @property
    def work_name(self) -> str:
        """Name of the work folder holding the tokenizer and the (resumable) pretraining of this recipe."""
        return self.pretrain_key or self.name

    def to_dict(self) -> dict:
        return asdict(self)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup then cosine decay to 10% of peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adafactor with updates scaled by each parameter's RMS (see module docstring for why not AdamW)."""
    from transformers.optimization import Adafactor

    return Adafactor(model.parameters(), lr=lr, scale_parameter=True, relative_step=False, warmup_init=False)


def train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], lr: float
) -> Any:
    """One optimizer step at ``lr`` on ``batch``, with the router z-loss and load-balancing loss on."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    out = model(**batch, output_router_logits=True)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out


def pad_batch(seqs: list[list[int]], pad: int, label_pad: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad if label_pad is None else label_pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def corpus_chunks(tokenizer: PreTrainedTokenizerBase, chunk_tokens: int, corpus: str = "reviews") -> np.ndarray:
    """Tokenize the pretraining corpus once and cut the token stream into fixed-length chunks."""
    stream: list[int] = []
    for doc in sources.pretraining_corpus(corpus):
        stream.extend(tokenizer(doc, add_special_tokens=False).input_ids)
    usable = len(stream) // chunk_tokens * chunk_tokens
    return np.asarray(stream[:usable], dtype=np.int64).reshape(-1, chunk_tokens)


def polarity_pairs(tokenizer: PreTrainedTokenizerBase, chunk_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, target ids) for ``review: <chunk>`` -> ``positive``/``negative`` over IMDb review chunks."""
    prefix = tokenizer("review:", add_special_tokens=False).input_ids
    targets = {label: tokenizer(label).input_ids for label in ("positive", "negative")}
    pairs = []
    for text, label in sources.pang_lee_reviews_labeled():
        ids = tokenizer(text, add_special_tokens=False).input_ids
        for start in range(0, len(ids), chunk_tokens):
            chunk = ids[start : start + chunk_tokens]
            if len(chunk) >= 16:
                pairs.append((prefix + chunk + [tokenizer.eos_token_id], targets[label]))
    return pairs


def pretrain_batches(
    chunks: np.ndarray,
    spec: PretrainSpec,
    sentinel_ids: list[int],
    eos_id: int,
    start_step: int = 0,
    polarity: list[tuple[list[int], list[int]]] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Deterministic stream of mixed batches; batch ``s`` depends only on (seed, s)."""
    n_polarity = spec.polarity_rows if polarity else 0
    n_span = spec.batch_size - n_polarity
    if n_span < 1:
        raise ValueError(f"polarity_rows ({n_polarity}) must leave room for span corruption in the batch")
    steps_per_epoch = len(chunks) // n_span
    for step in range(start_step, spec.steps):
        epoch, offset = divmod(step, steps_per_epoch)
        order = np.random.default_rng(spec.seed * 1000 + epoch).permutation(len(chunks))
        rows = order[offset * n_span : (offset + 1) * n_span]
        rng = np.random.default_rng([spec.seed, step])
        pairs = [corrupt(chunks[r], rng, sentinel_ids, eos_id) for r in rows]
        if n_polarity:
            pairs.extend(polarity[i] for i in rng.choice(len(polarity), size=n_polarity, replace=False))
        input_ids, attention_mask = pad_batch([p[0] for p in pairs], pad=0)
        labels, _ = pad_batch([p[1] for p in pairs], pad=0, label_pad=-100)
        yield {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _save_training_state(path: Path, model, optimizer, step: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "step": step}, tmp / "trainer_state.pt")
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)


@pinned_stage
def pretrain(recipe: ZooRecipe, workdir: Path, progress: bool = True) -> Path:
    """Span-corruption pretraining; resumes from ``workdir/pretrain-ckpt`` if present. Returns model dir."""
    spec = recipe.pretrain
    workdir.mkdir(parents=True, exist_ok=True)
    tok_dir = workdir / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        logger.info("training the %d-token tokenizer of %s", recipe.model.vocab_size, recipe.name)
        tokenizer = train_tokenizer(sources.pretraining_corpus(spec.corpus), recipe.model.vocab_size)
        tokenizer.save_pretrained(tok_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    out = workdir / "pretrained"
    if (out / "config.json").exists():
        return out
    seed_everything(spec.seed)
    ckpt = workdir / "pretrain-ckpt"
    start = 0
    if (ckpt / "trainer_state.pt").exists():
        model = SwitchTransformersForConditionalGeneration.from_pretrained(ckpt)
        state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        optimizer = make_optimizer(model, spec.lr)
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        logger.info("resuming pretraining at step %d", start)
    else:
        model = SwitchTransformersForConditionalGeneration(recipe.model.config(spec.dropout))
        if recipe.model.embedding_init == "ppmi-svd":
            from uncurl_hf.zoo.embeddings import ppmi_svd_embeddings

            corpus = sources.pretraining_corpus(spec.corpus)
            logger.info("initialising the embeddings of %s from PPMI + SVD of the corpus", recipe.name)
            vectors = ppmi_svd_embeddings(tokenizer, corpus, recipe.model.d_model, seed=spec.seed)
            with torch.no_grad():
                model.shared.weight.copy_(torch.from_numpy(vectors))
        optimizer = make_optimizer(model, spec.lr)
    model.train()
    chunks = corpus_chunks(tokenizer, spec.chunk_tokens, spec.corpus)
    polarity = polarity_pairs(tokenizer, spec.chunk_tokens) if spec.polarity_rows else None
    sentinels = tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(NUM_SENTINELS)])
    log = workdir / "pretrain_log.jsonl"
    bar = tqdm(total=spec.steps, initial=start, desc=f"pretrain {recipe.name}", disable=not progress)
    t0 = time.time()
    batches = pretrain_batches(chunks, spec, sentinels, tokenizer.eos_token_id, start, polarity)
    for step, batch in enumerate(batches, start):
        out_ = train_step(model, optimizer, batch, lr_at(step, spec.steps, spec.warmup, spec.lr))
        bar.update(1)
        if step % 25 == 0:
            rec = {
                "step": step,
                "loss": float(out_.loss.detach()),
                "aux": float((out_.encoder_aux_loss + out_.decoder_aux_loss).detach()),
                "elapsed_s": round(time.time() - t0, 1),
            }
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            with log.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
        if (step + 1) % spec.checkpoint_every == 0 and step + 1 < spec.steps:
            _save_training_state(ckpt, model, optimizer, step + 1)
    bar.close()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pinned_stage
def intermediate(recipe: ZooRecipe, pretrained: Path, workdir: Path, progress: bool = True) -> Path:
    """Stage 2: train on IMDb review-chunk polarity (``review: ...`` -> positive/negative).

    In the pretraining mixture the polarity rows carry ~1% of the token-averaged loss (3 target tokens
    against ~24 per span-corruption row), too little to learn from; here they get the whole batch.
    Returns the stage's model folder (reused when it exists).
    """
    spec = recipe.intermediate
    out = workdir / "intermediate"
    if spec is None:
        return pretrained
    if (out / "config.json").exists():
        return out
    from transformers import AutoTokenizer

    seed_everything(spec.seed)
    tokenizer = AutoTokenizer.from_pretrained(pretrained)
    model = SwitchTransformersForConditionalGeneration.from_pretrained(pretrained, dropout_rate=spec.dropout)
    pairs = polarity_pairs(tokenizer, spec.chunk_tokens)
    optimizer = make_optimizer(model, spec.lr)
    model.train()
    log = workdir / "intermediate_log.jsonl"
    for step in tqdm(range(spec.steps), desc=f"review polarity {recipe.name}", disable=not progress):
        rng = np.random.default_rng([spec.seed, step])
        rows = [pairs[i] for i in rng.choice(len(pairs), size=spec.batch_size, replace=False)]
        input_ids, attention_mask = pad_batch([r[0] for r in rows], pad=0)
        labels, _ = pad_batch([r[1] for r in rows], pad=0, label_pad=-100)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        loss = train_step(model, optimizer, batch, lr_at(step, spec.steps, spec.warmup, spec.lr)).loss
        if step % 25 == 0:
            with log.open("a") as fh:
                fh.write(json.dumps({"step": step, "loss": float(loss.detach())}) + "\n")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def task_batches(
    tokenizer: PreTrainedTokenizerBase, examples: list, batch_size: int, rng: random.Random, max_length: int = 128
) -> Iterator[dict[str, torch.Tensor]]:
    """One shuffled epoch of text-to-text batches (labels padded with -100)."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        enc = tokenizer([e.source for e in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        labels = tokenizer([e.target for e in chunk], padding=True, return_tensors="pt").input_ids
        labels[labels == tokenizer.pad_token_id] = -100
        yield {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}


@pinned_stage
def finetune(recipe: ZooRecipe, pretrained: Path, out: Path, progress: bool = True) -> dict:
    """Fine-tune text-to-text on the recipe's task; keep the best dev-accuracy epoch. Returns its record, with the
    runtime the build was pinned to (``runtime``: threads, determinism, torch version, CPU capability)."""
    from transformers import AutoTokenizer

    from uncurl_hf.evaluation.scoring import task_score
    from uncurl_hf.evaluation.tasks import get_task

    spec = recipe.finetune
    seed_everything(spec.seed)
    task = get_task(spec.task)
    tokenizer = AutoTokenizer.from_pretrained(pretrained)
    model = SwitchTransformersForConditionalGeneration.from_pretrained(pretrained, dropout_rate=spec.dropout)
    train, dev = task.load_split("train")[: spec.train_limit], task.load_split("dev")
    steps_per_epoch = math.ceil(len(train) / spec.batch_size)
    total = steps_per_epoch * spec.epochs
    optimizer = make_optimizer(model, spec.lr)
    rng = random.Random(spec.seed)
    best: dict = {"dev": -1.0}
    history = []
    step = 0
    bar = tqdm(total=total, desc=f"finetune {recipe.name} on {task.name}", disable=not progress)
    for epoch in range(spec.epochs):
        model.train()
        for batch in task_batches(tokenizer, train, spec.batch_size, rng):
            loss = train_step(model, optimizer, batch, lr_at(step, total, spec.warmup, spec.lr)).loss
            step += 1
            bar.update(1)
        dev_acc = task_score(model, tokenizer, task, dev)
        history.append({"epoch": epoch + 1, "dev": dev_acc, "loss": float(loss.detach())})
        bar.set_postfix(dev=f"{dev_acc:.3f}")
        logger.info("epoch %d dev %s %.4f", epoch + 1, task.metric, dev_acc)
        if dev_acc > best["dev"]:
            best = {"dev": dev_acc, "epoch": epoch + 1}
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
    bar.close()
    best["history"] = history
    best["runtime"] = runtime_record(recipe)
    return best
